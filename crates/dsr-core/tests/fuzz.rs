//! Fuzzing of the weight loaders with proptest: arbitrary bytes and mutated valid files
//! (safetensors, PyTorch zip archives, their pickles, the `dsr.config` / `dsr.image_size`
//! metadata). Every input must give an error or a valid result: no panic, and no allocation
//! above 256 MiB (a counting allocator watches).
//!
//! A short seeded run (256 cases per target) is part of `cargo test`; the long run is
//! `DSR_FUZZ_CASES=100000 cargo test --release -p dsr-core --test fuzz -- --nocapture`
//! (`DSR_FUZZ_SEED` picks another seed). The cargo-fuzz targets in `fuzz/` call the same
//! loaders.

mod mutate;
mod peak_alloc;
mod torch_zip;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dsr_core::weights::{
    load_checkpoint, load_discrete_pckl, load_lightning_ckpt, load_torch, parse_metadata,
    safetensors_from_bytes, save_checkpoint, META_CONFIG, META_IMAGE_SIZE,
};
use dsr_core::DsrConfig;
use mutate::{apply, fuzz, mutations};
use peak_alloc::*;
use proptest::prelude::*;
use torch_zip::*;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

const ALLOCATION_LIMIT: usize = 256 << 20;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsr-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small valid checkpoint of the tiny configuration with its metadata.
fn tiny_safetensors() -> Vec<u8> {
    let dir = scratch("seed");
    let path = dir.join("tiny.safetensors");
    let cfg = DsrConfig::tiny();
    let tensors = cfg
        .state_dict_shapes()
        .unwrap()
        .into_iter()
        .map(|(k, s)| {
            let n: usize = s.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.01).collect();
            (k, Tensor::from_vec(v, s, &Device::Cpu).unwrap())
        })
        .collect();
    let mut extra = BTreeMap::new();
    extra.insert(
        "dsr.postprocess".to_string(),
        "{\"image_threshold\":0.5}".to_string(),
    );
    save_checkpoint(&path, &tensors, &cfg, Some([64, 64]), &extra).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// A two-tensor safetensors file with both metadata entries, small enough that mutations often
/// hit the header.
fn small_safetensors() -> Vec<u8> {
    let a = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap();
    let b = Tensor::zeros((2, 2), DType::F16, &Device::Cpu).unwrap();
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        META_CONFIG.to_string(),
        serde_json::to_string(&DsrConfig::tiny()).unwrap(),
    );
    meta.insert(META_IMAGE_SIZE.to_string(), "[64, 64]".to_string());
    safetensors::serialize([("a", &a), ("b", &b)], Some(meta)).unwrap()
}

fn header_range(bytes: &[u8]) -> std::ops::Range<usize> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    0..(8 + n).min(bytes.len())
}

/// Loads `bytes` as safetensors; when it loads with a configuration, builds the model too.
fn check_safetensors(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let path = Path::new("fuzz.safetensors");
    let ok = match safetensors_from_bytes(path, bytes) {
        Ok(ckpt) => {
            if let Some(cfg) = ckpt.config {
                let _ = ckpt.build_model(&cfg, &Device::Cpu);
            }
            true
        }
        Err(e) => {
            prop_assert!(e.to_string().contains("fuzz.safetensors"), "{e}");
            false
        }
    };
    assert_no_allocation_above(ALLOCATION_LIMIT);
    Ok(ok)
}

/// Writes `bytes` to `path` and runs every PyTorch loader on it.
fn check_torch_file(path: &Path, bytes: &[u8]) -> Result<bool, TestCaseError> {
    std::fs::write(path, bytes).unwrap();
    let mut ok = false;
    for result in [
        load_checkpoint(path).map(|_| ()),
        load_torch(path, None).map(|_| ()),
        load_discrete_pckl(path).map(|_| ()),
        load_lightning_ckpt(path).map(|_| ()),
    ] {
        match result {
            Ok(()) => ok = true,
            Err(e) => {
                let line = e.to_string();
                prop_assert!(line.contains(&path.display().to_string()), "{line}");
            }
        }
    }
    assert_no_allocation_above(ALLOCATION_LIMIT);
    Ok(ok)
}

#[test]
fn safetensors_arbitrary_bytes() {
    fuzz(
        "safetensors/arbitrary",
        prop::collection::vec(any::<u8>(), 0..512),
        |bytes| check_safetensors(&bytes),
    );
    // Arbitrary headers behind a correct length field.
    fuzz(
        "safetensors/arbitrary-header",
        (".{0,200}", prop::collection::vec(any::<u8>(), 0..64)),
        |(header, data)| {
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&data);
            check_safetensors(&bytes)
        },
    );
}

#[test]
fn safetensors_mutated() {
    let small = small_safetensors();
    let tiny = tiny_safetensors();
    assert!(check_safetensors(&small).unwrap() && check_safetensors(&tiny).unwrap());
    fuzz("safetensors/mutated-small", mutations(), |edits| {
        check_safetensors(&apply(&small, &edits, Some(header_range(&small))))
    });
    fuzz("safetensors/mutated-tiny-model", mutations(), |edits| {
        check_safetensors(&apply(&tiny, &edits, Some(header_range(&tiny))))
    });
}

/// JSON values near the valid ones: mutated valid documents and arbitrary text.
fn json_like(valid: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(mutate::mutation(), 1..3).prop_map(move |edits| {
            String::from_utf8_lossy(&apply(valid.as_bytes(), &edits, None)).into_owned()
        }),
        "[-0-9e.,\\[\\] ]{0,40}",
        ".{0,60}",
    ]
}

/// Parses one metadata entry; a value that parses must be usable.
fn check_metadata(key: &str, value: String) -> Result<bool, TestCaseError> {
    let mut meta = BTreeMap::new();
    meta.insert(key.to_string(), value);
    let ok = match parse_metadata(Path::new("m.safetensors"), &meta) {
        Ok((cfg, size)) => {
            // A configuration that parses is usable: its shapes can be listed (nothing is
            // allocated for them) and an image size fits the network.
            if let Some(cfg) = cfg {
                prop_assert!(cfg.state_dict_shapes().is_ok());
            }
            if let Some([h, w]) = size {
                prop_assert!(dsr_core::config::validate_image_size(h, w).is_ok());
            }
            true
        }
        Err(e) => {
            prop_assert!(e.to_string().contains(&format!("metadata '{key}'")), "{e}");
            false
        }
    };
    assert_no_allocation_above(ALLOCATION_LIMIT);
    Ok(ok)
}

#[test]
fn metadata_parser() {
    let config = serde_json::to_string(&DsrConfig::tiny()).unwrap();
    let config: &'static str = Box::leak(config.into_boxed_str());
    fuzz("metadata/dsr.config", json_like(config), |v| {
        check_metadata(META_CONFIG, v)
    });
    // Configurations with every field drawn from small, boundary and huge values.
    let width = || prop_oneof![8 => 1usize..40, 1 => 0usize..5000, 1 => any::<usize>()];
    fuzz(
        "metadata/dsr.config-fields",
        (
            (width(), width(), width(), 0usize..100),
            (
                width(),
                width(),
                width(),
                prop_oneof![4 => 0.0f64..1.0, 1 => -1.0f64..2.0],
            ),
        ),
        |((d, k, h, layers), (rh, a, u, strength))| {
            let json = format!(
                r#"{{"latent_anomaly_strength":{strength},"embedding_dim":{d},"num_embeddings":{k},"num_hiddens":{h},"num_residual_layers":{layers},"num_residual_hiddens":{rh},"anomaly_detection_module_base_width":{a},"upsampling_module_base_width":{u}}}"#
            );
            check_metadata(META_CONFIG, json)
        },
    );
    fuzz("metadata/dsr.image_size", json_like("[256, 256]"), |v| {
        check_metadata(META_IMAGE_SIZE, v)
    });
}

#[test]
fn torch_archives_mutated() {
    let dir = scratch("torch");
    let tensors = vec![
        TensorSpec::new("a.weight", &[2, 3], (0..6).map(|i| i as f32).collect()),
        TensorSpec::new("a.bias", &[2], vec![0.5, -0.5]),
    ];
    let pickle = state_dict_pickle(&tensors);
    let small = archive(&tensors);
    let path = dir.join("archive.pth");
    assert!(check_torch_file(&path, &small).unwrap(), "the seed loads");
    fuzz("torch/mutated-archive", mutations(), |edits| {
        check_torch_file(&path, &apply(&small, &edits, None))
    });
    // Mutations of the pickle alone, re-packed into a valid archive: they reach candle's
    // pickle reader.
    fuzz("torch/mutated-pickle", mutations(), |edits| {
        let p = apply(&pickle, &edits, None);
        check_torch_file(
            &path,
            &archive_with_pickle(&p, &tensors, zip::CompressionMethod::Stored),
        )
    });
    fuzz(
        "torch/arbitrary-after-zip-magic",
        prop::collection::vec(any::<u8>(), 0..512),
        |bytes| {
            let mut b = b"PK\x03\x04".to_vec();
            b.extend_from_slice(&bytes);
            check_torch_file(&path, &b)
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn official_pckl_mutated() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/small/discrete_small.pckl");
    let seed = std::fs::read(fixture).unwrap();
    let dir = scratch("pckl");
    let path = dir.join("discrete.pckl");
    assert!(check_torch_file(&path, &seed).unwrap(), "the seed loads");
    // The pickle sits at the start of the archive: half the edits land in its first 4 KiB.
    fuzz("torch/mutated-official-pckl", mutations(), |edits| {
        check_torch_file(&path, &apply(&seed, &edits, Some(0..4096)))
    });
    let _ = std::fs::remove_dir_all(&dir);
}
