//! End-to-end tests of `dsr train` / `predict` / `test` on a subset of the shipped demo data, and
//! of interrupted training: `kill -9` at arbitrary moments, then `--resume`, must end with the
//! same model and the same loss curve as an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dsr_core::weights::load_checkpoint;
use dsr_train::session::RunConfig;

mod common;
use common::{dsr, s};

fn demo_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/battery_weld")
}

/// The first `n` files (sorted) of `from` copied into `to`.
fn copy_first(from: &Path, to: &Path, n: usize) -> Vec<String> {
    std::fs::create_dir_all(to).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    names.sort();
    names.truncate(n);
    for name in &names {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    names
}

/// A small MVTec-layout copy of the demo data: 4 training, 2 good and 3 defective test images.
fn small_dataset(root: &Path) {
    let src = demo_data();
    copy_first(&src.join("train/good"), &root.join("train/good"), 4);
    copy_first(&src.join("test/good"), &root.join("test/good"), 2);
    let defects = copy_first(&src.join("test/defective"), &root.join("test/defective"), 3);
    let gt = root.join("ground_truth/defective");
    std::fs::create_dir_all(&gt).unwrap();
    for name in defects {
        let mask = name.replace(".png", "_mask.png");
        std::fs::copy(
            src.join("ground_truth/defective").join(&mask),
            gt.join(&mask),
        )
        .unwrap();
    }
}

/// The flags of a tiny seeded run.
fn tiny_run_args<'a>(data: &'a str, results: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--preset",
        "tiny",
        "--image-size",
        "64,64",
        "--pretrain-steps",
        "4",
        "--set",
        "pretrain.batch_size=2",
        "--batch",
        "2",
        "--phase2-steps",
        "8",
        "--phase3-steps",
        "4",
        "--checkpoint-every",
        "3",
        "--seed",
        "5",
        "--results",
        results,
    ]
}

/// The run folders `<results>/dsr/<dataset>/<category>/vN`.
fn run_dirs(results: &Path) -> Vec<PathBuf> {
    let list = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    let mut found = Vec::new();
    for dataset in list(&results.join("dsr")) {
        for category in list(&dataset) {
            found.extend(list(&category));
        }
    }
    found
}

fn only_run_dir(results: &Path) -> PathBuf {
    let mut found = run_dirs(results);
    assert_eq!(found.len(), 1, "{found:?}");
    found.pop().unwrap()
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn in_unit_range(m: &serde_json::Value) {
    for key in [
        "image_auroc",
        "image_ap",
        "pixel_auroc",
        "pixel_ap",
        "pixel_aupro",
    ] {
        let v = m[key].as_f64().unwrap_or_else(|| panic!("{key} missing"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
}

/// Without --vq-weights, --pretrain or cached official weights, the small preset starts from
/// the general codebook compiled into the binary: no phase 1 runs, the run configuration and
/// the model file say where the discrete model came from, and the model's discrete part holds
/// the shipped codebook's values. Widths without a shipped codebook get one clear error.
#[test]
fn the_small_preset_starts_from_the_shipped_general_codebook() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("weld");
    small_dataset(&data);
    let results = dir.path().join("results");
    let out = dsr(&[
        "train",
        "--data",
        s(&data),
        "--preset",
        "small",
        "--image-size",
        "64,64",
        "--batch",
        "2",
        "--phase2-steps",
        "2",
        "--phase3-steps",
        "0",
        "--results",
        s(&results),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("discrete model: the shipped general codebook"),
        "{stdout}"
    );
    let run = only_run_dir(&results);
    let cfg = RunConfig::from_toml_file(&run.join("config.toml")).unwrap();
    assert!(cfg.vq.general && !cfg.vq.pretrain && cfg.vq.weights.is_none());
    assert!(!run.join("weights/vq.safetensors").exists());
    let phases: Vec<String> = jsonl(&run.join("metrics.jsonl"))
        .iter()
        .map(|l| l["phase"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(phases, ["phase2", "phase2"]);
    let model = load_checkpoint(&run.join("weights/model.safetensors")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&model.metadata["dsr.run"]).unwrap();
    assert!(meta["discrete_model"]
        .as_str()
        .unwrap()
        .contains("general codebook"));
    // The frozen discrete model is the shipped one, value for value.
    let shipped = dsr_train::codebook::GeneralCodebook::GeneralSmall
        .checkpoint()
        .unwrap();
    for (key, want) in &shipped.tensors {
        let got = &model.tensors[key];
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{key}");
    }

    // The mid widths have no shipped codebook: the error says what to do, before any step.
    let out = dsr(&[
        "train",
        "--data",
        s(&data),
        "--preset",
        "mid",
        "--results",
        s(&results),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--pretrain") && err.contains("--vq-weights"),
        "{err}"
    );
}

#[test]
fn train_then_predict_then_test() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("weld");
    small_dataset(&data);
    let results = dir.path().join("results");
    let out = dsr(&tiny_run_args(s(&data), s(&results)));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let run = only_run_dir(&results);
    assert!(run.ends_with("weld/v0"), "{}", run.display());

    // The resolved configuration parses back and holds the flags.
    let cfg = RunConfig::from_toml_file(&run.join("config.toml")).unwrap();
    assert_eq!(cfg.train.batch_size, 2);
    assert_eq!(cfg.train.seed, 5);
    assert_eq!(cfg.train.image_size, [64, 64]);
    assert!(cfg.vq.pretrain);

    // One log line per step of every phase, in order, with finite losses.
    let lines = jsonl(&run.join("metrics.jsonl"));
    let phases: Vec<&str> = lines.iter().map(|l| l["phase"].as_str().unwrap()).collect();
    assert_eq!(phases.iter().filter(|p| **p == "phase1").count(), 4);
    assert_eq!(
        phases.iter().filter(|p| **p == "phase2").count(),
        8,
        "{phases:?}"
    );
    assert_eq!(
        phases.iter().filter(|p| **p == "phase3").count(),
        4,
        "{phases:?}"
    );
    for l in &lines[4..] {
        assert!(l["losses"]["loss"].as_f64().unwrap().is_finite());
    }

    // Weights: phase 1, the resumable checkpoint and the final model with its thresholds.
    for f in ["vq", "last", "model"] {
        assert!(
            run.join(format!("weights/{f}.safetensors")).is_file(),
            "{f}"
        );
    }
    let model = run.join("weights/model.safetensors");
    let ckpt = load_checkpoint(&model).unwrap();
    assert!(ckpt.metadata.contains_key("dsr.postprocess"));
    assert_eq!(ckpt.image_size, Some([64, 64]));

    // The test at the end of training.
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    in_unit_range(&metrics["overall"]);
    assert_eq!(metrics["num_images"], 5);
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("data:image/png;base64,"));

    // predict on the test folders with the trained model.
    let pred = dir.path().join("pred");
    let out = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&data.join("test/defective")),
        s(&data.join("test/good")),
        "--out",
        s(&pred),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pred.join("predictions.json")).unwrap())
            .unwrap();
    let rows = table["predictions"]
        .as_array()
        .expect("predictions.json lists the predictions");
    for row in rows {
        let score = row["normalized_score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{row}");
    }
    assert_eq!(rows.len(), 5);
    let csv = std::fs::read_to_string(pred.join("predictions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6, "{csv}");
    for entry in std::fs::read_dir(&pred).unwrap() {
        let p = entry.unwrap().path();
        match p.extension().and_then(|e| e.to_str()) {
            Some("png") => {
                image::open(&p).unwrap();
            }
            Some("npy") => {
                let bytes = std::fs::read(&p).unwrap();
                assert_eq!(&bytes[..6], b"\x93NUMPY");
                let header = String::from_utf8_lossy(&bytes[10..128]);
                assert!(header.contains("'shape': (64, 64)"), "{header}");
                assert_eq!(bytes.len() % 16, 0);
            }
            _ => {}
        }
    }

    // test again on the whole folder: the same numbers as at the end of training.
    let test_out = dir.path().join("test");
    let out = dsr(&[
        "test",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&test_out),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(test_out.join("metrics.json")).unwrap())
            .unwrap();
    assert_eq!(again["overall"], metrics["overall"]);
}

/// The losses of every phase-2/3 step of a run, by step.
fn losses(run: &Path) -> Vec<(u64, String, f64)> {
    jsonl(&run.join("metrics.jsonl"))
        .into_iter()
        .filter(|l| l["phase"] != "phase1")
        .map(|l| {
            (
                l["step"].as_u64().unwrap(),
                l["phase"].as_str().unwrap().to_string(),
                l["losses"]["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn training_killed_at_arbitrary_moments_resumes_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("weld");
    small_dataset(&data);

    // The uninterrupted reference run.
    let results_a = dir.path().join("a");
    let mut args = tiny_run_args(s(&data), s(&results_a));
    args.push("--no-test");
    let out = dsr(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_a = only_run_dir(&results_a);

    // The same run, killed with SIGKILL after a growing number of log lines each time.
    let results_b = dir.path().join("b");
    let mut args = tiny_run_args(s(&data), s(&results_b));
    args.push("--no-test");
    let mut kills = 0;
    let mut attempt = 0;
    let mut run_b: Option<PathBuf> = None;
    loop {
        attempt += 1;
        assert!(attempt < 40, "the run did not finish");
        // Every other resume recomputes the convolutions in the backward (`--recompute`): the
        // run must still match the uninterrupted one to the bit.
        let owned: Vec<String> = match &run_b {
            None => args.iter().map(|a| a.to_string()).collect(),
            Some(r) => {
                let mut v: Vec<String> = vec![
                    "train".into(),
                    "--resume".into(),
                    r.display().to_string(),
                    "--no-test".into(),
                ];
                if attempt % 2 == 0 {
                    v.push("--recompute".into());
                }
                v
            }
        };
        let mut child = Command::new(common::dsr_exe())
            .args(&owned)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Kill once the log has grown by `attempt` lines (or the run ends first).
        let log_len = |r: &Option<PathBuf>| {
            r.as_ref()
                .and_then(|r| std::fs::read_to_string(r.join("metrics.jsonl")).ok())
                .map(|t| t.lines().count())
                .unwrap_or(0)
        };
        let before = log_len(&run_b);
        let started = Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert!(status.success(), "{err}");
                break true;
            }
            if run_b.is_none() {
                run_b = run_dirs(&results_b)
                    .into_iter()
                    .find(|r| r.join("config.toml").is_file());
            }
            if run_b.is_some() && log_len(&run_b) >= before + 1 + attempt % 3 {
                child.kill().unwrap(); // SIGKILL on Unix
                child.wait().unwrap();
                kills += 1;
                break false;
            }
            assert!(started.elapsed() < Duration::from_secs(300));
            std::thread::sleep(Duration::from_millis(5));
        };
        if finished {
            break;
        }
    }
    assert!(kills >= 3, "only {kills} kills happened");
    let run_b = run_b.unwrap();

    // Same loss curve (every step once, equal values) and the same final weights.
    let (la, lb) = (losses(&run_a), losses(&run_b));
    assert_eq!(la.len(), 12);
    assert_eq!(
        lb.iter().map(|l| l.0).collect::<Vec<_>>(),
        (0..12).collect::<Vec<_>>()
    );
    for (a, b) in la.iter().zip(&lb) {
        assert_eq!(a.1, b.1);
        assert!(
            (a.2 - b.2).abs() <= 1e-6 * a.2.abs().max(1.0),
            "{a:?} vs {b:?}"
        );
    }
    let ma = load_checkpoint(&run_a.join("weights/model.safetensors")).unwrap();
    let mb = load_checkpoint(&run_b.join("weights/model.safetensors")).unwrap();
    assert_eq!(ma.tensors.len(), mb.tensors.len());
    let mut worst = 0f32;
    for (k, ta) in &ma.tensors {
        let tb = &mb.tensors[k];
        let d = (ta - tb)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
    }
    eprintln!("{kills} kills; largest weight difference {worst:e}");
    assert!(worst <= 1e-6, "weights differ by {worst}");
}

#[test]
fn a_bad_training_image_stops_the_run_or_is_skipped_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("weld");
    small_dataset(&data);
    std::fs::write(data.join("train/good/broken.png"), b"not a png").unwrap();
    let results = dir.path().join("results");
    let short = |extra: &[&str]| {
        let mut args = tiny_run_args(s(&data), s(&results));
        for (flag, value) in [
            ("--pretrain-steps", "1"),
            ("--phase2-steps", "1"),
            ("--phase3-steps", "1"),
        ] {
            let i = args.iter().position(|a| *a == flag).unwrap();
            args[i + 1] = value;
        }
        args.push("--no-test");
        args.extend_from_slice(extra);
        dsr(&args)
    };
    let failed = short(&[]);
    assert_eq!(failed.status.code(), Some(1));
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(err.contains("broken.png"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let skipped = short(&["--on-error", "skip"]);
    let err = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "{err}");
    assert!(
        err.contains("skipped") && err.contains("broken.png"),
        "{err}"
    );
}
