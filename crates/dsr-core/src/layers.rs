//! Leaf layers and tensor operations shared by every DSR network.
//!
//! Convolutions own their PyTorch leaf names (`weight`, `bias`); the layers hold the weights and
//! call the kernels of [`crate::kernels`] with tensors and plain parameters. The operations here
//! are the places where candle 0.11 needs care (see the crate docs): 2×2 max-pooling is written
//! as a reshape + max (candle's `max_pool2d` backward is scaled by 1/4), bilinear upsampling has
//! a custom operator with a hand-written backward (candle's has none, see
//! [`crate::kernels::resample`]), and nearest upsampling is a broadcast (candle's backward
//! overwrites instead of accumulating).

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::activation::Act;
use crate::kernels::nhwc::Nhwc;
pub use crate::kernels::norm::{instance_norm, instance_norm_relu, INSTANCE_NORM_EPS};
use crate::kernels::norm::{InstanceNormRelu, RecomputedConvNormRelu};
pub use crate::kernels::resample::{
    avg_pool_same, max_pool, max_pool2x2, upsample_bilinear, upsample_bilinear2x,
    upsample_bilinear_matmul, upsample_nearest,
};

/// Initialisation hint that mirrors PyTorch's default for a layer with fan-in `fan_in`
/// (kaiming-uniform with a = √5 for weights and U(±1/√fan_in) for biases have the same bound).
fn torch_default_init(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A 2-D convolution with PyTorch's weight layout `[out, in, kh, kw]` and zero padding.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    /// The weight's copies in the kernels' layouts (see [`crate::kernels::conv::WeightCache`]).
    cache: crate::kernels::conv::WeightCache,
}

impl Conv2d {
    /// Reads `weight` (and `bias` when `bias` is true) under `vb`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let init = torch_default_init(in_channels * kernel * kernel);
        let weight =
            vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_channels, "bias", init)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            cache: Default::default(),
        })
    }

    /// A 3×3 convolution with padding 1 and a bias, the U-Nets' workhorse.
    pub fn k3(
        in_channels: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Self::new(in_channels, out_channels, 3, 1, 1, true, vb)
    }

    /// The weight tensor `[out, in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias tensor `[out]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Conv2d {
    /// Whether the weight and bias are f32 CPU tensors outside any autograd graph (loaded
    /// weights, not training variables): what the channels-last inference path needs.
    pub(crate) fn is_plain(&self) -> bool {
        let plain = crate::kernels::conv::is_plain_f32_cpu;
        plain(&self.weight) && self.bias.as_ref().is_none_or(plain)
    }

    /// The convolution of an activation in either layout.
    pub(crate) fn forward_act(&self, xs: &Act) -> candle_core::Result<Act> {
        Ok(match xs {
            Act::Planes(t) => Act::Planes(self.forward(t)?),
            Act::Pixels(p) => Act::Pixels(self.forward_nhwc(p)?),
        })
    }

    /// The convolution of a channels-last batch (see [`crate::kernels::nhwc`]).
    fn forward_nhwc(&self, xs: &Nhwc) -> candle_core::Result<Nhwc> {
        let policy = crate::exec::current();
        crate::kernels::conv::conv2d_nhwc(
            xs,
            &self.weight,
            self.bias.as_ref(),
            (self.stride, self.padding),
            (policy.winograd(), policy.bf16()),
            policy.keep_filters.then_some(&self.cache),
        )
    }
}

impl Module for Conv2d {
    /// The convolution under the execution policy in force: its algorithm, and the weight's
    /// kept copies when the model was built for inference from loaded weights.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (w, b) = (&self.weight, self.bias.as_ref());
        if crate::exec::current().keep_filters {
            crate::kernels::conv::conv2d_cached(xs, w, b, self.stride, self.padding, &self.cache)
        } else {
            crate::kernels::conv::conv2d(xs, w, b, self.stride, self.padding)
        }
    }
}

/// The "up×2" transposed convolution of DSR: kernel 4, stride 2, padding 1, with a bias; PyTorch
/// weight layout `[in, out, kh, kw]`. It exactly doubles height and width.
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    weight: Tensor,
    bias: Tensor,
}

impl ConvTranspose2d {
    /// Reads `weight` `[in, out, 4, 4]` and `bias` `[out]` under `vb`.
    pub fn up2(
        in_channels: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        // PyTorch computes the fan-in of a transposed convolution from dimension 1 of its weight.
        let init = torch_default_init(out_channels * 16);
        let weight = vb.get_with_hints((in_channels, out_channels, 4, 4), "weight", init)?;
        let bias = vb.get_with_hints(out_channels, "bias", init)?;
        Ok(Self { weight, bias })
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        crate::kernels::conv::conv_transpose2d(xs, &self.weight, Some(&self.bias), 2, 1)
    }
}

/// Conv3×3 → InstanceNorm → ReLU, the "CBR" block of the U-Nets.
#[derive(Debug, Clone)]
pub struct ConvNormRelu {
    conv: Conv2d,
}

impl ConvNormRelu {
    /// Wraps a convolution whose output is normalised and rectified.
    pub fn new(conv: Conv2d) -> Self {
        Self { conv }
    }
}

impl Module for ConvNormRelu {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let conv = &self.conv;
        if let Some(bias) = &conv.bias {
            let tracked = xs.track_op() || conv.weight.track_op() || bias.track_op();
            let cpu_f32 = [xs, &conv.weight, bias]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
            let policy = crate::exec::current();
            if tracked && cpu_f32 && policy.exec.recompute {
                let op = RecomputedConvNormRelu {
                    stride: conv.stride,
                    padding: conv.padding,
                    winograd: policy.winograd(),
                };
                return xs
                    .contiguous()?
                    .apply_op3(&conv.weight, &bias.contiguous()?, op);
            }
        }
        let ys = xs.apply(conv)?;
        if !ys.track_op()
            && ys.device().is_cpu()
            && ys.dtype() == DType::F32
            && ys.is_contiguous()
            && ys.rank() == 4
        {
            // Inference: the convolution's output is a fresh tensor nobody else holds, so it is
            // normalised where it lies instead of into a second full-size buffer.
            ys.inplace_op1(&InstanceNormRelu)?;
            return Ok(ys);
        }
        instance_norm_relu(&ys)
    }
}

impl ConvNormRelu {
    /// The convolution.
    pub(crate) fn conv(&self) -> &Conv2d {
        &self.conv
    }

    /// The block on a channels-last batch (see [`crate::kernels::nhwc`]).
    fn forward_nhwc(&self, xs: &Nhwc) -> candle_core::Result<Nhwc> {
        let mut ys = self.conv.forward_nhwc(xs)?;
        ys.instance_norm_relu();
        Ok(ys)
    }

    /// The block on an activation in either layout.
    fn forward_act(&self, xs: &Act) -> candle_core::Result<Act> {
        Ok(match xs {
            Act::Planes(t) => Act::Planes(self.forward(t)?),
            Act::Pixels(p) => Act::Pixels(self.forward_nhwc(p)?),
        })
    }
}

/// Two CBR blocks stored as one `nn.Sequential` (convs at indices 0 and 3).
#[derive(Debug, Clone)]
pub struct DoubleConv {
    first: ConvNormRelu,
    second: ConvNormRelu,
}

impl DoubleConv {
    /// Reads `0.weight`, `0.bias`, `3.weight`, `3.bias` under `vb`.
    pub fn new(
        in_ch: usize,
        mid_ch: usize,
        out_ch: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            first: ConvNormRelu::new(Conv2d::k3(in_ch, mid_ch, vb.pp("0"))?),
            second: ConvNormRelu::new(Conv2d::k3(mid_ch, out_ch, vb.pp("3"))?),
        })
    }
}

impl DoubleConv {
    /// Its two convolutions.
    pub(crate) fn convs(&self) -> [&Conv2d; 2] {
        [self.first.conv(), self.second.conv()]
    }

    /// The two blocks on an activation in either layout.
    pub(crate) fn forward_act(&self, xs: &Act) -> candle_core::Result<Act> {
        self.second.forward_act(&self.first.forward_act(xs)?)
    }
}

impl Module for DoubleConv {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.apply(&self.first)?.apply(&self.second)
    }
}

/// Bilinear ×2 upsampling (align_corners = true) followed by a CBR block whose convolution sits
/// at index 1 of the `nn.Sequential`.
#[derive(Debug, Clone)]
pub struct UpConv {
    block: ConvNormRelu,
}

impl UpConv {
    /// Reads `1.weight` and `1.bias` under `vb`.
    pub fn new(in_ch: usize, out_ch: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            block: ConvNormRelu::new(Conv2d::k3(in_ch, out_ch, vb.pp("1"))?),
        })
    }
}

impl UpConv {
    /// Its convolution.
    pub(crate) fn conv(&self) -> &Conv2d {
        self.block.conv()
    }

    /// Upsampling and block on an activation in either layout.
    pub(crate) fn forward_act(&self, xs: &Act) -> candle_core::Result<Act> {
        match xs {
            Act::Planes(t) => Ok(Act::Planes(self.forward(t)?)),
            Act::Pixels(p) => Ok(Act::Pixels(
                self.block.forward_nhwc(&p.upsample_bilinear2x())?,
            )),
        }
    }
}

impl Module for UpConv {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        upsample_bilinear2x(xs)?.apply(&self.block)
    }
}

/// Softmax over the channel dimension (dim 1) of an NCHW tensor.
pub fn softmax_channels(xs: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(xs, 1)
}
