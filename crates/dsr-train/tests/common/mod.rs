//! Helpers shared by the training tests.

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::init::{init_seeded, InitScheme};
use dsr_core::weights::Checkpoint;
use dsr_core::{DsrConfig, DsrModel};

/// Seeded weights for the discrete model of the tiny configuration.
pub fn discrete_checkpoint(cfg: &DsrConfig) -> Checkpoint {
    let varmap = VarMap::new();
    DsrModel::new(
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_seeded(
        &varmap,
        99,
        InitScheme::Pytorch,
        &["discrete_latent_model."],
    )
    .unwrap();
    let tensors = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("discrete_latent_model."))
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    Checkpoint {
        path: "discrete.safetensors".into(),
        tensors,
        config: Some(*cfg),
        image_size: None,
        metadata: BTreeMap::new(),
    }
}
