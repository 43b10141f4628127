//! Instance normalisation on the CPU, as PyTorch's kernel computes it, with its gradients: the
//! plain operator, the fused normalisation + ReLU (in place at inference), and the
//! conv → norm → ReLU node that recomputes its convolution in the backward.

use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp1, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::conv::{f32_data, plain_tensor};

/// `InstanceNorm2d` epsilon (PyTorch default).
pub const INSTANCE_NORM_EPS: f64 = 1e-5;

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
pub(crate) struct InstanceNormRelu;

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
            crate::kernels::simd::wide(|| {
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
            crate::kernels::simd::wide(|| {
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
    crate::kernels::simd::wide(|| {
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

/// Conv (with bias) → instance norm → ReLU as one autograd node that keeps only its input, the
/// weight and the bias: the backward computes the convolution again (the same bits) instead of
/// keeping its output alive (see [`crate::exec::Execution::recompute`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecomputedConvNormRelu {
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    /// Whether the forward's policy computes 3×3 convolutions by Winograd's algorithm (the
    /// backward, which runs outside that call, computes them the same way).
    pub(crate) winograd: bool,
}

impl RecomputedConvNormRelu {
    /// The convolution of plain tensors (no graph), computed as the tracked convolution does
    /// (by Winograd's algorithm under the same conditions), so that outputs and gradients are
    /// the same bits either way.
    fn conv(&self, xs: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        crate::kernels::conv::conv2d_with(
            xs,
            weight,
            Some(bias),
            self.stride,
            self.padding,
            self.winograd,
        )
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
        let (gx, gw, gb) = crate::kernels::conv::conv2d_backward(
            &xs,
            &weight,
            &grad_conv,
            self.stride,
            self.padding,
            self.winograd,
        )?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}
