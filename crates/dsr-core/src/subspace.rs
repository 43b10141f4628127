//! The subspace restriction modules (prefixes `subspace_restriction_module_hi.` and `_lo.`):
//! an encoder–decoder without skip connections that maps (possibly anomalous) quantized features
//! back towards the normal appearance subspace, followed by re-quantization with the frozen
//! codebook of the same level.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{max_pool2x2, Conv2d, DoubleConv, UpConv};
use crate::nhwc::Nhwc;
use crate::quantizer::{Quantized, VectorQuantizer};
use crate::Result;

/// The network inside a subspace restriction module (`unet.*`): three encoder blocks, two
/// decoder stages, no skips.
#[derive(Debug, Clone)]
pub struct SubspaceRestrictionNetwork {
    block1: DoubleConv,
    block2: DoubleConv,
    block3: DoubleConv,
    up2: UpConv,
    db2: DoubleConv,
    up3: UpConv,
    db3: DoubleConv,
    fin_out: Conv2d,
}

impl SubspaceRestrictionNetwork {
    /// Builds the network for `channels` input/output channels and base width `base_width`
    /// (both equal the embedding width in DSR).
    pub fn new(vb: VarBuilder, channels: usize, base_width: usize) -> candle_core::Result<Self> {
        let bw = base_width;
        let enc = vb.pp("encoder");
        let dec = vb.pp("decoder");
        Ok(Self {
            block1: DoubleConv::new(enc.pp("block1"), channels, bw, bw)?,
            block2: DoubleConv::new(enc.pp("block2"), bw, 2 * bw, 2 * bw)?,
            block3: DoubleConv::new(enc.pp("block3"), 2 * bw, 4 * bw, 4 * bw)?,
            up2: UpConv::new(dec.pp("up2"), 4 * bw, 2 * bw)?,
            db2: DoubleConv::new(dec.pp("db2"), 2 * bw, 2 * bw, 2 * bw)?,
            up3: UpConv::new(dec.pp("up3"), 2 * bw, bw)?,
            db3: DoubleConv::new(dec.pp("db3"), bw, bw, bw)?,
            fin_out: Conv2d::k3(dec.pp("fin_out").pp("0"), bw, channels)?,
        })
    }
}

impl SubspaceRestrictionNetwork {
    /// Every convolution of the network.
    fn convs(&self) -> impl Iterator<Item = &Conv2d> {
        let blocks = [
            &self.block1,
            &self.block2,
            &self.block3,
            &self.db2,
            &self.db3,
        ];
        blocks.into_iter().flat_map(DoubleConv::convs).chain([
            self.up2.conv(),
            self.up3.conv(),
            &self.fin_out,
        ])
    }

    /// The forward with activations kept channels last (see [`crate::nhwc`]); the same values
    /// as [`Self::forward_planes`].
    fn forward_nhwc(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let b1 = self.block1.forward_nhwc(&Nhwc::from_tensor(xs)?)?;
        let b2 = self.block2.forward_nhwc(&b1.max_pool2x2())?;
        let b3 = self.block3.forward_nhwc(&b2.max_pool2x2())?;
        let x = self.db2.forward_nhwc(&self.up2.forward_nhwc(&b3)?)?;
        let x = self.db3.forward_nhwc(&self.up3.forward_nhwc(&x)?)?;
        self.fin_out.forward_nhwc(&x)?.to_tensor()
    }

    /// The forward on NCHW tensors, layer by layer (training, and devices other than the CPU).
    fn forward_planes(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let b1 = xs.apply(&self.block1)?;
        let b2 = max_pool2x2(&b1)?.apply(&self.block2)?;
        let b3 = max_pool2x2(&b2)?.apply(&self.block3)?;
        b3.apply(&self.up2)?
            .apply(&self.db2)?
            .apply(&self.up3)?
            .apply(&self.db3)?
            .apply(&self.fin_out)
    }
}

impl Module for SubspaceRestrictionNetwork {
    /// `B×D×h×w → B×D×h×w` (h, w multiples of 4). At inference on the CPU (f32, nothing
    /// tracked) the activations stay channels last between layers; the values are those of the
    /// layer-by-layer NCHW forward.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if Nhwc::suits(xs, self.convs()) {
            self.forward_nhwc(xs)
        } else {
            self.forward_planes(xs)
        }
    }
}

/// A subspace restriction module: `F̃ = unet(Q)`, `Q̃ = VQ(F̃)`.
#[derive(Debug, Clone)]
pub struct SubspaceRestrictionModule {
    unet: SubspaceRestrictionNetwork,
}

impl SubspaceRestrictionModule {
    /// Builds the module for embedding width `embedding_dim` under `vb`.
    pub fn new(vb: VarBuilder, embedding_dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            unet: SubspaceRestrictionNetwork::new(vb.pp("unet"), embedding_dim, embedding_dim)?,
        })
    }

    /// Restores `xs` (`B×D×h×w`) and re-quantizes it with `vq` (the frozen codebook of the same
    /// level); returns `(F̃, Q̃)`. Gradients reach the network through the straight-through
    /// estimator.
    pub fn forward(&self, xs: &Tensor, vq: &VectorQuantizer) -> Result<(Tensor, Quantized)> {
        let features = xs.apply(&self.unet)?;
        let quantized = vq.forward(&features)?;
        Ok((features, quantized))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nhwc::test_support::{assert_same_values, input, seeded};

    #[test]
    fn channels_last_forward_gives_the_nchw_forward_values() {
        // 32 channels at 32×32: the 32- and 64-channel layers at 32×32 and 16×16 by Winograd's
        // algorithm, the 8×8 ones by the direct product. Two images.
        let network = seeded(true, |vb| SubspaceRestrictionNetwork::new(vb, 32, 32));
        let xs = input(2, 32, 32);
        assert!(Nhwc::suits(&xs, network.convs()));
        let trainable = seeded(false, |vb| SubspaceRestrictionNetwork::new(vb, 32, 32));
        assert!(!Nhwc::suits(&xs, trainable.convs()));
        let pixels = network.forward_nhwc(&xs).unwrap();
        assert_eq!(pixels.dims(), &[2, 32, 32, 32]);
        assert_same_values(&network.forward_planes(&xs).unwrap(), &pixels);
    }
}
