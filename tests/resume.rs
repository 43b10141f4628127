//! `dsr predict` killed with SIGKILL half-way, then `--resume`: every output is complete and
//! equal to an uninterrupted run's, and the tables cover every image. Also `dsr test
//! --on-error` and `--max-pixels`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

mod common;
use common::{dsr, s};

fn make_model(path: &Path) {
    common::make_model(path, true);
}

fn make_image(path: &Path, w: u32, h: u32, seed: u32) {
    common::make_image(path, w, h, false, seed);
}

/// The files of a folder (name → bytes), with the folder's own path in the tables replaced.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let mut bytes = std::fs::read(e.path()).unwrap();
        if name.starts_with("predictions.") {
            let text = String::from_utf8(bytes).unwrap();
            bytes = text.replace(s(dir), "<OUT>").into_bytes();
        }
        out.insert(name, bytes);
    }
    out
}

fn count_npy(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".npy"))
                .count()
        })
        .unwrap_or(0)
}

/// Starts `dsr predict` and kills it with SIGKILL once `after` maps are written; `None` when
/// the run finished first.
fn predict_and_kill(model: &Path, images: &Path, out: &Path, after: usize) -> Option<usize> {
    let mut child = Command::new(common::dsr_exe())
        .args([
            "predict",
            "--model",
            s(model),
            s(images),
            "--out",
            s(out),
            "--batch",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success());
            return None;
        }
        if count_npy(out) >= after {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return Some(count_npy(out));
        }
        assert!(start.elapsed() < Duration::from_secs(120), "predict hangs");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn predict_killed_midway_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model);
    let mut n = 40;
    for attempt in 0..4 {
        let images = dir.path().join(format!("images-{attempt}"));
        std::fs::create_dir_all(&images).unwrap();
        for i in 0..n {
            make_image(&images.join(format!("{i:03}.png")), 96, 80, i as u32);
        }
        std::fs::write(images.join("broken.png"), b"not a png").unwrap();
        let reference = dir.path().join(format!("reference-{attempt}"));
        let out = dsr(&[
            "predict",
            "--model",
            s(&model),
            s(&images),
            "--out",
            s(&reference),
            "--batch",
            "1",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        let killed = dir.path().join(format!("killed-{attempt}"));
        let Some(done) = predict_and_kill(&model, &images, &killed, 3) else {
            // The whole run fit between two polls: try again with more images.
            println!("attempt {attempt}: {n} images finished before the kill; retrying");
            n *= 4;
            continue;
        };
        println!("attempt {attempt}: killed with {done} of {n} maps written");
        assert!(done < n, "the run was not interrupted");
        assert!(!killed.join("predictions.csv").exists());
        // A temporary file of an interrupted write is cleaned up by the next run.
        std::fs::write(killed.join(".dsr-tmp-4194305-7"), b"partial").unwrap();

        let resume = || {
            dsr(&[
                "predict",
                "--model",
                s(&model),
                s(&images),
                "--out",
                s(&killed),
                "--batch",
                "1",
                "--resume",
            ])
        };
        let out = resume();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{}", stdout.trim());
        let resumed: usize = stdout
            .split("resuming: ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .expect("the resumed run says how many images were done");
        assert!(resumed >= done.saturating_sub(1) && resumed < n, "{stdout}");

        let a = contents(&reference);
        let b = contents(&killed);
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "the same files"
        );
        for (name, bytes) in &a {
            assert!(
                &b[name] == bytes,
                "{name} differs from the uninterrupted run's"
            );
        }
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(killed.join("predictions.json")).unwrap())
                .unwrap();
        assert_eq!(json["predictions"].as_array().unwrap().len(), n);
        assert_eq!(json["skipped"].as_array().unwrap().len(), 1);

        // Resuming a finished run predicts nothing and changes nothing.
        let out = resume();
        // The broken file is tried again (and skipped again) each time.
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("resuming: {n} of {}", n + 1)),
            "{stdout}"
        );
        assert_eq!(contents(&killed), a);

        // Another model into the same folder is refused under --resume.
        let other = dir.path().join("other.safetensors");
        make_model(&other);
        let mut bytes = std::fs::read(&other).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&other, bytes).unwrap();
        let out = dsr(&[
            "predict",
            "--model",
            s(&other),
            s(&images),
            "--out",
            s(&killed),
            "--resume",
        ]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("another model"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    panic!("no attempt could interrupt the run");
}

fn mvtec(root: &Path) -> PathBuf {
    for (sub, n) in [("train/good", 1), ("test/good", 3), ("test/crack", 2)] {
        let d = root.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..n {
            make_image(&d.join(format!("00{i}.png")), 64, 64, i + 7);
        }
    }
    let gt = root.join("ground_truth/crack");
    std::fs::create_dir_all(&gt).unwrap();
    for i in 0..2 {
        let mut m = RgbImage::new(64, 64);
        for y in 20..40 {
            for x in 20..40 {
                m.put_pixel(x, y, Rgb([255, 255, 255]));
            }
        }
        m.save(gt.join(format!("00{i}_mask.png"))).unwrap();
    }
    root.to_path_buf()
}

#[test]
fn test_skips_or_stops_on_unreadable_images_and_limits_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model);
    let data = mvtec(&dir.path().join("widget"));
    std::fs::write(data.join("test/good/003.png"), b"").unwrap();
    let out_dir = dir.path().join("results");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "test",
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--out",
            s(&out_dir),
        ];
        a.extend_from_slice(extra);
        dsr(&a)
    };
    let fail = args(&[]);
    assert_eq!(fail.status.code(), Some(1));
    let err = String::from_utf8_lossy(&fail.stderr);
    assert!(err.contains("003.png is empty (zero bytes)"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let skip = args(&["--on-error", "skip"]);
    assert!(
        skip.status.success(),
        "{}",
        String::from_utf8_lossy(&skip.stderr)
    );
    assert!(String::from_utf8_lossy(&skip.stderr).contains("skipping"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(json["num_images"], 5);
    assert_eq!(json["skipped"].as_array().unwrap().len(), 1);

    // A mask of another size than its image.
    make_image(&data.join("ground_truth/crack/001_mask.png"), 32, 64, 1);
    let wrong = args(&["--on-error", "fail"]);
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("001_mask.png is 32x64 but its image"), "{err}");
    std::fs::remove_file(data.join("test/good/003.png")).unwrap();
    let skip = args(&["--on-error", "skip"]);
    assert!(skip.status.success());
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(json["num_images"], 4);
    assert!(json["skipped"][0]["error"]
        .as_str()
        .unwrap()
        .contains("32x64"));

    // A pixel limit below 64×64 refuses every image by its header.
    let limited = args(&["--max-pixels", "1000"]);
    assert_eq!(limited.status.code(), Some(1));
    let err = String::from_utf8_lossy(&limited.stderr);
    assert!(err.contains("more than the limit of 1000 pixels"), "{err}");
    let predicted = dir.path().join("predicted");
    let out = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&data.join("test/crack")),
        "--out",
        s(&predicted),
        "--max-pixels",
        "1000",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("skipping") && err.contains("limit of 1000 pixels"),
        "{err}"
    );
}
