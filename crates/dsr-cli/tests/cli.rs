//! End-to-end tests of the `dsr` binary on a tiny seeded model and a generated MVTec-style folder.

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{Device, Tensor};
use dsr_core::weights::load_checkpoint;
use dsr_eval::postprocess::{PostProcessor, METADATA_KEY};

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::{dsr, make_image, make_model, s};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dsr-core/tests/fixtures")
        .join(name)
}

/// `<root>/train/good`, `<root>/test/{good,crack}` with masks under `<root>/ground_truth/crack`, sizes 64×64 and 80×70.
fn make_dataset(root: &Path) {
    let train = root.join("train/good");
    std::fs::create_dir_all(&train).unwrap();
    make_image(&train.join("000.png"), 64, 64, false, 9);
    let good = root.join("test/good");
    let crack = root.join("test/crack");
    let gt = root.join("ground_truth/crack");
    for d in [&good, &crack, &gt] {
        std::fs::create_dir_all(d).unwrap();
    }
    make_image(&good.join("000.png"), 64, 64, false, 0);
    make_image(&good.join("001.png"), 80, 70, false, 1);
    make_image(&good.join("002.png"), 64, 64, false, 2);
    for (i, (w, h)) in [(64, 64), (80, 70)].into_iter().enumerate() {
        let mask = make_image(&crack.join(format!("00{i}.png")), w, h, true, 5 + i as u32);
        image::DynamicImage::ImageRgb8(mask)
            .to_luma8()
            .save(gt.join(format!("00{i}_mask.png")))
            .unwrap();
    }
}

/// Parses a float32 `.npy` file: its shape and values.
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_text = header.split("'shape': (").nth(1).unwrap();
    let shape_text = &shape_text[..shape_text.find(')').unwrap()];
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse().unwrap())
        .collect();
    let values: Vec<f32> = bytes[10 + len..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (shape, values)
}

#[test]
fn info_prints_the_configuration_and_thresholds() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let out = dsr(&["info", s(&model)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("\"embedding_dim\":4"), "{text}");
    assert!(text.contains("image size: 64×64"), "{text}");
    assert!(text.contains("thresholds: image 0.3"), "{text}");
    assert!(text.contains("tensors: "), "{text}");
    assert!(text.contains("elements: "), "{text}");
}

#[test]
fn convert_round_trips_our_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    let copy = dir.path().join("copy.safetensors");
    make_model(&model, true);
    let out = dsr(&["convert", s(&model), s(&copy)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let a = load_checkpoint(&model).unwrap();
    let b = load_checkpoint(&copy).unwrap();
    assert_eq!(a.config, b.config);
    assert_eq!(a.image_size, b.image_size);
    assert_eq!(a.metadata.get(METADATA_KEY), b.metadata.get(METADATA_KEY));
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, t) in &a.tensors {
        let diff = (t - &b.tensors[k]).unwrap().abs().unwrap();
        assert_eq!(
            diff.max_all().unwrap().to_scalar::<f32>().unwrap(),
            0.0,
            "{k}"
        );
    }
}

#[test]
fn convert_reads_a_lightning_checkpoint_with_a_given_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("lightning.safetensors");
    let ckpt = fixture("torch/lightning_small.ckpt");
    // Without a configuration the command refuses and says what to pass.
    let out = dsr(&["convert", s(&ckpt), s(&out_path)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--config"), "{}", stderr(&out));
    let out = dsr(&[
        "convert",
        s(&ckpt),
        s(&out_path),
        "--config",
        s(&fixture("small/config.json")),
        "--image-size",
        "64,64",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let converted = load_checkpoint(&out_path).unwrap();
    assert_eq!(converted.image_size, Some([64, 64]));
    assert_eq!(converted.config.unwrap().embedding_dim, 8);
    let post = PostProcessor::from_json(&converted.metadata[METADATA_KEY]).unwrap();
    assert_eq!(post.image_threshold, 0.25);
    assert_eq!(post.pixel_threshold, 0.5);
    converted
        .build_model(&converted.config.unwrap(), &Device::Cpu)
        .unwrap();
}

#[test]
fn convert_reads_the_discrete_pckl() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("discrete.safetensors");
    let out = dsr(&[
        "convert",
        s(&fixture("small/discrete_small.pckl")),
        s(&out_path),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let converted = load_checkpoint(&out_path).unwrap();
    assert!(converted
        .tensors
        .keys()
        .all(|k| k.starts_with("discrete_latent_model.")));
    assert_eq!(converted.config.unwrap().embedding_dim, 8);
    let info = dsr(&["info", s(&out_path)]);
    assert!(stdout(&info).contains("dsr.partial: discrete_latent_model"));
}

#[test]
fn predict_writes_overlays_maps_and_tables_and_skips_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    make_image(&images.join("a.png"), 64, 64, false, 0);
    make_image(&images.join("b.png"), 80, 70, true, 1);
    std::fs::write(images.join("corrupt.png"), b"this is not a PNG").unwrap();
    let out_dir = dir.path().join("out");
    let out = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&images),
        "--out",
        s(&out_dir),
        "--batch",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("corrupt.png"), "{}", stderr(&out));
    for stem in ["a", "b"] {
        let png = image::open(out_dir.join(format!("{stem}.png"))).unwrap();
        assert_eq!((png.width(), png.height()), (64, 64));
        let (shape, values) = read_npy(&out_dir.join(format!("{stem}.npy")));
        assert_eq!(shape, vec![64, 64]);
        assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    assert!(!out_dir.join("corrupt.png").exists());
    let csv = std::fs::read_to_string(out_dir.join("predictions.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("path,score,normalized_score,label"));
    for line in &lines[1..] {
        let fields: Vec<&str> = line.split(',').collect();
        let score: f32 = fields[1].parse().unwrap();
        let normalized: f32 = fields[2].parse().unwrap();
        assert!((0.0..=1.0).contains(&score) && (0.0..=1.0).contains(&normalized));
        assert!(fields[3] == "anomalous" || fields[3] == "normal");
        assert_eq!(fields[4], "normalized");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("predictions.json")).unwrap())
            .unwrap();
    assert_eq!(json["map_values"], "normalized");
    assert_eq!(json["predictions"].as_array().unwrap().len(), 2);
    let skipped = json["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("corrupt.png"));
}

#[test]
fn predict_raw_at_model_size_equals_library_inference() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("model.safetensors");
    make_model(&model_path, true);
    let img_path = dir.path().join("x.png");
    make_image(&img_path, 64, 64, true, 3);
    let out_dir = dir.path().join("out");
    let out = dsr(&[
        "predict",
        "--model",
        s(&model_path),
        s(&img_path),
        "--out",
        s(&out_dir),
        "--raw",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (shape, values) = read_npy(&out_dir.join("x.npy"));
    assert_eq!(shape, vec![64, 64]);

    let ckpt = load_checkpoint(&model_path).unwrap();
    let model = ckpt
        .build_model(&ckpt.config.unwrap(), &Device::Cpu)
        .unwrap();
    let chw =
        dsr_train::data::load_image(&img_path, &dsr_train::data::LoadConfig::new(64, 64)).unwrap();
    let input = Tensor::from_vec(chw, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let expected = model
        .infer(&input)
        .unwrap()
        .anomaly_map
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(values.len(), expected.len());
    for (a, b) in values.iter().zip(&expected) {
        assert_eq!(a.to_bits(), b.to_bits());
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("predictions.json")).unwrap())
            .unwrap();
    assert_eq!(json["map_values"], "raw");
}

#[test]
fn direct_convolutions_change_the_maps_only_by_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("model.safetensors");
    make_model(&model_path, true);
    let img_path = dir.path().join("x.png");
    make_image(&img_path, 64, 64, true, 5);
    let run = |flag: Option<&str>| {
        let out_dir = dir.path().join(format!("out{}", flag.unwrap_or("")));
        let mut args = vec!["predict", "--model", s(&model_path), s(&img_path)];
        args.extend(["--out", s(&out_dir), "--raw"]);
        args.extend(flag);
        let out = dsr(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        read_npy(&out_dir.join("x.npy")).1
    };
    let (winograd, direct) = (run(None), run(Some("--direct-conv")));
    assert_eq!(winograd.len(), direct.len());
    // The tiny model's deepest U-Net layers (32 channels) take Winograd's algorithm by default.
    assert_ne!(winograd, direct);
    let worst = winograd
        .iter()
        .zip(&direct)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    // Random weights: the instance norms of channels with little variance amplify rounding
    // (2e-5 seen here; a map value is a probability).
    assert!(worst < 1e-4, "maps differ by {worst}");
}

#[test]
fn bf16_precision_runs_where_the_cpu_has_it_and_is_refused_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("model.safetensors");
    make_model(&model_path, true);
    let img_path = dir.path().join("x.png");
    make_image(&img_path, 64, 64, true, 5);
    let run = |precision: &str| {
        let out_dir = dir.path().join(format!("out-{precision}"));
        let mut args = vec!["predict", "--model", s(&model_path), s(&img_path)];
        args.extend(["--out", s(&out_dir), "--raw", "--precision", precision]);
        (dsr(&args), out_dir)
    };
    let supported = dsr_core::Precision::Bf16.supported();
    let (out, _) = run("bf16");
    if !supported {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("AVX512-BF16"), "{}", stderr(&out));
        eprintln!("skipped the bf16 maps: this CPU lacks AVX512-BF16");
        return;
    }
    assert!(out.status.success(), "{}", stderr(&out));
    let bf16 = read_npy(&dir.path().join("out-bf16").join("x.npy")).1;
    let (out, f32_dir) = run("f32");
    assert!(out.status.success(), "{}", stderr(&out));
    let f32_map = read_npy(&f32_dir.join("x.npy")).1;
    assert_eq!(bf16.len(), f32_map.len());
    assert_ne!(bf16, f32_map, "bf16 gave f32's bits");
    // Random weights amplify bf16's rounding (tests/bf16.rs of dsr-core); a map value is a
    // probability: the bound only catches a broken kernel.
    assert!(bf16
        .iter()
        .all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
    let out = dsr(&["predict", "--precision", "f16", s(&img_path)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn predict_takes_glob_patterns_and_fails_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, false);
    make_image(&dir.path().join("p1.png"), 64, 64, false, 0);
    make_image(&dir.path().join("p2.png"), 64, 64, false, 1);
    std::fs::write(dir.path().join("q.png"), b"garbage").unwrap();
    let out_dir = dir.path().join("out");
    let pattern = format!("{}/p*.png", s(dir.path()));
    let out = dsr(&[
        "predict",
        "--model",
        s(&model),
        &pattern,
        "--out",
        s(&out_dir),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out_dir.join("p1.npy").exists() && out_dir.join("p2.npy").exists());
    let csv = std::fs::read_to_string(out_dir.join("predictions.csv")).unwrap();
    // Without a post-processor the maps are raw and there is no normalised score.
    assert!(csv.lines().nth(1).unwrap().contains(",,"), "{csv}");
    assert!(csv.contains(",raw,"), "{csv}");

    let bad = dir.path().join("q.png");
    let out = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&bad),
        "--out",
        s(&out_dir),
        "--on-error",
        "fail",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("q.png"), "{}", stderr(&out));
}

fn check_metrics(m: &serde_json::Value) {
    for key in [
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "image_f1",
        "pixel_auroc",
        "pixel_ap",
        "pixel_aupro",
        "pixel_f1_max",
        "pixel_f1",
    ] {
        let v = m[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing in {m}"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
}

#[test]
fn test_writes_metrics_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let data = dir.path().join("mvtec");
    make_dataset(&data.join("widget"));
    let out_dir = dir.path().join("results");
    let out = dsr(&[
        "test",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--category",
        "widget",
        "--out",
        s(&out_dir),
        "--batch",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("image AUROC"), "{}", stdout(&out));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("metrics.json")).unwrap())
            .unwrap();
    check_metrics(&json["overall"]);
    check_metrics(&json["per_defect_type"]["crack"]);
    assert_eq!(json["num_images"], 5);
    assert_eq!(json["num_defective"], 2);
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.contains("<svg"));
    assert!(html.contains("data:image/png;base64,"));
}

#[test]
fn test_without_post_processor_says_where_thresholds_come_from() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, false);
    let data = dir.path().join("widget");
    make_dataset(&data);
    let out_dir = dir.path().join("results");
    let out = dsr(&[
        "test",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out_dir),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("F1-max threshold"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("metrics.json")).unwrap())
            .unwrap();
    check_metrics(&json["overall"]);
    assert!(json["threshold_source"]
        .as_str()
        .unwrap()
        .contains("F1-max threshold"));
}

#[test]
fn usage_errors_exit_with_2() {
    for args in [
        &[][..],
        &["bogus"][..],
        &["predict", "--out", "x", "a.png"][..],
        &[
            "predict", "--model", "m", "--out", "x", "--batch", "many", "a.png",
        ][..],
        &[
            "predict",
            "--model",
            "m",
            "--out",
            "x",
            "--on-error",
            "maybe",
            "a.png",
        ][..],
        &["convert", "a"][..],
        &["convert", "a", "b", "--image-size", "65,64"][..],
    ] {
        let out = dsr(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    let help = dsr(&["predict", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = stdout(&help);
    assert!(
        text.contains("--on-error") && text.contains("default: skip"),
        "{text}"
    );
    assert!(text.contains("Exit codes"), "{text}");
}

#[test]
fn a_missing_model_exits_with_1_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model.safetensors");
    let img = dir.path().join("a.png");
    make_image(&img, 64, 64, false, 0);
    let out = dsr(&[
        "predict",
        "--model",
        s(&missing),
        s(&img),
        "--out",
        s(&dir.path().join("out")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no-such-model.safetensors"),
        "{}",
        stderr(&out)
    );
    let out = dsr(&["info", s(&missing)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no-such-model.safetensors"));
}

/// `--device cuda` on a binary built without the `cuda` feature says how to get one, in one
/// line, before touching any data.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_on_a_cpu_build_says_how_to_build_with_cuda() {
    let out = dsr(&["train", "--data", "/nonexistent", "--device", "cuda"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("built without CUDA support") && err.contains("--features cuda"),
        "{err}"
    );
    assert!(!err.contains("nonexistent"), "{err}");
}

#[test]
fn a_budgeted_run_replans_to_its_deadline_and_records_the_lengths() {
    use dsr_train::budget::{BudgetPlan, BudgetSplit, Deadline, StepTimes};
    use dsr_train::session::{RunConfig, Session, SessionEvent};
    use dsr_train::train::Schedule;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data);
    let mut cfg = RunConfig::default();
    cfg.data.root = data;
    cfg.output.results = dir.path().join("results");
    cfg.vq.pretrain = true;
    cfg.pretrain.steps = 2;
    cfg.pretrain.crop = 64;
    cfg.train.model = dsr_core::DsrConfig::tiny();
    cfg.train.image_size = [64, 64];
    cfg.train.batch_size = 1;
    cfg.train.schedule = Schedule::Original {
        phase2_steps: 40,
        phase3_steps: 5,
        lr_drop_fraction: 0.8,
    };
    let cfg = cfg.with_overrides(&[]).unwrap();
    // A plan whose budget has already run out, re-planned after every step: after the warm-up
    // step and one timed step, phase 2 ends as soon as its learning-rate drop allows
    // (0.8 · 3 = 2, at the next step) and phase 3 is dropped.
    let started = std::time::Instant::now() - std::time::Duration::from_secs(10);
    let times = StepTimes {
        phase1: None,
        phase2: 1e-3,
        phase3: 1e-3,
        evaluation: 0.0,
    };
    let plan = BudgetPlan {
        budget_seconds: 1.0,
        spent_seconds: 0.0,
        times,
        split: BudgetSplit {
            phase1: 0.0,
            phase3: 0.1,
        },
        pretrain_steps: 2,
        phase2_steps: 40,
        phase3_steps: 5,
        predicted_seconds: 1.0,
    };
    let deadline = Deadline {
        interval_seconds: 0.0,
        ..Deadline::new(started, plan)
    };
    assert!(deadline.seconds_left() < 0.0);
    let session = Session::create(cfg).unwrap().with_deadline(deadline);
    let mut replans = Vec::new();
    let mut steps = 0;
    session
        .run(&Device::Cpu, &mut |e| match e {
            SessionEvent::Replanned {
                step,
                phase2_steps,
                phase3_steps,
                step_seconds,
            } => {
                assert!(*step_seconds > 0.0);
                replans.push((*step, *phase2_steps, *phase3_steps));
            }
            SessionEvent::Train(_) => steps += 1,
            _ => {}
        })
        .unwrap();
    assert_eq!(replans, [(2, 3, 0)]);
    assert_eq!(steps, 3);
    // The run's configuration says what it ran; a resume reads it back unchanged.
    let run_dir = session.dir().path.clone();
    drop(session);
    let written = Session::read_config(&run_dir).unwrap();
    assert_eq!(
        written.train.schedule,
        Schedule::Original {
            phase2_steps: 3,
            phase3_steps: 0,
            lr_drop_fraction: 0.8
        }
    );
    let resumed = Session::resume(&run_dir).unwrap();
    assert_eq!(resumed.config(), &written);
}

#[test]
fn an_auto_image_size_takes_the_shape_of_the_training_images() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("wide");
    make_dataset(&root);
    // Training images twice as wide as high (the test images do not count).
    let train = root.join("train/good");
    std::fs::remove_file(train.join("000.png")).unwrap();
    for i in 0..3 {
        make_image(&train.join(format!("00{i}.png")), 128, 64, false, i);
    }
    let size_of = |arg: &str| -> Vec<i64> {
        let o = dsr(&[
            "train",
            "--data",
            s(&root),
            "--preset",
            "small",
            "--image-size",
            arg,
            "--print-config",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        // The printed TOML, whitespace removed: `image_size=[H,W,]` under [train].
        let text: String = stdout(&o).split_whitespace().collect();
        let at = text.find("image_size=[").expect("no image_size") + "image_size=[".len();
        let end = at + text[at..].find(']').unwrap();
        text[at..end]
            .split(',')
            .filter(|v| !v.is_empty())
            .map(|v| v.parse().unwrap())
            .collect()
    };
    // About 96×96 pixels shaped 2:1 is 64×128; about 128×128 is 96×192 (1.125 times the
    // pixels: the exact ratio within a quarter of the budget).
    assert_eq!(size_of("auto:96"), vec![64, 128]);
    assert_eq!(size_of("auto:128"), vec![96, 192]);
    // `auto` keeps the configured size's pixel count (256×256 by default).
    assert_eq!(size_of("auto"), vec![192, 384]);
    // An exact size stays as given.
    assert_eq!(size_of("64,64"), vec![64, 64]);

    // A training image whose header cannot be read is named.
    std::fs::write(train.join("003.png"), b"not a png").unwrap();
    let o = dsr(&[
        "train",
        "--data",
        s(&root),
        "--image-size",
        "auto:128",
        "--print-config",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains("003.png"), "{}", stderr(&o));
}
