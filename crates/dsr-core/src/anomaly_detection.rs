//! The anomaly detection module (prefix `anomaly_detection_module.`): a U-Net on
//! `cat(I_spc, I_gen)` that outputs 2-class logits at full input resolution.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::unet::UnetModel;

/// Compares the object-specific and the general reconstruction and predicts, per pixel, the
/// logits of "normal" (channel 0) and "anomalous" (channel 1).
#[derive(Debug, Clone)]
pub struct AnomalyDetectionModule {
    unet: UnetModel,
}

impl AnomalyDetectionModule {
    /// Builds the module with U-Net base width `base_width` (64 in the reference) under `vb`.
    pub fn new(base_width: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            unet: UnetModel::new(6, 2, base_width, vb.pp("unet"))?,
        })
    }

    /// `I_spc`, `I_gen` (`B×3×H×W` each) → logits `B×2×H×W`.
    pub fn forward(&self, specific: &Tensor, general: &Tensor) -> candle_core::Result<Tensor> {
        Tensor::cat(&[specific, general], 1)?.apply(&self.unet)
    }
}
