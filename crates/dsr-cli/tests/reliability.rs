//! Hostile and unlucky inputs through the `dsr` binary, one test per class of
//! docs/reliability.md ("Reliability 2"): no file the program did not write is replaced, no
//! wrong answer is given with confidence, nothing checkable is checked late, no value the
//! program accepts makes it abort, paths stay where they belong, concurrent and resumed runs stay
//! consistent, and every error is one line naming the file and what to do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use dsr_core::weights::{load_checkpoint, save_checkpoint};

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::{dsr, dsr_exe, make_image, make_model, s};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Exit code 1 with a one-line message holding every one of `parts`.
fn fails_with(o: &Output, parts: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}\n{}", stdout(o));
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    for p in parts {
        assert!(lines[0].contains(p), "'{p}' not in: {err}");
    }
    lines[0].to_string()
}

/// `<root>/train/good`, `<root>/test/{good,crack}`, masks under `<root>/ground_truth/crack`.
fn make_dataset(root: &Path, defective: bool) {
    let train = root.join("train/good");
    std::fs::create_dir_all(&train).unwrap();
    make_image(&train.join("000.png"), 64, 64, false, 9);
    make_image(&train.join("001.png"), 64, 64, false, 8);
    let good = root.join("test/good");
    std::fs::create_dir_all(&good).unwrap();
    make_image(&good.join("000.png"), 64, 64, false, 0);
    make_image(&good.join("001.png"), 64, 64, false, 1);
    if defective {
        let crack = root.join("test/crack");
        let gt = root.join("ground_truth/crack");
        std::fs::create_dir_all(&crack).unwrap();
        std::fs::create_dir_all(&gt).unwrap();
        for i in 0..2 {
            let mask = make_image(&crack.join(format!("00{i}.png")), 64, 64, true, 5 + i);
            image::DynamicImage::ImageRgb8(mask)
                .to_luma8()
                .save(gt.join(format!("00{i}_mask.png")))
                .unwrap();
        }
    }
}

/// The flags of a tiny seeded training run on `data` into `results`.
fn tiny_train<'a>(data: &'a str, results: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--preset",
        "tiny",
        "--image-size",
        "64,64",
        "--pretrain-steps",
        "2",
        "--set",
        "pretrain.batch_size=2",
        "--batch",
        "2",
        "--phase2-steps",
        "2",
        "--phase3-steps",
        "1",
        "--results",
        results,
    ]
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walk(dir);
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(s(path)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `dsr args` and fails the test if it has not ended within `limit` (it is killed).
fn dsr_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(dsr_exe())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            panic!("dsr {args:?} still ran after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Data loss

#[test]
fn predict_never_writes_over_its_inputs_or_files_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    make_image(&images.join("a.png"), 64, 64, false, 1);
    make_image(&images.join("b.jpg"), 64, 64, false, 2);
    let before: Vec<Vec<u8>> = ["a.png", "b.jpg"]
        .iter()
        .map(|n| std::fs::read(images.join(n)).unwrap())
        .collect();
    let unchanged = || {
        for (n, b) in ["a.png", "b.jpg"].iter().zip(&before) {
            assert_eq!(&std::fs::read(images.join(n)).unwrap(), b, "{n} changed");
        }
    };
    // --out DIR DIR: the input folder itself.
    let o = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&images),
        "--out",
        s(&images),
    ]);
    fails_with(&o, &["holds the input", "another --out"]);
    unchanged();
    assert!(!images.join(".dsr-outputs").exists());
    // --out through a symbolic link to the input folder.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&images, &link).unwrap();
    let o = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&images),
        "--out",
        s(&link),
    ]);
    fails_with(&o, &["holds the input"]);
    // One input given as a file in the output folder.
    let o = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&images.join("a.png")),
        "--out",
        s(&images),
    ]);
    fails_with(&o, &["holds the input"]);
    unchanged();
    // A hard link to an input where an output would go.
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::hard_link(images.join("a.png"), out.join("a.png")).unwrap();
    let o = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&images),
        "--out",
        s(&out),
    ]);
    fails_with(&o, &["a.png", "is one of the inputs"]);
    unchanged();
    // A file of the user's where an output would go.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("b.npy"), b"mine").unwrap();
    std::fs::write(other.join("predictions.csv"), b"mine too").unwrap();
    let o = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&images),
        "--out",
        s(&other),
    ]);
    fails_with(&o, &["b.npy", "was not written by dsr"]);
    assert_eq!(std::fs::read(other.join("b.npy")).unwrap(), b"mine");
    assert!(
        !other.join("a.png").exists(),
        "nothing written before the check"
    );
    // Its own outputs: a second run replaces them.
    let fresh = dir.path().join("fresh");
    for _ in 0..2 {
        let o = dsr(&[
            "predict",
            "--model",
            s(&model),
            s(&images),
            "--out",
            s(&fresh),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    unchanged();
}

#[test]
fn convert_pretrain_test_and_augment_keep_their_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let before = std::fs::read(&model).unwrap();
    // convert X X, through a symbolic link, and over a hard link.
    let o = dsr(&["convert", s(&model), s(&model)]);
    fails_with(&o, &["is the input", "write to another file"]);
    let sym = dir.path().join("sym.safetensors");
    std::os::unix::fs::symlink(&model, &sym).unwrap();
    let o = dsr(&["convert", s(&model), s(&sym)]);
    fails_with(&o, &["is the input"]);
    let hard = dir.path().join("hard.safetensors");
    std::fs::hard_link(&model, &hard).unwrap();
    let o = dsr(&["convert", s(&model), s(&hard)]);
    fails_with(&o, &["is the input"]);
    assert_eq!(std::fs::read(&model).unwrap(), before);
    // An existing file that is not our checkpoint.
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, b"keep me").unwrap();
    let o = dsr(&["convert", s(&model), s(&notes)]);
    fails_with(&o, &["notes.txt", "not a checkpoint written by dsr"]);
    assert_eq!(std::fs::read(&notes).unwrap(), b"keep me");
    // Our own earlier output is replaced.
    let copy = dir.path().join("copy.safetensors");
    for _ in 0..2 {
        let o = dsr(&["convert", s(&model), s(&copy)]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // dsr pretrain --out an input image.
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    make_image(&images.join("a.png"), 64, 64, false, 1);
    let img_before = std::fs::read(images.join("a.png")).unwrap();
    let o = dsr(&[
        "pretrain",
        "--images",
        s(&images),
        "--out",
        s(&images.join("a.png")),
        "--preset",
        "tiny",
        "--crop",
        "64",
        "--load-size",
        "64",
        "--steps",
        "1",
    ]);
    fails_with(&o, &["a.png", "is the input"]);
    assert_eq!(std::fs::read(images.join("a.png")).unwrap(), img_before);
    // dsr test --out a folder of the test images; dsr augment --out its image folder.
    let data = dir.path().join("data");
    make_dataset(&data, true);
    let good = data.join("test/good");
    let o = dsr(&[
        "test",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&good),
    ]);
    fails_with(&o, &["holds the input"]);
    assert!(!good.join("metrics.json").exists());
    let train = data.join("train/good");
    let o = dsr(&[
        "augment",
        "--data",
        s(&data),
        "--out",
        s(&train),
        "--n",
        "2",
        "--size",
        "64",
    ]);
    fails_with(&o, &["holds the input"]);
    assert_eq!(std::fs::read_dir(&train).unwrap().count(), 2);
}

// ---------------------------------------------------------------------------------------------
// 2. Wrong answers said with confidence

/// A model whose weights are all finite but so large that its activations overflow.
fn overflowing_model(good: &Path, path: &Path) {
    let ckpt = load_checkpoint(good).unwrap();
    let tensors: std::collections::HashMap<String, Tensor> = ckpt
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), (t * 1e30).unwrap()))
        .collect();
    let extra: BTreeMap<String, String> = ckpt
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "dsr.config" && k.as_str() != "dsr.image_size")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    save_checkpoint(
        path,
        &tensors,
        &ckpt.config.unwrap(),
        ckpt.image_size,
        &extra,
    )
    .unwrap();
}

#[test]
fn an_overflowing_model_gives_no_answer_and_names_the_model_and_image() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    make_model(&good, true);
    let model = dir.path().join("overflow.safetensors");
    overflowing_model(&good, &model);
    let img = dir.path().join("img");
    std::fs::create_dir_all(&img).unwrap();
    make_image(&img.join("a.png"), 64, 64, false, 1);
    let o = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&img),
        "--out",
        s(&dir.path().join("out")),
    ]);
    fails_with(&o, &["overflow.safetensors", "a.png", "non-finite"]);
    assert!(!dir.path().join("out/predictions.csv").exists());
    let data = dir.path().join("data");
    make_dataset(&data, true);
    let o = dsr(&[
        "test",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&dir.path().join("t")),
    ]);
    fails_with(&o, &["overflow.safetensors", "000.png", "non-finite"]);
}

#[test]
fn truncated_jpegs_are_refused_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let full = dir.path().join("full.jpg");
    make_image(&full, 64, 64, false, 3);
    let bytes = std::fs::read(&full).unwrap();
    let img = dir.path().join("img");
    std::fs::create_dir_all(&img).unwrap();
    // Cuts from the end of the headers to two bytes before the end-of-image marker.
    let cuts = [
        bytes.len() / 2,
        bytes.len() * 3 / 4,
        bytes.len() - 2,
        bytes.len() - 10,
    ];
    for cut in cuts {
        std::fs::write(img.join(format!("cut{cut}.jpg")), &bytes[..cut]).unwrap();
    }
    let o = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&img),
        "--out",
        s(&dir.path().join("out")),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.matches("skipping").count(), cuts.len(), "{err}");
    assert!(
        err.contains("cut short") || err.contains("not a readable image"),
        "{err}"
    );
    // The whole file loads.
    std::fs::copy(&full, img.join("whole.jpg")).unwrap();
    let o = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&img.join("whole.jpg")),
        "--out",
        s(&dir.path().join("out2")),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn settings_outside_their_domain_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, true);
    let results = dir.path().join("results");
    for (set, expected) in [
        (
            "train.adam.beta1=1.5",
            "train.adam.beta1 must lie in [0, 1)",
        ),
        (
            "train.adam.beta2=-0.1",
            "train.adam.beta2 must lie in [0, 1)",
        ),
        ("train.adam.lr=-1", "train.adam.lr must be greater than 0"),
        ("train.adam.lr=0", "train.adam.lr must be greater than 0"),
        ("train.adam.lr=nan", "train.adam.lr is NaN"),
        ("train.adam.eps=0", "train.adam.eps must be greater than 0"),
        (
            "train.schedule.lr_drop_fraction=2",
            "lr_drop_fraction must be a fraction between 0 and 1",
        ),
        (
            "data.normal_split_ratio=1.5",
            "data.normal_split_ratio must lie in [0, 1)",
        ),
        (
            "pretrain.adam.beta1=1",
            "pretrain.adam.beta1 must lie in [0, 1)",
        ),
        (
            "pretrain.ema_decay=1",
            "pretrain.ema_decay must lie in [0, 1)",
        ),
        (
            "pretrain.crop=128",
            "pretrain.crop 128 is larger than the training images",
        ),
        ("data.max_pixels=0", "data.max_pixels must be at least 1"),
        (
            "data.eval_batch=100000",
            "data.eval_batch must lie between 1 and 4096",
        ),
    ] {
        let mut args = tiny_train(s(&data), s(&results));
        args.extend(["--set", set]);
        let o = dsr(&args);
        let line = fails_with(&o, &[expected]);
        assert!(!line.contains("lower the learning rate"), "{line}");
    }
    assert!(
        !results.exists(),
        "no run folder for a configuration that cannot run"
    );
    let images = data.join("train/good");
    for (extra, expected) in [
        (
            &["--load-size", "0"][..],
            "--load-size 0 must be at least the crop size",
        ),
        (
            &["--crop", "128", "--load-size", "64"][..],
            "--load-size 64 must be at least the crop size 128",
        ),
        (&["--load-size", "100", "--crop", "64"][..], "--load-size"),
    ] {
        let mut args = vec![
            "pretrain",
            "--images",
            s(&images),
            "--preset",
            "tiny",
            "--steps",
            "1",
        ];
        args.extend(extra);
        args.extend(["--out", "never.safetensors"]);
        fails_with(&dsr(&args), &[expected]);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Work thrown away late

#[test]
fn a_run_that_cannot_be_evaluated_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    // No defective test image: F1 and the thresholds are undefined.
    let data = dir.path().join("nodefect");
    make_dataset(&data, false);
    let results = dir.path().join("results");
    let start = Instant::now();
    let o = dsr(&tiny_train(s(&data), s(&results)));
    let line = fails_with(&o, &["validation set", "2 good and 0 defective"]);
    assert!(!line.contains("resume"), "{line}");
    assert!(!results.exists(), "no run folder was made");
    assert!(
        !stdout(&o).contains("phase"),
        "nothing trained: {}",
        stdout(&o)
    );
    // The folder layout with defective images but no mask folder.
    let normal = dir.path().join("normal");
    let abnormal = dir.path().join("abnormal");
    std::fs::create_dir_all(&normal).unwrap();
    std::fs::create_dir_all(&abnormal).unwrap();
    for i in 0..6 {
        make_image(&normal.join(format!("{i}.png")), 64, 64, false, i);
    }
    make_image(&abnormal.join("x.png"), 64, 64, true, 3);
    let mut args = tiny_train("", s(&results));
    args.drain(1..3);
    args.extend(["--normal-dir", s(&normal), "--abnormal-dir", s(&abnormal)]);
    let o = dsr(&args);
    fails_with(&o, &["x.png", "has no mask", "--mask-dir"]);
    assert!(!results.exists());
    // The test split is checked too unless --no-test (here: validation from the test set, the
    // rest of the test has no defective image).
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_validation_failing_after_training_keeps_the_trained_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, true);
    // A mask that exists but cannot be read: found only when the validation reads it.
    std::fs::write(data.join("ground_truth/crack/001_mask.png"), b"not a png").unwrap();
    let results = dir.path().join("results");
    let o = dsr(&tiny_train(s(&data), s(&results)));
    let line = fails_with(
        &o,
        &["model was written to", "001_mask.png", "dsr test --model"],
    );
    assert!(!line.contains("resume with"), "{line}");
    let model = results.join("dsr/data/data/v0/weights/model.safetensors");
    let model = if model.is_file() {
        model
    } else {
        files_in(&results)
            .into_iter()
            .find(|p| p.ends_with("weights/model.safetensors"))
            .expect("the model was written")
    };
    let ckpt = load_checkpoint(&model).unwrap();
    assert!(ckpt.metadata.contains_key("dsr.output_map"));
    assert!(!ckpt.metadata.contains_key("dsr.postprocess"));
}

// ---------------------------------------------------------------------------------------------
// 4. Values the program accepts must not make it abort

#[test]
fn huge_counts_and_sizes_are_refused_with_what_they_need() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let img = dir.path().join("a.png");
    make_image(&img, 64, 64, false, 1);
    let data = dir.path().join("data");
    make_dataset(&data, true);
    let huge = "18446744073709551615";
    let o_dir = dir.path().join("o");
    for args in [
        vec![
            "predict",
            "--model",
            s(&model),
            s(&img),
            "--out",
            s(&o_dir),
            "--batch",
            huge,
        ],
        vec![
            "test",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--batch",
            "1000000000",
        ],
        vec!["train", "--data", s(&data), "--batch", huge],
        vec!["augment", "--data", s(&data), "--n", "100000"],
    ] {
        let o = dsr(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("from 1 to 4096"), "{}", stderr(&o));
    }
    // A checkpoint recording 8192×8192 images: inference needs far more than any machine here.
    let big = dir.path().join("big.safetensors");
    let ckpt = load_checkpoint(&model).unwrap();
    let extra: BTreeMap<String, String> = ckpt
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "dsr.config" && k.as_str() != "dsr.image_size")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    save_checkpoint(
        &big,
        &ckpt.tensors,
        &ckpt.config.unwrap(),
        Some([8192, 8192]),
        &extra,
    )
    .unwrap();
    // Each under a 4 GiB cap: the tiny model at that size may fit a large machine.
    let o = dsr_capped(&[
        "predict",
        "--model",
        s(&big),
        s(&img),
        "--out",
        s(&dir.path().join("o")),
    ]);
    fails_with(
        &o,
        &[
            "inference on batches of 1 images of 8192×8192 needs about",
            "available",
        ],
    );
    let o = dsr_capped(&[
        "test",
        "--model",
        s(&big),
        "--data",
        s(&data),
        "--out",
        s(&dir.path().join("t")),
    ]);
    fails_with(&o, &["8192×8192 needs about"]);
    // train.image_size the same.
    let results = dir.path().join("results");
    let mut args = tiny_train(s(&data), s(&results));
    args.extend([
        "--set",
        "train.image_size=[8192, 8192]",
        "--set",
        "pretrain.crop=64",
    ]);
    fails_with(&dsr_capped(&args), &["needs about", "--image-size"]);
    assert!(!results.exists());
    // augment: many large samples.
    let o = dsr(&[
        "augment",
        "--data",
        s(&data),
        "--n",
        "4096",
        "--size",
        "8192",
        "--out",
        s(&dir.path().join("aug")),
    ]);
    fails_with(
        &o,
        &[
            "4096 samples of 8192×8192 needs about",
            "lower --n or --size",
        ],
    );
}

/// Runs `dsr args` under an address-space limit of 4 GiB (`ulimit -v`).
fn dsr_capped(args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(dsr_exe());
    cmd.args(args);
    // SAFETY: setrlimit between fork and exec touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: 4 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &limit);
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// An image of 20000×20000 pixels with the pixel limit raised, under an address-space limit of
/// 4 GiB: refused with what decoding needs instead of an abort.
#[test]
fn a_huge_image_under_a_memory_cap_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    // A PNG header claiming 20000×20000 (the rest is never reached).
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(20000u32.to_be_bytes());
    ihdr.extend(20000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    for chunk in [&b"IDAT"[..], b"IEND"] {
        png.extend(0u32.to_be_bytes());
        png.extend(chunk);
        png.extend(crc32(chunk).to_be_bytes());
    }
    let img = dir.path().join("huge.png");
    std::fs::write(&img, &png).unwrap();
    let o = dsr_capped(&[
        "predict",
        "--model",
        s(&model),
        s(&img),
        "--out",
        s(&dir.path().join("o")),
        "--max-pixels",
        "1000000000",
        "--on-error",
        "fail",
    ]);
    fails_with(
        &o,
        &[
            "huge.png",
            "decoding 20000x20000 pixels needs about",
            "--max-pixels",
        ],
    );
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------------------------
// 5. Paths

#[test]
fn a_category_cannot_leave_the_results_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    make_dataset(&root.join("bottle"), true);
    let results = dir.path().join("results");
    for category in ["../x", "/tmp/x", "..", ".", "a/b", ""] {
        let mut args = tiny_train(s(&root), s(&results));
        args.extend(["--category", category]);
        let o = dsr(&args);
        fails_with(&o, &["is not the name of a sub-folder"]);
    }
    assert!(!results.exists());
    assert!(!dir.path().join("x").exists());
    let o = dsr(&[
        "test",
        "--model",
        "m.safetensors",
        "--data",
        s(&root),
        "--category",
        "../root",
    ]);
    fails_with(&o, &["is not the name of a sub-folder"]);
}

#[test]
fn odd_file_names_keep_their_own_outputs() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let img = dir.path().join("img");
    std::fs::create_dir_all(&img).unwrap();
    // Two names that differ only in a byte that is not UTF-8, one with a literal "%FF".
    let names: Vec<PathBuf> = [&b"a\xff.png"[..], b"a\xfe.png", b"a%FF.png"]
        .iter()
        .map(|n| img.join(std::ffi::OsStr::from_bytes(n)))
        .collect();
    for (i, n) in names.iter().enumerate() {
        make_image(n, 64, 64, false, i as u32);
    }
    // The longest legal name (255 bytes) and a 240-byte stem.
    let long = img.join(format!("{}.png", "x".repeat(251)));
    make_image(&long, 64, 64, false, 7);
    make_image(
        &img.join(format!("{}.png", "y".repeat(240))),
        64,
        64,
        false,
        8,
    );
    let out = dir.path().join("out");
    let o = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&img),
        "--out",
        s(&out),
        "--on-error",
        "fail",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("predictions.json")).unwrap())
            .unwrap();
    let rows = table["predictions"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    let paths: std::collections::HashSet<&str> =
        rows.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(paths.len(), 5, "{paths:?}");
    // The literal "%FF" name is escaped too ("%" is "%25"), so the three outputs differ.
    for name in ["a%FF.png", "a%FE.png", "a%25FF.png"] {
        assert!(out.join(name).is_file(), "{name}");
    }
    for r in rows {
        let overlay = PathBuf::from(r["overlay"].as_str().unwrap());
        assert!(overlay.is_file(), "{overlay:?}");
        assert!(overlay.file_name().unwrap().len() <= 255);
    }
}

#[test]
fn fifos_are_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let fifo = dir.path().join("fifo.safetensors");
    mkfifo(&fifo);
    let img = dir.path().join("a.png");
    make_image(&img, 64, 64, false, 1);
    let limit = Duration::from_secs(30);
    let o = dsr_within(
        &[
            "predict",
            "--model",
            s(&fifo),
            s(&img),
            "--out",
            s(&dir.path().join("o")),
        ],
        limit,
    );
    fails_with(&o, &["fifo.safetensors", "FIFO"]);
    let o = dsr_within(&["info", s(&fifo)], limit);
    fails_with(&o, &["FIFO"]);
    let o = dsr_within(
        &["convert", s(&fifo), s(&dir.path().join("c.safetensors"))],
        limit,
    );
    fails_with(&o, &["FIFO"]);
    // A FIFO among the input images is skipped.
    let pipe_img = dir.path().join("pipe.png");
    mkfifo(&pipe_img);
    let o = dsr_within(
        &[
            "predict",
            "--model",
            s(&model),
            s(&pipe_img),
            s(&img),
            "--out",
            s(&dir.path().join("o2")),
        ],
        limit,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("pipe.png") && stderr(&o).contains("FIFO"),
        "{}",
        stderr(&o)
    );
    // A FIFO as the run configuration.
    let cfg = dir.path().join("run.toml");
    mkfifo(&cfg);
    let o = dsr_within(&["train", "--config", s(&cfg)], limit);
    fails_with(&o, &["run.toml", "FIFO"]);
}

// ---------------------------------------------------------------------------------------------
// 6. Concurrency and resume

#[test]
fn a_run_folder_takes_one_dsr_train_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    make_dataset(&data, true);
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut cfg = dsr_train::session::RunConfig::default();
    cfg.data.root = data.clone();
    cfg.vq.pretrain = true;
    cfg.train.model = dsr_core::DsrConfig::tiny();
    cfg.train.image_size = [64, 64];
    cfg.pretrain.crop = 64;
    let cfg = cfg.with_overrides(&[]).unwrap();
    std::fs::write(run.join("config.toml"), cfg.to_toml().unwrap()).unwrap();
    let held =
        dsr_core::files::FolderLock::acquire(&run, dsr_train::session::LOCK_FILE, "dsr train")
            .unwrap();
    let o = dsr(&["train", "--resume", s(&run)]);
    fails_with(
        &o,
        &[
            "run",
            "in use by another dsr train",
            &std::process::id().to_string(),
        ],
    );
    assert!(!run.join("metrics.jsonl").exists());
    // --print-config reads a run in use without taking it.
    let o = dsr(&["train", "--resume", s(&run), "--print-config"]);
    assert!(o.status.success(), "{}", stderr(&o));
    drop(held);
    // A broken config.toml on --resume: one line naming the file, the place and what to do.
    std::fs::write(
        run.join("config.toml"),
        "[train]\nbatch_size = \"many\"\n[data\n",
    )
    .unwrap();
    let o = dsr(&["train", "--resume", s(&run)]);
    fails_with(&o, &["config.toml", "line 3", "fix the file"]);
}

#[test]
fn predict_resume_redoes_changed_inputs_and_edited_rows() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let img = dir.path().join("img");
    std::fs::create_dir_all(&img).unwrap();
    for i in 0..3 {
        make_image(&img.join(format!("{i}.png")), 64, 64, false, i);
    }
    let out = dir.path().join("out");
    let run = |resume: bool| {
        let mut args = vec!["predict", "--model", s(&model), s(&img), "--out", s(&out)];
        if resume {
            args.push("--resume");
        }
        let o = dsr(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    run(false);
    let csv_before = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    assert!(run(true).contains("resuming: 3 of 3"));
    // Input 1's content changes (same size); a hand-edited journal row for input 2.
    make_image(&img.join("1.png"), 64, 64, true, 1);
    let journal = out.join("predictions.jsonl");
    let text = std::fs::read_to_string(&journal).unwrap();
    let edited: Vec<String> = text
        .lines()
        .map(|l| {
            if l.contains("\"stem\":\"2\"") {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["row"]["label"] = "anomalous".into();
                v["row"]["score"] = 0.99.into();
                v.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&journal, edited.join("\n") + "\n").unwrap();
    assert!(run(true).contains("resuming: 1 of 3"));
    let csv_after = std::fs::read_to_string(out.join("predictions.csv")).unwrap();
    let row = |csv: &str, n: &str| {
        csv.lines()
            .find(|l| l.contains(&format!("{n}.png,")))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        row(&csv_before, "2"),
        row(&csv_after, "2"),
        "row 2 predicted again"
    );
    assert_ne!(
        row(&csv_before, "1"),
        row(&csv_after, "1"),
        "row 1 of the new content"
    );
    // A second predict into a folder in use is refused.
    let ledger = std::fs::OpenOptions::new()
        .append(true)
        .open(out.join(".dsr-outputs"))
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on an open descriptor.
    assert_eq!(
        unsafe { libc::flock(ledger.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let o = dsr(&["predict", "--model", s(&model), s(&img), "--out", s(&out)]);
    fails_with(&o, &["in use by another dsr predict"]);
}

// ---------------------------------------------------------------------------------------------
// 7. Messages

#[test]
fn errors_are_one_line_with_the_file_and_the_documented_words() {
    let dir = tempfile::tempdir().unwrap();
    // A safetensors header length of 2^60 in a 100-byte file.
    let huge = dir.path().join("huge.safetensors");
    let mut bytes = (1u64 << 60).to_le_bytes().to_vec();
    bytes.push(b'{');
    bytes.resize(100, b' ');
    std::fs::write(&huge, &bytes).unwrap();
    let o = dsr(&["info", s(&huge)]);
    fails_with(
        &o,
        &[
            "huge.safetensors",
            "header length field says 1152921504606846976 bytes but only 92 follow",
        ],
    );
    // A run configuration that does not parse.
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[train]\nbatch_size = 4\nadam = { lr = }\n").unwrap();
    let o = dsr(&["train", "--config", s(&cfg)]);
    fails_with(&o, &["bad.toml", "line 3"]);
}
