//! Resampling: bilinear with align_corners = true (the CPU operator with its adjoint, as candle
//! 0.11's `upsample_bilinear2d` has no backward, and the matrix form every device supports), and
//! pooling and nearest upsampling written so that their gradients are exact.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::f32_data;

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
