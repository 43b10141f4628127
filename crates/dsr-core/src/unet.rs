//! The U-Net shared by the anomaly detection module and the upsampling module (`UnetModel`):
//! four encoder blocks, three decoder stages with skip connections (upsampled tensor first, skip
//! second), non-affine instance normalisation and bilinear ×2 upsampling.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::activation::Act;
use crate::layers::{Conv2d, DoubleConv, UpConv};

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
        in_channels: usize,
        out_channels: usize,
        base_width: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let bw = base_width;
        let enc = vb.pp("encoder");
        let dec = vb.pp("decoder");
        Ok(Self {
            block1: DoubleConv::new(in_channels, bw, bw, enc.pp("block1"))?,
            block2: DoubleConv::new(bw, 2 * bw, 2 * bw, enc.pp("block2"))?,
            block3: DoubleConv::new(2 * bw, 4 * bw, 4 * bw, enc.pp("block3"))?,
            block4: DoubleConv::new(4 * bw, 4 * bw, 4 * bw, enc.pp("block4"))?,
            up1: UpConv::new(4 * bw, 4 * bw, dec.pp("up1"))?,
            db1: DoubleConv::new(8 * bw, 4 * bw, 4 * bw, dec.pp("db1"))?,
            up2: UpConv::new(4 * bw, 2 * bw, dec.pp("up2"))?,
            db2: DoubleConv::new(4 * bw, 2 * bw, 2 * bw, dec.pp("db2"))?,
            up3: UpConv::new(2 * bw, bw, dec.pp("up3"))?,
            db3: DoubleConv::new(2 * bw, bw, bw, dec.pp("db3"))?,
            fin_out: Conv2d::k3(bw, out_channels, dec.pp("fin_out").pp("0"))?,
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

    /// The forward with the input in the layout `x` has; the activations stay in it from
    /// input to logits.
    fn forward_act(&self, x: Act) -> candle_core::Result<Tensor> {
        let b1 = self.block1.forward_act(&x)?;
        drop(x);
        let b2 = self.block2.forward_act(&b1.max_pool2x2()?)?;
        let b3 = self.block3.forward_act(&b2.max_pool2x2()?)?;
        let b4 = self.block4.forward_act(&b3.max_pool2x2()?)?;
        let up1 = self.up1.forward_act(&b4)?;
        drop(b4);
        let db1 = self.db1.forward_act(&up1.cat(&b3)?)?;
        drop((up1, b3));
        let up2 = self.up2.forward_act(&db1)?;
        let db2 = self.db2.forward_act(&up2.cat(&b2)?)?;
        drop((up2, b2));
        let up3 = self.up3.forward_act(&db2)?;
        let db3 = self.db3.forward_act(&up3.cat(&b1)?)?;
        drop((up3, b1));
        self.fin_out.forward_act(&db3)?.into_tensor()
    }
}

impl Module for UnetModel {
    /// `B×C_in×H×W → B×C_out×H×W` (H, W multiples of 8). At inference on the CPU (f32,
    /// nothing tracked) the activations stay channels last from input to logits; the values
    /// are those of the layer-by-layer NCHW forward.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(Act::input(xs, self.convs())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::nhwc::test_support::{assert_same_values, input, seeded};

    /// A U-Net from 6 to 2 channels of base width `width`, plain or trainable.
    fn unet(width: usize, plain: bool) -> UnetModel {
        seeded(plain, |vb| UnetModel::new(6, 2, width, vb))
    }

    #[test]
    fn channels_last_forward_gives_the_nchw_forward_values() {
        // Width 32 at 64×64: the 32- and 64-channel layers down to 16×16 run by Winograd's
        // algorithm, the first layer (6 channels) and the 8×8 ones by the direct product, both
        // in each layout. Two images: the batch loop too. (Here not one value differs.)
        let unet = unet(32, true);
        let xs = input(2, 6, 64);
        assert!(Act::suits_pixels(&xs, unet.convs()));
        let run = |pixels| {
            unet.forward_act(Act::in_layout(&xs, pixels).unwrap())
                .unwrap()
        };
        let pixels = run(true);
        assert_eq!(pixels.dims(), &[2, 2, 64, 64]);
        assert_same_values(&run(false), &pixels);
    }

    #[test]
    fn training_variables_take_the_nchw_path() {
        let xs = input(1, 6, 16);
        assert!(!Act::suits_pixels(&xs, unet(8, false).convs()));
        let plain = unet(8, true);
        assert!(Act::suits_pixels(&xs, plain.convs()));
        let tracked = candle_core::Var::from_tensor(&xs).unwrap();
        assert!(!Act::suits_pixels(tracked.as_tensor(), plain.convs()));
    }
}
