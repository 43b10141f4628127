//! [`Act`]: an activation batch that knows its layout, so that each network writes its forward
//! once. At inference on the CPU (f32, nothing tracked) a network keeps its activations channels
//! last ([`Nhwc`]) from input to output; in training and on other devices they stay NCHW
//! tensors, layer by layer. Both layouts run the same kernels on the same values.

use candle_core::Tensor;

use crate::kernels::nhwc::Nhwc;
use crate::layers::{max_pool2x2, Conv2d};

/// An activation batch in the layout its network runs in.
#[derive(Debug)]
pub(crate) enum Act {
    /// An NCHW tensor (training, and devices other than the CPU).
    Planes(Tensor),
    /// A channels-last batch (inference on the CPU).
    Pixels(Nhwc),
}

impl Act {
    /// The input `xs` (NCHW) of a network whose convolutions are `convs`: channels last when
    /// the network can run so on it (see [`Act::suits_pixels`]), else as it is.
    pub(crate) fn input<'a>(
        xs: &Tensor,
        convs: impl IntoIterator<Item = &'a Conv2d>,
    ) -> candle_core::Result<Self> {
        Self::in_layout(xs, Self::suits_pixels(xs, convs))
    }

    /// The input `xs` channels last (`pixels`) or as it is.
    pub(crate) fn in_layout(xs: &Tensor, pixels: bool) -> candle_core::Result<Self> {
        Ok(if pixels {
            Act::Pixels(Nhwc::from_tensor(xs)?)
        } else {
            Act::Planes(xs.clone())
        })
    }

    /// Whether a network whose convolutions are `convs` can run on `xs` channels last: `xs` an
    /// f32 `[n, c, h, w]` CPU tensor outside any autograd graph, every weight plain
    /// ([`Conv2d::is_plain`]).
    pub(crate) fn suits_pixels<'a>(
        xs: &Tensor,
        convs: impl IntoIterator<Item = &'a Conv2d>,
    ) -> bool {
        Nhwc::takes(xs) && convs.into_iter().all(Conv2d::is_plain)
    }

    /// The NCHW tensor of the batch.
    pub(crate) fn into_tensor(self) -> candle_core::Result<Tensor> {
        match self {
            Act::Planes(t) => Ok(t),
            Act::Pixels(p) => p.to_tensor(),
        }
    }

    /// 2×2 max-pooling with stride 2.
    pub(crate) fn max_pool2x2(&self) -> candle_core::Result<Self> {
        Ok(match self {
            Act::Planes(t) => Act::Planes(max_pool2x2(t)?),
            Act::Pixels(p) => Act::Pixels(p.max_pool2x2()),
        })
    }

    /// The channels of `self` followed by those of `other` (same layout, same pixels).
    pub(crate) fn cat(&self, other: &Self) -> candle_core::Result<Self> {
        match (self, other) {
            (Act::Planes(a), Act::Planes(b)) => Ok(Act::Planes(Tensor::cat(&[a, b], 1)?)),
            (Act::Pixels(a), Act::Pixels(b)) => Ok(Act::Pixels(a.cat(b)?)),
            _ => candle_core::bail!("cannot concatenate activations of different layouts"),
        }
    }
}
