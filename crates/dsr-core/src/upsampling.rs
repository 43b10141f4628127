//! The upsampling module (prefix `upsampling_module.`): despite its name it keeps the resolution
//! and refines the anomaly mask from `cat(I_spc, I_gen, softmax(M))`.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::unet::UnetModel;

/// Refines the detection module's mask (trained alone in phase 3).
#[derive(Debug, Clone)]
pub struct UpsamplingModule {
    unet: UnetModel,
}

impl UpsamplingModule {
    /// Builds the module with U-Net base width `base_width` (64 in the reference) under `vb`.
    pub fn new(base_width: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            unet: UnetModel::new(8, 2, base_width, vb.pp("unet"))?,
        })
    }

    /// `I_spc`, `I_gen` (`B×3×H×W`) and the mask probabilities `B×2×H×W` → refined logits
    /// `B×2×H×W`.
    pub fn forward(
        &self,
        specific: &Tensor,
        general: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        Tensor::cat(&[specific, general, mask], 1)?.apply(&self.unet)
    }
}
