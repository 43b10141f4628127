//! The U-Net shared by the anomaly detection module and the upsampling module (`UnetModel`):
//! four encoder blocks, three decoder stages with skip connections (upsampled tensor first, skip
//! second), non-affine instance normalisation and bilinear ×2 upsampling.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{max_pool2x2, Conv2d, DoubleConv, UpConv};

/// A full-resolution U-Net with `out_channels` logits (keys `encoder.*`, `decoder.*`).
#[derive(Debug, Clone)]
pub struct UnetModel {
    block1: DoubleConv,
    block2: DoubleConv,
    block3: DoubleConv,
    block4: DoubleConv,
    up1: UpConv,
    db1: DoubleConv,
    up2: UpConv,
    db2: DoubleConv,
    up3: UpConv,
    db3: DoubleConv,
    fin_out: Conv2d,
}

impl UnetModel {
    /// Builds the U-Net under `vb` (the module's `unet` prefix).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        base_width: usize,
    ) -> candle_core::Result<Self> {
        let bw = base_width;
        let enc = vb.pp("encoder");
        let dec = vb.pp("decoder");
        Ok(Self {
            block1: DoubleConv::new(enc.pp("block1"), in_channels, bw, bw)?,
            block2: DoubleConv::new(enc.pp("block2"), bw, 2 * bw, 2 * bw)?,
            block3: DoubleConv::new(enc.pp("block3"), 2 * bw, 4 * bw, 4 * bw)?,
            block4: DoubleConv::new(enc.pp("block4"), 4 * bw, 4 * bw, 4 * bw)?,
            up1: UpConv::new(dec.pp("up1"), 4 * bw, 4 * bw)?,
            db1: DoubleConv::new(dec.pp("db1"), 8 * bw, 4 * bw, 4 * bw)?,
            up2: UpConv::new(dec.pp("up2"), 4 * bw, 2 * bw)?,
            db2: DoubleConv::new(dec.pp("db2"), 4 * bw, 2 * bw, 2 * bw)?,
            up3: UpConv::new(dec.pp("up3"), 2 * bw, bw)?,
            db3: DoubleConv::new(dec.pp("db3"), 2 * bw, bw, bw)?,
            fin_out: Conv2d::k3(dec.pp("fin_out").pp("0"), bw, out_channels)?,
        })
    }
}

impl Module for UnetModel {
    /// `B×C_in×H×W → B×C_out×H×W` (H, W multiples of 8).
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let b1 = xs.apply(&self.block1)?;
        let b2 = max_pool2x2(&b1)?.apply(&self.block2)?;
        let b3 = max_pool2x2(&b2)?.apply(&self.block3)?;
        let b4 = max_pool2x2(&b3)?.apply(&self.block4)?;
        let up1 = b4.apply(&self.up1)?;
        let db1 = Tensor::cat(&[&up1, &b3], 1)?.apply(&self.db1)?;
        let up2 = db1.apply(&self.up2)?;
        let db2 = Tensor::cat(&[&up2, &b2], 1)?.apply(&self.db2)?;
        let up3 = db2.apply(&self.up3)?;
        let db3 = Tensor::cat(&[&up3, &b1], 1)?.apply(&self.db3)?;
        db3.apply(&self.fin_out)
    }
}
