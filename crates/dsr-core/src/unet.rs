//! The U-Net shared by the anomaly detection module and the upsampling module (`UnetModel`):
//! four encoder blocks, three decoder stages with skip connections (upsampled tensor first, skip
//! second), non-affine instance normalisation and bilinear ×2 upsampling.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{max_pool2x2, Conv2d, DoubleConv, UpConv};
use crate::nhwc::Nhwc;

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

impl UnetModel {
    /// Every convolution of the network.
    fn convs(&self) -> impl Iterator<Item = &Conv2d> {
        let blocks = [&self.block1, &self.block2, &self.block3, &self.block4];
        let decoder = [&self.db1, &self.db2, &self.db3];
        let ups = [&self.up1, &self.up2, &self.up3];
        blocks
            .into_iter()
            .chain(decoder)
            .flat_map(DoubleConv::convs)
            .chain(ups.into_iter().map(UpConv::conv))
            .chain([&self.fin_out])
    }

    /// Whether [`Self::forward_nhwc`] can run on `xs`: inference (nothing tracked) on f32 CPU
    /// tensors.
    fn suits_nhwc(&self, xs: &Tensor) -> bool {
        Nhwc::suits(xs, self.convs())
    }

    /// The forward with activations kept channels last from input to logits (see
    /// [`crate::nhwc`]); the same values as [`Self::forward_planes`].
    fn forward_nhwc(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let b1 = self.block1.forward_nhwc(&Nhwc::from_tensor(xs)?)?;
        let b2 = self.block2.forward_nhwc(&b1.max_pool2x2())?;
        let b3 = self.block3.forward_nhwc(&b2.max_pool2x2())?;
        let b4 = self.block4.forward_nhwc(&b3.max_pool2x2())?;
        let up1 = self.up1.forward_nhwc(&b4)?;
        drop(b4);
        let db1 = self.db1.forward_nhwc(&up1.cat(&b3)?)?;
        drop((up1, b3));
        let up2 = self.up2.forward_nhwc(&db1)?;
        let db2 = self.db2.forward_nhwc(&up2.cat(&b2)?)?;
        drop((up2, b2));
        let up3 = self.up3.forward_nhwc(&db2)?;
        let db3 = self.db3.forward_nhwc(&up3.cat(&b1)?)?;
        drop((up3, b1));
        self.fin_out.forward_nhwc(&db3)?.to_tensor()
    }

    /// The forward on NCHW tensors, layer by layer (training, and devices other than the CPU).
    fn forward_planes(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
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

impl Module for UnetModel {
    /// `B×C_in×H×W → B×C_out×H×W` (H, W multiples of 8). At inference on the CPU (f32,
    /// nothing tracked) the activations stay channels last from input to logits; the values
    /// are those of the layer-by-layer NCHW forward.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.suits_nhwc(xs) {
            self.forward_nhwc(xs)
        } else {
            self.forward_planes(xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nhwc::test_support::{assert_same_values, input, seeded};

    /// A U-Net from 6 to 2 channels of base width `width`, plain or trainable.
    fn unet(width: usize, plain: bool) -> UnetModel {
        seeded(plain, |vb| UnetModel::new(vb, 6, 2, width))
    }

    #[test]
    fn channels_last_forward_gives_the_nchw_forward_values() {
        // Width 32 at 64×64: the 32- and 64-channel layers down to 16×16 run by Winograd's
        // algorithm, the first layer (6 channels) and the 8×8 ones by the direct product, both
        // in each layout. Two images: the batch loop too. (Here not one value differs.)
        let unet = unet(32, true);
        let xs = input(2, 6, 64);
        assert!(unet.suits_nhwc(&xs));
        let pixels = unet.forward_nhwc(&xs).unwrap();
        assert_eq!(pixels.dims(), &[2, 2, 64, 64]);
        assert_same_values(&unet.forward_planes(&xs).unwrap(), &pixels);
    }

    #[test]
    fn training_variables_take_the_nchw_path() {
        let xs = input(1, 6, 16);
        assert!(!unet(8, false).suits_nhwc(&xs));
        let plain = unet(8, true);
        assert!(plain.suits_nhwc(&xs));
        let tracked = candle_core::Var::from_tensor(&xs).unwrap();
        assert!(!plain.suits_nhwc(tracked.as_tensor()));
    }
}
