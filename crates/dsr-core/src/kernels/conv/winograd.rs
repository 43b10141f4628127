//! 3×3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(4×4, 3×3): the
//! forward, and in training also the input gradient (itself such a convolution) and the weight
//! gradient ([`weight_gradient`]).
//!
//! Each 4×4 block of output pixels is computed from the 6×6 block of input pixels around it:
//! the input block `d` and the 3×3 filter `g` are transformed into 6×6 blocks `V = Bᵀ d B` and
//! `U = G g Gᵀ`, multiplied element by element and summed over the input channels, and the sum
//! `M` is transformed back by `Y = Aᵀ M A`. The sums over channels are 36 matrix products
//! (one per element of the 6×6 block) of `[tiles, c]` by `[c, co]`: 36 multiply-adds per input
//! channel and output channel for 16 output pixels, against 144 for the direct convolution, so
//! the products do 4× less work. The transforms are small integer combinations (and, for the
//! filter, divisions by 4, 6, 12 and 24, done once per weight in f64), computed here on
//! channels-last copies so that they run along contiguous channel vectors.
//!
//! The rounding differs from the direct convolution's and is larger: the transforms scale
//! neighbouring pixels by up to 5 (input) and 8 (output) before and after the products.
//! Against an f64 sum the error is a few times the direct convolution's (unit test below:
//! 3.7e-6 against 6.9e-7 on outputs up to 1.1); the smaller F(2×2, 3×3) tile rounds as well
//! as the direct convolution but does 2.25× less work where this does 4×. Measured on the
//! reference fixture's random networks, whose instance norms amplify small differences, every
//! fixture output stays within its tolerance for the layers this is used for ([`MIN_CHANNELS`]
//! and more input channels, [`MIN_PIXELS`] and more pixels; anomaly-detection softmax 2.1e-6
//! against its 1e-5, anomaly map 4.3e-6, against 1.3e-6 and 1.2e-6 with F(2×2, 3×3) and
//! 1.3e-6 and 1.9e-6 with direct convolutions). `ConvAlgorithm::Direct` (`dsr
//! --direct-conv`) gives PyTorch's summation order back.

use gemm::Parallelism;
use rayon::prelude::*;

use super::channels_last::{
    add_bias_pixels, image_to_pixels, matmul, pad_image, scatter_band, with_bf16_scratch,
    with_scratch, ImageLayout, View,
};
use super::{check_bias, Geometry};
use crate::kernels::bf16::{self, PackedB};

/// Output pixels per side of a tile.
const OUT: usize = 4;

/// Input pixels per side of a tile (`OUT` + 2).
const IN: usize = 6;

/// Elements of a transformed 6×6 block.
const BLOCK: usize = IN * IN;

/// The target size (in bytes) of the transformed inputs and products of one band of tile rows.
const BAND_BYTES: usize = 16 << 20;

/// Input channels below which the direct convolution is used: the transforms cost per input
/// and output value, the products' saving grows with the channels (criterion group "inference
/// 3x3", two cores, 256×256, 64 outputs, filters transformed per call: 32 → 64 channels 14.0 ms
/// against 22.4 ms direct, 64 → 64 15.6 against 33.8; 16 → 64, measured with this threshold
/// lowered, 10.1 against 11.9: within the host's noise, not worth a rounding of its own).
const MIN_CHANNELS: usize = 32;

/// Pixels per image (16×16, 16 tiles) below which the direct convolution is used: there the
/// products saved are few and the transformed filters, 4× the weight, comparatively large. In
/// the reference model at 256×256 the 8×8 layers would keep 57 MB of transformed filters (of
/// 591 MB for every eligible layer) to save 0.3 of 178 GFLOP of products per image.
const MIN_PIXELS: usize = 16 * 16;

/// Whether a convolution of geometry `g` is computed by Winograd's algorithm when it may be:
/// [`applies`], with at least [`MIN_CHANNELS`] input channels and [`MIN_PIXELS`] pixels. The one
/// rule for every entry point (untracked, tracked, the input gradient, the recomputing
/// operator), so that each computes a layer the same way.
pub(super) fn pays_off(g: &Geometry) -> bool {
    applies(g) && g.channels >= MIN_CHANNELS && g.h * g.w >= MIN_PIXELS
}

/// Whether [`conv2d_forward`] can compute the convolution of geometry `g`: a 3×3 kernel, stride
/// 1, padding 1 (output size = input size), height and width multiples of 4 (whole tiles),
/// tap-major weight columns.
pub(super) fn applies(g: &Geometry) -> bool {
    g.tap_major
        && (g.kh, g.kw, g.stride, g.pad) == (3, 3, 1, 1)
        && g.h >= OUT
        && g.w >= OUT
        && g.h % OUT == 0
        && g.w % OUT == 0
}

/// The transformed filters `U = G g Gᵀ` of a weight in PyTorch's layout (`[co, c, 3, 3]`),
/// laid out `[c, 36, co]` as [`conv2d_forward`] takes them; computed in f64 and rounded once.
pub(super) fn transformed_filters(weight: &[f32], c: usize, co: usize) -> Vec<f32> {
    transformed_filters_with(c, co, |o, ch, tap| weight[(o * c + ch) * 9 + tap])
}

/// [`transformed_filters`] of the tap-major weight matrix `wmat` (`[co, 9·c]`, column
/// `tap·c + channel`).
pub(super) fn transformed_tap_major(wmat: &[f32], c: usize, co: usize) -> Vec<f32> {
    transformed_filters_with(c, co, |o, ch, tap| wmat[o * 9 * c + tap * c + ch])
}

/// The transformed filters of the convolution that gives the input gradient of the convolution
/// with the tap-major weight matrix `wmat` (`[co, 9·c]`): the weight with its input and output
/// channels swapped and its taps turned by 180° (`co` → `c` channels).
pub(super) fn transformed_input_gradient(wmat: &[f32], c: usize, co: usize) -> Vec<f32> {
    transformed_filters_with(co, c, |o, ch, tap| wmat[ch * 9 * c + (8 - tap) * c + o])
}

/// The transformed filters of the `[co, c, 3, 3]` weight whose tap `tap` (= ky·3 + kx) from
/// input channel `ch` to output `o` is `tap_value(o, ch, tap)`, laid out `[c, 36, co]`.
fn transformed_filters_with(
    c: usize,
    co: usize,
    tap_value: impl Fn(usize, usize, usize) -> f32 + Sync,
) -> Vec<f32> {
    // One input channel per task, its outputs in groups of GROUP: the group's transformed
    // filters are gathered in `local` and written as 36 runs of GROUP neighbouring values.
    // (Writing each filter's 36 values straight to their places, `co` apart, made for
    // 512 outputs a stride of 2 KB that the caches hold in a few sets only: the transform
    // took longer than the layer's products.)
    const GROUP: usize = 16;
    let mut u = vec![0f32; c * BLOCK * co];
    u.par_chunks_mut(BLOCK * co)
        .enumerate()
        .for_each(|(ch, block)| {
            let mut local = [[[0f64; GROUP]; IN]; IN];
            for o0 in (0..co).step_by(GROUP) {
                let group = GROUP.min(co - o0);
                let g: [[f64; GROUP]; 9] = std::array::from_fn(|tap| {
                    std::array::from_fn(|k| {
                        if k < group {
                            f64::from(tap_value(o0 + k, ch, tap))
                        } else {
                            0.0
                        }
                    })
                });
                filter_transform(&g, &mut local);
                for (e, values) in local.iter().flatten().enumerate() {
                    let dst = &mut block[e * co + o0..e * co + o0 + group];
                    for (d, v) in dst.iter_mut().zip(values) {
                        *d = *v as f32;
                    }
                }
            }
        });
    u
}

/// `G g Gᵀ` of 3×3 filters `g` (taps row-major, each tap a lane per filter), with the 6×3
/// matrix `G` of the interpolation points 0, ±1, ±2 and ∞ (rows `[¼ 0 0]`, `−⅙ [1 1 1]`,
/// `−⅙ [1 −1 1]`, `[1/24 1/12 ⅙]`, `[1/24 −1/12 ⅙]`, `[0 0 1]`); `u` receives the 6×6
/// elements. Lane by lane, so that the lanes fill vector registers.
fn filter_transform<const L: usize>(g: &[[f64; L]; 9], u: &mut [[[f64; L]; IN]; IN]) {
    // Multiplications by the reciprocal rather than divisions (slow in f64); the difference
    // is far below f32's rounding.
    const SIXTH: f64 = 1.0 / 6.0;
    #[inline(always)]
    fn combine<const L: usize>(a: &[f64; L], b: &[f64; L], c: &[f64; L], y: &mut [[f64; L]; IN]) {
        let [y0, y1, y2, y3, y4, y5] = y;
        for k in 0..L {
            let (quarter, half) = (0.25 * a[k], 0.5 * b[k]);
            y0[k] = quarter;
            y1[k] = -(a[k] + b[k] + c[k]) * SIXTH;
            y2[k] = -(a[k] - b[k] + c[k]) * SIXTH;
            y3[k] = (quarter + half + c[k]) * SIXTH;
            y4[k] = (quarter - half + c[k]) * SIXTH;
            y5[k] = c[k];
        }
    }
    // G g: column kx of g becomes column kx of the 6×3 product (`columns[kx][i]`).
    let mut columns = [[[0f64; L]; IN]; 3];
    for (kx, column) in columns.iter_mut().enumerate() {
        combine(&g[kx], &g[3 + kx], &g[6 + kx], column);
    }
    // (G g) Gᵀ: row i of the product combines row i of the three columns.
    for (i, row) in u.iter_mut().enumerate() {
        combine(&columns[0][i], &columns[1][i], &columns[2][i], row);
    }
}

/// `k` consecutive slices of `len` values from the start of `s`.
#[inline(always)]
fn split<const K: usize>(s: &mut [f32], len: usize) -> [&mut [f32]; K] {
    let mut parts = s.chunks_exact_mut(len);
    std::array::from_fn(|_| parts.next().expect("split: slice too short"))
}

/// The six combinations `Bᵀ x` of one column of the 6×6 block, channel by channel:
/// `Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0; 0 −2 −1 2 1 0; 0 2 −1 −2 1 0;
/// 0 4 0 −5 0 1]`.
#[inline(always)]
fn b_transpose(x: [&[f32]; IN], y: [&mut [f32]; IN]) {
    let c = y[0].len();
    let [x0, x1, x2, x3, x4, x5] = x.map(|x| &x[..c]);
    let [y0, y1, y2, y3, y4, y5] = y.map(|y| &mut y[..c]);
    for ch in 0..c {
        let (a, b) = (x4[ch] - 4.0 * x2[ch], x3[ch] - 4.0 * x1[ch]);
        let (p, q) = (x4[ch] - x2[ch], 2.0 * (x3[ch] - x1[ch]));
        y0[ch] = 4.0 * x0[ch] - 5.0 * x2[ch] + x4[ch];
        y1[ch] = a + b;
        y2[ch] = a - b;
        y3[ch] = p + q;
        y4[ch] = p - q;
        y5[ch] = 4.0 * x1[ch] - 5.0 * x3[ch] + x5[ch];
    }
}

/// The four combinations `Aᵀ x` of one column of the 6×6 block, channel by channel:
/// `Aᵀ = [1 1 1 1 1 0; 0 1 −1 2 −2 0; 0 1 1 4 4 0; 0 1 −1 8 −8 1]`.
#[inline(always)]
fn a_transpose(x: [&[f32]; IN], y: [&mut [f32]; OUT]) {
    let c = y[0].len();
    let [x0, x1, x2, x3, x4, x5] = x.map(|x| &x[..c]);
    let [y0, y1, y2, y3] = y.map(|y| &mut y[..c]);
    for ch in 0..c {
        let (s12, d12) = (x1[ch] + x2[ch], x1[ch] - x2[ch]);
        let (s34, d34) = (x3[ch] + x4[ch], x3[ch] - x4[ch]);
        y0[ch] = x0[ch] + s12 + s34;
        y1[ch] = d12 + 2.0 * d34;
        y2[ch] = s12 + 4.0 * s34;
        y3[ch] = d12 + 8.0 * d34 + x5[ch];
    }
}

/// Transforms the input blocks of one row of tiles: `padded` is the image, channels last,
/// padded by one pixel; `ty` the tile row; `dst` (`[tiles, 36, c]`) receives `V = Bᵀ d B` of
/// each tile, element `i·6 + j` for row `i`, column `j`.
fn transform_tile_row(padded: &[f32], c: usize, wp: usize, ty: usize, dst: &mut [f32]) {
    let mut rows = vec![0f32; BLOCK * c];
    crate::kernels::simd::wide(|| {
        for (tx, out) in dst.chunks_exact_mut(BLOCK * c).enumerate() {
            // Bᵀ d: combine the block's six input rows, column by column (six neighbouring
            // pixels of a row are 6·c contiguous values).
            let base = |r: usize| ((OUT * ty + r) * wp + OUT * tx) * c;
            for j in 0..IN {
                let x = std::array::from_fn(|r| &padded[base(r) + j * c..base(r) + (j + 1) * c]);
                b_transpose(x, split::<IN>(&mut rows[j * IN * c..(j + 1) * IN * c], c));
            }
            // (Bᵀ d) B: combine the columns of each row; `rows` holds column j's row i at
            // (j·6 + i)·c.
            for (i, out) in out.chunks_exact_mut(IN * c).enumerate() {
                let x = std::array::from_fn(|j| &rows[(j * IN + i) * c..(j * IN + i + 1) * c]);
                b_transpose(x, split::<IN>(out, c));
            }
        }
    });
}

/// `V = Bᵀ d B` of the tiles of the tile rows from `ty0` on that `v` (`[tiles, 36, c]`) holds,
/// from the padded channels-last image `padded`; one tile row per job.
fn transform_band(g: &Geometry, padded: &[f32], ty0: usize, v: &mut [f32]) {
    let (c, tw) = (g.channels, g.w / OUT);
    v.par_chunks_exact_mut(tw * BLOCK * c)
        .enumerate()
        .for_each(|(r, dst)| transform_tile_row(padded, c, g.w + 2, ty0 + r, dst));
}

/// Transforms the summed products of one row of tiles back: `m` is `[36, tiles, co]` for the
/// whole band, `t0` the band's first tile of this row; `dst` receives the row's four output
/// rows (`[4, ow, co]`, pixel-major).
fn untransform_tile_row(m: &[f32], tiles: usize, co: usize, t0: usize, dst: &mut [f32]) {
    let ow = dst.len() / (OUT * co);
    let mut rows = vec![0f32; IN * OUT * co];
    crate::kernels::simd::wide(|| {
        for tx in 0..ow / OUT {
            let t = t0 + tx;
            let element = |e: usize| &m[(e * tiles + t) * co..(e * tiles + t + 1) * co];
            // Aᵀ M: combine the six rows of each column; `rows` holds column j's row i at
            // (j·4 + i)·co.
            for j in 0..IN {
                let y = split::<OUT>(&mut rows[j * OUT * co..(j + 1) * OUT * co], co);
                a_transpose(std::array::from_fn(|i| element(i * IN + j)), y);
            }
            // (Aᵀ M) A: combine the columns of each row into the row's four output pixels.
            for i in 0..OUT {
                let x = std::array::from_fn(|j| &rows[(j * OUT + i) * co..(j * OUT + i + 1) * co]);
                let start = (i * ow + OUT * tx) * co;
                a_transpose(x, split::<OUT>(&mut dst[start..start + OUT * co], co));
            }
        }
    });
}

/// Tile rows per band for `c` → `co` channels: as many as keep the band's transformed inputs
/// and products near `band_bytes` (at least one), in bands of equal size (a short last band
/// would repeat the products' fixed costs, packing the `[c, co]` filters, for a few tiles).
fn band_tile_rows(g: &Geometry, co: usize, band_bytes: usize) -> usize {
    let (th, tw) = (g.h / OUT, g.w / OUT);
    let most_rows = (band_bytes / (BLOCK * tw * (g.channels + co) * 4).max(1)).clamp(1, th);
    th.div_ceil(th.div_ceil(most_rows))
}

/// The convolution of `n` images `xs` in `layout` (NCHW `[n, c, h, w]` or channels last) with
/// the filters whose [`transformed_filters`] are `u`, plus `bias[o]` when given, for a geometry
/// where [`applies`] holds. Returns the output in the same layout as a flat vector; either
/// layout gives the same bits.
pub(super) fn conv2d_forward(
    g: &Geometry,
    xs: &[f32],
    u: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    layout: ImageLayout,
) -> candle_core::Result<Vec<f32>> {
    conv2d_forward_banded(g, xs, u, co, bias, BAND_BYTES, layout)
}

/// [`conv2d_forward`] with bands of tile rows whose transformed inputs and products take about
/// `band_bytes` (at least one tile row per band), input and output in `layout`.
pub(super) fn conv2d_forward_banded(
    g: &Geometry,
    xs: &[f32],
    u: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    band_bytes: usize,
    layout: ImageLayout,
) -> candle_core::Result<Vec<f32>> {
    forward(g, xs, Filters::F32(u), co, bias, band_bytes, layout)
}

/// [`transformed_filters`] (`[c, 36, co]`) rounded to bf16 and packed for the bf16 products:
/// one `[c, co]` operand per element of the 6×6 block.
pub(super) fn pack_filters_bf16(u: &[f32], c: usize, co: usize) -> Vec<PackedB> {
    (0..BLOCK)
        .into_par_iter()
        .map(|e| PackedB::new(c, co, |ch, o| u[(ch * BLOCK + e) * co + o]))
        .collect()
}

/// [`conv2d_forward`] with bf16 products ([`crate::kernels::bf16`]): the transformed inputs
/// `V` are rounded to bf16 before each of the 36 products, `u` holds the
/// [`pack_filters_bf16`] of the transformed filters; the transforms, sums and bias stay f32.
/// Needs AVX512-BF16.
pub(super) fn conv2d_forward_bf16(
    g: &Geometry,
    xs: &[f32],
    u: &[PackedB],
    co: usize,
    bias: Option<&[f32]>,
    layout: ImageLayout,
) -> candle_core::Result<Vec<f32>> {
    forward(g, xs, Filters::Bf16(u), co, bias, BAND_BYTES, layout)
}

/// The transformed filters of [`forward`], in the arithmetic of its products.
#[derive(Clone, Copy)]
enum Filters<'a> {
    /// [`transformed_filters`]: f32 products through gemm.
    F32(&'a [f32]),
    /// [`pack_filters_bf16`]: bf16 products.
    Bf16(&'a [PackedB]),
}

/// The forward of [`conv2d_forward_banded`] and [`conv2d_forward_bf16`].
fn forward(
    g: &Geometry,
    xs: &[f32],
    filters: Filters,
    co: usize,
    bias: Option<&[f32]>,
    band_bytes: usize,
    layout: ImageLayout,
) -> candle_core::Result<Vec<f32>> {
    if !applies(g) {
        candle_core::bail!(
            "Winograd convolution: needs a 3×3 kernel, stride 1, padding 1 and an input whose \
             sides are multiples of {OUT}, got {g:?}"
        );
    }
    let (c, h, w) = (g.channels, g.h, g.w);
    let image_len = c * h * w;
    if image_len == 0 || xs.len() % image_len != 0 {
        candle_core::bail!(
            "Winograd convolution: {} input values are not whole {c}×{h}×{w} images",
            xs.len()
        );
    }
    match filters {
        Filters::F32(u) if u.len() != c * BLOCK * co => candle_core::bail!(
            "Winograd convolution: {} transformed filter values for {c} → {co} channels",
            u.len()
        ),
        Filters::Bf16(u) if u.len() != BLOCK || u.iter().any(|u| (u.k(), u.n()) != (c, co)) => {
            candle_core::bail!(
                "Winograd convolution: bf16 transformed filters that do not fit {c} → {co} \
                 channels"
            )
        }
        Filters::Bf16(_) if !bf16::available() => {
            candle_core::bail!("bf16 convolutions need a CPU with AVX512-BF16")
        }
        _ => {}
    }
    if let Some(b) = bias {
        check_bias(b, co)?;
    }
    let n = xs.len() / image_len;
    let (th, tw) = (h / OUT, w / OUT);
    let band_tile_rows = band_tile_rows(g, co, band_bytes);
    let band_tiles = band_tile_rows * tw;
    let padded_len = (h + 2) * (w + 2) * c;
    let v_len = band_tiles * BLOCK * c;
    let m_len = BLOCK * band_tiles * co;
    let product_len = OUT * OUT * band_tiles * co;
    let mut out = vec![0f32; n * co * h * w];
    with_scratch(padded_len + v_len + m_len + product_len, |scratch| {
        let (padded, rest) = scratch.split_at_mut(padded_len);
        let (v, rest) = rest.split_at_mut(v_len);
        let (m, product) = rest.split_at_mut(m_len);
        for (image, dst) in xs
            .chunks_exact(image_len)
            .zip(out.chunks_exact_mut(co * h * w))
        {
            pad_image(g, layout, image, padded);
            for ty0 in (0..th).step_by(band_tile_rows) {
                let rows = band_tile_rows.min(th - ty0);
                let tiles = rows * tw;
                let v = &mut v[..tiles * BLOCK * c];
                transform_band(g, padded, ty0, v);
                let v = &*v;
                // One product per block element, `[tiles, c] · [c, co]`, the 36 spread over
                // the threads (each is too small to be worth splitting).
                let m = &mut m[..BLOCK * tiles * co];
                match filters {
                    Filters::F32(u) => {
                        m.par_chunks_exact_mut(tiles * co)
                            .enumerate()
                            .for_each(|(e, dst)| {
                                matmul(
                                    dst,
                                    View::strided(&v[e * c..], tiles, c, BLOCK * c, 1),
                                    View::strided(&u[e * co..], c, co, BLOCK * co, 1),
                                    false,
                                    Parallelism::None,
                                )
                            })
                    }
                    // The same products with V_e rounded to bf16 rows (even length) first.
                    Filters::Bf16(u) => {
                        m.par_chunks_exact_mut(tiles * co)
                            .enumerate()
                            .for_each(|(e, dst)| {
                                let width = 2 * bf16::pairs(c);
                                with_bf16_scratch(tiles * width, |a| {
                                    for (t, row) in a.chunks_exact_mut(width).enumerate() {
                                        let start = (t * BLOCK + e) * c;
                                        bf16::convert(&v[start..start + c], &mut row[..c]);
                                        row[c..].fill(0);
                                    }
                                    bf16::matmul(dst, co, a, width, tiles, &u[e], false)
                                })
                            })
                    }
                }
                let m = &*m;
                let untransform = |out: &mut [f32]| {
                    out.par_chunks_exact_mut(OUT * w * co)
                        .enumerate()
                        .for_each(|(r, dst)| untransform_tile_row(m, tiles, co, r * tw, dst))
                };
                let first = OUT * ty0 * w;
                match layout {
                    ImageLayout::Planes => {
                        let product = &mut product[..OUT * OUT * tiles * co];
                        untransform(product);
                        scatter_band(g, product, co, bias, first, dst);
                    }
                    // The band's output rows, pixel-major, are the output's pixels `first..`.
                    ImageLayout::Pixels => {
                        let band = &mut dst[first * co..(first + OUT * OUT * tiles) * co];
                        untransform(band);
                        add_bias_pixels(band, bias);
                    }
                }
            }
        }
    });
    Ok(out)
}

/// The six combinations `A y` of one column (or row) of a 4×4 block of output gradients, channel
/// by channel: the adjoint of [`a_transpose`] (`A` is `Aᵀ` above, transposed).
#[inline(always)]
fn a_adjoint(x: [&[f32]; OUT], y: [&mut [f32]; IN]) {
    let c = y[0].len();
    let [x0, x1, x2, x3] = x.map(|x| &x[..c]);
    let [y0, y1, y2, y3, y4, y5] = y.map(|y| &mut y[..c]);
    for ch in 0..c {
        let (s02, s13) = (x0[ch] + x2[ch], x1[ch] + x3[ch]);
        let (f02, f13) = (x0[ch] + 4.0 * x2[ch], 2.0 * x1[ch] + 8.0 * x3[ch]);
        y0[ch] = x0[ch];
        y1[ch] = s02 + s13;
        y2[ch] = s02 - s13;
        y3[ch] = f02 + f13;
        y4[ch] = f02 - f13;
        y5[ch] = x3[ch];
    }
}

/// Transforms the output-gradient blocks of one row of tiles: `gy` is the image's output
/// gradient, channels last (`[h, w, co]`); `dst` (`[tiles, 36, co]`) receives `A ∂Y Aᵀ` of
/// each tile's 4×4 block, element `i·6 + j` for row `i`, column `j`.
fn gradient_tile_row(gy: &[f32], co: usize, w: usize, ty: usize, dst: &mut [f32]) {
    let mut columns = vec![0f32; BLOCK * co];
    crate::kernels::simd::wide(|| {
        for (tx, out) in dst.chunks_exact_mut(BLOCK * co).enumerate() {
            // A ∂Y: combine the four rows of each column; `columns` holds column b's row i at
            // (b·6 + i)·co.
            for b in 0..OUT {
                let x = std::array::from_fn(|a| {
                    let start = ((OUT * ty + a) * w + OUT * tx + b) * co;
                    &gy[start..start + co]
                });
                a_adjoint(
                    x,
                    split::<IN>(&mut columns[b * IN * co..(b + 1) * IN * co], co),
                );
            }
            // (A ∂Y) Aᵀ: combine the four columns of each row.
            for (i, out) in out.chunks_exact_mut(IN * co).enumerate() {
                let x = std::array::from_fn(|b| &columns[(b * IN + i) * co..(b * IN + i + 1) * co]);
                a_adjoint(x, split::<IN>(out, co));
            }
        }
    });
}

/// The gradient of the weight of the convolution of `n` NCHW images `xs` (`[n, c, h, w]`) for
/// the output gradient `gy` (`[n, co, h, w]`), as the tap-major weight matrix (`[co, 9·c]`,
/// column `tap·c + channel`), by Winograd's algorithm, for a geometry where [`applies`] holds.
///
/// `∂U = Σ_tiles ∂M ⊙ V` per element of the 6×6 block, with `V = Bᵀ d B` the forward's
/// transformed input and `∂M = A ∂Y Aᵀ` the transformed output gradient: 36 products
/// `[c, tiles] · [tiles, co]` per band, summed over the bands and images; then `∂g = Gᵀ ∂U G`
/// in f64, rounded once. 4× fewer multiplications than the patch-matrix product; the rounding
/// is larger (the test below bounds it).
pub(super) fn weight_gradient(
    g: &Geometry,
    xs: &[f32],
    gy: &[f32],
    co: usize,
) -> candle_core::Result<Vec<f32>> {
    weight_gradient_banded(g, xs, gy, co, BAND_BYTES)
}

/// [`weight_gradient`] with bands of tile rows of about `band_bytes`.
fn weight_gradient_banded(
    g: &Geometry,
    xs: &[f32],
    gy: &[f32],
    co: usize,
    band_bytes: usize,
) -> candle_core::Result<Vec<f32>> {
    if !applies(g) {
        candle_core::bail!("Winograd weight gradient: not a geometry it applies to, {g:?}");
    }
    let (c, h, w) = (g.channels, g.h, g.w);
    let image_len = c * h * w;
    if image_len == 0 || co == 0 || xs.len() % image_len != 0 {
        candle_core::bail!(
            "Winograd weight gradient: {} input values are not whole {c}×{h}×{w} images",
            xs.len()
        );
    }
    let n = xs.len() / image_len;
    if gy.len() != n * co * h * w {
        candle_core::bail!(
            "Winograd weight gradient: {} output-gradient values for {n}×{co}×{h}×{w}",
            gy.len()
        );
    }
    let (th, tw) = (h / OUT, w / OUT);
    let band_tile_rows = band_tile_rows(g, co, band_bytes);
    let band_tiles = band_tile_rows * tw;
    let padded_len = (h + 2) * (w + 2) * c;
    let gy_len = h * w * co;
    let v_len = band_tiles * BLOCK * c;
    let dm_len = band_tiles * BLOCK * co;
    // ∂U, `[36, c, co]`.
    let mut du = vec![0f32; BLOCK * c * co];
    with_scratch(padded_len + gy_len + v_len + dm_len, |scratch| {
        let (padded, rest) = scratch.split_at_mut(padded_len);
        let (gy_pixels, rest) = rest.split_at_mut(gy_len);
        let (v, dm) = rest.split_at_mut(v_len);
        let mut first = true;
        for (image, gy_image) in xs.chunks_exact(image_len).zip(gy.chunks_exact(co * h * w)) {
            pad_image(g, ImageLayout::Planes, image, padded);
            image_to_pixels(gy_image, (co, h, w), gy_pixels);
            let gy_pixels = &*gy_pixels;
            for ty0 in (0..th).step_by(band_tile_rows) {
                let rows = band_tile_rows.min(th - ty0);
                let tiles = rows * tw;
                let v = &mut v[..tiles * BLOCK * c];
                transform_band(g, padded, ty0, v);
                let dm = &mut dm[..tiles * BLOCK * co];
                dm.par_chunks_exact_mut(tw * BLOCK * co)
                    .enumerate()
                    .for_each(|(r, dst)| gradient_tile_row(gy_pixels, co, w, ty0 + r, dst));
                let (v, dm) = (&*v, &*dm);
                // ∂U_e [c, co] (+)= V_eᵀ [c, tiles] · ∂M_e [tiles, co], the 36 over the threads.
                du.par_chunks_exact_mut(c * co)
                    .enumerate()
                    .for_each(|(e, dst)| {
                        matmul(
                            dst,
                            View::strided(&v[e * c..], c, tiles, 1, BLOCK * c),
                            View::strided(&dm[e * co..], tiles, co, BLOCK * co, 1),
                            !first,
                            Parallelism::None,
                        )
                    });
                first = false;
            }
        }
    });
    Ok(filter_gradient(&du, c, co))
}

/// `∂g = Gᵀ ∂U G` of the summed products `du` (`[36, c, co]`), in f64, as the tap-major weight
/// matrix gradient `[co, 9·c]`.
fn filter_gradient(du: &[f32], c: usize, co: usize) -> Vec<f32> {
    const SIXTH: f64 = 1.0 / 6.0;
    // Gᵀ z of six values: the adjoint of the combination in `filter_transform`.
    #[inline(always)]
    fn combine(z: [f64; IN]) -> [f64; 3] {
        let [z0, z1, z2, z3, z4, z5] = z;
        [
            0.25 * z0 - (z1 + z2) * SIXTH + (0.25 * (z3 + z4)) * SIXTH,
            (z2 - z1) * SIXTH + (0.5 * (z3 - z4)) * SIXTH,
            (z3 + z4 - z1 - z2) * SIXTH + z5,
        ]
    }
    // `[c, 9, co]` first (one input channel per task, rows of `co` outputs), then transposed.
    let mut by_channel = vec![0f32; c * 9 * co];
    by_channel
        .par_chunks_exact_mut(9 * co)
        .enumerate()
        .for_each(|(ch, taps)| {
            for o in 0..co {
                let u = |i: usize, j: usize| f64::from(du[((i * IN + j) * c + ch) * co + o]);
                // Gᵀ ∂U: the three rows ky of the 3×6 product, column by column.
                let rows: [[f64; IN]; 3] = {
                    let columns: [[f64; 3]; IN] =
                        std::array::from_fn(|j| combine(std::array::from_fn(|i| u(i, j))));
                    std::array::from_fn(|ky| std::array::from_fn(|j| columns[j][ky]))
                };
                // (Gᵀ ∂U) G: the three taps kx of each row.
                for (ky, row) in rows.iter().enumerate() {
                    for (kx, value) in combine(*row).into_iter().enumerate() {
                        taps[(ky * 3 + kx) * co + o] = value as f32;
                    }
                }
            }
        });
    let mut gw = vec![0f32; co * 9 * c];
    gw.par_chunks_exact_mut(9 * c)
        .enumerate()
        .for_each(|(o, row)| {
            for (tap, run) in row.chunks_exact_mut(c).enumerate() {
                for (ch, v) in run.iter_mut().enumerate() {
                    *v = by_channel[(ch * 9 + tap) * co + o];
                }
            }
        });
    gw
}

#[cfg(test)]
mod tests {
    use super::super::channels_last;
    use super::super::tests::{to_pixels, to_planes};
    use super::*;

    /// The tap-major weight matrix (`[co, 9·c]`) of a `[co, c, 3, 3]` weight.
    fn tap_major(weight: &[f32], c: usize, co: usize) -> Vec<f32> {
        let mut wmat = vec![0f32; weight.len()];
        for o in 0..co {
            for ch in 0..c {
                for tap in 0..9 {
                    wmat[o * 9 * c + tap * c + ch] = weight[(o * c + ch) * 9 + tap];
                }
            }
        }
        wmat
    }

    /// Deterministic values in about [-1, 1].
    fn ramp(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let x = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(97))
                    >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn winograd_matches_the_direct_convolution() {
        // (channels, h, w, co, batch, band bytes): several channel counts around the lane width,
        // the smallest image, several bands per image and one band for everything.
        for (c, h, w, co, n, band) in [
            (3, 8, 12, 5, 2, 1 << 20),
            (8, 16, 16, 8, 1, 1),
            (20, 12, 8, 17, 2, 4096),
            (16, 4, 4, 16, 1, 1 << 20),
            (1, 4, 4, 1, 3, 1),
        ] {
            let g = Geometry::new(true, c, (h, w), (3, 3), 1, 1).unwrap();
            assert!(applies(&g));
            let xs = ramp(n * c * h * w, 1);
            let weight = ramp(co * 9 * c, 2);
            let bias = ramp(co, 3);
            let wmat = tap_major(&weight, c, co);
            let u = transformed_filters(&weight, c, co);
            let direct =
                channels_last::conv2d_forward(&g, &xs, &wmat, co, Some(&bias), ImageLayout::Planes)
                    .unwrap();
            let fast =
                conv2d_forward_banded(&g, &xs, &u, co, Some(&bias), band, ImageLayout::Planes)
                    .unwrap();
            assert_eq!(direct.len(), fast.len());
            // Each output sums 9·c products of magnitude ≤ 1: bound the error relative to that.
            let scale = (9 * c) as f32;
            let worst = direct
                .iter()
                .zip(&fast)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 4.0 * f32::EPSILON * scale,
                "c {c}, {h}×{w}, co {co}: max difference {worst}"
            );
            let unbiased =
                conv2d_forward_banded(&g, &xs, &u, co, None, band, ImageLayout::Planes).unwrap();
            for (i, (a, b)) in fast.iter().zip(&unbiased).enumerate() {
                let o = (i / (h * w)) % co;
                assert_eq!(*a, b + bias[o], "bias of channel {o}");
            }
            // Channels-last images in and out: the same arithmetic, the same bits.
            let pixels = to_pixels(&xs, n, c);
            let fast_pixels =
                conv2d_forward_banded(&g, &pixels, &u, co, Some(&bias), band, ImageLayout::Pixels)
                    .unwrap();
            assert_eq!(
                to_planes(&fast_pixels, n, co),
                fast,
                "c {c}, {h}×{w}, co {co}"
            );
        }
    }

    #[test]
    fn winograd_rounds_within_a_few_times_the_direct_convolution() {
        // Both against the convolution summed in f64, on values in [-1, 1] and weights in
        // [-0.05, 0.05] (the scale of trained layers).
        let (c, h, w, co) = (32, 16, 12, 16);
        let g = Geometry::new(true, c, (h, w), (3, 3), 1, 1).unwrap();
        let xs = ramp(c * h * w, 4);
        let weight: Vec<f32> = ramp(co * 9 * c, 5).iter().map(|v| v * 0.05).collect();
        let wmat = tap_major(&weight, c, co);
        let direct =
            channels_last::conv2d_forward(&g, &xs, &wmat, co, None, ImageLayout::Planes).unwrap();
        let u = transformed_filters(&weight, c, co);
        let fast = conv2d_forward(&g, &xs, &u, co, None, ImageLayout::Planes).unwrap();
        let (mut worst_direct, mut worst_fast, mut largest) = (0f64, 0f64, 0f64);
        for o in 0..co {
            for y in 0..h {
                for x in 0..w {
                    let mut exact = 0f64;
                    for (tap, ch) in (0..9).flat_map(|tap| (0..c).map(move |ch| (tap, ch))) {
                        let (iy, ix) =
                            ((y + tap / 3).wrapping_sub(1), (x + tap % 3).wrapping_sub(1));
                        if iy < h && ix < w {
                            exact += f64::from(xs[(ch * h + iy) * w + ix])
                                * f64::from(wmat[o * 9 * c + tap * c + ch]);
                        }
                    }
                    let i = (o * h + y) * w + x;
                    largest = largest.max(exact.abs());
                    worst_direct = worst_direct.max((f64::from(direct[i]) - exact).abs());
                    worst_fast = worst_fast.max((f64::from(fast[i]) - exact).abs());
                }
            }
        }
        eprintln!(
            "largest output {largest:e}, error: Winograd {worst_fast:e}, direct {worst_direct:e}"
        );
        assert!(worst_direct > 0.0);
        // F(4×4, 3×3) rounds several times worse than the direct sum (see the module's notes).
        assert!(
            worst_fast <= 8.0 * worst_direct,
            "Winograd {worst_fast:e} against direct {worst_direct:e}"
        );
        assert!(
            worst_fast <= 1e-5 * largest,
            "Winograd {worst_fast:e}, outputs up to {largest:e}"
        );
    }

    #[test]
    fn weight_gradient_matches_the_f64_sum_closely() {
        // Two images, bands of one tile row and of everything; c and co around the lane width.
        for (n, c, co, h, w, band) in [
            (2, 20, 17, 16, 12, 1),
            (1, 32, 16, 8, 8, 1 << 24),
            (2, 32, 32, 64, 64, 1 << 20),
        ] {
            let g = Geometry::new(true, c, (h, w), (3, 3), 1, 1).unwrap();
            let xs = ramp(n * c * h * w, 6);
            let gy: Vec<f32> = ramp(n * co * h * w, 7).iter().map(|v| v * 0.1).collect();
            let wmat = vec![0f32; co * 9 * c];
            let (_, direct) =
                channels_last::conv2d_backward_banded(&g, &xs, &wmat, co, &gy, 1 << 20, false)
                    .unwrap();
            let fast = weight_gradient_banded(&g, &xs, &gy, co, band).unwrap();
            // ∂W[o][tap·c + ch] = Σ_images Σ_pixels gy[o](y, x) · x[ch](y + ky − 1, x + kx − 1).
            let (mut worst_direct, mut worst_fast, mut largest) = (0f64, 0f64, 0f64);
            for o in 0..co {
                for tap in 0..9 {
                    for ch in 0..c {
                        let mut exact = 0f64;
                        for i in 0..n {
                            for y in 0..h {
                                for x in 0..w {
                                    let (iy, ix) = (
                                        (y + tap / 3).wrapping_sub(1),
                                        (x + tap % 3).wrapping_sub(1),
                                    );
                                    if iy < h && ix < w {
                                        exact += f64::from(gy[((i * co + o) * h + y) * w + x])
                                            * f64::from(xs[((i * c + ch) * h + iy) * w + ix]);
                                    }
                                }
                            }
                        }
                        let k = o * 9 * c + tap * c + ch;
                        largest = largest.max(exact.abs());
                        worst_direct = worst_direct.max((f64::from(direct[k]) - exact).abs());
                        worst_fast = worst_fast.max((f64::from(fast[k]) - exact).abs());
                    }
                }
            }
            eprintln!(
                "weight gradient, largest {largest:e}, error: Winograd {worst_fast:e}, direct \
                 {worst_direct:e}"
            );
            assert!(
                worst_fast <= 2e-6 * largest,
                "Winograd {worst_fast:e} of {largest:e}"
            );
        }
    }

    #[test]
    fn only_stride_one_same_size_three_by_three_convolutions_of_whole_tiles_apply() {
        let geometry =
            |(h, w), k, stride, pad| Geometry::new(true, 4, (h, w), (k, k), stride, pad).unwrap();
        assert!(applies(&geometry((8, 8), 3, 1, 1)));
        assert!(!applies(&geometry((7, 8), 3, 1, 1)));
        assert!(!applies(&geometry((8, 9), 3, 1, 1)));
        assert!(!applies(&geometry((6, 8), 3, 1, 1)));
        assert!(!applies(&geometry((8, 2), 3, 1, 1)));
        assert!(!applies(&geometry((8, 8), 3, 2, 1)));
        assert!(!applies(&geometry((8, 8), 3, 1, 0)));
        assert!(!applies(&geometry((8, 8), 4, 1, 1)));
        let g = geometry((8, 8), 3, 1, 1);
        let err = conv2d_forward(
            &geometry((7, 8), 3, 1, 1),
            &[0.0; 4 * 56],
            &[0.0; 64],
            1,
            None,
            ImageLayout::Planes,
        )
        .unwrap_err();
        assert!(err.to_string().contains("multiples of 4"), "{err}");
        let err =
            conv2d_forward(&g, &[0.0; 10], &[0.0; 64], 1, None, ImageLayout::Planes).unwrap_err();
        assert!(err.to_string().contains("not whole"), "{err}");
        let err =
            conv2d_forward(&g, &[0.0; 256], &[0.0; 36], 1, None, ImageLayout::Planes).unwrap_err();
        assert!(err.to_string().contains("transformed filter"), "{err}");
    }
}
