//! The training losses of DSR's second and third stages.

use candle_core::Tensor;

use crate::error::{LossError, Result};
use crate::focal::{focal_loss_named, FocalKind};

/// Weight of the image-reconstruction term in the second-stage loss (the paper's λ₃).
const IMAGE_WEIGHT: f64 = 10.0;

/// The mean squared error over all elements, `mean((a − b)²)`, as a scalar tensor.
///
/// `a` and `b` must have the same shape (any rank); gradients flow into both. `name` is used in
/// the error message when the shapes differ.
///
/// # Errors
///
/// [`LossError::Shape`] if the shapes differ (no broadcasting takes place); candle errors are
/// passed through.
pub fn mse_loss(name: &'static str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(LossError::Shape {
            name,
            expected: format!("{:?} (the shape of the first operand)", a.dims()),
            got: b.dims().to_vec(),
        });
    }
    Ok(a.sub(b)?.sqr()?.mean_all()?)
}

/// The tensors the second-stage loss compares, named as in the paper.
///
/// `B` is the batch, `H×W` the image size; the feature maps have `D` channels at `H/4×W/4`
/// ("hi", the bottom/fine level) and `H/8×W/8` ("lo", the top/coarse level). Only the pairs
/// that are compared must agree in shape.
#[derive(Debug, Clone, Copy)]
pub struct SecondStageInputs<'a> {
    /// F̃_hi, `B×D×H/4×W/4`: the subspace-restricted fine features (`recon_feat_hi`).
    pub recon_feat_hi: &'a Tensor,
    /// Q_hi, `B×D×H/4×W/4`: the clean quantised fine features (`embedding_bot`), detached.
    pub quantized_hi: &'a Tensor,
    /// F̃_lo, `B×D×H/8×W/8`: the subspace-restricted coarse features (`recon_feat_lo`).
    pub recon_feat_lo: &'a Tensor,
    /// Q_lo, `B×D×H/8×W/8`: the clean quantised coarse features (`embedding_top`), detached.
    pub quantized_lo: &'a Tensor,
    /// The input image, `B×3×H×W`.
    pub image: &'a Tensor,
    /// I_spc, `B×3×H×W`: the object-specific reconstruction (`obj_spec_image`).
    pub object_specific_image: &'a Tensor,
    /// M, `B×2×H×W`: the anomaly detection module's softmax probabilities (`anomaly_map`).
    pub anomaly_map: &'a Tensor,
    /// M_gt, `B×1×H×W` (or `B×H×W`): the 0/1 ground-truth mask (`true_anomaly_map`).
    pub true_anomaly_map: &'a Tensor,
}

/// The second-stage loss and its terms, each a scalar (rank-0) tensor that is part of the
/// autograd graph.
#[derive(Debug, Clone)]
pub struct SecondStageLoss {
    /// The sum of the four terms below; call `backward` on this one.
    pub total: Tensor,
    /// `MSE(F̃_hi, Q_hi)`.
    pub l2_hi: Tensor,
    /// `MSE(F̃_lo, Q_lo)`.
    pub l2_lo: Tensor,
    /// `10·MSE(image, I_spc)`.
    pub l2_img_x10: Tensor,
    /// `focal(M, M_gt)` of the chosen [`FocalKind`].
    pub focal: Tensor,
}

/// DSR's second-stage loss: `MSE(F̃_hi, Q_hi) + MSE(F̃_lo, Q_lo) + 10·MSE(image, I_spc) +
/// focal(M, M_gt)` (paper Eq. 3 with λ₂ = 1, λ₃ = 10; anomalib's `DsrSecondStageLoss` when
/// `kind` is [`FocalKind::Anomalib`]).
///
/// Shapes are those documented on [`SecondStageInputs`]; every MSE is a mean over all
/// elements. Returns the total and each term.
///
/// # Errors
///
/// [`LossError::Shape`] naming the first pair whose shapes disagree; candle errors are passed
/// through.
pub fn second_stage_loss(
    inputs: &SecondStageInputs<'_>,
    kind: FocalKind,
) -> Result<SecondStageLoss> {
    let l2_hi = mse_loss("quantized_hi", inputs.recon_feat_hi, inputs.quantized_hi)?;
    let l2_lo = mse_loss("quantized_lo", inputs.recon_feat_lo, inputs.quantized_lo)?;
    let l2_img_x10 = mse_loss(
        "object_specific_image",
        inputs.image,
        inputs.object_specific_image,
    )?
    .affine(IMAGE_WEIGHT, 0.0)?;
    let focal = focal_loss_named(
        ("anomaly_map", inputs.anomaly_map),
        ("true_anomaly_map", inputs.true_anomaly_map),
        kind,
    )?;
    let total = (((&l2_hi + &l2_lo)? + &l2_img_x10)? + &focal)?;
    Ok(SecondStageLoss {
        total,
        l2_hi,
        l2_lo,
        l2_img_x10,
        focal,
    })
}

/// DSR's third-stage loss: the focal loss of the upsampling module's output against the
/// smudge mask.
///
/// * `anomaly_map_up`: M_up, `B×2×H×W` softmax probabilities.
/// * `mask`: `B×1×H×W` (or `B×H×W`) 0/1 ground truth.
///
/// Returns a scalar tensor.
///
/// # Errors
///
/// As [`focal_loss`](crate::focal_loss), with the errors naming `anomaly_map_up` and `mask`.
pub fn third_stage_loss(anomaly_map_up: &Tensor, mask: &Tensor, kind: FocalKind) -> Result<Tensor> {
    focal_loss_named(("anomaly_map_up", anomaly_map_up), ("mask", mask), kind)
}
