//! Configuration and input validation, and seeded initialisation.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::init::{init_seeded, InitScheme};
use dsr_core::{DsrConfig, DsrModel, Error, SeededRandomness};

fn tiny_model() -> (VarMap, DsrModel) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = DsrModel::new(&DsrConfig::tiny(), vb).unwrap();
    (varmap, model)
}

#[test]
fn config_json_uses_the_reference_field_names() {
    let json = r#"{"latent_anomaly_strength": 0.2, "embedding_dim": 8, "num_embeddings": 128,
        "num_hiddens": 32, "num_residual_layers": 2, "num_residual_hiddens": 16,
        "anomaly_detection_module_base_width": 8, "upsampling_module_base_width": 8}"#;
    let cfg: DsrConfig = serde_json::from_str(json).unwrap();
    assert_eq!(cfg.embedding_dim, 8);
    let back: DsrConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    let unknown = r#"{"embedding_dim": 8, "num_embeddings": 128, "num_hiddens": 32, "num_residual_layers": 2, "num_residual_hiddens": 16, "typo_field": 1}"#;
    assert!(serde_json::from_str::<DsrConfig>(unknown)
        .unwrap_err()
        .to_string()
        .contains("typo_field"));
    let d = DsrConfig::default();
    assert_eq!(
        (
            d.embedding_dim,
            d.num_embeddings,
            d.num_hiddens,
            d.num_residual_layers,
            d.num_residual_hiddens
        ),
        (128, 4096, 128, 2, 64)
    );
}

#[test]
fn bad_configurations_are_refused_with_the_field_named() {
    for (cfg, needle) in [
        (
            DsrConfig {
                num_hiddens: 33,
                ..DsrConfig::tiny()
            },
            "num_hiddens",
        ),
        (
            DsrConfig {
                embedding_dim: 0,
                ..DsrConfig::tiny()
            },
            "embedding_dim",
        ),
        (
            DsrConfig {
                num_embeddings: 1,
                ..DsrConfig::tiny()
            },
            "num_embeddings",
        ),
        (
            DsrConfig {
                latent_anomaly_strength: 1.5,
                ..DsrConfig::tiny()
            },
            "latent_anomaly_strength",
        ),
    ] {
        let err = DsrModel::new(&cfg, VarBuilder::zeros(DType::F32, &Device::Cpu)).unwrap_err();
        assert!(
            matches!(err, Error::Config(_)) && err.to_string().contains(needle),
            "{err}"
        );
    }
}

#[test]
fn inputs_must_be_rgb_with_sides_multiple_of_32_and_at_least_64() {
    let (_, model) = tiny_model();
    for shape in [
        (1, 3, 96, 100),
        (1, 3, 32, 32),
        (1, 3, 264, 256),
        (1, 1, 64, 64),
    ] {
        let x = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let err = model.infer(&x).unwrap_err();
        assert!(matches!(err, Error::Input(_)), "{shape:?}: {err}");
    }
    for shape in [(1, 3, 64, 64), (2, 3, 96, 128)] {
        let x = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let out = model.infer(&x).unwrap();
        assert_eq!(out.anomaly_map.dims(), &[shape.0, shape.2, shape.3]);
    }
    let x = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let wrong_mask = Tensor::zeros((1, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let err = model
        .forward_phase2(&x, &wrong_mask, &mut SeededRandomness::new(0))
        .unwrap_err();
    assert!(err.to_string().contains("anomaly mask"), "{err}");
}

fn snapshot(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
    let data = varmap.data().lock().unwrap();
    let mut v: Vec<(String, Vec<f32>)> = data
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn seeded_initialisation_is_reproducible_and_follows_pytorch_bounds() {
    let (a, _) = tiny_model();
    let (b, _) = tiny_model();
    let (c, _) = tiny_model();
    init_seeded(&a, 42, InitScheme::Pytorch, &[]).unwrap();
    init_seeded(&b, 42, InitScheme::Pytorch, &[]).unwrap();
    init_seeded(&c, 43, InitScheme::Pytorch, &[]).unwrap();
    let (sa, sb, sc) = (snapshot(&a), snapshot(&b), snapshot(&c));
    assert_eq!(sa, sb);
    assert_ne!(sa, sc);
    let data = a.data().lock().unwrap();
    for (k, var) in data.iter() {
        let t = var.as_tensor();
        let max = t
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if k.ends_with("_ema_cluster_size") {
            assert_eq!(max, 0.0);
        } else if k.ends_with(".weight") && t.rank() == 4 {
            let fan_in: usize = t.dims()[1..].iter().product();
            assert!(max <= 1.0 / (fan_in as f32).sqrt(), "{k}");
        }
    }
}

#[test]
fn original_scheme_draws_small_normal_weights_for_detection_and_reconstruction() {
    let (a, _) = tiny_model();
    init_seeded(&a, 1, InitScheme::Original, &[]).unwrap();
    let data = a.data().lock().unwrap();
    let w = data["anomaly_detection_module.unet.encoder.block2.0.weight"].as_tensor();
    let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.005, "std {std}");
}
