//! The feature memory through a model and a checkpoint file: a training image lies at distance
//! zero from a memory of its own features, the memory and combined maps of a loaded model are
//! the ones computed by hand from the detection mask and the distance map, and a file whose map
//! needs a memory it lacks (or holds one of the wrong width) is refused with a message naming
//! the file.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dsr_core::feature_memory::{Blend, FeatureMemory, MEMORY_ROWS_KEY, META_FEATURE_MEMORY};
use dsr_core::weights::{load_checkpoint, save_checkpoint, META_OUTPUT_MAP};
use dsr_core::{DsrConfig, DsrModel, Execution, OutputMap};

mod common;
use common::{random, values};

const SIZE: usize = 64;

fn model(cfg: &DsrConfig, weights: &HashMap<String, Tensor>) -> DsrModel {
    DsrModel::new(
        cfg,
        VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn a_training_image_is_at_distance_zero_and_loaded_maps_match_the_hand_computed_ones() {
    let cfg = DsrConfig::tiny();
    let weights = DsrModel::seeded_weights(&cfg, 11).unwrap();
    let plain = model(&cfg, &weights);
    let train = random(&[3, 3, SIZE, SIZE], 5, 1.0).abs().unwrap();
    let encoded = plain.discrete().encode(&train).unwrap();
    let features = FeatureMemory::features(&encoded).unwrap();
    let (b, c, h, w) = features.dims4().unwrap();
    assert_eq!((b, c, h, w), (3, 2 * cfg.num_hiddens, SIZE / 4, SIZE / 4));
    let memory = FeatureMemory::from_features(std::slice::from_ref(&features), usize::MAX).unwrap();
    assert_eq!(memory.rows().dims(), &[b * h * w, c]);

    // Each training pixel's own features are remembered: its distance is zero up to rounding,
    // while other images lie farther away.
    let own = values(&memory.distance_map(&encoded, SIZE, SIZE).unwrap());
    let scale = values(&memory.rows().abs().unwrap().max_keepdim(0).unwrap())
        .into_iter()
        .fold(0.0, f32::max);
    let own_max = own.iter().cloned().fold(0.0, f32::max);
    assert!(own_max <= 1e-2 * scale.max(1.0), "own distance {own_max}");
    let other = random(&[2, 3, SIZE, SIZE], 9, 1.0).abs().unwrap();
    let other_encoded = plain.discrete().encode(&other).unwrap();
    let far = values(&memory.distance_map(&other_encoded, SIZE, SIZE).unwrap());
    let far_mean = far.iter().sum::<f32>() / far.len() as f32;
    assert!(far_mean > 10.0 * own_max, "{far_mean} vs {own_max}");

    // A checkpoint with the memory and a blend, outputting the combined map.
    let blend = Blend {
        weight: 0.5,
        detection_mean: 0.4,
        detection_std: 0.1,
        memory_mean: far_mean,
        memory_std: far_mean / 3.0,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let mut tensors = weights.clone();
    tensors.insert(MEMORY_ROWS_KEY.to_string(), memory.rows().clone());
    let mut extra = BTreeMap::new();
    extra.insert(META_OUTPUT_MAP.to_string(), "combined".to_string());
    extra.insert(
        META_FEATURE_MEMORY.to_string(),
        serde_json::to_string(&blend).unwrap(),
    );
    save_checkpoint(&path, &tensors, &cfg, Some([SIZE, SIZE]), &extra).unwrap();

    let ckpt = load_checkpoint(&path).unwrap();
    let loaded = ckpt.build_model(&cfg, &Device::Cpu).unwrap();
    assert_eq!(loaded.output_map(), OutputMap::Combined);
    assert_eq!(loaded.feature_memory().unwrap().blend(), Some(blend));
    let kept = load_checkpoint(&path)
        .unwrap()
        .into_inference_model(&cfg, &Device::Cpu, Execution::default())
        .unwrap();

    let detection = plain
        .clone()
        .with_output_map(OutputMap::Detection)
        .infer(&other)
        .unwrap()
        .anomaly_map;
    let distance = memory.distance_map(&other_encoded, SIZE, SIZE).unwrap();
    let by_hand: Vec<f32> = values(&detection)
        .iter()
        .zip(values(&distance))
        .map(|(d, m)| (d - 0.4) / 0.1 + 0.5 * (m - far_mean) / (far_mean / 3.0))
        .collect();
    for m in [&loaded, &kept] {
        let out = m.infer(&other).unwrap();
        assert_eq!(out.anomaly_map.dims(), &[2, SIZE, SIZE]);
        let got = values(&out.anomaly_map);
        assert!(max_abs_diff(&got, &by_hand) < 1e-3);
        // The image score stays the detection module's.
        let score = values(&plain.infer(&other).unwrap().pred_score);
        assert!(max_abs_diff(&values(&out.pred_score), &score) < 1e-6);
        // The memory map alone is the distance map.
        let mem = m
            .clone()
            .with_output_map(OutputMap::Memory)
            .infer(&other)
            .unwrap();
        assert!(max_abs_diff(&values(&mem.anomaly_map), &values(&distance)) < 1e-4);
    }
}

#[test]
fn a_file_without_the_memory_its_map_needs_is_refused_with_its_name() {
    let cfg = DsrConfig::tiny();
    let weights = DsrModel::seeded_weights(&cfg, 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let save = |name: &str, tensors: &HashMap<String, Tensor>, extra: &[(&str, &str)]| {
        let path = dir.path().join(name);
        let extra: BTreeMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        save_checkpoint(&path, tensors, &cfg, Some([SIZE, SIZE]), &extra).unwrap();
        path
    };
    let error = |path: &std::path::Path| {
        load_checkpoint(path)
            .unwrap()
            .build_model(&cfg, &Device::Cpu)
            .unwrap_err()
            .to_string()
    };

    for map in ["memory", "combined"] {
        let path = save(
            &format!("{map}.safetensors"),
            &weights,
            &[(META_OUTPUT_MAP, map)],
        );
        let e = error(&path);
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains(MEMORY_ROWS_KEY), "{e}");
    }

    let mut with_rows = weights.clone();
    with_rows.insert(
        MEMORY_ROWS_KEY.to_string(),
        Tensor::ones((4, 2 * cfg.num_hiddens), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = save(
        "no-blend.safetensors",
        &with_rows,
        &[(META_OUTPUT_MAP, "combined")],
    );
    assert!(error(&path).contains(META_FEATURE_MEMORY));
    // Without a blend the memory map itself works.
    let path = save(
        "memory-only.safetensors",
        &with_rows,
        &[(META_OUTPUT_MAP, "memory")],
    );
    let m = load_checkpoint(&path)
        .unwrap()
        .build_model(&cfg, &Device::Cpu)
        .unwrap();
    assert!(m.feature_memory().unwrap().blend().is_none());

    let bad_blend = r#"{"weight":1.0,"detection_mean":0.0,"detection_std":0.0,"memory_mean":0.0,"memory_std":1.0}"#;
    let path = save(
        "bad-blend.safetensors",
        &with_rows,
        &[
            (META_OUTPUT_MAP, "combined"),
            (META_FEATURE_MEMORY, bad_blend),
        ],
    );
    assert!(error(&path).contains("positive"));

    let mut narrow = weights.clone();
    narrow.insert(
        MEMORY_ROWS_KEY.to_string(),
        Tensor::ones((4, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = save(
        "narrow.safetensors",
        &narrow,
        &[(META_OUTPUT_MAP, "memory")],
    );
    assert!(error(&path).contains("channels"));
}
