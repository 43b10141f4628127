//! Focal losses for DSR's two-channel anomaly masks.
//!
//! Two formulations exist and they differ substantially (see [`FocalKind`]). Both are written
//! for the two-class structure of DSR's masks: the channels are narrowed out once and every
//! further step works on `B×1×H×W` tensors, so no softmax over the strided channel dimension is
//! ever materialised. [`kornia_focal_loss`] also accepts more than two classes through a
//! straightforward (slower) path, which is what the two-class path is checked against.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{LossError, Result};

/// Label smoothing of the original focal loss: the one-hot target is clamped to
/// `[SMOOTH, 1 − SMOOTH]` and `SMOOTH` is added to `p_t` before the logarithm.
const SMOOTH: f64 = 1e-5;

/// The focusing parameter γ used by both DSR focal losses.
const DSR_GAMMA: f64 = 2.0;

/// The α that anomalib passes to kornia's focal loss.
const ANOMALIB_ALPHA: f64 = 1.0;

/// Which focal loss DSR's mask terms use.
///
/// Serialised in lowercase (`"original"`, `"anomalib"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FocalKind {
    /// The focal loss of the original DSR code and paper, applied to probabilities.
    ///
    /// Per pixel, with `P` the two softmax probabilities and `o` the one-hot target clamped to
    /// `[1e-5, 1 − 1e-5]`: `p_t = o₀·P₀ + o₁·P₁ + 1e-5` and `loss = −(1 − p_t)²·ln p_t`,
    /// averaged over the `B·H·W` pixels. Every class has weight 1, and a perfect prediction
    /// gives a loss of (almost exactly) zero.
    #[default]
    Original,
    /// The focal loss anomalib 2.7.0 computes with kornia ≥ 0.7 (α = 1, γ = 2, mean reduction).
    ///
    /// kornia treats its input as logits and applies a log-softmax, but DSR hands it softmax
    /// probabilities, so the loss sees `q = softmax(softmax(logits))` (confined to
    /// `[0.269, 0.731]` for two classes). With α = 1, normal pixels (class 0) get weight 0 and
    /// anomalous pixels weight 1, so the per-pixel term is `[t = 1]·(1 − q₁)²·(−ln q₁)`; the
    /// mean divides by `B·C·H·W = 2·B·H·W`. An all-normal target gives exactly 0.
    Anomalib,
}

/// Computes the focal loss of a two-channel anomaly map against a binary mask.
///
/// * `probs`: `B×2×H×W`, the softmax probabilities of DSR's mask heads (channel 1 is
///   "anomalous"). Gradients flow back into this tensor.
/// * `target`: `B×1×H×W` or `B×H×W`, a 0/1 mask of any dtype. Like the reference's integer
///   cast of the mask, values `≥ 1` mark anomalous pixels and smaller values normal ones; no
///   gradient flows into the target.
///
/// Returns a scalar (rank-0) tensor of `probs`' dtype, as defined by `kind` (see
/// [`FocalKind`]).
///
/// # Errors
///
/// [`LossError::Shape`] if `probs` is not `B×2×H×W` or `target` does not match it; candle
/// errors are passed through.
pub fn focal_loss(probs: &Tensor, target: &Tensor, kind: FocalKind) -> Result<Tensor> {
    focal_loss_named(("probs", probs), ("target", target), kind)
}

/// [`focal_loss`] with the argument names that shape errors report.
pub(crate) fn focal_loss_named(
    (probs_name, probs): (&'static str, &Tensor),
    (target_name, target): (&'static str, &Tensor),
    kind: FocalKind,
) -> Result<Tensor> {
    let (b, _, h, w) = dims_nchw(probs_name, probs, Some(2))?;
    let anomalous = binary_target(target_name, target, b, h, w)?
        .ge(1.0)?
        .to_dtype(probs.dtype())?;
    match kind {
        FocalKind::Original => original_focal(probs, &anomalous),
        FocalKind::Anomalib => {
            let per_class = kornia_two_class(probs, &anomalous, ANOMALIB_ALPHA, DSR_GAMMA)?;
            Ok(mean_over_classes(per_class, 2)?)
        }
    }
}

/// kornia's `FocalLoss(alpha, gamma, reduction="mean")` (kornia ≥ 0.7 semantics).
///
/// * `logits`: `B×C×H×W` raw scores with `C ≥ 2`; a log-softmax over dimension 1 turns them
///   into log-probabilities `ln q`. Gradients flow back into this tensor.
/// * `target_labels`: `B×H×W` (or `B×1×H×W`) class labels in `0..C`, integer or float dtype
///   (float labels are truncated like torch's `.long()`).
/// * `alpha`: class weight; class 0 gets `1 − alpha`, every other class `alpha`.
/// * `gamma`: the focusing parameter, `≥ 0`.
///
/// The per-element term is `α_c·[t = c]·(−(1 − q_c)^γ·ln q_c)` and the result, a scalar
/// tensor of `logits`' dtype, is its mean over all `B·C·H·W` elements.
///
/// For two classes the loss is computed on the narrowed channels without a softmax over the
/// channel dimension; a class whose weight is exactly zero is skipped entirely (where kornia
/// would produce `0·∞ = NaN` for a saturated, weight-zero class, this gives 0).
///
/// # Errors
///
/// [`LossError::Shape`] for mismatched shapes, [`LossError::Parameter`] for a non-finite
/// `alpha` or a negative or non-finite `gamma`, [`LossError::LabelRange`] for labels outside
/// `0..C`; candle errors are passed through.
pub fn kornia_focal_loss(
    logits: &Tensor,
    target_labels: &Tensor,
    alpha: f64,
    gamma: f64,
) -> Result<Tensor> {
    let (per_class, classes) = kornia_per_class(logits, target_labels, alpha, gamma)?;
    Ok(mean_over_classes(per_class, classes)?)
}

/// kornia's `FocalLoss(alpha, gamma, reduction="none")`: the unreduced `B×C×H×W` tensor of
/// per-element terms of [`kornia_focal_loss`].
///
/// Entries of non-target classes are 0, and so are all entries of a class with weight 0
/// (class 0 when `alpha = 1`). Inputs, defaults and errors are those of
/// [`kornia_focal_loss`].
///
/// # Errors
///
/// As [`kornia_focal_loss`].
pub fn kornia_focal_loss_none(
    logits: &Tensor,
    target_labels: &Tensor,
    alpha: f64,
    gamma: f64,
) -> Result<Tensor> {
    let (per_class, _) = kornia_per_class(logits, target_labels, alpha, gamma)?;
    Ok(per_class.into_tensor()?)
}

/// The per-class loss terms of the kornia focal loss, before any reduction.
enum PerClass {
    /// The two-class fast path: one `B×1×H×W` tensor per class, `None` where the class
    /// weight is zero (its terms are all zero).
    Two([Option<Tensor>; 2], Tensor),
    /// The general path: the full `B×C×H×W` tensor.
    Full(Tensor),
}

impl PerClass {
    /// Sums the terms of every pixel over the classes, giving a `B×1×H×W` tensor.
    fn pixel_sums(self) -> candle_core::Result<Tensor> {
        match self {
            PerClass::Two([Some(t0), Some(t1)], _) => t0 + t1,
            PerClass::Two([Some(t), None], _) | PerClass::Two([None, Some(t)], _) => Ok(t),
            PerClass::Two([None, None], like) => like.zeros_like(),
            PerClass::Full(full) => full.sum_keepdim(1),
        }
    }

    /// Assembles the unreduced `B×C×H×W` tensor.
    fn into_tensor(self) -> candle_core::Result<Tensor> {
        match self {
            PerClass::Two([t0, t1], like) => {
                let t0 = match t0 {
                    Some(t) => t,
                    None => like.zeros_like()?,
                };
                let t1 = match t1 {
                    Some(t) => t,
                    None => like.zeros_like()?,
                };
                Tensor::cat(&[t0, t1], 1)
            }
            PerClass::Full(full) => Ok(full),
        }
    }
}

/// Averages per-class terms over all `B·C·H·W` elements.
fn mean_over_classes(per_class: PerClass, classes: usize) -> candle_core::Result<Tensor> {
    // The mean over the pixels divided by C equals the mean over every element; the division
    // by two is exact in binary floating point.
    per_class
        .pixel_sums()?
        .mean_all()?
        .affine(1.0 / classes as f64, 0.0)
}

/// Validates the kornia inputs and computes the per-class terms on the fitting path; also
/// returns the number of classes.
fn kornia_per_class(
    logits: &Tensor,
    target_labels: &Tensor,
    alpha: f64,
    gamma: f64,
) -> Result<(PerClass, usize)> {
    let (b, classes, h, w) = dims_nchw("logits", logits, None)?;
    if classes < 2 {
        return Err(LossError::Shape {
            name: "logits",
            expected: "B×C×H×W with C ≥ 2".to_owned(),
            got: logits.dims().to_vec(),
        });
    }
    if !alpha.is_finite() {
        return Err(LossError::Parameter {
            name: "alpha",
            value: alpha,
            reason: "must be finite",
        });
    }
    if !(gamma.is_finite() && gamma >= 0.0) {
        return Err(LossError::Parameter {
            name: "gamma",
            value: gamma,
            reason: "must be finite and non-negative",
        });
    }
    let labels = binary_target("target_labels", target_labels, b, h, w)?.to_dtype(DType::F64)?;
    let min = labels.min_all()?.to_scalar::<f64>()?;
    let max = labels.max_all()?.to_scalar::<f64>()?;
    // Written so that NaN labels fail the check too.
    if !(min >= 0.0 && max < classes as f64) {
        return Err(LossError::LabelRange {
            name: "target_labels",
            classes,
            min,
            max,
        });
    }
    // For non-negative values, flooring is torch's truncating `.long()`.
    let labels = labels.floor()?;
    if classes == 2 {
        let anomalous = labels.ge(1.0)?.to_dtype(logits.dtype())?;
        let terms = kornia_two_class(logits, &anomalous, alpha, gamma)?;
        Ok((terms, classes))
    } else {
        let terms = kornia_general(logits, &labels, alpha, gamma)?;
        Ok((PerClass::Full(terms), classes))
    }
}

/// The kornia focal terms for two classes.
///
/// `logits` is `B×2×H×W`, `class1` the `B×1×H×W` 0/1 indicator of target class 1 in the
/// logits' dtype. The log-softmax of two channels is `a_c − ln(e^{a₀} + e^{a₁})` with
/// `a_c = z_c − max(z₀, z₁)`, the same sequence of operations as a max-shifted log-softmax.
/// The maximum is detached: it cancels mathematically, so the gradient stays the exact
/// `onehot − softmax` form even where both logits are equal.
fn kornia_two_class(
    logits: &Tensor,
    class1: &Tensor,
    alpha: f64,
    gamma: f64,
) -> candle_core::Result<PerClass> {
    let z0 = logits.narrow(1, 0, 1)?;
    let z1 = logits.narrow(1, 1, 1)?;
    let shift = z0.maximum(&z1)?.detach();
    let a0 = z0.sub(&shift)?;
    let a1 = z1.sub(&shift)?;
    let log_norm = (a0.exp()? + a1.exp()?)?.log()?;
    let weights = [1.0 - alpha, alpha];
    let mut terms: [Option<Tensor>; 2] = [None, None];
    for (class, shifted) in [a0, a1].into_iter().enumerate() {
        if weights[class] == 0.0 {
            continue;
        }
        let log_q = shifted.sub(&log_norm)?;
        let focal = focus(&log_q.exp()?.affine(-1.0, 1.0)?, gamma)?;
        let element = focal.mul(&log_q)?.neg()?;
        let selected = if class == 1 {
            class1.clone()
        } else {
            class1.affine(-1.0, 1.0)?
        };
        let weight = selected.affine(weights[class], 0.0)?;
        terms[class] = Some(element.mul(&weight)?);
    }
    Ok(PerClass::Two(terms, z1))
}

/// The kornia focal terms for any number of classes, written the straightforward way.
///
/// `logits` is `B×C×H×W`, `labels` the `B×1×H×W` whole-number labels (F64). Returns the
/// `B×C×H×W` terms.
fn kornia_general(
    logits: &Tensor,
    labels: &Tensor,
    alpha: f64,
    gamma: f64,
) -> candle_core::Result<Tensor> {
    let classes = logits.dim(1)?;
    let dtype = logits.dtype();
    let device = logits.device();
    let shift = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&shift)?;
    let log_norm = shifted.exp()?.sum_keepdim(1)?.log()?;
    let log_q = shifted.broadcast_sub(&log_norm)?;
    let focal = focus(&log_q.exp()?.affine(-1.0, 1.0)?, gamma)?;
    let element = focal.mul(&log_q)?.neg()?;
    let class_ids = Tensor::arange(0u32, classes as u32, device)?
        .to_dtype(DType::F64)?
        .reshape((1, classes, 1, 1))?;
    let one_hot = labels.broadcast_eq(&class_ids)?.to_dtype(dtype)?;
    let class_weights: Vec<f64> = (0..classes)
        .map(|c| if c == 0 { 1.0 - alpha } else { alpha })
        .collect();
    let class_weights =
        Tensor::from_vec(class_weights, (1, classes, 1, 1), device)?.to_dtype(dtype)?;
    element.mul(&one_hot)?.broadcast_mul(&class_weights)
}

/// The focusing factor `x^γ`, with the common exponents done by exact multiplication.
fn focus(x: &Tensor, gamma: f64) -> candle_core::Result<Tensor> {
    if gamma == 2.0 {
        x.sqr()
    } else if gamma == 1.0 {
        Ok(x.clone())
    } else if gamma == 0.0 {
        // torch's `pow(x, 0)` is 1 everywhere, including at 0.
        x.ones_like()
    } else {
        x.powf(gamma)
    }
}

/// The original DSR focal loss (see [`FocalKind::Original`]).
///
/// `probs` is `B×2×H×W`, `anomalous` the `B×1×H×W` 0/1 indicator in the same dtype.
fn original_focal(probs: &Tensor, anomalous: &Tensor) -> Result<Tensor> {
    let p0 = probs.narrow(1, 0, 1)?;
    let p1 = probs.narrow(1, 1, 1)?;
    // The one-hot target with every entry clamped to [SMOOTH, 1 − SMOOTH], as in the reference.
    let o1 = anomalous.clamp(SMOOTH, 1.0 - SMOOTH)?;
    let o0 = anomalous.affine(-1.0, 1.0)?.clamp(SMOOTH, 1.0 - SMOOTH)?;
    let pt = (p0.mul(&o0)? + p1.mul(&o1)?)?.affine(1.0, SMOOTH)?;
    let focal = focus(&pt.affine(-1.0, 1.0)?, DSR_GAMMA)?;
    let per_pixel = focal.mul(&pt.log()?)?.neg()?;
    Ok(per_pixel.mean_all()?)
}

/// Checks that `t` is rank 4 (and has `channels` channels when given); returns its dims.
pub(crate) fn dims_nchw(
    name: &'static str,
    t: &Tensor,
    channels: Option<usize>,
) -> Result<(usize, usize, usize, usize)> {
    let dims = t.dims();
    match (dims, channels) {
        (&[b, c, h, w], None) => Ok((b, c, h, w)),
        (&[b, c, h, w], Some(want)) if c == want => Ok((b, c, h, w)),
        _ => Err(LossError::Shape {
            name,
            expected: match channels {
                Some(c) => format!("B×{c}×H×W"),
                None => "B×C×H×W".to_owned(),
            },
            got: dims.to_vec(),
        }),
    }
}

/// Checks that `target` is `B×1×H×W` or `B×H×W` for the given sizes; returns it as
/// `B×1×H×W`.
fn binary_target(
    name: &'static str,
    target: &Tensor,
    b: usize,
    h: usize,
    w: usize,
) -> Result<Tensor> {
    match target.dims() {
        &[tb, 1, th, tw] if (tb, th, tw) == (b, h, w) => Ok(target.clone()),
        &[tb, th, tw] if (tb, th, tw) == (b, h, w) => Ok(target.unsqueeze(1)?),
        dims => Err(LossError::Shape {
            name,
            expected: format!("{b}×1×{h}×{w} or {b}×{h}×{w}"),
            got: dims.to_vec(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic pseudo-random values in `[-scale, scale)` (splitmix64).
    fn values(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// The two-class path must agree with the general log-softmax path, values and gradients,
    /// for several α and γ (including a weight-zero class).
    #[test]
    fn two_class_path_matches_general_path() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, w) = (2, 3, 5);
        let logits = Tensor::from_vec(values(b * 2 * h * w, 7, 4.0), (b, 2, h, w), &dev)?;
        let labels: Vec<f64> = values(b * h * w, 11, 1.0)
            .into_iter()
            .map(|v| if v > 0.0 { 1.0 } else { 0.0 })
            .collect();
        let labels = Tensor::from_vec(labels, (b, 1, h, w), &dev)?;
        for (alpha, gamma) in [(1.0, 2.0), (0.25, 2.0), (0.0, 1.5), (0.6, 0.0), (0.5, 1.0)] {
            let fast_var = Var::from_tensor(&logits)?;
            let fast = mean_over_classes(
                kornia_two_class(fast_var.as_tensor(), &labels, alpha, gamma)?,
                2,
            )?;
            let slow_var = Var::from_tensor(&logits)?;
            let slow = mean_over_classes(
                PerClass::Full(kornia_general(slow_var.as_tensor(), &labels, alpha, gamma)?),
                2,
            )?;
            let (fv, sv) = (fast.to_scalar::<f64>()?, slow.to_scalar::<f64>()?);
            assert!(
                (fv - sv).abs() <= 1e-14,
                "α={alpha} γ={gamma}: {fv} vs {sv}"
            );
            let fg = fast.backward()?;
            let sg = slow.backward()?;
            let fg = fg
                .get(fast_var.as_tensor())
                .expect("gradient of the fast path");
            let sg = sg
                .get(slow_var.as_tensor())
                .expect("gradient of the general path");
            let diff = (fg - sg)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff <= 1e-14, "α={alpha} γ={gamma}: gradient diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn shape_errors_name_the_argument() -> Result<()> {
        let dev = Device::Cpu;
        let probs = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev)?;
        let target = Tensor::zeros((2, 1, 4, 4), DType::F32, &dev)?;
        let err = focal_loss(&probs, &target, FocalKind::Original).unwrap_err();
        assert!(
            err.to_string().starts_with("probs: expected shape B×2×H×W"),
            "{err}"
        );
        let probs = Tensor::zeros((2, 2, 4, 4), DType::F32, &dev)?;
        let target = Tensor::zeros((2, 1, 4, 5), DType::F32, &dev)?;
        let err = focal_loss(&probs, &target, FocalKind::Anomalib).unwrap_err();
        assert_eq!(
            err.to_string(),
            "target: expected shape 2×1×4×4 or 2×4×4, got [2, 1, 4, 5]"
        );
        Ok(())
    }
}
