//! `dsr predict --shard I/N` (N processes at once, merged, against one whole run) and
//! `dsr export` (the model file, its guards, its usage errors).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::{dsr, dsr_exe, make_image, make_model, s};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The rows of a `predictions.json` by input path: (stem of its map, score, normalised score,
/// label), and the bytes of each map.
fn rows(out: &Path) -> BTreeMap<String, (String, String, Vec<u8>)> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("predictions.json")).unwrap())
            .unwrap();
    json["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let map = Path::new(r["map"].as_str().unwrap());
            let stem = map.file_stem().unwrap().to_string_lossy().into_owned();
            let values = format!("{} {} {}", r["score"], r["normalized_score"], r["label"]);
            (
                r["path"].as_str().unwrap().to_string(),
                (stem, values, std::fs::read(map).unwrap()),
            )
        })
        .collect()
}

#[test]
fn shards_run_at_once_give_exactly_the_rows_of_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    // Seven images in two folders; "a.png" in both, so the second is named a_2 by position in
    // the whole list, which every shard must reproduce.
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    for d in [&one, &two] {
        std::fs::create_dir_all(d).unwrap();
    }
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        make_image(
            &one.join(format!("{name}.png")),
            64,
            64,
            i % 2 == 1,
            i as u32,
        );
    }
    for (i, name) in ["a", "e", "f"].iter().enumerate() {
        make_image(
            &two.join(format!("{name}.png")),
            72,
            64,
            i == 0,
            10 + i as u32,
        );
    }
    let whole = dir.path().join("whole");
    let out = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&one),
        s(&two),
        "--out",
        s(&whole),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    let n = 3;
    let children: Vec<_> = (0..n)
        .map(|i| {
            Command::new(dsr_exe())
                .args(["predict", "--model", s(&model), s(&one), s(&two)])
                .arg("--out")
                .arg(dir.path().join(format!("shard-{i}")))
                .args(["--shard", &format!("{i}/{n}"), "--batch", "2"])
                .output()
                .unwrap()
        })
        .collect();
    for (i, out) in children.iter().enumerate() {
        assert!(out.status.success(), "shard {i}: {}", stderr(out));
    }
    let mut merged = BTreeMap::new();
    let mut sizes = Vec::new();
    for i in 0..n {
        let part = rows(&dir.path().join(format!("shard-{i}")));
        sizes.push(part.len());
        for (path, row) in part {
            assert!(
                merged.insert(path.clone(), row).is_none(),
                "{path} in two shards"
            );
        }
    }
    // 7 inputs by position mod 3: 3, 2 and 2.
    assert_eq!(sizes, [3, 2, 2]);
    let whole_rows = rows(&whole);
    assert_eq!(whole_rows.len(), 7);
    assert_eq!(merged, whole_rows);
    assert!(merged.values().any(|(stem, _, _)| stem == "a_2"));

    let bad = dsr(&[
        "predict",
        "--model",
        s(&model),
        s(&one),
        "--out",
        s(&dir.path().join("bad")),
        "--shard",
        "3/3",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("shard"), "{}", stderr(&bad));
}

#[test]
fn export_writes_an_onnx_model_and_replaces_only_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    make_model(&model, true);
    let onnx = dir.path().join("model.onnx");
    let export = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "export",
            "--model",
            s(&model),
            "--format",
            "onnx",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        dsr(&args)
    };
    let out = export(&onnx, &["--dynamic-batch", "--opset", "18"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("opset 18") && text.contains("pred_label"),
        "{text}"
    );
    let written = dsr_export::from_bytes(&std::fs::read(&onnx).unwrap()).unwrap();
    assert_eq!(written.opset_import[0].version, 18);
    assert_eq!(written.graph.output.len(), 6);
    // Its own file is replaced.
    assert!(export(&onnx, &[]).status.success());

    // Another file is not, and stays as it was.
    let other = dir.path().join("other.onnx");
    std::fs::write(&other, b"keep me").unwrap();
    let out = export(&other, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("other.onnx"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&other).unwrap(), b"keep me");

    let out = export(&dir.path().join("x.onnx"), &["--opset", "9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("opset 9"), "{}", stderr(&out));
    let out = export(&dir.path().join("x.onnx"), &["--format", "tflite"]);
    assert_eq!(out.status.code(), Some(2));
    let missing = dir.path().join("missing.safetensors");
    let out = dsr(&["export", "--model", s(&missing), "--out", s(&onnx)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("missing.safetensors"),
        "{}",
        stderr(&out)
    );
    assert!(!dir.path().join("x.onnx").exists());
}
