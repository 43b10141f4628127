//! Inference with bf16 convolution products (`Precision::Bf16`) against the same model in f32:
//! on the reference fixture (its weights and input) and on a configuration whose U-Nets take
//! Winograd's algorithm. Run only on CPUs with AVX512-BF16; elsewhere each test says why it is
//! skipped and checks that building the model is refused instead.
//!
//! Tolerances (docs/performance.md, "BF16"). bf16 keeps 8 significant bits: each product's
//! operands are off by up to 2⁻⁸ relative, 10⁵ times f32's rounding. The random networks of
//! these models amplify small differences enormously (their instance norms divide by the spread
//! of channels that hardly vary; f32's Winograd and direct convolutions already differ by 2e-5
//! in their maps), and a few quantiser codes flip, so their bf16 maps are far from f32's:
//! measured max |bf16 − f32| 0.55 and 0.41, mean 0.077 and 0.081 (probabilities in [0, 1]).
//! The bounds below are those figures with a margin: they catch a broken kernel (maps of
//! noise, NaN) and a drift of the rounding, not the accuracy a trained model keeps, which
//! docs/performance.md measures on trained checkpoints.
//! Also printed: the share of codes that changed, per quantiser.

mod common;

use candle_core::{Device, Tensor};
use dsr_core::{Checkpoint, DsrConfig, DsrModel, Error, Execution, Precision};

use common::*;

/// The largest difference of an anomaly-map value allowed between bf16 and f32 (random weights).
const MAX_DIFF: f64 = 0.75;

/// The largest mean difference over an anomaly map allowed between bf16 and f32 (random
/// weights).
const MEAN_DIFF: f64 = 0.12;

/// The largest difference of an image score allowed between bf16 and f32 (random weights;
/// measured 1.1e-2 and 3.8e-5).
const SCORE_DIFF: f64 = 0.05;

/// The largest share of the discrete encoders' codes that bf16 may change (measured 2 of 512
/// and none).
const CODES_CHANGED: f64 = 0.02;

fn checkpoint(cfg: &DsrConfig, tensors: std::collections::HashMap<String, Tensor>) -> Checkpoint {
    Checkpoint {
        path: "test weights".into(),
        tensors,
        config: Some(*cfg),
        image_size: None,
        metadata: Default::default(),
    }
}

/// The models of `tensors` in f32 and bf16 (`None` where the CPU lacks AVX512-BF16, after
/// checking that the bf16 model is refused with a clear error).
fn models(
    cfg: &DsrConfig,
    tensors: std::collections::HashMap<String, Tensor>,
) -> Option<(DsrModel, DsrModel)> {
    let bf16 = Execution {
        precision: Precision::Bf16,
        ..Execution::default()
    };
    let f32_model = checkpoint(cfg, tensors.clone())
        .into_inference_model(cfg, &Device::Cpu, Execution::default())
        .unwrap();
    let bf16_model = checkpoint(cfg, tensors).into_inference_model(cfg, &Device::Cpu, bf16);
    if !Precision::Bf16.supported() {
        let err = bf16_model.expect_err("bf16 refused without AVX512-BF16");
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
        assert!(err.to_string().contains("AVX512-BF16"), "{err}");
        eprintln!("skipped: this CPU lacks AVX512-BF16 (the bf16 model was refused: {err})");
        return None;
    }
    Some((f32_model, bf16_model.unwrap()))
}

/// The largest and the mean absolute difference of two maps.
fn differences(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len());
    let diffs: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .collect();
    let max = diffs.iter().copied().fold(0f64, f64::max);
    (max, diffs.iter().sum::<f64>() / diffs.len() as f64)
}

/// Runs both models on `image` and checks the anomaly maps and scores against the tolerances.
fn compare(name: &str, f32_model: &DsrModel, bf16_model: &DsrModel, image: &Tensor) {
    // Where the two part: the share of the four quantisers' codes that bf16 changes.
    let (te, tb) = (
        f32_model.forward_eval(image).unwrap(),
        bf16_model.forward_eval(image).unwrap(),
    );
    for (what, a, b) in [
        ("q_t", &te.encoded.q_t.indices, &tb.encoded.q_t.indices),
        ("q_b", &te.encoded.q_b.indices, &tb.encoded.q_b.indices),
        ("srm_lo", &te.srm_lo.1.indices, &tb.srm_lo.1.indices),
        ("srm_hi", &te.srm_hi.1.indices, &tb.srm_hi.1.indices),
    ] {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
        );
        let changed = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        eprintln!("{name}: {what} codes changed {changed} of {}", a.len());
        if what.starts_with("q_") {
            let share = changed as f64 / a.len() as f64;
            assert!(
                share <= CODES_CHANGED,
                "{name}: {what}: {changed} codes changed"
            );
        }
    }
    let (adm, _) = differences(&te.adm_softmax, &tb.adm_softmax);
    let (feat, _) = differences(&te.srm_hi.0, &tb.srm_hi.0);
    eprintln!("{name}: detection softmax max diff {adm:.3e}, srm_hi features {feat:.3e}");
    let exact = f32_model.infer(image).unwrap();
    let fast = bf16_model.infer(image).unwrap();
    let (max, mean) = differences(&exact.anomaly_map, &fast.anomaly_map);
    let (score_max, _) = differences(&exact.pred_score, &fast.pred_score);
    eprintln!(
        "{name}: anomaly map max |bf16 − f32| = {max:.3e}, mean {mean:.3e}; score {score_max:.3e}"
    );
    // The products did run in bf16: the maps are not f32's bits.
    assert!(max > 0.0, "{name}: bf16 gave f32's bits");
    assert!(
        max <= MAX_DIFF,
        "{name}: anomaly maps differ by up to {max:e}"
    );
    assert!(
        mean <= MEAN_DIFF,
        "{name}: anomaly maps differ by {mean:e} on average"
    );
    assert!(
        score_max <= SCORE_DIFF,
        "{name}: scores differ by {score_max:e}"
    );
    assert!(values(&fast.anomaly_map).iter().all(|v| v.is_finite()));
    // Kept bf16 weights give the same bits at the next call.
    let again = bf16_model.infer(image).unwrap();
    assert_eq!(values(&fast.anomaly_map), values(&again.anomaly_map));
}

#[test]
fn bf16_inference_on_the_fixture_stays_close_to_f32() {
    let (cfg, _, _) = config();
    let Some((f32_model, bf16_model)) = models(&cfg, load("weights.safetensors")) else {
        return;
    };
    let image = get(&load("forward_eval.safetensors"), "input.image");
    compare("fixture", &f32_model, &bf16_model, &image);
}

#[test]
fn bf16_winograd_inference_stays_close_to_f32() {
    // U-Nets of width 32: their 3×3 layers with 32 and more input channels take Winograd's
    // algorithm at 64×64, the others the channels-last product.
    let cfg = DsrConfig {
        anomaly_detection_module_base_width: 32,
        upsampling_module_base_width: 32,
        ..DsrConfig::tiny()
    };
    let Some((f32_model, bf16_model)) = models(&cfg, DsrModel::seeded_weights(&cfg, 3).unwrap())
    else {
        return;
    };
    compare(
        "width 32",
        &f32_model,
        &bf16_model,
        &random(&[2, 3, 64, 64], 1, 1.0).abs().unwrap(),
    );
}
