//! Shared helpers of the tests: where the fixture lives, its configuration and tolerances (all
//! read from the fixture itself), tensor comparison, and seeded random inputs.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dsr_core::DsrConfig;
use rand::{Rng, SeedableRng};

/// The fixture folder: `DSR_FIXTURE_DIR` when set, else the copy inside the repository.
pub fn fixture_dir() -> PathBuf {
    match std::env::var_os("DSR_FIXTURE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/small"),
    }
}

/// `manifest.json` of the fixture.
pub fn manifest() -> serde_json::Value {
    let path = fixture_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("manifest.json parses")
}

/// The model configuration, image size and batch of the fixture (`config.json`).
pub fn config() -> (DsrConfig, usize, usize) {
    let path = fixture_dir().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).expect("config.json parses");
    let cfg: DsrConfig = serde_json::from_value(v["config"].clone()).expect("config fields");
    let size = v["image_size"].as_u64().expect("image_size") as usize;
    let batch = v["batch"].as_u64().expect("batch") as usize;
    (cfg, size, batch)
}

/// Reads one safetensors file of the fixture.
pub fn load(name: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir().join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tensor of a loaded file, by key.
pub fn get(map: &HashMap<String, Tensor>, key: &str) -> Tensor {
    map.get(key)
        .unwrap_or_else(|| panic!("fixture key {key} missing"))
        .clone()
}

/// A VarBuilder over the fixture's full state_dict (constants, no gradients).
pub fn weights_vb() -> VarBuilder<'static> {
    VarBuilder::from_tensors(load("weights.safetensors"), DType::F32, &Device::Cpu)
}

/// A tolerance of the manifest's `tolerance_policy`.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
}

/// Reads `tolerance_policy[kind]` (`atol`, optional `rtol`).
pub fn tol(kind: &str) -> Tol {
    let m = manifest();
    let t = &m["tolerance_policy"][kind];
    let atol = t["atol"]
        .as_f64()
        .unwrap_or_else(|| panic!("tolerance {kind} has no atol"));
    let rtol = t["rtol"].as_f64().unwrap_or(0.0);
    Tol { atol, rtol }
}

/// The manifest's gradient tolerance, relative to the largest reference magnitude.
pub fn grad_rel_tol() -> f64 {
    manifest()["tolerance_policy"]["grad"]["atol_relative_to_max_abs"]
        .as_f64()
        .expect("grad tolerance")
}

/// Largest |a − b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Asserts `|ours − reference| ≤ atol + rtol·|reference|` elementwise and the same shape;
/// returns the largest absolute difference.
pub fn assert_close(name: &str, ours: &Tensor, reference: &Tensor, tol: Tol) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let a: Vec<f64> = ours
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = reference
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut worst = 0f64;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let d = (x - y).abs();
        assert!(
            d <= tol.atol + tol.rtol * y.abs(),
            "{name}: element {i}: ours {x}, reference {y}, |diff| {d} > atol {} + rtol {}·|ref|",
            tol.atol,
            tol.rtol
        );
        worst = worst.max(d);
    }
    eprintln!("{name}: max |diff| = {worst:.3e}");
    worst
}

/// Asserts that two index tensors are identical.
pub fn assert_indices(name: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let a: Vec<i64> = ours
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<i64> = reference
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mismatches: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert!(
        mismatches.is_empty(),
        "{name}: indices differ at {mismatches:?}"
    );
    eprintln!("{name}: all {} indices equal", a.len());
}

/// A CPU tensor of `shape` with values uniform in `[-scale, scale)`, from `seed`.
pub fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The values of a tensor, flattened.
pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}
