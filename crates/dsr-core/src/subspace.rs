//! The subspace restriction modules (prefixes `subspace_restriction_module_hi.` and `_lo.`):
//! an encoder–decoder without skip connections that maps (possibly anomalous) quantized features
//! back towards the normal appearance subspace, followed by re-quantization with the frozen
//! codebook of the same level.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::activation::Act;
use crate::layers::{Conv2d, DoubleConv, UpConv};
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
    pub fn new(channels: usize, base_width: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let bw = base_width;
        let enc = vb.pp("encoder");
        let dec = vb.pp("decoder");
        Ok(Self {
            block1: DoubleConv::new(channels, bw, bw, enc.pp("block1"))?,
            block2: DoubleConv::new(bw, 2 * bw, 2 * bw, enc.pp("block2"))?,
            block3: DoubleConv::new(2 * bw, 4 * bw, 4 * bw, enc.pp("block3"))?,
            up2: UpConv::new(4 * bw, 2 * bw, dec.pp("up2"))?,
            db2: DoubleConv::new(2 * bw, 2 * bw, 2 * bw, dec.pp("db2"))?,
            up3: UpConv::new(2 * bw, bw, dec.pp("up3"))?,
            db3: DoubleConv::new(bw, bw, bw, dec.pp("db3"))?,
            fin_out: Conv2d::k3(bw, channels, dec.pp("fin_out").pp("0"))?,
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

    /// The forward with the input in the layout `x` has; the activations stay in it from
    /// input to output.
    fn forward_act(&self, x: Act) -> candle_core::Result<Tensor> {
        let b1 = self.block1.forward_act(&x)?;
        drop(x);
        let b2 = self.block2.forward_act(&b1.max_pool2x2()?)?;
        let b3 = self.block3.forward_act(&b2.max_pool2x2()?)?;
        let x = self.db2.forward_act(&self.up2.forward_act(&b3)?)?;
        let x = self.db3.forward_act(&self.up3.forward_act(&x)?)?;
        self.fin_out.forward_act(&x)?.into_tensor()
    }
}

impl Module for SubspaceRestrictionNetwork {
    /// `B×D×h×w → B×D×h×w` (h, w multiples of 4). At inference on the CPU (f32, nothing
    /// tracked) the activations stay channels last between layers; the values are those of the
    /// layer-by-layer NCHW forward.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(Act::input(xs, self.convs())?)
    }
}

/// A subspace restriction module: `F̃ = unet(Q)`, `Q̃ = VQ(F̃)`.
#[derive(Debug, Clone)]
pub struct SubspaceRestrictionModule {
    unet: SubspaceRestrictionNetwork,
}

impl SubspaceRestrictionModule {
    /// Builds the module for embedding width `embedding_dim` under `vb`.
    pub fn new(embedding_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            unet: SubspaceRestrictionNetwork::new(embedding_dim, embedding_dim, vb.pp("unet"))?,
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
    use crate::kernels::nhwc::test_support::{assert_same_values, input, seeded};

    #[test]
    fn channels_last_forward_gives_the_nchw_forward_values() {
        // 32 channels at 32×32: the 32- and 64-channel layers at 32×32 and 16×16 by Winograd's
        // algorithm, the 8×8 ones by the direct product. Two images.
        let network = seeded(true, |vb| SubspaceRestrictionNetwork::new(32, 32, vb));
        let xs = input(2, 32, 32);
        assert!(Act::suits_pixels(&xs, network.convs()));
        let trainable = seeded(false, |vb| SubspaceRestrictionNetwork::new(32, 32, vb));
        assert!(!Act::suits_pixels(&xs, trainable.convs()));
        let run = |pixels| {
            network
                .forward_act(Act::in_layout(&xs, pixels).unwrap())
                .unwrap()
        };
        let pixels = run(true);
        assert_eq!(pixels.dims(), &[2, 32, 32, 32]);
        assert_same_values(&run(false), &pixels);
    }
}
