//! Seeded weight initialisation (candle's CPU generator cannot be seeded, so a fresh model is
//! built on a `VarMap` and then every tensor is overwritten from a ChaCha generator).

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How fresh (not loaded) weights are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitScheme {
    /// PyTorch's defaults everywhere (anomalib): U(±1/√fan_in) for convolution weights and
    /// biases; codebooks N(0, 1), EMA cluster sizes 0.
    #[default]
    Pytorch,
    /// The original code: like `Pytorch`, but every convolution weight of the anomaly detection
    /// module and of the image reconstruction network is drawn from N(0, 0.02).
    Original,
}

/// Fan-in PyTorch uses for a convolution (or transposed convolution) weight of `shape`.
fn fan_in(shape: &[usize]) -> usize {
    // PyTorch takes dimension 1 of the weight in both cases: `in` for a convolution
    // (`[out, in, kh, kw]`) and `out` for a transposed one (`[in, out, kh, kw]`).
    shape[1] * shape[2..].iter().product::<usize>()
}

fn normal(rng: &mut rand_chacha::ChaCha8Rng, mean: f64, std: f64) -> f32 {
    // Box–Muller; one of the pair is enough here.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Overwrites every variable of `varmap` whose key starts with one of `prefixes` (all when
/// empty) with values drawn from a generator seeded with `seed`, following `scheme`. Keys are
/// visited in sorted order, so the result depends on the seed and the key set only.
pub fn init_seeded(
    varmap: &VarMap,
    seed: u64,
    scheme: InitScheme,
    prefixes: &[&str],
) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Config("the VarMap lock is poisoned".into()))?;
    let mut keys: Vec<&String> = data
        .keys()
        .filter(|k| prefixes.is_empty() || prefixes.iter().any(|p| k.starts_with(p)))
        .collect();
    keys.sort();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for key in keys {
        let var = &data[key];
        let shape = var.as_tensor().dims().to_vec();
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if key.ends_with("_ema_cluster_size") {
            vec![0.0; n]
        } else if key.ends_with("_embedding.weight") || key.ends_with("_ema_w") {
            (0..n).map(|_| normal(&mut rng, 0.0, 1.0)).collect()
        } else if key.ends_with(".weight") && shape.len() == 4 {
            let original_normal = scheme == InitScheme::Original
                && (key.starts_with("anomaly_detection_module.")
                    || key.starts_with("image_reconstruction_network."));
            if original_normal {
                (0..n).map(|_| normal(&mut rng, 0.0, 0.02)).collect()
            } else {
                let bound = 1.0 / (fan_in(&shape) as f64).sqrt();
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            }
        } else if key.ends_with(".bias") {
            let weight_key = format!("{}.weight", key.trim_end_matches(".bias"));
            let wshape = data
                .get(&weight_key)
                .map(|w| w.as_tensor().dims().to_vec())
                .ok_or_else(|| Error::Config(format!("bias {key} has no weight {weight_key}")))?;
            let bound = 1.0 / (fan_in(&wshape) as f64).sqrt();
            (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect()
        } else {
            return Err(Error::Config(format!(
                "no initialisation rule for tensor {key} {shape:?}"
            )));
        };
        var.set(&Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(var.device())?)?;
    }
    Ok(())
}
