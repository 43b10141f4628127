//! Checks the focal losses against independent plain-loop computations in f64 (values and,
//! by central finite differences, gradients), plus properties and error handling.
//!
//! The original focal loss has no fixture; its definition: one-hot target
//! clamped to `[1e-5, 1 − 1e-5]`, `p_t = Σ_c o_c·P_c + 1e-5`, `−(1 − p_t)²·ln p_t`, mean over
//! pixels.

use candle_core::{DType, Device, Tensor, Var};
use dsr_losses::{
    focal_loss, kornia_focal_loss, kornia_focal_loss_none, mse_loss, second_stage_loss,
    third_stage_loss, FocalKind, LossError, SecondStageInputs,
};
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Deterministic pseudo-random values uniform in `[0, 1)` (splitmix64).
fn uniform(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// A random `B×2×H×W` probability map (softmax of logits in `[-scale, scale)`) and a
/// random `B×1×H×W` 0/1 mask, as flat NCHW vectors.
fn random_case(b: usize, h: usize, w: usize, seed: u64, scale: f64) -> (Vec<f64>, Vec<f64>) {
    let hw = h * w;
    let logits = uniform(b * 2 * hw, seed);
    let mut probs = vec![0.0; b * 2 * hw];
    for bi in 0..b {
        for i in 0..hw {
            let z0 = (logits[bi * 2 * hw + i] * 2.0 - 1.0) * scale;
            let z1 = (logits[bi * 2 * hw + hw + i] * 2.0 - 1.0) * scale;
            let p1 = 1.0 / (1.0 + (z0 - z1).exp());
            probs[bi * 2 * hw + i] = 1.0 - p1;
            probs[bi * 2 * hw + hw + i] = p1;
        }
    }
    let mask = uniform(b * hw, seed ^ 0xDEAD_BEEF)
        .into_iter()
        .map(|u| if u < 0.5 { 0.0 } else { 1.0 })
        .collect();
    (probs, mask)
}

/// The original focal loss written as plain loops over pixels, in f64.
fn original_reference(probs: &[f64], mask: &[f64], b: usize, hw: usize) -> f64 {
    let smooth = 1e-5;
    let mut sum = 0.0;
    for bi in 0..b {
        for i in 0..hw {
            let label = usize::from(mask[bi * hw + i] >= 1.0);
            let mut pt = smooth;
            for c in 0..2 {
                let one_hot: f64 = if c == label { 1.0 } else { 0.0 };
                pt += one_hot.clamp(smooth, 1.0 - smooth) * probs[(bi * 2 + c) * hw + i];
            }
            sum += -(1.0 - pt).powi(2) * pt.ln();
        }
    }
    sum / (b * hw) as f64
}

/// kornia's focal loss (kornia 0.9.0, α = 1, γ = 2, applied to the probabilities as logits) written as
/// plain loops, in f64.
fn anomalib_reference(probs: &[f64], mask: &[f64], b: usize, hw: usize) -> f64 {
    let mut sum = 0.0;
    for bi in 0..b {
        for i in 0..hw {
            if mask[bi * hw + i] < 1.0 {
                continue;
            }
            let z0 = probs[bi * 2 * hw + i];
            let z1 = probs[bi * 2 * hw + hw + i];
            let m = z0.max(z1);
            let log_q1 = z1 - m - ((z0 - m).exp() + (z1 - m).exp()).ln();
            sum += -(1.0 - log_q1.exp()).powi(2) * log_q1;
        }
    }
    sum / (2 * b * hw) as f64
}

/// The reference of a kind.
fn reference(kind: FocalKind, probs: &[f64], mask: &[f64], b: usize, hw: usize) -> f64 {
    match kind {
        FocalKind::Original => original_reference(probs, mask, b, hw),
        FocalKind::Anomalib => anomalib_reference(probs, mask, b, hw),
    }
}

/// The loss of a kind as an f64 number, for f64 or f32 inputs.
fn loss_value(
    kind: FocalKind,
    probs: &[f64],
    mask: &[f64],
    shape: (usize, usize, usize),
    dtype: DType,
) -> Result<f64, Box<dyn std::error::Error>> {
    let (b, h, w) = shape;
    let p = Tensor::from_slice(probs, (b, 2, h, w), &Device::Cpu)?.to_dtype(dtype)?;
    let m = Tensor::from_slice(mask, (b, 1, h, w), &Device::Cpu)?.to_dtype(dtype)?;
    Ok(focal_loss(&p, &m, kind)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

#[test]
fn focal_values_match_plain_loops() -> TestResult {
    let (b, h, w) = (3, 4, 5);
    for seed in 0..4 {
        let (probs, mask) = random_case(b, h, w, seed, 3.0);
        for kind in [FocalKind::Original, FocalKind::Anomalib] {
            let want = reference(kind, &probs, &mask, b, h * w);
            let got64 = loss_value(kind, &probs, &mask, (b, h, w), DType::F64)?;
            assert!(
                (got64 - want).abs() <= 1e-13 * want.abs().max(1e-3),
                "{kind:?} f64, seed {seed}: {got64} vs {want}"
            );
            let got32 = loss_value(kind, &probs, &mask, (b, h, w), DType::F32)?;
            assert!(
                (got32 - want).abs() <= 1e-5 * want.abs() + 1e-6,
                "{kind:?} f32, seed {seed}: {got32} vs {want}"
            );
        }
    }
    Ok(())
}

#[test]
fn focal_gradients_match_finite_differences() -> TestResult {
    let (b, h, w) = (2, 3, 3);
    let hw = h * w;
    let step = 1e-6;
    for seed in [3, 17] {
        let (probs, mask) = random_case(b, h, w, seed, 2.5);
        for kind in [FocalKind::Original, FocalKind::Anomalib] {
            let var = Var::from_tensor(&Tensor::from_slice(&probs, (b, 2, h, w), &Device::Cpu)?)?;
            let target = Tensor::from_slice(&mask, (b, h, w), &Device::Cpu)?;
            let loss = focal_loss(var.as_tensor(), &target, kind)?;
            let grads = loss.backward()?;
            let grad = grads
                .get(var.as_tensor())
                .ok_or("no gradient reached the probabilities")?
                .flatten_all()?
                .to_vec1::<f64>()?;
            let scale = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
            assert!(scale > 0.0, "{kind:?}: the gradient vanishes everywhere");
            for k in 0..probs.len() {
                let mut plus = probs.clone();
                plus[k] += step;
                let mut minus = probs.clone();
                minus[k] -= step;
                let fd = (reference(kind, &plus, &mask, b, hw)
                    - reference(kind, &minus, &mask, b, hw))
                    / (2.0 * step);
                assert!(
                    (grad[k] - fd).abs() <= 1e-6 * scale,
                    "{kind:?}, seed {seed}, element {k}: autograd {} vs finite difference {fd}",
                    grad[k]
                );
            }
        }
    }
    Ok(())
}

/// The closed-form two-way log-softmax has the exact gradient even where both channels are
/// equal, where a `max`-based formula would pick one branch.
#[test]
fn kornia_gradient_is_exact_at_ties() -> TestResult {
    let logits = Var::from_tensor(&Tensor::new(&[[[[0.5f64]], [[0.5]]]], &Device::Cpu)?)?;
    let labels = Tensor::new(&[[[1u32]]], &Device::Cpu)?;
    let loss = kornia_focal_loss(logits.as_tensor(), &labels, 1.0, 2.0)?;
    let grads = loss.backward()?;
    let grad = grads
        .get(logits.as_tensor())
        .ok_or("no gradient reached the logits")?
        .flatten_all()?
        .to_vec1::<f64>()?;
    // With q₁ = ½, the term −(1 − q₁)²·ln q₁ has derivative 2(1 − q₁)·q₁·ln q₁ − (1 − q₁)² with
    // respect to ln q₁, d ln q₁/dz₁ = q₀ = ½ = −d ln q₁/dz₀, and the mean divides by C = 2.
    let q = 0.5f64;
    let dl_dlogq = 2.0 * (1.0 - q) * q * q.ln() - (1.0 - q).powi(2);
    let want = [-dl_dlogq * 0.5 / 2.0, dl_dlogq * 0.5 / 2.0];
    for (g, w) in grad.iter().zip(want) {
        assert!((g - w).abs() < 1e-15, "gradient {grad:?}, want {want:?}");
    }
    Ok(())
}

#[test]
fn focal_kind_serialises_in_lowercase() -> TestResult {
    assert_eq!(FocalKind::default(), FocalKind::Original);
    assert_eq!(serde_json::to_string(&FocalKind::Original)?, "\"original\"");
    assert_eq!(serde_json::to_string(&FocalKind::Anomalib)?, "\"anomalib\"");
    let kind: FocalKind = serde_json::from_str("\"anomalib\"")?;
    assert_eq!(kind, FocalKind::Anomalib);
    assert!(serde_json::from_str::<FocalKind>("\"Anomalib\"").is_err());
    Ok(())
}

#[test]
fn second_and_third_stage_sum_their_terms() -> TestResult {
    let dev = Device::Cpu;
    let (probs, mask) = random_case(2, 8, 8, 5, 2.0);
    let m = Tensor::from_slice(&probs, (2, 2, 8, 8), &dev)?;
    let m_gt = Tensor::from_slice(&mask, (2, 1, 8, 8), &dev)?;
    let rand = |n: usize, seed: u64, shape: (usize, usize, usize, usize)| {
        Tensor::from_vec(uniform(n, seed), shape, &dev)
    };
    let f_hi = rand(2 * 4 * 2 * 2, 1, (2, 4, 2, 2))?;
    let q_hi = rand(2 * 4 * 2 * 2, 2, (2, 4, 2, 2))?;
    let f_lo = rand(2 * 4, 3, (2, 4, 1, 1))?;
    let q_lo = rand(2 * 4, 4, (2, 4, 1, 1))?;
    let img = rand(2 * 3 * 64, 5, (2, 3, 8, 8))?;
    let spc = rand(2 * 3 * 64, 6, (2, 3, 8, 8))?;
    let inputs = SecondStageInputs {
        recon_feat_hi: &f_hi,
        quantized_hi: &q_hi,
        recon_feat_lo: &f_lo,
        quantized_lo: &q_lo,
        image: &img,
        object_specific_image: &spc,
        anomaly_map: &m,
        true_anomaly_map: &m_gt,
    };
    let scalar = |t: &Tensor| t.to_scalar::<f64>();
    let mse = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> {
        let a = a.flatten_all()?.to_vec1::<f64>()?;
        let b = b.flatten_all()?.to_vec1::<f64>()?;
        Ok(a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len() as f64)
    };
    for kind in [FocalKind::Original, FocalKind::Anomalib] {
        let loss = second_stage_loss(&inputs, kind)?;
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
        assert!(close(scalar(&loss.l2_hi)?, mse(&f_hi, &q_hi)?));
        assert!(close(scalar(&loss.l2_lo)?, mse(&f_lo, &q_lo)?));
        assert!(close(scalar(&loss.l2_img_x10)?, 10.0 * mse(&img, &spc)?));
        assert!(close(
            scalar(&loss.focal)?,
            reference(kind, &probs, &mask, 2, 64)
        ));
        let sum = scalar(&loss.l2_hi)?
            + scalar(&loss.l2_lo)?
            + scalar(&loss.l2_img_x10)?
            + scalar(&loss.focal)?;
        assert!(close(scalar(&loss.total)?, sum));
        let third = third_stage_loss(&m, &m_gt, kind)?;
        assert_eq!(scalar(&third)?, scalar(&loss.focal)?);
    }
    Ok(())
}

#[test]
fn shape_and_parameter_errors_are_reported() -> TestResult {
    let dev = Device::Cpu;
    let a = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev)?;
    let b = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev)?;
    let err = mse_loss("image", &a, &b).unwrap_err();
    assert!(
        matches!(err, LossError::Shape { name: "image", .. }),
        "{err}"
    );

    let probs = Tensor::zeros((2, 2, 4, 4), DType::F32, &dev)?;
    let mask = Tensor::zeros((2, 2, 4, 4), DType::F32, &dev)?;
    let err = third_stage_loss(&probs, &mask, FocalKind::Original).unwrap_err();
    assert!(
        matches!(err, LossError::Shape { name: "mask", .. }),
        "{err}"
    );

    let inputs = SecondStageInputs {
        recon_feat_hi: &a,
        quantized_hi: &a,
        recon_feat_lo: &a,
        quantized_lo: &b,
        image: &a,
        object_specific_image: &a,
        anomaly_map: &probs,
        true_anomaly_map: &probs,
    };
    let err = second_stage_loss(&inputs, FocalKind::Anomalib).unwrap_err();
    assert!(
        matches!(
            err,
            LossError::Shape {
                name: "quantized_lo",
                ..
            }
        ),
        "{err}"
    );

    let logits = Tensor::zeros((1, 2, 2, 2), DType::F32, &dev)?;
    let labels = Tensor::new(&[[[0i64, 1], [2, 1]]], &dev)?;
    let err = kornia_focal_loss(&logits, &labels, 1.0, 2.0).unwrap_err();
    assert!(
        matches!(err, LossError::LabelRange { classes: 2, max, .. } if max == 2.0),
        "{err}"
    );
    let labels = Tensor::new(&[[[0i64, 1], [1, 1]]], &dev)?;
    let err = kornia_focal_loss(&logits, &labels, 1.0, -1.0).unwrap_err();
    assert!(
        matches!(err, LossError::Parameter { name: "gamma", .. }),
        "{err}"
    );
    let err = kornia_focal_loss(&logits, &labels, f64::NAN, 2.0).unwrap_err();
    assert!(
        matches!(err, LossError::Parameter { name: "alpha", .. }),
        "{err}"
    );
    let one_class = Tensor::zeros((1, 1, 2, 2), DType::F32, &dev)?;
    let err = kornia_focal_loss(&one_class, &labels, 1.0, 2.0).unwrap_err();
    assert!(
        matches!(err, LossError::Shape { name: "logits", .. }),
        "{err}"
    );

    // Loss errors convert into candle errors for callers that use `candle_core::Result`.
    let as_candle: candle_core::Error = err.into();
    assert!(as_candle.to_string().contains("logits"), "{as_candle}");
    Ok(())
}

/// With more than two classes the general log-softmax path runs; it must agree with a plain
/// loop (α weights class 0 by 1 − α, the others by α; mean over B·C·H·W).
#[test]
fn kornia_three_classes_match_plain_loops() -> TestResult {
    let (b, c, h, w) = (2, 3, 2, 3);
    let hw = h * w;
    let logits: Vec<f64> = uniform(b * c * hw, 9)
        .iter()
        .map(|u| u * 8.0 - 4.0)
        .collect();
    let labels: Vec<u32> = uniform(b * hw, 10)
        .iter()
        .map(|u| (u * 3.0) as u32)
        .collect();
    let (alpha, gamma) = (0.25, 1.5);
    let t_logits = Tensor::from_slice(&logits, (b, c, h, w), &Device::Cpu)?;
    let t_labels = Tensor::from_slice(&labels, (b, h, w), &Device::Cpu)?;
    let none = kornia_focal_loss_none(&t_logits, &t_labels, alpha, gamma)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mean = kornia_focal_loss(&t_logits, &t_labels, alpha, gamma)?.to_scalar::<f64>()?;
    let mut sum = 0.0;
    for bi in 0..b {
        for i in 0..hw {
            let z: Vec<f64> = (0..c).map(|ci| logits[(bi * c + ci) * hw + i]).collect();
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            for (ci, zc) in z.iter().enumerate() {
                let log_q = zc - lse;
                let weight = if ci == 0 { 1.0 - alpha } else { alpha };
                let hit = if labels[bi * hw + i] as usize == ci {
                    1.0
                } else {
                    0.0
                };
                let want = -weight * hit * (1.0 - log_q.exp()).powf(gamma) * log_q;
                let got = none[(bi * c + ci) * hw + i];
                assert!(
                    (got - want).abs() <= 1e-14,
                    "({bi}, {ci}, {i}): {got} vs {want}"
                );
                sum += want;
            }
        }
    }
    let want = sum / (b * c * hw) as f64;
    assert!((mean - want).abs() <= 1e-14, "{mean} vs {want}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn losses_are_non_negative_and_finite(
        b in 1usize..3, h in 1usize..6, w in 1usize..6, seed in any::<u64>(), scale in 0.1f64..20.0,
    ) {
        let (probs, mask) = random_case(b, h, w, seed, scale);
        for kind in [FocalKind::Original, FocalKind::Anomalib] {
            for dtype in [DType::F32, DType::F64] {
                let v = loss_value(kind, &probs, &mask, (b, h, w), dtype).unwrap();
                prop_assert!(v.is_finite() && v >= -1e-12, "{kind:?} {dtype:?}: {v}");
            }
        }
    }

    #[test]
    fn perfect_prediction_gives_zero_original_loss(
        b in 1usize..3, h in 1usize..6, w in 1usize..6, seed in any::<u64>(),
    ) {
        let (_, mask) = random_case(b, h, w, seed, 1.0);
        let hw = h * w;
        let mut probs = vec![0.0; b * 2 * hw];
        for bi in 0..b {
            for i in 0..hw {
                let p1 = mask[bi * hw + i];
                probs[bi * 2 * hw + i] = 1.0 - p1;
                probs[bi * 2 * hw + hw + i] = p1;
            }
        }
        let v = loss_value(FocalKind::Original, &probs, &mask, (b, h, w), DType::F64).unwrap();
        prop_assert!(v.abs() < 1e-15, "{v}");
        // The double softmax keeps anomalib's loss away from zero: each anomalous pixel costs
        // at least (1 − σ(1))²·(−ln σ(1)) / 2 ≈ 0.0113 even when predicted perfectly.
        let anomalous = mask.iter().filter(|&&m| m >= 1.0).count() as f64;
        let floor = (1.0 - 1.0 / (1.0 + (-1.0f64).exp())).powi(2)
            * (1.0 + (-1.0f64).exp()).ln()
            / 2.0;
        let v = loss_value(FocalKind::Anomalib, &probs, &mask, (b, h, w), DType::F64).unwrap();
        prop_assert!((v - floor * anomalous / (b * hw) as f64).abs() < 1e-14, "{v}");
    }

    #[test]
    fn all_normal_target_gives_exactly_zero_anomalib_loss(
        b in 1usize..3, h in 1usize..6, w in 1usize..6, seed in any::<u64>(), scale in 0.1f64..20.0,
    ) {
        let (probs, _) = random_case(b, h, w, seed, scale);
        let normal = vec![0.0; b * h * w];
        for dtype in [DType::F32, DType::F64] {
            let v = loss_value(FocalKind::Anomalib, &probs, &normal, (b, h, w), dtype).unwrap();
            prop_assert_eq!(v, 0.0);
        }
    }

    #[test]
    fn target_layouts_and_dtypes_agree(
        b in 1usize..3, h in 1usize..5, w in 1usize..5, seed in any::<u64>(),
    ) {
        let (probs, mask) = random_case(b, h, w, seed, 3.0);
        let p = Tensor::from_slice(&probs, (b, 2, h, w), &Device::Cpu).unwrap();
        let with_channel = Tensor::from_slice(&mask, (b, 1, h, w), &Device::Cpu).unwrap();
        let flat = with_channel.squeeze(1).unwrap();
        let as_u8 = flat.to_dtype(DType::U8).unwrap();
        for kind in [FocalKind::Original, FocalKind::Anomalib] {
            let base = focal_loss(&p, &with_channel, kind).unwrap().to_scalar::<f64>().unwrap();
            for t in [&flat, &as_u8] {
                let v = focal_loss(&p, t, kind).unwrap().to_scalar::<f64>().unwrap();
                prop_assert_eq!(v, base);
            }
        }
        let kornia = kornia_focal_loss(&p, &as_u8, 1.0, 2.0).unwrap().to_scalar::<f64>().unwrap();
        let anomalib = focal_loss(&p, &flat, FocalKind::Anomalib).unwrap().to_scalar::<f64>().unwrap();
        prop_assert_eq!(kornia, anomalib);
    }
}
