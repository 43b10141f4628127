//! Convolutions with channels-last patch matrices: the forward, its gradients, and the forward of
//! the transposed convolution.
//!
//! [`super::Im2Col`] builds a `[c·kh·kw, oh·ow]` patch matrix, and the product `W · cols` then has
//! the output channels (often only 64) as its short side. gemm runs that orientation at a third
//! to a half of its speed at the full-resolution layers of the U-Nets (measured 75 GFLOP/s against
//! 200 GFLOP/s for a 128 → 64 channel 3×3 convolution at 256×256 on two cores). Here the patch
//! matrix is built the other way round, one output pixel per row (`[oh·ow, kh·kw·c]`, in the same
//! tap-major column order), from a zero-padded channels-last copy of the input, so that each row
//! is `kh` contiguous copies; the product `cols · Wᵀ` gives `[oh·ow, co]`, which is transposed back
//! onto the NCHW output planes with the bias added. Rows are processed in bands of output rows, so
//! the patch matrix of a band stays small whatever the image size.
//!
//! Every output is the same dot product, over the same columns in the same order, as with
//! [`super::Im2Col`], so the results are bit for bit those of that path. (Why the patch matrix
//! is not skipped altogether: docs/performance.md, "Kernel choices".)
//!
//! gemm is called directly rather than through candle's `matmul`, which cannot take these
//! operands as the strided views of our own buffers that they are.

use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

use candle_core::Shape;

use super::{add_bias_planes, check_bias, Geometry};
use crate::kernels::bf16::{self, PackedB};

/// The target size (in bytes) of the patch matrix of one band of output rows.
const BAND_BYTES: usize = 24 << 20;

/// The side of the square tiles in which values move between the channels-first and
/// channels-last layouts.
const TILE: usize = 16;

thread_local! {
    /// Working memory reused by successive convolutions on this thread: the padded copies, patch
    /// matrices and products of one call are overwritten before they are read, so they need
    /// neither a fresh allocation nor zeroing per call. It keeps the largest size asked for so
    /// far, some tens of MB at 256×256.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The same for the bf16 operands of the bf16 products ([`crate::kernels::bf16`]).
    static SCRATCH_BF16: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// gemm's threads: rayon's pool when it has more than one.
fn gemm_parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        threads => Parallelism::Rayon(threads),
    }
}

/// A matrix inside a slice: element `(i, j)` at `data[i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub(super) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major `[rows, cols]` matrix.
    pub(super) fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A matrix with the given strides; panics if it does not lie inside `data`.
    pub(super) fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * row_stride + (cols - 1) * col_stride;
            assert!(
                last < data.len(),
                "a {rows}×{cols} view runs past its {} values",
                data.len()
            );
        }
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }
}

/// `dst = lhs · rhs`, or `dst += lhs · rhs` when `accumulate`, with `dst` the row-major
/// `[lhs.rows, rhs.cols]` matrix at the start of `dst`; gemm on `parallelism`'s threads.
pub(super) fn matmul(
    dst: &mut [f32],
    lhs: View,
    rhs: View,
    accumulate: bool,
    parallelism: Parallelism,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(
        rhs.rows, k,
        "matmul: inner dimensions {k} and {} differ",
        rhs.rows
    );
    assert!(
        dst.len() >= m * n,
        "matmul: {} values for a {m}×{n} result",
        dst.len()
    );
    // SAFETY: both views were checked to lie inside their slices and `dst` holds the m×n
    // row-major result; `dst` is a unique borrow, so nothing read aliases what is written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Output rows per band: as many as keep the band's patch rows (`kh·kw·channels` values per
/// output pixel) near `band_bytes`, at least one.
fn band_rows(g: &Geometry, band_bytes: usize) -> usize {
    (band_bytes / (g.ow * g.rows() * 4).max(1)).clamp(1, g.oh.max(1))
}

/// Runs `f` on `len` values of this thread's working memory, whose contents are left over from
/// earlier calls. Re-entered on the same thread (a convolution inside a rayon job that runs while
/// another waits), it falls back to a fresh buffer.
pub(super) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                // Not `resize`: the old contents need not be copied.
                *buf = vec![0f32; len];
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

/// [`with_scratch`] for bf16 values (bits), from this thread's own bf16 working memory.
pub(super) fn with_bf16_scratch<R>(len: usize, f: impl FnOnce(&mut [u16]) -> R) -> R {
    SCRATCH_BF16.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                *buf = vec![0u16; len];
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0u16; len]),
    })
}

/// Writes the transpose of the `rows × cols` block of `src` that starts at `s0` (rows `ss`
/// apart) into `dst` from `d0` on (rows `ds` apart): `dst[d0 + j·ds + i] = src[s0 + i·ss + j]`,
/// plus `add[j]` when given. Moves between the NCHW and channels-last layouts are such
/// transposes; 8 × 8 blocks go through AVX registers when the CPU has them, the rest element
/// by element. Pure moves and single additions: the
/// values are the same bits either way.
#[allow(clippy::too_many_arguments)]
pub(crate) fn transpose_into(
    src: &[f32],
    (s0, ss): (usize, usize),
    dst: &mut [f32],
    (d0, ds): (usize, usize),
    rows: usize,
    cols: usize,
    add: Option<&[f32]>,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        s0 + (rows - 1) * ss + cols <= src.len() && d0 + (cols - 1) * ds + rows <= dst.len(),
        "transpose: a {rows}×{cols} block runs past its buffers"
    );
    assert!(
        add.is_none_or(|a| a.len() >= cols),
        "transpose: too few values to add"
    );
    #[allow(unused_mut)]
    let mut blocked = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        blocked = (rows / 8 * 8, cols / 8 * 8);
        // SAFETY: AVX is present; the blocks lie inside the ranges checked above, which are
        // inside `src` and `dst`.
        unsafe {
            transpose_blocks_avx(
                src.as_ptr().add(s0),
                ss,
                dst.as_mut_ptr().add(d0),
                ds,
                blocked,
                add,
            )
        };
    }
    // What the blocks left: the columns past the last whole block in the blocked rows, every
    // column in the other rows.
    let mut rest = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
        // Strips of TILE rows, so that each written run is TILE long.
        for i0 in rows.clone().step_by(TILE) {
            let strip = i0..(i0 + TILE).min(rows.end);
            for j in cols.clone() {
                let extra = add.map(|a| a[j]);
                for i in strip.clone() {
                    let v = src[s0 + i * ss + j];
                    dst[d0 + j * ds + i] = extra.map_or(v, |e| v + e);
                }
            }
        }
    };
    rest(0..blocked.0, blocked.1..cols);
    rest(blocked.0..rows, 0..cols);
}

/// The 8 × 8 blocks of [`transpose_into`]: rows `0..blocks.0` and columns `0..blocks.1`, both
/// multiples of 8, of the matrix at `src`.
///
/// # Safety
/// The CPU must have AVX, and every element of the blocks and of their transposes must lie inside
/// the allocations behind `src` and `dst`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_blocks_avx(
    src: *const f32,
    ss: usize,
    dst: *mut f32,
    ds: usize,
    blocks: (usize, usize),
    add: Option<&[f32]>,
) {
    use std::arch::x86_64::*;
    for i0 in (0..blocks.0).step_by(8) {
        for j0 in (0..blocks.1).step_by(8) {
            let s = src.add(i0 * ss + j0);
            let r0 = _mm256_loadu_ps(s);
            let r1 = _mm256_loadu_ps(s.add(ss));
            let r2 = _mm256_loadu_ps(s.add(2 * ss));
            let r3 = _mm256_loadu_ps(s.add(3 * ss));
            let r4 = _mm256_loadu_ps(s.add(4 * ss));
            let r5 = _mm256_loadu_ps(s.add(5 * ss));
            let r6 = _mm256_loadu_ps(s.add(6 * ss));
            let r7 = _mm256_loadu_ps(s.add(7 * ss));
            // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
            let t0 = _mm256_unpacklo_ps(r0, r1);
            let t1 = _mm256_unpackhi_ps(r0, r1);
            let t2 = _mm256_unpacklo_ps(r2, r3);
            let t3 = _mm256_unpackhi_ps(r2, r3);
            let t4 = _mm256_unpacklo_ps(r4, r5);
            let t5 = _mm256_unpackhi_ps(r4, r5);
            let t6 = _mm256_unpacklo_ps(r6, r7);
            let t7 = _mm256_unpackhi_ps(r6, r7);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let columns = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            let d = dst.add(j0 * ds + i0);
            for (k, mut v) in columns.into_iter().enumerate() {
                if let Some(a) = add {
                    v = _mm256_add_ps(v, _mm256_set1_ps(a[j0 + k]));
                }
                _mm256_storeu_ps(d.add(k * ds), v);
            }
        }
    }
}

/// How the images of a batch lie in memory, in and out of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ImageLayout {
    /// `[n, c, h, w]`: one plane per channel, candle's and PyTorch's layout.
    Planes,
    /// `[n, h, w, c]`: the channels of each pixel side by side (the layout of
    /// [`crate::kernels::nhwc::Nhwc`]).
    Pixels,
}

/// The convolution of `n` images `xs` in `layout` (NCHW `[n, g.channels, g.h, g.w]` or
/// channels last) with the tap-major weight matrix `wmat` (`[co, kh·kw·c]`: row `o`, column
/// `tap·c + channel`), plus `bias[o]` when given. Returns the output `[n, co, g.oh, g.ow]` (or
/// `[n, g.oh, g.ow, co]` channels last) as a flat vector; either layout gives the same bits.
pub(super) fn conv2d_forward(
    g: &Geometry,
    xs: &[f32],
    wmat: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    layout: ImageLayout,
) -> candle_core::Result<Vec<f32>> {
    conv2d_forward_banded(g, xs, wmat, co, bias, BAND_BYTES, layout)
}

/// [`conv2d_forward`] with bands of output rows whose patch matrices take about `band_bytes`
/// (at least one row per band), input and output in `layout`.
pub(super) fn conv2d_forward_banded(
    g: &Geometry,
    xs: &[f32],
    wmat: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    band_bytes: usize,
    layout: ImageLayout,
) -> candle_core::Result<Vec<f32>> {
    if !g.tap_major {
        candle_core::bail!("channels-last convolution: the weight columns must be tap-major");
    }
    let (c, h, w) = (g.channels, g.h, g.w);
    let k = g.rows();
    let image_len = c * h * w;
    if image_len == 0 || xs.len() % image_len != 0 {
        candle_core::bail!(
            "channels-last convolution: {} input values are not whole {c}×{h}×{w} images",
            xs.len()
        );
    }
    if wmat.len() != co * k {
        candle_core::bail!(
            "channels-last convolution: {} weight values for a {co}×{k} matrix",
            wmat.len()
        );
    }
    if let Some(b) = bias {
        check_bias(b, co)?;
    }
    let n = xs.len() / image_len;
    let out_plane = g.oh * g.ow;
    // Wᵀ `[k, co]`, so that both operands of the product are read along their rows.
    let mut wt = vec![0f32; k * co];
    for (o, row) in wmat.chunks_exact(k).enumerate() {
        for (r, &v) in row.iter().enumerate() {
            wt[r * co + o] = v;
        }
    }
    let band_rows = band_rows(g, band_bytes);
    let padded_len = (h + 2 * g.pad) * (w + 2 * g.pad) * c;
    let cols_len = band_rows * g.ow * k;
    let mut out = vec![0f32; n * co * out_plane];
    with_scratch(padded_len + cols_len + band_rows * g.ow * co, |scratch| {
        let (padded, rest) = scratch.split_at_mut(padded_len);
        let (cols, product) = rest.split_at_mut(cols_len);
        let buffers = Buffers {
            padded,
            cols,
            product,
        };
        forward_images(g, xs, &wt, co, bias, band_rows, layout, buffers, &mut out);
    });
    Ok(out)
}

/// The working buffers of [`forward_images`].
struct Buffers<'a> {
    padded: &'a mut [f32],
    cols: &'a mut [f32],
    product: &'a mut [f32],
}

/// The image loop of [`conv2d_forward_banded`] on its working buffers.
#[allow(clippy::too_many_arguments)]
fn forward_images(
    g: &Geometry,
    xs: &[f32],
    wt: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    band_rows: usize,
    layout: ImageLayout,
    buffers: Buffers,
    out: &mut [f32],
) {
    let Buffers {
        padded,
        cols,
        product,
    } = buffers;
    let k = g.rows();
    let image_len = g.channels * g.h * g.w;
    let out_plane = g.oh * g.ow;
    let parallelism = gemm_parallelism();
    for (image, dst) in xs
        .chunks_exact(image_len)
        .zip(out.chunks_exact_mut(co * out_plane))
    {
        pad_image(g, layout, image, padded);
        for oy0 in (0..g.oh).step_by(band_rows) {
            let rows = band_rows.min(g.oh - oy0);
            let m = rows * g.ow;
            let cols = &mut cols[..m * k];
            fill_patches(g, padded, oy0, cols);
            let product_into = |dst: &mut [f32]| {
                let (lhs, rhs) = (View::rows(cols, m, k), View::rows(wt, k, co));
                matmul(dst, lhs, rhs, false, parallelism)
            };
            match layout {
                ImageLayout::Planes => {
                    let product = &mut product[..m * co];
                    product_into(product);
                    scatter_band(g, product, co, bias, oy0 * g.ow, dst);
                }
                // The band's rows of the product are the output's pixels `oy0·ow..`.
                ImageLayout::Pixels => {
                    let band = &mut dst[oy0 * g.ow * co..(oy0 * g.ow + m) * co];
                    product_into(band);
                    add_bias_pixels(band, bias);
                }
            }
        }
    }
}

/// The tap-major weight matrix `wmat` (`[co, kh·kw·c]`) as the right operand `Wᵀ` of
/// [`conv2d_forward_bf16`], rounded to bf16 and packed.
pub(super) fn pack_weight_bf16(wmat: &[f32], co: usize) -> PackedB {
    let k = wmat.len() / co.max(1);
    PackedB::new(k, co, |r, o| wmat[o * k + r])
}

/// [`conv2d_forward`] with bf16 products ([`crate::kernels::bf16`]): the padded channels-last
/// image and so the patch matrix are rounded to bf16, `wt` is [`pack_weight_bf16`] of the
/// weight matrix; each output is the same dot product over the same columns, multiplied in
/// bf16 and summed in f32. The bias is added in f32 as in [`conv2d_forward`]. Needs
/// AVX512-BF16 ([`crate::kernels::bf16::available`]).
pub(super) fn conv2d_forward_bf16(
    g: &Geometry,
    xs: &[f32],
    wt: &PackedB,
    co: usize,
    bias: Option<&[f32]>,
    layout: ImageLayout,
) -> candle_core::Result<Vec<f32>> {
    if !g.tap_major {
        candle_core::bail!("channels-last convolution: the weight columns must be tap-major");
    }
    let (c, h, w) = (g.channels, g.h, g.w);
    let k = g.rows();
    let image_len = c * h * w;
    if image_len == 0 || xs.len() % image_len != 0 {
        candle_core::bail!(
            "channels-last convolution: {} input values are not whole {c}×{h}×{w} images",
            xs.len()
        );
    }
    if (wt.k(), wt.n()) != (k, co) {
        candle_core::bail!(
            "channels-last convolution: a {}×{} bf16 weight for a {k}×{co} product",
            wt.k(),
            wt.n()
        );
    }
    if let Some(b) = bias {
        check_bias(b, co)?;
    }
    if !bf16::available() {
        candle_core::bail!("bf16 convolutions need a CPU with AVX512-BF16");
    }
    let n = xs.len() / image_len;
    let out_plane = g.oh * g.ow;
    let width = 2 * bf16::pairs(k);
    let band_rows = band_rows(g, BAND_BYTES);
    let padded_len = (h + 2 * g.pad) * (w + 2 * g.pad) * c;
    let cols_len = band_rows * g.ow * width;
    let mut out = vec![0f32; n * co * out_plane];
    with_scratch(padded_len + band_rows * g.ow * co, |scratch| {
        let (padded, product) = scratch.split_at_mut(padded_len);
        with_bf16_scratch(padded_len + cols_len, |scratch16| {
            let (padded16, cols) = scratch16.split_at_mut(padded_len);
            for (image, dst) in xs
                .chunks_exact(image_len)
                .zip(out.chunks_exact_mut(co * out_plane))
            {
                pad_image(g, layout, image, padded);
                padded16
                    .par_chunks_mut(1 << 16)
                    .zip(padded.par_chunks(1 << 16))
                    .for_each(|(d, s)| bf16::convert(s, d));
                for oy0 in (0..g.oh).step_by(band_rows) {
                    let rows = band_rows.min(g.oh - oy0);
                    let m = rows * g.ow;
                    let cols = &mut cols[..m * width];
                    fill_patch_rows(g, padded16, oy0, cols, width);
                    let product_into =
                        |dst: &mut [f32]| bf16::matmul(dst, co, cols, width, m, wt, true);
                    match layout {
                        ImageLayout::Planes => {
                            let product = &mut product[..m * co];
                            product_into(product);
                            scatter_band(g, product, co, bias, oy0 * g.ow, dst);
                        }
                        ImageLayout::Pixels => {
                            let band = &mut dst[oy0 * g.ow * co..(oy0 * g.ow + m) * co];
                            product_into(band);
                            add_bias_pixels(band, bias);
                        }
                    }
                }
            }
        })
    });
    Ok(out)
}

/// Adds `bias[o]` to channel `o` of every pixel of the channels-last `values` (`[pixels, co]`).
pub(super) fn add_bias_pixels(values: &mut [f32], bias: Option<&[f32]>) {
    let Some(bias) = bias else { return };
    let co = bias.len();
    values.par_chunks_mut(co * 256).for_each(|pixels| {
        crate::kernels::simd::wide(|| {
            for pixel in pixels.chunks_exact_mut(co) {
                for (v, &b) in pixel.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        })
    });
}

/// One NCHW image (`[c, h, w]`) channels last into `dst` (`[h, w, c]`), a pixel row per job.
pub(crate) fn image_to_pixels(image: &[f32], (c, h, w): (usize, usize, usize), dst: &mut [f32]) {
    dst.par_chunks_exact_mut(w * c)
        .enumerate()
        .for_each(|(y, row)| transpose_into(image, (y * w, h * w), row, (0, c), c, w, None));
}

/// Copies one NCHW image into `padded` (`[h + 2·pad, w + 2·pad, c]`, channels last), leaving
/// the border zero.
fn to_padded_channels_last(g: &Geometry, image: &[f32], padded: &mut [f32]) {
    pad_image(g, ImageLayout::Planes, image, padded)
}

/// Copies one image in `layout` into `padded` (`[h + 2·pad, w + 2·pad, c]`, channels last),
/// leaving the border zero.
pub(super) fn pad_image(g: &Geometry, layout: ImageLayout, image: &[f32], padded: &mut [f32]) {
    let (c, h, w, p) = (g.channels, g.h, g.w, g.pad);
    let row_len = (w + 2 * p) * c;
    padded
        .par_chunks_exact_mut(row_len)
        .enumerate()
        .for_each(|(y, row)| {
            // The buffer is reused: the border is cleared here, the inside overwritten.
            if y < p || y >= h + p {
                row.fill(0.0);
                return;
            }
            row[..p * c].fill(0.0);
            row[(w + p) * c..].fill(0.0);
            let y = y - p;
            match layout {
                // Row y of every channel plane, as the pixels of the padded row.
                ImageLayout::Planes => {
                    transpose_into(image, (y * w, h * w), row, (p * c, c), c, w, None)
                }
                ImageLayout::Pixels => {
                    row[p * c..(w + p) * c].copy_from_slice(&image[y * w * c..(y + 1) * w * c])
                }
            }
        });
}

/// Fills `cols` (`[rows·ow, kh·kw·c]`) with the patches of the output rows `oy0..oy0 + rows`,
/// read from the padded channels-last image.
fn fill_patches(g: &Geometry, padded: &[f32], oy0: usize, cols: &mut [f32]) {
    fill_patch_rows(g, padded, oy0, cols, g.rows())
}

/// [`fill_patches`] of any element type, with patch rows `width` long (at least `kh·kw·c`; the
/// values past the patch are set to the type's zero).
fn fill_patch_rows<T: Copy + Default + Send + Sync>(
    g: &Geometry,
    padded: &[T],
    oy0: usize,
    cols: &mut [T],
    width: usize,
) {
    let c = g.channels;
    let k = g.rows();
    let wp = g.w + 2 * g.pad;
    // The kw taps of one kernel row are neighbouring pixels: one run of kw·c values.
    let run = g.kw * c;
    cols.par_chunks_exact_mut(g.ow * width)
        .enumerate()
        .for_each(|(r, band_row)| {
            let oy = oy0 + r;
            for (ox, patch) in band_row.chunks_exact_mut(width).enumerate() {
                for ky in 0..g.kh {
                    let start = ((oy * g.stride + ky) * wp + ox * g.stride) * c;
                    patch[ky * run..(ky + 1) * run].copy_from_slice(&padded[start..start + run]);
                }
                patch[k..].fill(T::default());
            }
        });
}

/// Writes the band `product` (`[m, co]`, pixel-major) onto the output planes of one image
/// (`dst`, `[co, oh·ow]`) from pixel `first` on, adding `bias[o]` to channel `o`.
pub(super) fn scatter_band(
    g: &Geometry,
    product: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    first: usize,
    dst: &mut [f32],
) {
    let m = product.len() / co;
    let out_plane = g.oh * g.ow;
    let zeros = [0f32; TILE];
    dst.par_chunks_mut(TILE * out_plane)
        .enumerate()
        .for_each(|(block, planes)| {
            let channels = planes.len() / out_plane;
            let o0 = block * TILE;
            // The bias, or zero (added either way, as the NCHW path adds its bias).
            let add = bias.map_or(&zeros[..channels], |b| &b[o0..o0 + channels]);
            let (src, dst) = ((o0, co), (first, out_plane));
            transpose_into(product, src, planes, dst, m, channels, Some(add));
        });
}

/// The gradients of [`conv2d_forward`] (without its bias) for the output gradient `gy`
/// (`[n, co, g.oh, g.ow]`): the input gradient `[n, c, h, w]` and the weight-matrix gradient
/// `[co, kh·kw·c]`, both as flat vectors.
///
/// Per band of output rows, with the band's channels-last patch matrix `P` (`[m, k]`) and output
/// gradient `G` (`[co, m]`, a view of `gy`): `∂W += G · P` and `∂P = Gᵀ · W`, whose rows are then
/// added onto a padded channels-last input gradient (the adjoint of building `P`), which is
/// transposed back to NCHW at the end of each image. Both products are read and written along
/// rows, as in the forward.
pub(super) fn conv2d_backward(
    g: &Geometry,
    xs: &[f32],
    wmat: &[f32],
    co: usize,
    gy: &[f32],
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    conv2d_backward_banded(g, xs, wmat, co, gy, BAND_BYTES, true)
}

/// The weight-matrix gradient of [`conv2d_backward`] alone.
pub(super) fn conv2d_weight_gradient(
    g: &Geometry,
    xs: &[f32],
    wmat: &[f32],
    co: usize,
    gy: &[f32],
) -> candle_core::Result<Vec<f32>> {
    Ok(conv2d_backward_banded(g, xs, wmat, co, gy, BAND_BYTES, false)?.1)
}

/// [`conv2d_backward`] with bands of about `band_bytes` of patch matrix; the input gradient is
/// left empty unless `input_gradient`.
pub(super) fn conv2d_backward_banded(
    g: &Geometry,
    xs: &[f32],
    wmat: &[f32],
    co: usize,
    gy: &[f32],
    band_bytes: usize,
    input_gradient: bool,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    if !g.tap_major {
        candle_core::bail!("channels-last convolution: the weight columns must be tap-major");
    }
    let (c, h, w, p) = (g.channels, g.h, g.w, g.pad);
    let k = g.rows();
    let image_len = c * h * w;
    let out_plane = g.oh * g.ow;
    if image_len == 0 || xs.len() % image_len != 0 || wmat.len() != co * k {
        candle_core::bail!(
            "channels-last convolution backward: {} input and {} weight values for {c}×{h}×{w} \
             images and a {co}×{k} matrix",
            xs.len(),
            wmat.len()
        );
    }
    let n = xs.len() / image_len;
    if gy.len() != n * co * out_plane {
        candle_core::bail!(
            "channels-last convolution backward: {} output-gradient values for {n}×{co}×{}×{}",
            gy.len(),
            g.oh,
            g.ow
        );
    }
    let (hp, wp) = (h + 2 * p, w + 2 * p);
    let band_rows = band_rows(g, band_bytes);
    let padded_len = hp * wp * c;
    let mut grad_x = vec![0f32; if input_gradient { n * image_len } else { 0 }];
    let mut grad_w = vec![0f32; co * k];
    with_scratch(2 * padded_len + band_rows * g.ow * k, |scratch| {
        let (padded, rest) = scratch.split_at_mut(padded_len);
        let (grad_padded, cols) = rest.split_at_mut(padded_len);
        let parallelism = gemm_parallelism();
        let mut first_product = true;
        let mut gx_images = grad_x.chunks_exact_mut(image_len);
        for (image, gy_image) in xs
            .chunks_exact(image_len)
            .zip(gy.chunks_exact(co * out_plane))
        {
            to_padded_channels_last(g, image, padded);
            if input_gradient {
                grad_padded.fill(0.0);
            }
            for oy0 in (0..g.oh).step_by(band_rows) {
                let rows = band_rows.min(g.oh - oy0);
                let m = rows * g.ow;
                let cols = &mut cols[..m * k];
                let band_gy = &gy_image[oy0 * g.ow..];
                fill_patches(g, padded, oy0, cols);
                // G: the band's `m` pixels of the `co` planes (`out_plane` apart).
                let g_band = View::strided(band_gy, co, m, out_plane, 1);
                // ∂W [co, k] (+)= G [co, m] · P [m, k]
                matmul(
                    &mut grad_w,
                    g_band,
                    View::rows(cols, m, k),
                    !first_product,
                    parallelism,
                );
                first_product = false;
                if input_gradient {
                    // ∂P [m, k] = Gᵀ [m, co] · W [co, k], written over the patch matrix.
                    let g_t = View::strided(band_gy, m, co, 1, out_plane);
                    matmul(cols, g_t, View::rows(wmat, co, k), false, parallelism);
                    add_patches(g, cols, oy0, grad_padded);
                }
            }
            if let Some(gx_image) = gx_images.next() {
                from_padded_channels_last(g, grad_padded, gx_image);
            }
        }
    });
    Ok((grad_x, grad_w))
}

/// The adjoint of [`fill_patches`]: adds the patch rows of the output rows `oy0..` in `cols` onto
/// the padded channels-last `grad` at the pixels they were read from.
fn add_patches(g: &Geometry, cols: &[f32], oy0: usize, grad: &mut [f32]) {
    let c = g.channels;
    let k = g.rows();
    let wp = g.w + 2 * g.pad;
    let run = g.kw * c;
    let rows = cols.len() / (g.ow * k);
    // One pass per kernel row: within a pass every output row adds onto its own padded row, so
    // the rows can be handled in parallel.
    for ky in 0..g.kh {
        grad.par_chunks_exact_mut(wp * c)
            .enumerate()
            .for_each(|(py, row)| {
                if py < ky || (py - ky) % g.stride != 0 {
                    return;
                }
                let oy = (py - ky) / g.stride;
                if oy < oy0 || oy >= oy0 + rows {
                    return;
                }
                let band_row = &cols[(oy - oy0) * g.ow * k..(oy - oy0 + 1) * g.ow * k];
                for (ox, patch) in band_row.chunks_exact(k).enumerate() {
                    let start = ox * g.stride * c;
                    let dst = &mut row[start..start + run];
                    for (d, &v) in dst.iter_mut().zip(&patch[ky * run..(ky + 1) * run]) {
                        *d += v;
                    }
                }
            });
    }
}

/// The adjoint of [`to_padded_channels_last`]: the NCHW image of the inner (unpadded) pixels.
fn from_padded_channels_last(g: &Geometry, padded: &[f32], image: &mut [f32]) {
    let (c, h, w, p) = (g.channels, g.h, g.w, g.pad);
    let wp = w + 2 * p;
    image
        .par_chunks_mut(TILE * h * w)
        .enumerate()
        .for_each(|(block, planes)| {
            let channels = planes.len() / (h * w);
            for y in 0..h {
                // The inner pixels of padded row y + p, channels block·TILE on, as row y of
                // the planes.
                let src = (((y + p) * wp + p) * c + block * TILE, c);
                transpose_into(padded, src, planes, (y * w, h * w), w, channels, None);
            }
        });
}

/// The transposed convolution `col2im(W · x)` of [`super::Kind::Transposed`]: `xs` holds `n`
/// NCHW images `[n, ci, g.oh, g.ow]` (the transposed convolution's input is the output grid of
/// the convolution `g`, whose `g.channels` are the result's channels), `wmat` is
/// `[g.channels·kh·kw, ci]` with channel-major rows (`channel·kh·kw + tap`). Returns
/// `[n, g.channels, g.h, g.w]` plus `bias[channel]` when given.
///
/// Per band of input rows: `P = xᵀ · W'` (`[m, kh·kw·channels]`, tap-major columns, `xᵀ` read
/// straight from the NCHW planes), whose rows are added onto a padded channels-last output as
/// in the convolution's input gradient, transposed back to NCHW at the end of each image.
pub(super) fn conv_transpose2d_forward(
    g: &Geometry,
    xs: &[f32],
    wmat: &[f32],
    ci: usize,
    bias: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    if g.tap_major {
        candle_core::bail!(
            "channels-last transposed convolution: the weight rows must be channel-major"
        );
    }
    let co = g.channels;
    let taps = g.kh * g.kw;
    let k = g.rows();
    let in_plane = g.oh * g.ow;
    let out_image = co * g.h * g.w;
    if in_plane == 0 || ci == 0 || xs.len() % (ci * in_plane) != 0 || wmat.len() != k * ci {
        candle_core::bail!(
            "channels-last transposed convolution: {} input and {} weight values for \
             {ci}×{}×{} images and a {k}×{ci} matrix",
            xs.len(),
            wmat.len(),
            g.oh,
            g.ow
        );
    }
    if let Some(b) = bias {
        check_bias(b, co)?;
    }
    let n = xs.len() / (ci * in_plane);
    // W' `[ci, taps·co]`: W'[i][tap·co + c] = W[c·taps + tap][i].
    let mut w2 = vec![0f32; ci * k];
    for c in 0..co {
        for tap in 0..taps {
            let row = &wmat[(c * taps + tap) * ci..(c * taps + tap + 1) * ci];
            for (i, &v) in row.iter().enumerate() {
                w2[i * k + tap * co + c] = v;
            }
        }
    }
    // The output, channels last, as the patch rows are tap-major over `co` channels.
    let cl = Geometry {
        tap_major: true,
        ..*g
    };
    let band_rows = band_rows(g, BAND_BYTES);
    let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
    let padded_len = hp * wp * co;
    let mut out = vec![0f32; n * out_image];
    with_scratch(padded_len + band_rows * g.ow * k, |scratch| {
        let (padded, cols) = scratch.split_at_mut(padded_len);
        let parallelism = gemm_parallelism();
        for (image, dst) in xs
            .chunks_exact(ci * in_plane)
            .zip(out.chunks_exact_mut(out_image))
        {
            padded.fill(0.0);
            for oy0 in (0..g.oh).step_by(band_rows) {
                let rows = band_rows.min(g.oh - oy0);
                let m = rows * g.ow;
                let cols = &mut cols[..m * k];
                let band = &image[oy0 * g.ow..];
                // xᵀ: the band's `m` pixels of the `ci` planes (`in_plane` apart).
                let x_t = View::strided(band, m, ci, 1, in_plane);
                matmul(cols, x_t, View::rows(&w2, ci, k), false, parallelism);
                add_patches(&cl, cols, oy0, padded);
            }
            from_padded_channels_last(&cl, padded, dst);
        }
    });
    if let Some(b) = bias {
        add_bias_planes(&mut out, b, &Shape::from((n, co, g.h, g.w)))?;
    }
    Ok(out)
}
