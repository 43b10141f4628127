//! The image reconstruction network, or object-specific appearance decoder (prefix
//! `image_reconstruction_network.`): restores an image from the restored quantized features.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::discrete::ResidualStack;
use crate::layers::{max_pool2x2, Conv2d, ConvTranspose2d, DoubleConv};
use crate::DsrConfig;

/// Width of the bottleneck between the encoder and the decoder (fixed in the reference).
const BOTTLENECK: usize = 64;

/// `cat(upsample_t(Q̃_lo), Q̃_hi)` (`B×2D×H/4×W/4`) → object-specific image `I_spc`
/// (`B×3×H×W`).
#[derive(Debug, Clone)]
pub struct ImageReconstructionNetwork {
    block1: DoubleConv,
    block2: DoubleConv,
    pre_vq_conv: Conv2d,
    upblock1: ConvTranspose2d,
    upblock2: ConvTranspose2d,
    conv_1: Conv2d,
    residual_stack: ResidualStack,
    conv_trans_1: ConvTranspose2d,
    conv_trans_2: ConvTranspose2d,
}

impl ImageReconstructionNetwork {
    /// Builds the network for `cfg` under `vb`.
    pub fn new(cfg: &DsrConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let c = 2 * cfg.embedding_dim;
        let nh = cfg.num_hiddens;
        Ok(Self {
            block1: DoubleConv::new(c, c, 2 * c, vb.pp("block1"))?,
            block2: DoubleConv::new(2 * c, 2 * c, 4 * c, vb.pp("block2"))?,
            pre_vq_conv: Conv2d::new(4 * c, BOTTLENECK, 1, 1, 0, true, vb.pp("pre_vq_conv"))?,
            upblock1: ConvTranspose2d::up2(BOTTLENECK, BOTTLENECK, vb.pp("upblock1"))?,
            upblock2: ConvTranspose2d::up2(BOTTLENECK, BOTTLENECK, vb.pp("upblock2"))?,
            conv_1: Conv2d::new(BOTTLENECK, nh, 3, 1, 1, true, vb.pp("_conv_1"))?,
            residual_stack: ResidualStack::new(
                nh,
                cfg.num_residual_hiddens,
                cfg.num_residual_layers,
                vb.pp("_residual_stack"),
            )?,
            conv_trans_1: ConvTranspose2d::up2(nh, nh / 2, vb.pp("_conv_trans_1"))?,
            conv_trans_2: ConvTranspose2d::up2(nh / 2, 3, vb.pp("_conv_trans_2"))?,
        })
    }
}

impl Module for ImageReconstructionNetwork {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let x = xs.apply(&self.block1)?;
        let x = max_pool2x2(&x)?.apply(&self.block2)?;
        let x = max_pool2x2(&x)?.apply(&self.pre_vq_conv)?;
        x.apply(&self.upblock1)?
            .relu()?
            .apply(&self.upblock2)?
            .relu()?
            .apply(&self.conv_1)?
            .apply(&self.residual_stack)?
            .apply(&self.conv_trans_1)?
            .relu()?
            .apply(&self.conv_trans_2)
    }
}
