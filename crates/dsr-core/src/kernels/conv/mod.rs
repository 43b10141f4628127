//! Fast CPU convolutions as "im2col + one matrix product", with exact gradients.
//!
//! candle 0.11's CPU `conv2d` is a tiled im2col with small matrix products, and its
//! `conv_transpose2d` is a plain loop nest; both are several times slower than a single large
//! product per image. Here a convolution is written as two pieces:
//!
//! * a data-movement operator, `Im2Col` (NCHW planes → a `[c·kh·kw, oh·ow]` matrix of patches
//!   per image, built from contiguous row copies) or its adjoint `Col2Im` (scatter-add of such a
//!   matrix back onto the planes); each is the other's backward pass;
//! * one ordinary candle matrix product per image, whose gradient candle already knows.
//!
//! A convolution is then `W[co, ci·k²] · im2col(x)`, and a transposed convolution is
//! `col2im(Wᵀ[co·k², ci] · x)`. The weight gradient comes out of the matrix product as
//! `grad · colsᵀ`, the input gradient as `col2im(Wᵀ · grad)` (or `Wᵀ`'s counterpart for the
//! transposed convolution), so every gradient is a large matrix product too.
//!
//! The forward product of a convolution is computed the other way round, from a channels-last
//! patch matrix (`channels_last`) on the layers where gemm is faster so
//! ([`prefers_channels_last`]); it gives the same bits as `W · im2col(x)`. 3×3 convolutions
//! with stride 1, padding 1, at least 32 input channels and at least 16×16 pixels whose sides are multiples of 4 use
//! Winograd's F(4×4, 3×3) instead (`winograd`: 4× fewer multiplications, a larger rounding
//! error that stays within the reference tolerances), for the forward and, in training, for
//! the input and weight gradients of channels-last layers.
//!
//! At inference the U-Nets and the subspace restriction networks keep their activations
//! channels last between layers (the crate's `nhwc` module); `conv2d_nhwc` runs the same
//! kernels on such images without the moves to and from NCHW planes: the same bits.
//!
//! Only f32 tensors on the CPU take this path; every other device or dtype uses candle's own
//! operator, so results are the same everywhere up to rounding.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp2, Layout, Shape, Tensor,
};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

mod channels_last;
mod winograd;

use channels_last::ImageLayout;

pub(crate) use channels_last::{image_to_pixels, transpose_into};

use crate::kernels::bf16::PackedB;
use crate::kernels::nhwc::Nhwc;

/// The largest patch matrix (in bytes) built at once; larger batches are processed in groups of
/// whole images so that the patch matrices of one group stay below this size.
const COLS_BYTES_LIMIT: usize = 256 << 20;

/// The geometry shared by [`Im2Col`] and [`Col2Im`]: a convolution that maps `channels` planes of
/// `h`×`w` pixels onto an `oh`×`ow` grid with a `kh`×`kw` kernel, `stride` and zero `pad`, and
/// the order of the patch matrix's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    /// Rows ordered by kernel tap, then channel (`tap·channels + c`, the order in which PyTorch's
    /// CPU convolution and candle's accumulate a dot product) when true; by channel, then tap
    /// (`c·kh·kw + tap`, the order of the weight's memory layout) when false.
    tap_major: bool,
    channels: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    /// The geometry of a convolution of `h`×`w` planes; fails when the kernel does not fit.
    fn new(
        tap_major: bool,
        channels: usize,
        (h, w): (usize, usize),
        (kh, kw): (usize, usize),
        stride: usize,
        pad: usize,
    ) -> candle_core::Result<Self> {
        if stride == 0 {
            candle_core::bail!("convolution: the stride must be positive");
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!(
                "convolution: a {kh}×{kw} kernel does not fit a {h}×{w} input padded by {pad}"
            );
        }
        Ok(Self {
            tap_major,
            channels,
            h,
            w,
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad - kh) / stride + 1,
            ow: (w + 2 * pad - kw) / stride + 1,
        })
    }

    /// Rows of the patch matrix of one image.
    fn rows(&self) -> usize {
        self.channels * self.kh * self.kw
    }

    /// The patch-matrix row of channel `c` under kernel tap `tap` (= ky·kw + kx).
    fn row(&self, c: usize, tap: usize) -> usize {
        if self.tap_major {
            tap * self.channels + c
        } else {
            c * self.kh * self.kw + tap
        }
    }

    /// The channel and kernel tap of patch-matrix row `r` (the inverse of [`Geometry::row`]).
    fn channel_and_tap(&self, r: usize) -> (usize, usize) {
        if self.tap_major {
            (r % self.channels, r / self.channels)
        } else {
            (r / (self.kh * self.kw), r % (self.kh * self.kw))
        }
    }

    /// Columns of the patch matrix of one image.
    fn cols(&self) -> usize {
        self.oh * self.ow
    }

    /// The output positions `lo..hi` along one axis whose input index `o·stride + k − pad` falls
    /// inside `0..len`, for kernel offset `k` and an output axis of `out` positions.
    fn valid_range(&self, k: usize, len: usize, out: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.pad);
        let lo = if p > k { (p - k).div_ceil(s) } else { 0 };
        let hi = if len + p > k {
            ((len - 1 + p - k) / s + 1).min(out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// Unfolds NCHW images `[n, c, h, w]` into patch matrices `[n, c·kh·kw, oh·ow]`; row
/// [`Geometry::row`]`(c, ky·kw + kx)` holds the input pixel under kernel tap `(ky, kx)` for every
/// output position, zero where the tap falls on the padding.
#[derive(Debug, Clone, Copy)]
struct Im2Col(Geometry);

/// The adjoint of [`Im2Col`]: folds patch matrices `[n, c·kh·kw, oh·ow]` back onto NCHW images
/// `[n, c, h, w]`, adding up every entry that came from the same pixel.
#[derive(Debug, Clone, Copy)]
struct Col2Im(Geometry);

/// The contiguous f32 data of a CPU tensor; `op` names the operator in the errors.
pub(crate) fn f32_data<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op} is implemented for f32 tensors only"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op} needs a contiguous input"),
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (n, c, h, w) = layout.shape().dims4()?;
        if (c, h, w) != (g.channels, g.h, g.w) {
            candle_core::bail!(
                "im2col: input {:?} does not match the geometry {g:?}",
                layout.shape()
            );
        }
        let src = f32_data(storage, layout, "im2col")?;
        let (rows, cols) = (g.rows(), g.cols());
        let mut dst = vec![0f32; n * rows * cols];
        dst.par_chunks_mut(cols)
            .enumerate()
            .for_each(|(index, row)| {
                let (image, r) = (index / rows, index % rows);
                let (channel, tap) = g.channel_and_tap(r);
                let (ky, kx) = (tap / g.kw, tap % g.kw);
                let plane_start = (image * g.channels + channel) * h * w;
                let plane = &src[plane_start..plane_start + h * w];
                let (y_lo, y_hi) = g.valid_range(ky, h, g.oh);
                let (x_lo, x_hi) = g.valid_range(kx, w, g.ow);
                // Rows and columns outside the valid ranges stay zero (the vector starts zeroed).
                for oy in y_lo..y_hi {
                    let iy = oy * g.stride + ky - g.pad;
                    let input = &plane[iy * w..(iy + 1) * w];
                    let out = &mut row[oy * g.ow + x_lo..oy * g.ow + x_hi];
                    if g.stride == 1 {
                        let ix = x_lo + kx - g.pad;
                        out.copy_from_slice(&input[ix..ix + out.len()]);
                    } else {
                        for (o, ox) in out.iter_mut().zip(x_lo..x_hi) {
                            *o = input[ox * g.stride + kx - g.pad];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dst), Shape::from((n, rows, cols))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (n, rows, cols) = layout.shape().dims3()?;
        if (rows, cols) != (g.rows(), g.cols()) {
            candle_core::bail!(
                "col2im: input {:?} does not match the geometry {g:?}",
                layout.shape()
            );
        }
        let src = f32_data(storage, layout, "col2im")?;
        let (h, w) = (g.h, g.w);
        let kk = g.kh * g.kw;
        let image_len = g.rows() * cols;
        let mut dst = vec![0f32; n * g.channels * h * w];
        dst.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(index, plane)| {
                let (image, channel) = (index / g.channels, index % g.channels);
                let patches = &src[image * image_len..(image + 1) * image_len];
                for tap in 0..kk {
                    let start = g.row(channel, tap) * cols;
                    let row = &patches[start..start + cols];
                    let (ky, kx) = (tap / g.kw, tap % g.kw);
                    let (y_lo, y_hi) = g.valid_range(ky, h, g.oh);
                    let (x_lo, x_hi) = g.valid_range(kx, w, g.ow);
                    for oy in y_lo..y_hi {
                        let iy = oy * g.stride + ky - g.pad;
                        let out = &mut plane[iy * w..(iy + 1) * w];
                        let input = &row[oy * g.ow + x_lo..oy * g.ow + x_hi];
                        if g.stride == 1 {
                            let ix = x_lo + kx - g.pad;
                            for (o, &v) in out[ix..ix + input.len()].iter_mut().zip(input) {
                                *o += v;
                            }
                        } else {
                            for (&v, ox) in input.iter().zip(x_lo..x_hi) {
                                out[ox * g.stride + kx - g.pad] += v;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dst), Shape::from((n, g.channels, h, w))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// A plain (graph-free) CPU tensor over a copy of an operator's contiguous f32 operand.
pub(crate) fn plain_tensor(
    storage: &CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<Tensor> {
    Tensor::from_slice(f32_data(storage, layout, op)?, layout.shape(), &Device::Cpu)
}

/// Runs `f` on the contiguous f32 values of a CPU tensor (made contiguous first if needed).
pub(crate) fn with_f32_data<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(f32_data(cpu, layout, "conv")?),
        _ => candle_core::bail!("conv: the fast path needs a CPU tensor"),
    }
}

/// [`with_f32_data`] of a tensor that may be absent.
fn with_optional_f32_data<R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match t {
        Some(t) => with_f32_data(t, |v| f(Some(v))),
        None => f(None),
    }
}

/// Whether `t` is an f32 CPU tensor outside any autograd graph: what the channels-last
/// inference path takes (inputs, weights and biases).
pub(crate) fn is_plain_f32_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op()
}

/// Whether `bias` can be added inside the CPU kernels: an f32 vector on the CPU.
fn f32_cpu_vector(bias: &Tensor) -> bool {
    bias.dtype() == DType::F32 && bias.device().is_cpu() && bias.rank() == 1
}

/// The weight `[co, ci, kh, kw]` as the tap-major matrix `[co, kh·kw·ci]` of [`Geometry`]'s
/// tap-major rows (a small copy, differentiable).
fn tap_major_matrix(weight: &Tensor) -> candle_core::Result<Tensor> {
    let (co, ci, kh, kw) = weight.dims4()?;
    weight
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((co, kh * kw * ci))
}

/// Whether the fast path applies: f32 input and weight on the CPU.
fn fast_path(xs: &Tensor, weight: &Tensor) -> bool {
    xs.device().is_cpu()
        && weight.device().is_cpu()
        && xs.dtype() == DType::F32
        && weight.dtype() == DType::F32
}

/// Adds a per-channel bias `[c]` to an NCHW tensor.
fn add_bias(ys: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => ys.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(ys),
    }
}

/// Applies `f` to groups of whole images of `xs` so that each group's patch matrices take at
/// most `limit` bytes (`per_image` bytes per image), and concatenates the results.
fn in_groups(
    xs: &Tensor,
    per_image: usize,
    limit: usize,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let n = xs.dim(0)?;
    let group = (limit / per_image.max(1)).max(1);
    if n <= group {
        return f(xs);
    }
    let parts = (0..n)
        .step_by(group)
        .map(|start| f(&xs.narrow(0, start, group.min(n - start))?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// A 2-D convolution (cross-correlation, as in PyTorch) of `xs` `[n, ci, h, w]` with `weight`
/// `[co, ci, kh, kw]`, equal `stride` and zero `padding` on both axes, no dilation or groups, and
/// an optional `bias` `[co]`. Returns `[n, co, oh, ow]`.
///
/// f32 tensors on the CPU use im2col + one matrix product per image (gradients included), and
/// Winograd's algorithm for 3×3 convolutions that suit it when the execution policy in force
/// says so ([`crate::exec`]); anything else uses candle's `conv2d`.
pub fn conv2d(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    conv2d_limited(xs, weight, bias, stride, padding, Plan::current())
}

/// [`conv2d`] with the algorithm of the 3×3 convolutions given (`winograd`) instead of taken
/// from the policy in force: for backward passes, which run outside the call that built them.
pub(crate) fn conv2d_with(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    winograd: bool,
) -> candle_core::Result<Tensor> {
    let plan = Plan {
        winograd,
        bf16: false,
        ..Plan::current()
    };
    conv2d_limited(xs, weight, bias, stride, padding, plan)
}

/// Copies of a convolution layer's weight in the layouts the kernels take, made at the first
/// convolution that needs them and kept for the next ones. Only for weights that no longer
/// change: a layer passes its cache to the kernels when its model was built for inference from
/// loaded weights (see [`crate::exec`]). Clones share the copies.
#[derive(Debug, Clone, Default)]
pub struct WeightCache {
    winograd: Arc<OnceLock<Vec<f32>>>,
    /// The Winograd filters rounded to bf16 and packed (bf16 precision: the f32 ones are then
    /// never kept).
    winograd_bf16: Arc<OnceLock<Vec<PackedB>>>,
    /// The tap-major weight matrix rounded to bf16 and packed, for the channels-last product.
    patches_bf16: Arc<OnceLock<PackedB>>,
}

impl WeightCache {
    /// Runs `f` on the Winograd filters of `weight` (`[co, ci, 3, 3]`): from the cache when it
    /// is filled, computed and kept otherwise.
    fn with_winograd_filters<R>(
        &self,
        weight: &Tensor,
        f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let (co, ci, _, _) = weight.dims4()?;
        let compute = || with_f32_data(weight, |w| Ok(winograd::transformed_filters(w, ci, co)));
        if let Some(u) = self.winograd.get() {
            return f(u);
        }
        // Two threads may both compute it; the first stored copy is kept (the same values).
        let _ = self.winograd.set(compute()?);
        f(self.winograd.get().expect("set just above"))
    }

    /// [`WeightCache::with_winograd_filters`] for bf16 products: the filters rounded to bf16
    /// and packed ([`winograd::pack_filters_bf16`]).
    fn with_winograd_bf16<R>(
        &self,
        weight: &Tensor,
        f: impl FnOnce(&[PackedB]) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let (co, ci, _, _) = weight.dims4()?;
        if let Some(u) = self.winograd_bf16.get() {
            return f(u);
        }
        let packed = with_f32_data(weight, |w| {
            let u = winograd::transformed_filters(w, ci, co);
            Ok(winograd::pack_filters_bf16(&u, ci, co))
        })?;
        let _ = self.winograd_bf16.set(packed);
        f(self.winograd_bf16.get().expect("set just above"))
    }

    /// The tap-major weight matrix of `weight` rounded to bf16 and packed for the channels-last
    /// bf16 product ([`channels_last::pack_weight_bf16`]): from the cache when it is filled.
    fn with_patches_bf16<R>(
        &self,
        weight: &Tensor,
        f: impl FnOnce(&PackedB) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        if let Some(w) = self.patches_bf16.get() {
            return f(w);
        }
        let co = weight.dim(0)?;
        let packed = with_f32_data(&tap_major_matrix(weight)?, |w| {
            Ok(channels_last::pack_weight_bf16(w, co))
        })?;
        let _ = self.patches_bf16.set(packed);
        f(self.patches_bf16.get().expect("set just above"))
    }
}

/// [`conv2d`] of a layer whose weight copies are kept in `cache` (see [`WeightCache`]).
pub fn conv2d_cached(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    cache: &WeightCache,
) -> candle_core::Result<Tensor> {
    let plan = Plan {
        cache: Some(cache),
        ..Plan::current()
    };
    conv2d_limited(xs, weight, bias, stride, padding, plan)
}

/// [`conv2d`] of an untracked channels-last batch (the weight and bias untracked f32 CPU
/// tensors too): the same kernels as the NCHW inference path, so the same bits, without the
/// moves between layouts. Winograd's algorithm where [`winograd::pays_off`] and `winograd` is
/// set (with the filters kept in `cache`, when given), the banded channels-last product where
/// [`prefers_channels_last`], the NCHW patch-matrix product otherwise; the first two with bf16
/// products when `bf16` is set (the caller checks that the CPU has AVX512-BF16).
pub(crate) fn conv2d_nhwc(
    xs: &Nhwc,
    weight: &Tensor,
    bias: Option<&Tensor>,
    (stride, padding): (usize, usize),
    (winograd, bf16): (bool, bool),
    cache: Option<&WeightCache>,
) -> candle_core::Result<Nhwc> {
    let (co, ci, kh, kw) = weight.dims4()?;
    if ci != xs.c {
        candle_core::bail!(
            "conv2d: input has {} channels, the weight expects {ci}",
            xs.c
        );
    }
    if !is_plain_f32_cpu(weight) || !bias.is_none_or(is_plain_f32_cpu) {
        candle_core::bail!("conv2d: channels-last images need untracked f32 CPU weights");
    }
    let g = Geometry::new(true, ci, (xs.h, xs.w), (kh, kw), stride, padding)?;
    let fresh = WeightCache::default();
    let cache_or_fresh = cache.unwrap_or(&fresh);
    let data = if bf16 && winograd && winograd::pays_off(&g) {
        cache_or_fresh.with_winograd_bf16(weight, |u| {
            with_optional_f32_data(bias, |b| {
                winograd::conv2d_forward_bf16(&g, &xs.data, u, co, b, ImageLayout::Pixels)
            })
        })?
    } else if winograd && winograd::pays_off(&g) {
        cache_or_fresh.with_winograd_filters(weight, |u| {
            with_optional_f32_data(bias, |b| {
                winograd::conv2d_forward(&g, &xs.data, u, co, b, ImageLayout::Pixels)
            })
        })?
    } else if bf16 && prefers_channels_last(g.oh * g.ow, co) {
        cache_or_fresh.with_patches_bf16(weight, |w| {
            with_optional_f32_data(bias, |b| {
                channels_last::conv2d_forward_bf16(&g, &xs.data, w, co, b, ImageLayout::Pixels)
            })
        })?
    } else if prefers_channels_last(g.oh * g.ow, co) {
        with_f32_data(&tap_major_matrix(weight)?, |w| {
            with_optional_f32_data(bias, |b| {
                channels_last::conv2d_forward(&g, &xs.data, w, co, b, ImageLayout::Pixels)
            })
        })?
    } else {
        // Few pixels for many channels: the NCHW patch-matrix product is the faster one there,
        // and the moves to and from it are small.
        let plan = Plan {
            limit: COLS_BYTES_LIMIT,
            winograd,
            bf16,
            cache,
        };
        let ys = conv2d_limited(&xs.to_tensor()?, weight, bias, stride, padding, plan)?;
        return Nhwc::from_tensor(&ys);
    };
    Ok(Nhwc {
        data,
        n: xs.n,
        h: g.oh,
        w: g.ow,
        c: co,
    })
}

/// How [`conv2d_limited`] may compute a convolution.
#[derive(Debug, Clone, Copy)]
struct Plan<'a> {
    /// The largest size (in bytes) of the patch matrices built at once.
    limit: usize,
    /// Untracked 3×3 convolutions that suit it run by Winograd's algorithm.
    winograd: bool,
    /// Untracked convolutions compute their Winograd and channels-last products in bf16 (set
    /// only where the CPU has AVX512-BF16).
    bf16: bool,
    /// Where the layer keeps its weight's transformed copies, if it does.
    cache: Option<&'a WeightCache>,
}

impl Plan<'_> {
    /// The defaults and the execution policy in force ([`crate::exec`]).
    fn current() -> Self {
        Self {
            limit: COLS_BYTES_LIMIT,
            winograd: crate::exec::current().winograd(),
            bf16: crate::exec::current().bf16(),
            cache: None,
        }
    }
}

/// [`conv2d`] as `plan` says.
fn conv2d_limited(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    plan: Plan,
) -> candle_core::Result<Tensor> {
    let Plan {
        limit,
        winograd,
        bf16,
        cache,
    } = plan;
    if !fast_path(xs, weight) {
        let ys = xs.conv2d(weight, padding, stride, 1, 1)?;
        return add_bias(ys, bias);
    }
    let (_, ci, h, w) = xs.dims4()?;
    let (co, wci, kh, kw) = weight.dims4()?;
    if wci != ci {
        candle_core::bail!("conv2d: input has {ci} channels, the weight expects {wci}");
    }
    // Tap-major rows make each output a dot product summed in the same order as PyTorch's CPU
    // convolution; the weight is reordered to match.
    let g = Geometry::new(true, ci, (h, w), (kh, kw), stride, padding)?;
    let untracked = !xs.track_op() && !weight.track_op();
    let fresh = WeightCache::default();
    if untracked && bf16 && winograd && winograd::pays_off(&g) {
        let shape = (xs.dim(0)?, co, g.oh, g.ow);
        return cache.unwrap_or(&fresh).with_winograd_bf16(weight, |u| {
            untracked_product(xs, bias, shape, |x, b| {
                winograd::conv2d_forward_bf16(&g, x, u, co, b, ImageLayout::Planes)
            })
        });
    }
    if untracked && winograd && winograd::pays_off(&g) {
        let shape = (xs.dim(0)?, co, g.oh, g.ow);
        return cache.unwrap_or(&fresh).with_winograd_filters(weight, |u| {
            untracked_channels_last(xs, u, bias, shape, |x, u, b| {
                winograd::conv2d_forward(&g, x, u, co, b, ImageLayout::Planes)
            })
        });
    }
    let wmat = tap_major_matrix(weight)?;
    let xs = xs.contiguous()?;
    let pointwise = kh == 1 && kw == 1 && stride == 1 && padding == 0;
    let per_image = if pointwise {
        0
    } else {
        g.rows() * g.cols() * 4
    };
    if pointwise {
        // The "patch matrix" is a view of the input: nothing extra stays alive for the backward.
        let ys = in_groups(&xs, per_image, limit, |chunk| {
            let m = chunk.dim(0)?;
            wmat.broadcast_left(m)?
                .matmul(&chunk.reshape((m, ci, h * w))?)?
                .reshape((m, co, g.oh, g.ow))
        })?;
        return add_bias_fresh(ys, bias);
    }
    // One autograd node whose backward rebuilds the patch matrices group by group: training then
    // keeps only the input and the weight of each convolution alive (as PyTorch does), not its
    // patch matrix (9× the input for a 3×3 kernel).
    if xs.track_op() || wmat.track_op() {
        let op = ConvOp::new(Kind::Conv, g, limit, winograd);
        return tracked(&xs, &wmat, bias, op);
    }
    // Nothing to differentiate (inference): straight from the tensors' storage, bias included.
    let shape = (xs.dim(0)?, co, g.oh, g.ow);
    if !prefers_channels_last(g.oh * g.ow, co) {
        return add_bias_fresh(nchw_product(Kind::Conv, g, limit, &xs, &wmat)?, bias);
    }
    if bf16 {
        return cache.unwrap_or(&fresh).with_patches_bf16(weight, |w| {
            untracked_product(&xs, bias, shape, |x, b| {
                channels_last::conv2d_forward_bf16(&g, x, w, co, b, ImageLayout::Planes)
            })
        });
    }
    with_f32_data(&wmat, |wmat| {
        untracked_channels_last(&xs, wmat, bias, shape, |x, w, b| {
            channels_last::conv2d_forward(&g, x, w, co, b, ImageLayout::Planes)
        })
    })
}

/// [`untracked_channels_last`] of a kernel that holds its own weights: `kernel(x, bias)`.
fn untracked_product(
    xs: &Tensor,
    bias: Option<&Tensor>,
    shape: (usize, usize, usize, usize),
    kernel: impl Fn(&[f32], Option<&[f32]>) -> candle_core::Result<Vec<f32>>,
) -> candle_core::Result<Tensor> {
    untracked_channels_last(xs, &[], bias, shape, |x, _, b| kernel(x, b))
}

/// Runs the channels-last `kernel(x, weights, bias)` on the plain tensor `xs` and the weight
/// values `weights` (in the layout the kernel takes) and returns its output as a tensor of
/// `shape`; the bias goes into the kernel when it is an f32 CPU vector,
/// otherwise it is added afterwards.
fn untracked_channels_last(
    xs: &Tensor,
    weights: &[f32],
    bias: Option<&Tensor>,
    shape: (usize, usize, usize, usize),
    kernel: impl Fn(&[f32], &[f32], Option<&[f32]>) -> candle_core::Result<Vec<f32>>,
) -> candle_core::Result<Tensor> {
    let f32_bias = bias.filter(|b| f32_cpu_vector(b));
    let ys = with_f32_data(xs, |x| {
        with_optional_f32_data(f32_bias, |b| kernel(x, weights, b))
    })?;
    let ys = Tensor::from_vec(ys, shape, &Device::Cpu)?;
    match f32_bias {
        Some(_) => Ok(ys),
        None => add_bias(ys, bias),
    }
}

/// The gradients of `conv2d(xs, weight, Some(bias), stride, padding)` for the output gradient
/// `grad`, outside any graph: `(∂xs, ∂weight, ∂bias)`. The same operators and arithmetic as the
/// backward of a tracked [`conv2d`], so the values are the same bits; used by operators that
/// recompute a convolution in their own backward instead of keeping its output; `winograd` as
/// the forward chose it.
pub(crate) fn conv2d_backward(
    xs: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    stride: usize,
    padding: usize,
    winograd: bool,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    if !fast_path(xs, weight) {
        candle_core::bail!("conv2d_backward: implemented for f32 CPU tensors only");
    }
    let (_, ci, h, w) = xs.dims4()?;
    let (co, _, kh, kw) = weight.dims4()?;
    let g = Geometry::new(true, ci, (h, w), (kh, kw), stride, padding)?;
    let wmat = tap_major_matrix(&weight.detach())?;
    let op = ConvOp::new(Kind::Conv, g, COLS_BYTES_LIMIT, winograd);
    let (gx, gw) = op.bwd(xs, &wmat, grad, grad)?;
    let (Some(gx), Some(gw)) = (gx, gw) else {
        candle_core::bail!("conv2d_backward: the convolution gave no gradient");
    };
    let gw = gw
        .reshape((co, kh, kw, ci))?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    Ok((gx, gw, channel_sums(&grad.detach())?))
}

/// [`add_bias`] for a freshly computed, untracked product that nothing else holds: the bias is
/// added where the values lie (no second full-size buffer) when it is an f32 CPU vector.
fn add_bias_fresh(ys: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b)
            if !ys.track_op()
                && !b.track_op()
                && ys.device().is_cpu()
                && ys.dtype() == DType::F32
                && f32_cpu_vector(b)
                && ys.is_contiguous() =>
        {
            ys.inplace_op2(&b.contiguous()?, &AddBiasInPlace)?;
            Ok(ys)
        }
        _ => add_bias(ys, bias),
    }
}

/// Adds a per-channel bias `[c]` to a contiguous NCHW f32 tensor in place.
#[derive(Debug, Clone, Copy)]
struct AddBiasInPlace;

impl InplaceOp2 for AddBiasInPlace {
    fn name(&self) -> &'static str {
        "add-bias-inplace"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let bias = f32_data(s2, l2, "conv bias")?;
        let Some((start, end)) = l1.contiguous_offsets() else {
            candle_core::bail!("adding a bias in place needs a contiguous tensor");
        };
        let CpuStorage::F32(data) = s1 else {
            candle_core::bail!("adding a bias in place is implemented for f32 tensors only");
        };
        add_bias_planes(&mut data[start..end], bias, l1.shape())
    }
}

/// Fails unless `bias` has one value per output channel (`co`).
fn check_bias(bias: &[f32], co: usize) -> candle_core::Result<()> {
    if bias.len() != co {
        candle_core::bail!("conv: {co} output channels but {} biases", bias.len());
    }
    Ok(())
}

/// Adds `bias[c]` to every value of channel `c` of the NCHW `values` of `shape` (the same f32
/// additions as a broadcast add); the bias must have one value per channel.
fn add_bias_planes(values: &mut [f32], bias: &[f32], shape: &Shape) -> candle_core::Result<()> {
    let (_, co, h, w) = shape.dims4()?;
    check_bias(bias, co)?;
    for (k, plane) in values.chunks_mut(h * w).enumerate() {
        plane.iter_mut().for_each(|v| *v += bias[k % co]);
    }
    Ok(())
}

/// The convolution `op` of `xs` with `wmat` as one autograd node, its bias added inside the node
/// when there is one: a separate addition would keep the unbiased output alive for the backward
/// too (one more activation per convolution).
fn tracked(
    xs: &Tensor,
    wmat: &Tensor,
    bias: Option<&Tensor>,
    op: ConvOp,
) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) if f32_cpu_vector(b) => xs.apply_op3(wmat, &b.contiguous()?, ConvBiasOp(op)),
        _ => add_bias(xs.apply_op2(wmat, op)?, bias),
    }
}

/// Whether the channels-last kernels (`channels_last`) beat the NCHW patch-matrix products for a
/// layer whose output has `channels` planes of `pixels` pixels: at least 16 pixels per channel
/// (the measurements behind the rule: docs/performance.md, "Kernel choices"). Both paths give
/// the same forward bits.
fn prefers_channels_last(pixels: usize, channels: usize) -> bool {
    pixels >= 16 * channels
}

/// The NCHW patch-matrix product of [`ConvOp`] on plain (graph-free) tensors, in groups of
/// whole images whose patch matrices take at most `limit` bytes.
fn nchw_product(
    kind: Kind,
    g: Geometry,
    limit: usize,
    xs: &Tensor,
    wmat: &Tensor,
) -> candle_core::Result<Tensor> {
    let per_image = g.rows() * g.cols() * 4;
    match kind {
        Kind::Conv => {
            let (co, _) = wmat.dims2()?;
            in_groups(xs, per_image, limit, |chunk| {
                let m = chunk.dim(0)?;
                wmat.broadcast_left(m)?
                    .matmul(&chunk.apply_op1(Im2Col(g))?)?
                    .reshape((m, co, g.oh, g.ow))
            })
        }
        Kind::Transposed => {
            let (_, ci, h, w) = xs.dims4()?;
            in_groups(xs, per_image, limit, |chunk| {
                let m = chunk.dim(0)?;
                wmat.broadcast_left(m)?
                    .matmul(&chunk.reshape((m, ci, h * w))?)?
                    .apply_op1(Col2Im(g))
            })
        }
    }
}

/// Which product [`ConvOp`] differentiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `y_i = W · im2col(x_i)`, `W` `[co, rows]`.
    Conv,
    /// `y_i = col2im(W · x_i)`, `W` `[rows, ci]`.
    Transposed,
}

/// A convolution (or transposed convolution) of `x` with the weight matrix `W` as one autograd
/// node.
///
/// Forward: the product described by [`Kind`], in bands of channels-last patches
/// (`channels_last`). Backward: the gradients of `x` and `W`; for a convolution in the same
/// channels-last bands, for a transposed convolution with the patch matrices rebuilt from the
/// incoming gradient in groups of whole images bounded by `limit` bytes (whose weight gradient
/// adds the images' contributions one by one in batch order, so grouping does not change a
/// single bit).
#[derive(Debug, Clone, Copy)]
struct ConvOp {
    kind: Kind,
    g: Geometry,
    limit: usize,
    /// Whether 3×3 convolutions that suit it compute their forward, their input gradient and
    /// (for channels-last layers) their weight gradient by Winograd's algorithm.
    winograd: bool,
}

impl ConvOp {
    fn new(kind: Kind, g: Geometry, limit: usize, winograd: bool) -> Self {
        Self {
            kind,
            g,
            limit,
            winograd,
        }
    }

    /// Whether a convolution of geometry `g` (the layer's, or its input gradient's) runs by
    /// Winograd's algorithm here.
    fn by_winograd(&self, g: &Geometry) -> bool {
        self.winograd && self.kind == Kind::Conv && winograd::pays_off(g)
    }

    /// The forward product of the operands' storages plus the per-channel `bias` if any, as a
    /// flat vector and its shape.
    fn product(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (x, w) = (f32_data(s1, l1, "conv")?, f32_data(s2, l2, "conv")?);
        let (n, _, _, _) = l1.shape().dims4()?;
        let g = &self.g;
        if self.by_winograd(g) {
            let (co, _) = l2.shape().dims2()?;
            let u = winograd::transformed_tap_major(w, g.channels, co);
            let ys = winograd::conv2d_forward(g, x, &u, co, bias, ImageLayout::Planes)?;
            return Ok((ys, Shape::from((n, co, g.oh, g.ow))));
        }
        if self.channels_last(l2.shape().dims2()?) {
            return match self.kind {
                Kind::Conv => {
                    let (co, _) = l2.shape().dims2()?;
                    let ys = channels_last::conv2d_forward(g, x, w, co, bias, ImageLayout::Planes)?;
                    Ok((ys, Shape::from((n, co, g.oh, g.ow))))
                }
                Kind::Transposed => {
                    let (_, ci) = l2.shape().dims2()?;
                    let ys = channels_last::conv_transpose2d_forward(g, x, w, ci, bias)?;
                    Ok((ys, Shape::from((n, g.channels, g.h, g.w))))
                }
            };
        }
        // Plain tensors over copies of the operands (transient; the graph keeps only `x`, `W`
        // and the result).
        let xs = plain_tensor(s1, l1, "conv")?;
        let wmat = plain_tensor(s2, l2, "conv")?;
        let ys = nchw_product(self.kind, self.g, self.limit, &xs, &wmat)?;
        let shape = ys.shape().clone();
        let mut ys = ys.flatten_all()?.to_vec1::<f32>()?;
        if let Some(b) = bias {
            add_bias_planes(&mut ys, b, &shape)?;
        }
        Ok((ys, shape))
    }

    /// Whether this layer runs in channels-last bands, given the weight matrix's shape
    /// (`[co, rows]` for a convolution).
    fn channels_last(&self, (co, _): (usize, usize)) -> bool {
        let g = &self.g;
        match self.kind {
            Kind::Conv => prefers_channels_last(g.oh * g.ow, co),
            Kind::Transposed => prefers_channels_last(g.h * g.w, g.channels),
        }
    }
}

/// The sum of every channel of an NCHW f32 CPU tensor over images and pixels (the gradient of a
/// per-channel bias), accumulated in f64 (faster than candle's `sum((0, 2, 3))`, see
/// docs/performance.md).
fn channel_sums(grad: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = grad.dims4()?;
    let plane = h * w;
    let sums = with_f32_data(grad, |g| {
        let sums = (0..c)
            .into_par_iter()
            .map(|ch| {
                let total: f64 = (0..n)
                    .map(|i| {
                        let start = (i * c + ch) * plane;
                        g[start..start + plane]
                            .iter()
                            .map(|&v| v as f64)
                            .sum::<f64>()
                    })
                    .sum();
                total as f32
            })
            .collect::<Vec<f32>>();
        Ok(sums)
    })?;
    Tensor::from_vec(sums, c, &Device::Cpu)
}

/// [`ConvOp`] followed by the per-channel bias, as one autograd node.
#[derive(Debug, Clone, Copy)]
struct ConvBiasOp(ConvOp);

impl CustomOp3 for ConvBiasOp {
    fn name(&self) -> &'static str {
        "conv-im2col-bias"
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
        let bias = f32_data(s3, l3, "conv bias")?;
        let (ys, shape) = self.0.product(s1, l1, s2, l2, Some(bias))?;
        Ok((CpuStorage::F32(ys), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        wmat: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gw) = self.0.bwd(xs, wmat, res, grad)?;
        let gb = channel_sums(&grad.detach())?;
        Ok((gx, gw, Some(gb)))
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "conv-im2col"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ys, shape) = self.product(s1, l1, s2, l2, None)?;
        Ok((CpuStorage::F32(ys), shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        wmat: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (xs, wmat, grad) = (
            xs.detach().contiguous()?,
            wmat.detach(),
            grad.detach().contiguous()?,
        );
        let g = self.g;
        if self.kind == Kind::Conv && self.channels_last(wmat.dims2()?) {
            let (co, k) = wmat.dims2()?;
            // The input gradient of a 3×3 convolution with stride 1 and padding 1 is the same
            // kind of convolution of the output gradient, with the weight's channels swapped and
            // its taps turned by 180°: by Winograd's algorithm when that convolution suits it.
            let winograd_gradient = match winograd::applies(&g) {
                true => Some(Geometry::new(true, co, (g.oh, g.ow), (3, 3), 1, 1)?),
                false => None,
            }
            .filter(|gg| self.by_winograd(gg));
            let (gx, gw) = with_f32_data(&xs, |x| {
                with_f32_data(&wmat, |w| {
                    with_f32_data(&grad, |gy| match &winograd_gradient {
                        Some(gg) => {
                            let gw = match self.by_winograd(&g) {
                                true => winograd::weight_gradient(&g, x, gy, co)?,
                                false => channels_last::conv2d_weight_gradient(&g, x, w, co, gy)?,
                            };
                            let u = winograd::transformed_input_gradient(w, g.channels, co);
                            let layout = ImageLayout::Planes;
                            let gx =
                                winograd::conv2d_forward(gg, gy, &u, g.channels, None, layout)?;
                            Ok((gx, gw))
                        }
                        None => channels_last::conv2d_backward(&g, x, w, co, gy),
                    })
                })
            })?;
            return Ok((
                Some(Tensor::from_vec(gx, xs.shape(), &Device::Cpu)?),
                Some(Tensor::from_vec(gw, (co, k), &Device::Cpu)?),
            ));
        }
        let n = xs.dim(0)?;
        let per_image = g.rows() * g.cols() * 4;
        let group = (self.limit / per_image.max(1)).max(1);
        let mut grad_x = Vec::new();
        let mut grad_w: Option<Tensor> = None;
        let mut accumulate = |gw: Tensor| -> candle_core::Result<()> {
            grad_w = Some(match grad_w.take() {
                Some(acc) => (acc + gw)?,
                None => gw,
            });
            Ok(())
        };
        for start in (0..n).step_by(group) {
            let m = group.min(n - start);
            let x = xs.narrow(0, start, m)?;
            let gy = grad.narrow(0, start, m)?;
            match self.kind {
                Kind::Conv => {
                    let (co, _) = wmat.dims2()?;
                    let gy = gy.reshape((m, co, g.cols()))?;
                    let cols = x.apply_op1(Im2Col(g))?;
                    grad_x.push(
                        wmat.t()?
                            .broadcast_left(m)?
                            .matmul(&gy)?
                            .apply_op1(Col2Im(g))?,
                    );
                    for i in 0..m {
                        accumulate(gy.get(i)?.matmul(&cols.get(i)?.t()?)?)?;
                    }
                }
                Kind::Transposed => {
                    let (_, ci) = wmat.dims2()?;
                    let (h, w) = (g.oh, g.ow);
                    let x = x.reshape((m, ci, h * w))?;
                    let gmid = gy.apply_op1(Im2Col(g))?;
                    grad_x.push(
                        wmat.t()?
                            .broadcast_left(m)?
                            .matmul(&gmid)?
                            .reshape((m, ci, h, w))?,
                    );
                    for i in 0..m {
                        accumulate(gmid.get(i)?.matmul(&x.get(i)?.t()?)?)?;
                    }
                }
            }
        }
        Ok((Some(Tensor::cat(&grad_x, 0)?), grad_w))
    }
}

/// A 2-D transposed convolution of `xs` `[n, ci, h, w]` with `weight` `[ci, co, kh, kw]`
/// (PyTorch's layout), equal `stride` and `padding` on both axes, no output padding, dilation or
/// groups, and an optional `bias` `[co]`. Returns `[n, co, (h−1)·stride − 2·padding + kh, …]`.
///
/// f32 tensors on the CPU use one matrix product per image followed by col2im (gradients
/// included); anything else uses candle's `conv_transpose2d`.
pub fn conv_transpose2d(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    conv_transpose2d_limited(xs, weight, bias, stride, padding, COLS_BYTES_LIMIT)
}

/// [`conv_transpose2d`] with an explicit bound on the bytes of patch matrices built at once.
fn conv_transpose2d_limited(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    limit: usize,
) -> candle_core::Result<Tensor> {
    if !fast_path(xs, weight) {
        let ys = xs.conv_transpose2d(weight, padding, 0, stride, 1)?;
        return add_bias(ys, bias);
    }
    let (_, ci, h, w) = xs.dims4()?;
    let (wci, co, kh, kw) = weight.dims4()?;
    if wci != ci {
        candle_core::bail!("conv_transpose2d: input has {ci} channels, the weight expects {wci}");
    }
    if stride == 0 {
        candle_core::bail!("conv_transpose2d: the stride must be positive");
    }
    let (oh, ow) = ((h - 1) * stride + kh, (w - 1) * stride + kw);
    if oh <= 2 * padding || ow <= 2 * padding {
        candle_core::bail!("conv_transpose2d: padding {padding} leaves an empty output");
    }
    let (oh, ow) = (oh - 2 * padding, ow - 2 * padding);
    // The transposed convolution is the adjoint of the convolution mapping oh×ow onto h×w.
    // Each output sums over the input channels inside the matrix product, in their natural order,
    // so the rows keep the weight's own layout (channel, then tap) and need no reordering.
    let g = Geometry::new(false, co, (oh, ow), (kh, kw), stride, padding)?;
    debug_assert_eq!((g.oh, g.ow), (h, w));
    let wmat = weight.reshape((ci, g.rows()))?.t()?.contiguous()?;
    let xs = xs.contiguous()?;
    // As in `conv2d`: one autograd node, so that the `[rows, h·w]` products do not stay alive
    // until the backward.
    if xs.track_op() || wmat.track_op() {
        let op = ConvOp::new(Kind::Transposed, g, limit, false);
        return tracked(&xs, &wmat, bias, op);
    }
    if !prefers_channels_last(oh * ow, co) {
        return add_bias_fresh(nchw_product(Kind::Transposed, g, limit, &xs, &wmat)?, bias);
    }
    let shape = (xs.dim(0)?, co, oh, ow);
    with_f32_data(&wmat, |wmat| {
        untracked_channels_last(&xs, wmat, bias, shape, |x, w, b| {
            channels_last::conv_transpose2d_forward(&g, x, w, ci, b)
        })
    })
}

/// GFLOP/s of gemm's f32 product `[m, k] · [k, n]` on one thread, `reps` times (for the bf16
/// kernel's speed test).
#[cfg(test)]
pub(crate) fn speed_f32(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    use channels_last::{matmul, View};
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let t = std::time::Instant::now();
    for _ in 0..reps {
        matmul(
            &mut c,
            View::rows(&a, m, k),
            View::rows(&b, k, n),
            false,
            gemm::Parallelism::None,
        );
    }
    (2 * m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn ramp(shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 113) as f32 / 113.0 - 0.5) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Runs `f` on the whole batch and in groups of one image (a tiny byte limit), and checks
    /// that outputs and all gradients agree exactly.
    fn grouping_is_invisible(
        f: impl Fn(&Tensor, &Tensor, &Tensor, usize) -> candle_core::Result<Tensor>,
        x_shape: &[usize],
        w_shape: &[usize],
        co: usize,
    ) {
        let x = Var::from_tensor(&ramp(x_shape, 1.0)).unwrap();
        let wt = Var::from_tensor(&ramp(w_shape, 0.3)).unwrap();
        let b = Var::from_tensor(&ramp(&[co], 0.1)).unwrap();
        let whole = f(x.as_tensor(), wt.as_tensor(), b.as_tensor(), usize::MAX).unwrap();
        let grouped = f(x.as_tensor(), wt.as_tensor(), b.as_tensor(), 1).unwrap();
        assert_eq!(max_diff(&whole, &grouped), 0.0);
        let r = ramp(whole.dims(), 2.0);
        let g1 = (whole * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (grouped * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &wt, &b] {
            let d = max_diff(g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(d < 1e-5, "gradient differs by {d}");
        }
    }

    /// A direct convolution's plan with patch matrices of at most `limit` bytes.
    fn direct(limit: usize) -> Plan<'static> {
        Plan {
            limit,
            winograd: false,
            bf16: false,
            cache: None,
        }
    }

    #[test]
    fn image_groups_give_the_same_convolution() {
        grouping_is_invisible(
            |x, w, b, limit| conv2d_limited(x, w, Some(b), 1, 1, direct(limit)),
            &[3, 2, 6, 5],
            &[4, 2, 3, 3],
            4,
        );
        grouping_is_invisible(
            |x, w, b, limit| conv2d_limited(x, w, Some(b), 2, 1, direct(limit)),
            &[3, 2, 7, 6],
            &[4, 2, 4, 4],
            4,
        );
    }

    #[test]
    fn image_groups_give_the_same_transposed_convolution() {
        grouping_is_invisible(
            |x, w, b, limit| conv_transpose2d_limited(x, w, Some(b), 2, 1, limit),
            &[3, 4, 5, 6],
            &[4, 2, 4, 4],
            2,
        );
    }

    /// The values of a tensor.
    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// `n` NCHW images of `c` channels (`[n, c, pixels]`) laid out channels last
    /// (`[n, pixels, c]`).
    pub(super) fn to_pixels(planes: &[f32], n: usize, c: usize) -> Vec<f32> {
        let pixels = planes.len() / (n * c);
        let mut out = vec![0f32; planes.len()];
        for (i, image) in planes.chunks_exact(c * pixels).enumerate() {
            for (ch, plane) in image.chunks_exact(pixels).enumerate() {
                for (p, &v) in plane.iter().enumerate() {
                    out[(i * pixels + p) * c + ch] = v;
                }
            }
        }
        out
    }

    /// The inverse of [`to_pixels`].
    pub(super) fn to_planes(pixels: &[f32], n: usize, c: usize) -> Vec<f32> {
        let count = pixels.len() / (n * c);
        let mut out = vec![0f32; pixels.len()];
        for (i, image) in pixels.chunks_exact(c * count).enumerate() {
            for (p, pixel) in image.chunks_exact(c).enumerate() {
                for (ch, &v) in pixel.iter().enumerate() {
                    out[(i * c + ch) * count + p] = v;
                }
            }
        }
        out
    }

    #[test]
    fn channels_last_forward_is_bit_identical_to_the_patch_matrix_product() {
        // Channel counts around the transposition tile, strides, kernels, one row per band and
        // whole images per band.
        for (n, c, co, (h, w), k, stride, pad) in [
            (2, 3, 5, (9, 11), 3, 1, 1),
            (1, 17, 33, (20, 18), 3, 1, 1),
            (2, 16, 16, (16, 16), 3, 1, 1),
            (2, 6, 4, (12, 10), 4, 2, 1),
            (1, 5, 7, (9, 8), 3, 1, 0),
            (2, 4, 3, (7, 9), 1, 1, 0),
        ] {
            let g = Geometry::new(true, c, (h, w), (k, k), stride, pad).unwrap();
            let x = ramp(&[n, c, h, w], 1.0);
            let wmat = ramp(&[co, g.rows()], 0.3);
            let bias = values(&ramp(&[co], 0.1));
            let cols = x.apply_op1(Im2Col(g)).unwrap();
            let expected = wmat.broadcast_left(n).unwrap().matmul(&cols).unwrap();
            let mut expected = values(&expected);
            add_bias_planes(&mut expected, &bias, &Shape::from((n, co, g.oh, g.ow))).unwrap();
            for band_bytes in [1, 4 * g.ow * g.rows() * 3, usize::MAX / 2] {
                let ours = channels_last::conv2d_forward_banded(
                    &g,
                    &values(&x),
                    &values(&wmat),
                    co,
                    Some(&bias),
                    band_bytes,
                    ImageLayout::Planes,
                )
                .unwrap();
                assert_eq!(ours, expected, "{g:?}, bands of {band_bytes} bytes");
                // Channels-last images in and out: the same products, the same bits.
                let pixels = channels_last::conv2d_forward_banded(
                    &g,
                    &to_pixels(&values(&x), n, c),
                    &values(&wmat),
                    co,
                    Some(&bias),
                    band_bytes,
                    ImageLayout::Pixels,
                )
                .unwrap();
                assert_eq!(
                    to_planes(&pixels, n, co),
                    expected,
                    "{g:?}, channels last, bands of {band_bytes} bytes"
                );
            }
        }
    }

    #[test]
    fn channels_last_backward_matches_the_patch_matrix_gradients() {
        for (n, c, co, (h, w), k, stride, pad) in [
            (2, 3, 5, (9, 11), 3, 1, 1),
            (1, 17, 33, (20, 18), 3, 1, 1),
            (2, 6, 4, (12, 10), 4, 2, 1),
            (1, 5, 7, (9, 8), 3, 2, 0),
        ] {
            let g = Geometry::new(true, c, (h, w), (k, k), stride, pad).unwrap();
            let x = ramp(&[n, c, h, w], 1.0);
            let wmat = ramp(&[co, g.rows()], 0.3);
            let gy = ramp(&[n, co, g.oh * g.ow], 2.0);
            // The same gradients through the NCHW patch matrices: ∂x = col2im(Wᵀ·G),
            // ∂W = Σ G·colsᵀ.
            let gx_ref = wmat
                .t()
                .unwrap()
                .broadcast_left(n)
                .unwrap()
                .matmul(&gy)
                .unwrap()
                .apply_op1(Col2Im(g))
                .unwrap();
            let cols = x.apply_op1(Im2Col(g)).unwrap();
            let gw_ref = gy
                .matmul(&cols.transpose(1, 2).unwrap())
                .unwrap()
                .sum(0)
                .unwrap();
            let (x, wmat, gy) = (values(&x), values(&wmat), values(&gy));
            for band_bytes in [1, usize::MAX / 2] {
                let backward = |input_gradient| {
                    channels_last::conv2d_backward_banded(
                        &g,
                        &x,
                        &wmat,
                        co,
                        &gy,
                        band_bytes,
                        input_gradient,
                    )
                    .unwrap()
                };
                let (gx, gw) = backward(true);
                // The weight gradient alone is the same bits.
                let (none, gw_alone) = backward(false);
                assert!(none.is_empty());
                assert_eq!(gw_alone, gw);
                for (what, ours, reference) in [("input", gx, &gx_ref), ("weight", gw, &gw_ref)] {
                    let reference = values(reference);
                    assert_eq!(ours.len(), reference.len());
                    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for (a, b) in ours.iter().zip(&reference) {
                        assert!(
                            (a - b).abs() <= 1e-6 * scale,
                            "{what} gradient {a} vs {b}, {g:?}, bands of {band_bytes} bytes"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn untracked_and_tracked_convolutions_agree_exactly() {
        // Inference (plain tensors) and training (variables) take different entry points into
        // the same kernel; the outputs must not differ by a bit.
        let x = ramp(&[2, 5, 10, 9], 1.0);
        let w = ramp(&[6, 5, 3, 3], 0.3);
        let b = ramp(&[6], 0.1);
        let plain = conv2d(&x, &w, Some(&b), 1, 1).unwrap();
        let (xv, wv, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let tracked = conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), 1, 1).unwrap();
        assert!(tracked.track_op());
        assert_eq!(values(&plain), values(&tracked));
        let unbiased = conv2d(&x, &w, None, 1, 1).unwrap();
        let rebiased = unbiased
            .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
            .unwrap();
        assert_eq!(values(&plain), values(&rebiased));

        // The same for the transposed convolution (weight `[ci, co, k, k]`).
        let w = ramp(&[5, 6, 4, 4], 0.3);
        let wv = Var::from_tensor(&w).unwrap();
        let plain = conv_transpose2d(&x, &w, Some(&b), 2, 1).unwrap();
        let tracked =
            conv_transpose2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), 2, 1).unwrap();
        assert!(tracked.track_op());
        assert_eq!(plain.dims(), &[2, 6, 20, 18]);
        assert_eq!(values(&plain), values(&tracked));
    }

    #[test]
    fn bf16_convolutions_stay_within_the_rounding_of_their_operands() {
        if !crate::kernels::bf16::available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        // Winograd (32 → 16 channels, 16×16), channels-last products with an odd patch length
        // (3 channels) and with 8 → 16 channels; NCHW and channels-last images, kept weights.
        for (n, c, co, (h, w)) in [
            (2, 32, 16, (16, 16)),
            (1, 3, 5, (9, 11)),
            (2, 8, 16, (16, 16)),
        ] {
            let x = ramp(&[n, c, h, w], 1.0);
            let wt = ramp(&[co, c, 3, 3], 0.3);
            let b = ramp(&[co], 0.1);
            // Σ |x|·|w| over a patch bounds each output's magnitude: the scale of the errors.
            let scale = 9.0 * c as f32 * 0.5 * 0.15;
            for winograd in [true, false] {
                let plan = |bf16| Plan {
                    limit: COLS_BYTES_LIMIT,
                    winograd,
                    bf16,
                    cache: None,
                };
                let exact = conv2d_limited(&x, &wt, Some(&b), 1, 1, plan(false)).unwrap();
                let fast = conv2d_limited(&x, &wt, Some(&b), 1, 1, plan(true)).unwrap();
                let d = max_diff(&exact, &fast);
                // Operands rounded to 8 bits (2·2⁻⁸ per product), Winograd's transforms scale
                // neighbouring values by up to 5 and 8 (×40 at most; far less in practice).
                let bound = if winograd { 40.0 } else { 1.0 } * 2.0 / 256.0 * scale;
                assert!(
                    d > 0.0 && d <= bound,
                    "{n}×{c}→{co} {h}×{w} {winograd}: {d} > {bound}"
                );
                let cache = WeightCache::default();
                let xs = Nhwc::from_tensor(&x).unwrap();
                let pixels =
                    conv2d_nhwc(&xs, &wt, Some(&b), (1, 1), (winograd, true), Some(&cache))
                        .unwrap();
                let again = conv2d_nhwc(&xs, &wt, Some(&b), (1, 1), (winograd, true), Some(&cache))
                    .unwrap();
                assert_eq!(pixels.data, again.data);
                assert_eq!(values(&pixels.to_tensor().unwrap()), values(&fast));
            }
        }
    }

    #[test]
    fn rows_and_their_inverse_agree_in_both_orders() {
        for tap_major in [true, false] {
            let g = Geometry::new(tap_major, 5, (8, 8), (3, 4), 1, 1).unwrap();
            let mut seen = vec![false; g.rows()];
            for c in 0..5 {
                for tap in 0..12 {
                    let r = g.row(c, tap);
                    assert!(!seen[r], "row {r} used twice");
                    seen[r] = true;
                    assert_eq!(g.channel_and_tap(r), (c, tap));
                }
            }
        }
    }

    #[test]
    fn valid_ranges_cover_exactly_the_inside_taps() {
        for (len, k, s, p) in [
            (7, 3, 1, 1),
            (8, 4, 2, 1),
            (9, 4, 2, 1),
            (5, 1, 1, 0),
            (6, 3, 2, 0),
        ] {
            let g = Geometry::new(true, 1, (len, len), (k, k), s, p).unwrap();
            for tap in 0..k {
                let (lo, hi) = g.valid_range(tap, len, g.oh);
                for o in 0..g.oh {
                    let i = (o * s + tap) as isize - p as isize;
                    let inside = i >= 0 && (i as usize) < len;
                    assert_eq!(inside, (lo..hi).contains(&o), "len {len} k {k} s {s} p {p}");
                }
            }
        }
    }
}
