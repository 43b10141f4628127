//! Leaf layers and tensor operations shared by every DSR network.
//!
//! Convolutions own their PyTorch leaf names (`weight`, `bias`). The operations here are the
//! places where candle 0.11 needs care (see the crate docs): 2×2 max-pooling is written as a
//! reshape + max (candle's `max_pool2d` backward is scaled by 1/4), bilinear upsampling has a
//! custom operator with a hand-written backward (candle's has none), and nearest upsampling is a
//! broadcast (candle's backward overwrites instead of accumulating).

use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp1, Layout, Module, Shape, Tensor, D};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use crate::conv::{f32_data, plain_tensor};
use crate::nhwc::Nhwc;

/// `InstanceNorm2d` epsilon (PyTorch default).
pub const INSTANCE_NORM_EPS: f64 = 1e-5;

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
    /// The weight's copies in the kernels' layouts (see [`crate::runtime::set_weight_cache`]).
    cache: crate::conv::WeightCache,
}

impl Conv2d {
    /// Reads `weight` (and `bias` when `bias` is true) under `vb`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
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
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
    ) -> candle_core::Result<Self> {
        Self::new(vb, in_channels, out_channels, 3, 1, 1, true)
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
        let plain = crate::conv::is_plain_f32_cpu;
        plain(&self.weight) && self.bias.as_ref().is_none_or(plain)
    }

    /// The convolution of a channels-last batch (see [`crate::nhwc`]).
    pub(crate) fn forward_nhwc(&self, xs: &Nhwc) -> candle_core::Result<Nhwc> {
        crate::conv::conv2d_nhwc(
            xs,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
            &self.cache,
        )
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        crate::conv::conv2d_cached(
            xs,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
            &self.cache,
        )
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
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
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
        crate::conv::conv_transpose2d(xs, &self.weight, Some(&self.bias), 2, 1)
    }
}

/// Non-affine instance normalisation over H×W per (sample, channel), biased variance, eps 1e-5:
/// PyTorch's `InstanceNorm2d(C)` with default arguments, identical in training and evaluation.
///
/// On the CPU this is one operator with a closed-form backward whose forward arithmetic follows
/// PyTorch's CPU kernel step by step (sums accumulated in f64, mean and variance rounded to f32,
/// output `x·invstd + (−mean·invstd)` with a single rounding), so that results agree to the last
/// bit in the common case; layers after a nearly constant channel amplify any difference. Other
/// devices use the composite formula.
pub fn instance_norm(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        return xs.contiguous()?.apply_op1(InstanceNorm);
    }
    let (n, c, h, w) = xs.dims4()?;
    let flat = xs.reshape((n, c, h * w))?;
    let mean = flat.mean_keepdim(D::Minus1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let ys = centred.broadcast_div(&(var + INSTANCE_NORM_EPS)?.sqrt()?)?;
    ys.reshape((n, c, h, w))
}

/// `relu(instance_norm(x))` as one operator on the CPU: the same arithmetic as
/// [`instance_norm`] followed by a ReLU, but only the input and the output stay alive for the
/// backward (three tensors otherwise). The ReLU's gradient passes where the output is positive,
/// as PyTorch's does.
pub fn instance_norm_relu(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        return xs.contiguous()?.apply_op1(InstanceNormRelu);
    }
    instance_norm(xs)?.relu()
}

/// The fused CPU operator of [`instance_norm_relu`].
#[derive(Debug, Clone, Copy)]
struct InstanceNormRelu;

impl CustomOp1 for InstanceNormRelu {
    fn name(&self) -> &'static str {
        "instance-norm-relu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        normalize_planes(storage, layout, true)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad_res.contiguous()?,
            &InstanceNormReluGrad,
        )?))
    }
}

impl InplaceOp1 for InstanceNormRelu {
    fn name(&self) -> &'static str {
        "instance-norm-relu-inplace"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (_, _, h, w) = layout.shape().dims4()?;
        let (start, end) = match layout.contiguous_offsets() {
            Some(range) => range,
            None => candle_core::bail!("instance norm in place needs a contiguous tensor"),
        };
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("instance norm in place is implemented for f32 tensors only");
        };
        data[start..end].par_chunks_mut(h * w).for_each(|plane| {
            let (mean, invstd) = plane_stats(plane);
            let beta = -(mean * invstd);
            crate::simd::wide(|| {
                for v in plane.iter_mut() {
                    // The same arithmetic as `normalize_planes`.
                    *v = ((*v as f64 * invstd as f64 + beta as f64) as f32).max(0.0);
                }
            });
        });
        Ok(())
    }
}

/// The forward of the CPU instance norm (followed by a ReLU when `relu`): every `h×w` plane
/// normalised with its own statistics, as PyTorch's CPU kernel computes it.
fn normalize_planes(
    storage: &CpuStorage,
    layout: &Layout,
    relu: bool,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    let src = f32_data(storage, layout, "instance norm")?;
    let hw = h * w;
    let mut dst = vec![0f32; n * c * hw];
    dst.par_chunks_mut(hw)
        .zip(src.par_chunks(hw))
        .for_each(|(out, plane)| {
            let (mean, invstd) = plane_stats(plane);
            let beta = -(mean * invstd);
            crate::simd::wide(|| {
                for (o, &x) in out.iter_mut().zip(plane) {
                    // The product of two f32 is exact in f64, so this rounds like a fused
                    // multiply-add except in vanishingly rare double-rounding cases.
                    let y = (x as f64 * invstd as f64 + beta as f64) as f32;
                    *o = if relu { y.max(0.0) } else { y };
                }
            });
        });
    Ok((CpuStorage::F32(dst), Shape::from((n, c, h, w))))
}

/// Mean and inverse standard deviation of one plane, computed as PyTorch's CPU batch-norm
/// statistics kernel does for f32 inputs.
fn plane_stats(plane: &[f32]) -> (f32, f32) {
    let n = plane.len();
    let sum = sum_f64(plane, |v| v as f64);
    let mean = (sum / n as f64) as f32;
    let var_sum = sum_f64(plane, |v| {
        let d = v - mean;
        (d * d) as f64
    });
    let var = (var_sum as f32) / n as f32;
    let invstd = (1.0 / (var as f64 + INSTANCE_NORM_EPS).sqrt()) as f32;
    (mean, invstd)
}

/// The sum of `term(v)` over `values` in f64, in LANES interleaved partial sums (which the
/// compiler can keep in vector registers; one running sum is a chain of dependent additions,
/// 4 cycles each). The f64 sum of f32 terms is far more precise than its f32 rounding, so the
/// order of the additions practically never shows in the result.
fn sum_f64(values: &[f32], term: impl Fn(f32) -> f64 + Copy) -> f64 {
    const LANES: usize = 16;
    crate::simd::wide(|| {
        let mut lanes = [0f64; LANES];
        let chunks = values.chunks_exact(LANES);
        let tail: f64 = chunks.remainder().iter().map(|&v| term(v)).sum();
        for chunk in chunks {
            for (acc, &v) in lanes.iter_mut().zip(chunk) {
                *acc += term(v);
            }
        }
        lanes.iter().sum::<f64>() + tail
    })
}

/// The CPU instance-normalisation operator (forward).
#[derive(Debug, Clone, Copy)]
struct InstanceNorm;

/// Its input gradient: `(x, dy) → dx`.
#[derive(Debug, Clone, Copy)]
struct InstanceNormGrad;

impl CustomOp1 for InstanceNorm {
    fn name(&self) -> &'static str {
        "instance-norm"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        normalize_planes(storage, layout, false)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &InstanceNormGrad,
        )?))
    }
}

impl candle_core::CustomOp2 for InstanceNormGrad {
    fn name(&self) -> &'static str {
        "instance-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() {
            candle_core::bail!(
                "instance-norm gradient: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let xs = f32_data(s1, l1, "instance-norm gradient")?;
        let dys = f32_data(s2, l2, "instance-norm gradient")?;
        let hw = h * w;
        let mut dst = dys.to_vec();
        dst.par_chunks_mut(hw)
            .zip(xs.par_chunks(hw))
            .for_each(|(dx, x)| instance_norm_plane_grad(x, dx));
        Ok((CpuStorage::F32(dst), Shape::from((n, c, h, w))))
    }
}

/// The input gradient of instance norm + ReLU from `(x, y, dy)` in one pass per plane: the ReLU
/// mask is applied while the incoming gradient is copied, with no intermediate tensors.
#[derive(Debug, Clone, Copy)]
struct InstanceNormReluGrad;

impl candle_core::CustomOp3 for InstanceNormReluGrad {
    fn name(&self) -> &'static str {
        "instance-norm-relu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!(
                "instance-norm + ReLU gradient: shapes {:?}, {:?} and {:?} differ",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let xs = f32_data(s1, l1, "instance-norm + ReLU gradient")?;
        let ys = f32_data(s2, l2, "instance-norm + ReLU gradient")?;
        let dys = f32_data(s3, l3, "instance-norm + ReLU gradient")?;
        let hw = h * w;
        let mut dst = vec![0f32; n * c * hw];
        dst.par_chunks_mut(hw)
            .zip(
                xs.par_chunks(hw)
                    .zip(ys.par_chunks(hw).zip(dys.par_chunks(hw))),
            )
            .for_each(|(dx, (x, (y, dy)))| {
                for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
                    *d = if yi > 0.0 { gi } else { 0.0 };
                }
                instance_norm_plane_grad(x, dx);
            });
        Ok((CpuStorage::F32(dst), Shape::from((n, c, h, w))))
    }
}

/// The instance-norm input gradient of one plane: `g` holds the output gradient on entry and
/// the input gradient on return (`x` is the plane's input).
fn instance_norm_plane_grad(x: &[f32], g: &mut [f32]) {
    let hw = x.len();
    let (mean, invstd) = plane_stats(x);
    let (mean, invstd) = (mean as f64, invstd as f64);
    let mut sum = 0f64;
    let mut dot = 0f64;
    for (&xi, &gi) in x.iter().zip(g.iter()) {
        sum += gi as f64;
        dot += (xi as f64 - mean) * gi as f64;
    }
    let k = dot * invstd * invstd / hw as f64;
    let grad_mean = sum / hw as f64;
    for (d, &xi) in g.iter_mut().zip(x) {
        *d = ((*d as f64 - grad_mean - (xi as f64 - mean) * k) * invstd) as f32;
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
            if tracked && cpu_f32 && crate::runtime::activation_recompute() {
                let op = RecomputedConvNormRelu {
                    stride: conv.stride,
                    padding: conv.padding,
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

    /// The block on a channels-last batch (see [`crate::nhwc`]).
    pub(crate) fn forward_nhwc(&self, xs: &Nhwc) -> candle_core::Result<Nhwc> {
        let mut ys = self.conv.forward_nhwc(xs)?;
        ys.instance_norm_relu();
        Ok(ys)
    }
}

/// Conv (with bias) → instance norm → ReLU as one autograd node that keeps only its input, the
/// weight and the bias: the backward computes the convolution again (the same bits) instead of
/// keeping its output alive (see [`crate::runtime::set_activation_recompute`]).
#[derive(Debug, Clone, Copy)]
struct RecomputedConvNormRelu {
    stride: usize,
    padding: usize,
}

impl RecomputedConvNormRelu {
    /// The convolution of plain tensors (no graph), computed as the tracked convolution does
    /// (by Winograd's algorithm under the same conditions), so that outputs and gradients are
    /// the same bits either way.
    fn conv(&self, xs: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        crate::conv::conv2d(xs, weight, Some(bias), self.stride, self.padding)
    }
}

impl candle_core::CustomOp3 for RecomputedConvNormRelu {
    fn name(&self) -> &'static str {
        "conv-instance-norm-relu-recomputed"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = "conv + instance norm + ReLU";
        let ys = self.conv(
            &plain_tensor(s1, l1, op)?,
            &plain_tensor(s2, l2, op)?,
            &plain_tensor(s3, l3, op)?,
        )?;
        // A fresh, untracked output: normalised where it lies.
        ys.inplace_op1(&InstanceNormRelu)?;
        let shape = ys.shape().clone();
        Ok((CpuStorage::F32(ys.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xs, weight, bias) = (xs.detach(), weight.detach(), bias.detach());
        let conv_out = self.conv(&xs, &weight, &bias)?;
        let grad_conv = conv_out.apply_op3_no_bwd(
            &res.contiguous()?,
            &grad_res.contiguous()?,
            &InstanceNormReluGrad,
        )?;
        let (gx, gw, gb) =
            crate::conv::conv2d_backward(&xs, &weight, &grad_conv, self.stride, self.padding)?;
        Ok((Some(gx), Some(gw), Some(gb)))
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
        vb: VarBuilder,
        in_ch: usize,
        mid_ch: usize,
        out_ch: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            first: ConvNormRelu::new(Conv2d::k3(vb.pp("0"), in_ch, mid_ch)?),
            second: ConvNormRelu::new(Conv2d::k3(vb.pp("3"), mid_ch, out_ch)?),
        })
    }
}

impl DoubleConv {
    /// Its two convolutions.
    pub(crate) fn convs(&self) -> [&Conv2d; 2] {
        [self.first.conv(), self.second.conv()]
    }

    /// The two blocks on a channels-last batch (see [`crate::nhwc`]).
    pub(crate) fn forward_nhwc(&self, xs: &Nhwc) -> candle_core::Result<Nhwc> {
        self.second.forward_nhwc(&self.first.forward_nhwc(xs)?)
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
    pub fn new(vb: VarBuilder, in_ch: usize, out_ch: usize) -> candle_core::Result<Self> {
        Ok(Self {
            block: ConvNormRelu::new(Conv2d::k3(vb.pp("1"), in_ch, out_ch)?),
        })
    }
}

impl UpConv {
    /// Its convolution.
    pub(crate) fn conv(&self) -> &Conv2d {
        self.block.conv()
    }

    /// Upsampling and block on a channels-last batch (see [`crate::nhwc`]).
    pub(crate) fn forward_nhwc(&self, xs: &Nhwc) -> candle_core::Result<Nhwc> {
        self.block.forward_nhwc(&xs.upsample_bilinear2x())
    }
}

impl Module for UpConv {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        upsample_bilinear2x(xs)?.apply(&self.block)
    }
}

/// 2×2 max-pooling with stride 2 (`MaxPool2d(2)`), written as reshape + max so that its gradient
/// is exact (candle 0.11's `max_pool2d` backward divides the gradient by 4). Odd trailing rows or
/// columns are dropped, as PyTorch does.
pub fn max_pool2x2(xs: &Tensor) -> candle_core::Result<Tensor> {
    max_pool(xs, 2)
}

/// `k`×`k` max-pooling with stride `k` (exact gradient, see [`max_pool2x2`]).
pub fn max_pool(xs: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    let (oh, ow) = (h / k, w / k);
    let xs = if oh * k != h || ow * k != w {
        xs.narrow(2, 0, oh * k)?.narrow(3, 0, ow * k)?
    } else {
        xs.clone()
    };
    xs.reshape((n, c, oh, k, ow, k))?.max(5)?.max(3)
}

/// Nearest-neighbour upsampling by an integer factor `k` (each pixel repeated k×k times), as a
/// broadcast so its gradient accumulates correctly.
pub fn upsample_nearest(xs: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    xs.reshape((n, c, h, 1, w, 1))?
        .broadcast_as((n, c, h, k, w, k))?
        .reshape((n, c, h * k, w * k))
}

/// Average pooling with a `k`×`k` window, stride 1 and zero padding `k/2`, dividing by k² also
/// at the borders (PyTorch's `avg_pool2d(x, k, 1, k/2)` with `count_include_pad=True`).
pub fn avg_pool_same(xs: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let pad = k / 2;
    let padded = xs
        .pad_with_zeros(2, pad, pad)?
        .pad_with_zeros(3, pad, pad)?;
    padded.avg_pool2d_with_stride((k, k), (1, 1))
}

/// Interpolation taps of one axis for align_corners = true: for every output index the two
/// source indices and their weights.
#[derive(Debug, Clone)]
pub(crate) struct Taps {
    /// The first source index of each output index.
    pub(crate) i0: Vec<usize>,
    /// The second source index (the first again at the last input).
    pub(crate) i1: Vec<usize>,
    /// The weight of the first source.
    pub(crate) l0: Vec<f32>,
    /// The weight of the second source.
    pub(crate) l1: Vec<f32>,
}

impl Taps {
    /// The taps that resize an axis of `input` values to `output` values.
    pub(crate) fn new(input: usize, output: usize) -> Self {
        // The scale is computed in f32, as PyTorch's CPU kernel does for float tensors.
        let scale = if output > 1 {
            (input as f32 - 1.0) / (output as f32 - 1.0)
        } else {
            0.0
        };
        let mut taps = Taps {
            i0: Vec::with_capacity(output),
            i1: Vec::with_capacity(output),
            l0: Vec::with_capacity(output),
            l1: Vec::with_capacity(output),
        };
        for o in 0..output {
            let src = scale * o as f32;
            let i0 = (src.floor() as usize).min(input - 1);
            let lambda = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            taps.i0.push(i0);
            taps.i1.push(i1);
            taps.l0.push(1.0 - lambda);
            taps.l1.push(lambda);
        }
        taps
    }
}

/// Forward bilinear upsampling (align_corners = true) of contiguous NCHW planes.
#[derive(Debug, Clone, Copy)]
struct UpsampleBilinear {
    out_h: usize,
    out_w: usize,
}

/// The adjoint of [`UpsampleBilinear`]: scatters an output gradient back onto the input grid.
#[derive(Debug, Clone, Copy)]
struct UpsampleBilinearAdjoint {
    in_h: usize,
    in_w: usize,
}

impl CustomOp1 for UpsampleBilinear {
    fn name(&self) -> &'static str {
        "upsample-bilinear-ac"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let src = f32_data(storage, layout, "bilinear upsampling")?;
        let (oh, ow) = (self.out_h, self.out_w);
        let th = Taps::new(h, oh);
        let tw = Taps::new(w, ow);
        let mut dst = vec![0f32; n * c * oh * ow];
        dst.par_chunks_mut(oh * ow)
            .zip(src.par_chunks(h * w))
            .for_each(|(out, inp)| {
                for y in 0..oh {
                    let r0 = &inp[th.i0[y] * w..th.i0[y] * w + w];
                    let r1 = &inp[th.i1[y] * w..th.i1[y] * w + w];
                    let (a0, a1) = (th.l0[y], th.l1[y]);
                    let row = &mut out[y * ow..(y + 1) * ow];
                    for (x, o) in row.iter_mut().enumerate() {
                        let (j0, j1) = (tw.i0[x], tw.i1[x]);
                        let (b0, b1) = (tw.l0[x], tw.l1[x]);
                        *o = a0 * (b0 * r0[j0] + b1 * r0[j1]) + a1 * (b0 * r1[j0] + b1 * r1[j1]);
                    }
                }
            });
        Ok((CpuStorage::F32(dst), Shape::from((n, c, oh, ow))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let grad = grad_res
            .contiguous()?
            .apply_op1(UpsampleBilinearAdjoint { in_h: h, in_w: w })?;
        Ok(Some(grad))
    }
}

impl CustomOp1 for UpsampleBilinearAdjoint {
    fn name(&self) -> &'static str {
        "upsample-bilinear-ac-adjoint"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, oh, ow) = layout.shape().dims4()?;
        let src = f32_data(storage, layout, "bilinear upsampling")?;
        let (h, w) = (self.in_h, self.in_w);
        let th = Taps::new(h, oh);
        let tw = Taps::new(w, ow);
        let mut dst = vec![0f32; n * c * h * w];
        dst.par_chunks_mut(h * w)
            .zip(src.par_chunks(oh * ow))
            .for_each(|(gin, gout)| {
                for y in 0..oh {
                    let (a0, a1) = (th.l0[y], th.l1[y]);
                    let (r0, r1) = (th.i0[y] * w, th.i1[y] * w);
                    for x in 0..ow {
                        let g = gout[y * ow + x];
                        let (j0, j1) = (tw.i0[x], tw.i1[x]);
                        let (b0, b1) = (tw.l0[x], tw.l1[x]);
                        gin[r0 + j0] += a0 * b0 * g;
                        gin[r0 + j1] += a0 * b1 * g;
                        gin[r1 + j0] += a1 * b0 * g;
                        gin[r1 + j1] += a1 * b1 * g;
                    }
                }
            });
        Ok((CpuStorage::F32(dst), Shape::from((n, c, h, w))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, oh, ow) = _arg.dims4()?;
        let grad = grad_res.contiguous()?.apply_op1(UpsampleBilinear {
            out_h: oh,
            out_w: ow,
        })?;
        Ok(Some(grad))
    }
}

/// Interpolation matrix `[output, input]` of one axis (align_corners = true).
fn interpolation_matrix(
    input: usize,
    output: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let taps = Taps::new(input, output);
    let mut m = vec![0f32; output * input];
    for o in 0..output {
        m[o * input + taps.i0[o]] += taps.l0[o];
        m[o * input + taps.i1[o]] += taps.l1[o];
    }
    Tensor::from_vec(m, (output, input), device)?.to_dtype(dtype)
}

/// Bilinear resize with align_corners = true as two matrix products `A_h · x · A_wᵀ`. Every
/// backend supports it, with gradients; it is the reference the CPU operator is tested against
/// and the path taken on devices other than the CPU.
pub fn upsample_bilinear_matmul(
    xs: &Tensor,
    out_h: usize,
    out_w: usize,
) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    let a_w = interpolation_matrix(w, out_w, xs.dtype(), xs.device())?;
    let a_h = interpolation_matrix(h, out_h, xs.dtype(), xs.device())?;
    let rows = xs.reshape((n * c * h, w))?.matmul(&a_w.t()?)?;
    let planes = rows.reshape((n * c, h, out_w))?;
    a_h.broadcast_left(n * c)?
        .matmul(&planes)?
        .reshape((n, c, out_h, out_w))
}

/// Bilinear ×2 upsampling with align_corners = true (`nn.Upsample(scale_factor=2,
/// mode="bilinear", align_corners=True)`), differentiable on every device.
pub fn upsample_bilinear2x(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    upsample_bilinear(xs, 2 * h, 2 * w)
}

/// Bilinear resize to `out_h`×`out_w` with align_corners = true, differentiable on every device.
pub fn upsample_bilinear(xs: &Tensor, out_h: usize, out_w: usize) -> candle_core::Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        xs.contiguous()?
            .apply_op1(UpsampleBilinear { out_h, out_w })
    } else {
        upsample_bilinear_matmul(xs, out_h, out_w)
    }
}

/// Softmax over the channel dimension (dim 1) of an NCHW tensor.
pub fn softmax_channels(xs: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(xs, 1)
}
