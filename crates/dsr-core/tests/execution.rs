//! Execution policies are values of each model: a model built for inference from loaded weights
//! keeps its layers' transformed filters and computes the same bits as one that makes them at
//! every call; a model whose weights change (a training model) never computes with stale
//! copies; two models in one process may use different convolution algorithms.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::{Checkpoint, ConvAlgorithm, DsrConfig, DsrModel, Execution};

mod common;
use common::{random, values};

/// A configuration whose detection and upsampling U-Nets (width 32) have 3×3 convolutions that
/// take Winograd's algorithm at 64×64 (at least 32 input channels and 16×16 pixels).
fn config() -> DsrConfig {
    DsrConfig {
        anomaly_detection_module_base_width: 32,
        upsampling_module_base_width: 32,
        ..DsrConfig::tiny()
    }
}

fn anomaly_map(model: &DsrModel, x: &Tensor) -> Vec<f32> {
    values(&model.infer(x).unwrap().anomaly_map)
}

fn checkpoint(cfg: &DsrConfig, tensors: HashMap<String, Tensor>) -> Checkpoint {
    Checkpoint {
        path: "seeded weights".into(),
        tensors,
        config: Some(*cfg),
        image_size: Some([64, 64]),
        metadata: Default::default(),
    }
}

#[test]
fn kept_filters_give_the_same_outputs_and_models_choose_their_algorithm() {
    let cfg = config();
    let weights = DsrModel::seeded_weights(&cfg, 3).unwrap();
    let plain = DsrModel::new(
        &cfg,
        VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap();
    let kept = checkpoint(&cfg, weights.clone())
        .into_inference_model(&cfg, &Device::Cpu, Execution::default())
        .unwrap();
    let direct = checkpoint(&cfg, weights)
        .into_inference_model(
            &cfg,
            &Device::Cpu,
            Execution::with_conv(ConvAlgorithm::Direct),
        )
        .unwrap();
    let x = random(&[2, 3, 64, 64], 1, 1.0);
    let fresh = anomaly_map(&plain, &x);
    let first = anomaly_map(&kept, &x);
    let again = anomaly_map(&kept, &x);
    assert_eq!(fresh, first);
    assert_eq!(fresh, again);
    // The other model of the same process computes its convolutions directly: other rounding.
    let by_direct = anomaly_map(&direct, &x);
    assert_ne!(
        fresh, by_direct,
        "the direct convolutions gave the same bits"
    );
    let worst = fresh
        .iter()
        .zip(&by_direct)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "{worst}");
    // And the first model still computes by Winograd's algorithm.
    assert_eq!(fresh, anomaly_map(&kept, &x));
}

#[test]
fn a_model_whose_weights_change_computes_with_the_new_ones() {
    let cfg = config();
    let varmap = VarMap::new();
    let model = DsrModel::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    dsr_core::init::init_seeded(&varmap, 5, dsr_core::init::InitScheme::Pytorch, &[]).unwrap();
    let x = random(&[1, 3, 64, 64], 2, 1.0);
    let before = anomaly_map(&model, &x);
    // Change a Winograd layer's weight in place, as a training step does.
    let key = "anomaly_detection_module.unet.encoder.block1.3.weight";
    {
        let data = varmap.data().lock().unwrap();
        let var = &data[key];
        let shape = var.as_tensor().dims().to_vec();
        var.set(&random(&shape, 9, 0.05)).unwrap();
    }
    let after = anomaly_map(&model, &x);
    let current: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach().copy().unwrap()))
        .collect();
    let rebuilt = DsrModel::new(
        &cfg,
        VarBuilder::from_tensors(current, DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_ne!(before, after, "the changed weight changed nothing");
    assert_eq!(after, anomaly_map(&rebuilt, &x));
}

#[test]
fn training_variables_are_not_taken_as_loaded_weights() {
    let cfg = DsrConfig::tiny();
    let varmap = VarMap::new();
    DsrModel::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let tensors = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let err = checkpoint(&cfg, tensors)
        .into_inference_model(&cfg, &Device::Cpu, Execution::default())
        .unwrap_err();
    assert!(err.to_string().contains("training variable"), "{err}");
}
