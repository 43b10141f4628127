//! Weight names and formats: the default model's 188 keys, the official `.pckl` format of the
//! discrete model, our safetensors checkpoints, and clear errors for bad files.

mod common;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use common::*;
use dsr_core::weights::{self, load_checkpoint, load_discrete_pckl, save_checkpoint};
use dsr_core::{DiscreteLatentModel, DsrConfig, Error};

fn default_shapes_fixture() -> Vec<(String, Vec<usize>)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dsr_default_state_dict_shapes.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut list: Vec<(String, Vec<usize>)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let shape = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (e["key"].as_str().unwrap().to_string(), shape)
        })
        .collect();
    list.sort();
    list
}

#[test]
fn default_model_has_the_188_reference_keys_and_shapes() {
    let ours = DsrConfig::default().state_dict_shapes().unwrap();
    let reference = default_shapes_fixture();
    assert_eq!(reference.len(), 188);
    assert_eq!(ours, reference);
    let elements: usize = ours.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(elements, 40_306_954);
}

#[test]
fn small_model_keys_equal_the_fixture_state_dict() {
    let (cfg, _, _) = config();
    let tensors = load("weights.safetensors");
    let mut reference: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    reference.sort();
    assert_eq!(cfg.state_dict_shapes().unwrap(), reference);
}

#[test]
fn official_pckl_format_loads_and_matches_the_reference() {
    let (cfg, _, _) = config();
    let path = fixture_dir().join("discrete_small.pckl");
    let ckpt = load_discrete_pckl(&path).unwrap();
    let inferred = ckpt.config.unwrap();
    assert_eq!(
        (
            inferred.embedding_dim,
            inferred.num_embeddings,
            inferred.num_hiddens,
            inferred.num_residual_hiddens,
            inferred.num_residual_layers
        ),
        (
            cfg.embedding_dim,
            cfg.num_embeddings,
            cfg.num_hiddens,
            cfg.num_residual_hiddens,
            cfg.num_residual_layers
        )
    );
    assert_eq!(ckpt.tensors.len(), 40);
    // Identical values to the discrete part of the full state_dict.
    let full = load("weights.safetensors");
    for (k, v) in &ckpt.tensors {
        assert_eq!(max_abs_diff(v, &full[k]), 0.0, "{k}");
    }
    let vb = candle_nn::VarBuilder::from_tensors(ckpt.tensors.clone(), DType::F32, &Device::Cpu);
    let discrete = DiscreteLatentModel::new(&cfg, vb.pp("discrete_latent_model")).unwrap();
    let io = load("discrete_io.safetensors");
    let (recon, enc) = discrete.reconstruct(&get(&io, "input.image")).unwrap();
    assert_close(
        "discrete.quantized_t",
        &enc.q_t.quantized,
        &get(&io, "out.quantized_t"),
        tol("quantized"),
    );
    assert_close(
        "discrete.quantized_b",
        &enc.q_b.quantized,
        &get(&io, "out.quantized_b"),
        tol("quantized"),
    );
    assert_close(
        "discrete.recon_image",
        &recon,
        &get(&io, "out.recon_image"),
        tol("image"),
    );
}

#[test]
fn safetensors_checkpoint_round_trips_with_metadata() {
    let (cfg, size, _) = config();
    let tensors = load("weights.safetensors");
    let dir = tempdir();
    let path = dir.join("model.safetensors");
    let mut extra = BTreeMap::new();
    extra.insert("some.future.entry".to_string(), "{\"x\": 1}".to_string());
    save_checkpoint(&path, &tensors, &cfg, Some([size, size]), &extra).unwrap();
    let ckpt = load_checkpoint(&path).unwrap();
    assert_eq!(ckpt.config, Some(cfg));
    assert_eq!(ckpt.image_size, Some([size, size]));
    assert_eq!(
        ckpt.metadata.get("some.future.entry").map(String::as_str),
        Some("{\"x\": 1}")
    );
    for (k, v) in &tensors {
        assert_eq!(max_abs_diff(v, &ckpt.tensors[k]), 0.0, "{k}");
    }
    assert_same_answers(&ckpt.build_model(&cfg, &Device::Cpu).unwrap());
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != "model.safetensors")
        .collect();
    assert!(leftovers.is_empty());
}

/// A model rebuilt from a file answers bit for bit like the model built from the fixture
/// weights, and its score matches the reference at the manifest's tolerance.
fn assert_same_answers(model: &dsr_core::DsrModel) {
    let (cfg, _, _) = config();
    let fe = load("forward_eval.safetensors");
    let image = get(&fe, "input.image");
    let out = model.infer(&image).unwrap();
    let direct = dsr_core::DsrModel::new(&cfg, weights_vb())
        .unwrap()
        .infer(&image)
        .unwrap();
    assert_eq!(max_abs_diff(&out.anomaly_map, &direct.anomaly_map), 0.0);
    assert_eq!(max_abs_diff(&out.pred_score, &direct.pred_score), 0.0);
    assert_close(
        "pred_score",
        &out.pred_score,
        &get(&fe, "out.pred_score"),
        tol("score"),
    );
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "dsr-core-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn expect_weights_error(
    result: dsr_core::Result<impl std::fmt::Debug>,
    path: &std::path::Path,
    needle: &str,
) {
    match result {
        Err(Error::Weights { path: p, message }) => {
            assert_eq!(p, path);
            assert!(
                message.contains(needle),
                "message '{message}' lacks '{needle}'"
            );
        }
        other => panic!("expected a weights error containing '{needle}', got {other:?}"),
    }
}

#[test]
fn bad_weight_files_give_clear_errors() {
    let (cfg, _, _) = config();
    let dir = tempdir();
    let tensors = load("weights.safetensors");

    let empty = dir.join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    expect_weights_error(load_checkpoint(&empty), &empty, "empty");

    let text = dir.join("notes.safetensors");
    std::fs::write(&text, b"hello, this is not a model").unwrap();
    expect_weights_error(load_checkpoint(&text), &text, "not a weight file");

    let legacy = dir.join("legacy.pckl");
    std::fs::write(
        &legacy,
        [
            0x80u8, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
        ],
    )
    .unwrap();
    expect_weights_error(load_checkpoint(&legacy), &legacy, "legacy");

    let good = dir.join("good.safetensors");
    save_checkpoint(&good, &tensors, &cfg, None, &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    expect_weights_error(
        load_checkpoint(&truncated),
        &truncated,
        "not a valid safetensors file",
    );

    let mut missing: HashMap<String, Tensor> = tensors.clone();
    missing.remove("upsampling_module.unet.decoder.fin_out.0.bias");
    let path = dir.join("missing.safetensors");
    save_checkpoint(&path, &missing, &cfg, None, &BTreeMap::new()).unwrap();
    expect_weights_error(
        load_checkpoint(&path)
            .unwrap()
            .build_model(&cfg, &Device::Cpu),
        &path,
        "missing tensor 'upsampling_module.unet.decoder.fin_out.0.bias'",
    );

    let mut extra = tensors.clone();
    extra.insert(
        "something.else".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.join("extra.safetensors");
    save_checkpoint(&path, &extra, &cfg, None, &BTreeMap::new()).unwrap();
    expect_weights_error(
        load_checkpoint(&path)
            .unwrap()
            .build_model(&cfg, &Device::Cpu),
        &path,
        "unexpected tensor 'something.else'",
    );

    let wrong_cfg = DsrConfig {
        num_embeddings: cfg.num_embeddings * 2,
        ..cfg
    };
    expect_weights_error(
        load_checkpoint(&good)
            .unwrap()
            .build_model(&wrong_cfg, &Device::Cpu),
        &good,
        "has shape",
    );

    let mut nan = tensors.clone();
    nan.insert(
        "image_reconstruction_network._conv_1.bias".into(),
        Tensor::full(f32::NAN, cfg.num_hiddens, &Device::Cpu).unwrap(),
    );
    let path = dir.join("nan.safetensors");
    save_checkpoint(&path, &nan, &cfg, None, &BTreeMap::new()).unwrap();
    expect_weights_error(
        load_checkpoint(&path)
            .unwrap()
            .build_model(&cfg, &Device::Cpu),
        &path,
        "NaN",
    );

    let missing_file = dir.join("does-not-exist.safetensors");
    match load_checkpoint(&missing_file) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing_file),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_eq!(
        weights::detect_format(&good).unwrap(),
        weights::WeightFormat::Safetensors
    );
}

fn torch_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch")
}

#[test]
fn anomalib_lightning_checkpoint_loads_one_to_one() {
    let (cfg, _, _) = config();
    let path = torch_dir().join("lightning_small.ckpt");
    let ckpt = load_checkpoint(&path).unwrap();
    let full = load("weights.safetensors");
    assert_eq!(ckpt.tensors.len(), full.len());
    for (k, v) in &full {
        assert_eq!(max_abs_diff(v, &ckpt.tensors[k]), 0.0, "{k}");
    }
    assert_eq!(
        ckpt.metadata
            .get("anomalib._image_threshold")
            .map(String::as_str),
        Some("0.25")
    );
    assert_eq!(
        ckpt.metadata.get("anomalib.pixel_max").map(String::as_str),
        Some("1")
    );
    assert_same_answers(&ckpt.build_model(&cfg, &Device::Cpu).unwrap());
}

#[test]
fn legacy_torch_format_is_named_in_the_error() {
    let path = torch_dir().join("legacy_small.pckl");
    assert_eq!(
        weights::detect_format(&path).unwrap(),
        weights::WeightFormat::TorchLegacy
    );
    expect_weights_error(
        load_discrete_pckl(&path),
        &path,
        "legacy (non-zip) PyTorch format",
    );
    expect_weights_error(
        load_checkpoint(&path),
        &path,
        "legacy (non-zip) PyTorch format",
    );
}

#[test]
fn a_pckl_with_a_missing_key_is_refused() {
    // A zip archive whose state_dict lacks a tensor: the official-format loader must say which.
    let dir = tempdir();
    let src = fixture_dir().join("discrete_small.pckl");
    let dst = dir.join("broken.pckl");
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
    let mut writer = zip::ZipWriter::new(std::fs::File::create(&dst).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        let name = f.name().to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut bytes).unwrap();
        if name.ends_with("data.pkl") {
            // Rename one key inside the pickle so that it no longer matches the model.
            let needle = b"upsample_t.bias";
            let pos = bytes
                .windows(needle.len())
                .position(|w| w == needle)
                .expect("key in pickle");
            bytes[pos..pos + needle.len()].copy_from_slice(b"upsample_X.bias");
        }
        writer.start_file(name, opts).unwrap();
        std::io::Write::write_all(&mut writer, &bytes).unwrap();
    }
    writer.finish().unwrap();
    expect_weights_error(
        load_discrete_pckl(&dst),
        &dst,
        "missing tensor 'upsample_t.bias'",
    );
}
