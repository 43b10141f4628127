//! Training losses of DSR ("A Dual Subspace Re-Projection Network for Surface Anomaly
//! Detection", Zavrtanik, Kristan and Skočaj, ECCV 2022).
//!
//! * [`second_stage_loss`]: `MSE(F̃_hi, Q_hi) + MSE(F̃_lo, Q_lo) + 10·MSE(image, I_spc) +
//!   focal(M, M_gt)`, returned together with its four terms.
//! * [`third_stage_loss`]: the focal loss of the upsampling module's mask.
//! * [`focal_loss`]: the focal loss of a two-channel softmax mask against a 0/1 mask, in one of
//!   two formulations selected by [`FocalKind`]: the original DSR code's loss on probabilities
//!   ([`FocalKind::Original`], the default) or the loss anomalib 2.7.0 actually computes
//!   through kornia, which applies a second softmax and ignores normal pixels
//!   ([`FocalKind::Anomalib`]).
//! * [`kornia_focal_loss`] and [`kornia_focal_loss_none`]: kornia's `FocalLoss` itself, on
//!   logits, for any α and γ.
//! * [`mse_loss`]: the mean squared error used by the stage losses.
//!
//! All losses return scalar (rank-0) tensors that stay in the autograd graph, so
//! `loss.backward()` reaches the inputs. The two-class structure of DSR's masks is used
//! throughout: channels are narrowed out and a two-way log-softmax is written in closed form,
//! so no softmax over the strided channel dimension is computed.
//!
//! Architecture invariant: pure tensor functions, knows no model or data. Inputs are candle
//! tensors and nothing else; the caller decides where they come from.
//!
//! # Example
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use dsr_losses::{focal_loss, third_stage_loss, FocalKind};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! // One 1×2 image: the first pixel is predicted normal, the second anomalous.
//! let probs = Tensor::new(&[[[[0.9f32, 0.2]], [[0.1, 0.8]]]], &dev)?; // 1×2×1×2
//! let mask = Tensor::new(&[[[[0f32, 1.]]]], &dev)?; // 1×1×1×2
//!
//! let original = focal_loss(&probs, &mask, FocalKind::Original)?.to_scalar::<f32>()?;
//! // Per pixel −(1 − p_t)²·ln p_t with p_t ≈ 0.9 and 0.8, averaged over the two pixels.
//! let expected = (-(0.1f32.powi(2)) * 0.9f32.ln() - 0.2f32.powi(2) * 0.8f32.ln()) / 2.0;
//! assert!((original - expected).abs() < 1e-5);
//!
//! // anomalib's variant only sees the anomalous pixel, through a second softmax.
//! let q1 = 1.0 / (1.0 + (-(0.8f32 - 0.2)).exp());
//! let expected = (1.0 - q1).powi(2) * -q1.ln() / 4.0;
//! let anomalib = third_stage_loss(&probs, &mask, FocalKind::Anomalib)?.to_scalar::<f32>()?;
//! assert!((anomalib - expected).abs() < 1e-6);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod error;
mod focal;
mod stage;

pub use error::{LossError, Result};
pub use focal::{focal_loss, kornia_focal_loss, kornia_focal_loss_none, FocalKind};
pub use stage::{
    mse_loss, second_stage_loss, third_stage_loss, SecondStageInputs, SecondStageLoss,
};
