//! 3×3 convolutions (stride 1, padding 1) by Winograd's minimal filtering F(2×2, 3×3): the
//! forward, and in training also the input gradient (itself such a convolution).
//!
//! Each 2×2 block of output pixels is computed from the 4×4 block of input pixels around it:
//! the input block `d` and the 3×3 filter `g` are transformed into 4×4 blocks `V = Bᵀ d B` and
//! `U = G g Gᵀ`, multiplied element by element and summed over the input channels, and the sum
//! `M` is transformed back by `Y = Aᵀ M A`. The sums over channels are 16 matrix products
//! (one per element of the 4×4 block) of `[tiles, c]` by `[c, co]`: 16 multiply-adds per input
//! channel and output channel for 4 output pixels, against 36 for the direct convolution, so
//! the products do 2.25× less work. The transforms are additions (and halvings of the filter),
//! done here on channels-last copies so that they run along contiguous channel vectors.
//!
//! The rounding differs from the direct convolution's (the transforms add and subtract
//! neighbouring pixels before the products), though not its size: against an f64 sum the error
//! is no larger (unit test below). Measured on the reference fixture's random U-Nets, whose
//! instance norms amplify small differences, every fixture output stays within its tolerance
//! for the layers this is used for ([`MIN_CHANNELS`] and more input channels; with every 3×3
//! layer, the fixture's 6- and 8-channel first layers included, the anomaly-detection softmax
//! missed its 1e-5 by 1.20e-5). F(4×4, 3×3) (4× less work) rounds about 2.5× worse (the
//! fixture's detection U-Net in PyTorch float32: 1.10e-5 against 4.5e-6), which is why the
//! smaller tile is used. Weight gradients stay direct products (`channels_last`).

use gemm::Parallelism;
use rayon::prelude::*;

use super::channels_last::{matmul, scatter_band, to_padded_channels_last, with_scratch, View};
use super::{check_bias, Geometry};

/// Elements of a transformed 4×4 block.
const BLOCK: usize = 16;

/// The target size (in bytes) of the transformed inputs and products of one band of tile rows.
const BAND_BYTES: usize = 8 << 20;

/// Input channels below which the direct convolution is faster: the transforms cost per input
/// and output value, the products' saving grows with the channels (measured once, two cores,
/// 256×256, 64 outputs: 8 → 64 channels 9.1 ms direct against 12.9 ms, 16 → 64 13.6 against 15.8, 32 → 64
/// 22.7 against 19.2; 64 → 64 42.5 against 31.8; 256 → 256 at 64×64 30.0 against 16.0).
const MIN_CHANNELS: usize = 32;

/// Whether a convolution of geometry `g` is computed by Winograd's algorithm when it may be:
/// [`applies`], with at least [`MIN_CHANNELS`] input channels. The one rule for every entry point
/// (untracked, tracked, the input gradient, the recomputing operator), so that each computes a
/// layer the same way.
pub(super) fn pays_off(g: &Geometry) -> bool {
    applies(g) && g.channels >= MIN_CHANNELS
}

/// Whether [`conv2d_forward`] can compute the convolution of geometry `g`: a 3×3 kernel, stride
/// 1, padding 1 (output size = input size), even height and width, tap-major weight columns.
pub(super) fn applies(g: &Geometry) -> bool {
    g.tap_major
        && (g.kh, g.kw, g.stride, g.pad) == (3, 3, 1, 1)
        && g.h >= 2
        && g.w >= 2
        && g.h % 2 == 0
        && g.w % 2 == 0
}

/// The transformed filters `U = G g Gᵀ` of a weight in PyTorch's layout (`[co, c, 3, 3]`),
/// laid out `[c, 16, co]` as [`conv2d_forward`] takes them; computed in f64 and rounded once.
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
/// input channel `ch` to output `o` is `tap_value(o, ch, tap)`, laid out `[c, 16, co]`.
fn transformed_filters_with(
    c: usize,
    co: usize,
    tap_value: impl Fn(usize, usize, usize) -> f32 + Sync,
) -> Vec<f32> {
    // Blocks of CHUNK channels: the filters of one output read next to each other (in
    // PyTorch's layout, 9·CHUNK contiguous values), and the writes of one output (16 per
    // filter, `co` apart) stay within a few hundred cache lines that the next outputs write
    // next to.
    const CHUNK: usize = 16;
    let mut u = vec![0f32; c * BLOCK * co];
    u.par_chunks_mut(CHUNK * BLOCK * co)
        .enumerate()
        .for_each(|(chunk, block)| {
            let channels = chunk * CHUNK..(chunk * CHUNK + CHUNK).min(c);
            for o in 0..co {
                for ch in channels.clone() {
                    let g: [f64; 9] = std::array::from_fn(|tap| f64::from(tap_value(o, ch, tap)));
                    let dst = (ch - chunk * CHUNK) * BLOCK * co + o;
                    for (e, v) in filter_transform(&g).into_iter().enumerate() {
                        block[dst + e * co] = v as f32;
                    }
                }
            }
        });
    u
}

/// `G g Gᵀ` of one 3×3 filter `g` (row-major), `G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]`; the 16
/// elements row by row.
fn filter_transform(g: &[f64; 9]) -> [f64; BLOCK] {
    let combine = |a: f64, b: f64, c: f64| [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c];
    // G g: column kx of g becomes column kx of the 4×3 product.
    let columns: [[f64; 4]; 3] = std::array::from_fn(|kx| combine(g[kx], g[3 + kx], g[6 + kx]));
    let mut u = [0f64; BLOCK];
    for i in 0..4 {
        let row = combine(columns[0][i], columns[1][i], columns[2][i]);
        u[i * 4..i * 4 + 4].copy_from_slice(&row);
    }
    u
}

/// `k` consecutive slices of `len` values from the start of `s`.
#[inline(always)]
fn split<const K: usize>(s: &mut [f32], len: usize) -> [&mut [f32]; K] {
    let mut parts = s.chunks_exact_mut(len);
    std::array::from_fn(|_| parts.next().expect("split: slice too short"))
}

/// The four combinations `Bᵀ x` of one column of the 4×4 block, channel by channel:
/// `Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]`.
#[inline(always)]
fn b_transpose(x: [&[f32]; 4], y: [&mut [f32]; 4]) {
    let c = y[0].len();
    let [x0, x1, x2, x3] = x.map(|x| &x[..c]);
    let [y0, y1, y2, y3] = y;
    let (y1, y2, y3) = (&mut y1[..c], &mut y2[..c], &mut y3[..c]);
    for ch in 0..c {
        y0[ch] = x0[ch] - x2[ch];
        y1[ch] = x1[ch] + x2[ch];
        y2[ch] = x2[ch] - x1[ch];
        y3[ch] = x1[ch] - x3[ch];
    }
}

/// The two combinations `Aᵀ x` of one column of the 4×4 block, channel by channel:
/// `Aᵀ = [1 1 1 0; 0 1 −1 −1]`.
#[inline(always)]
fn a_transpose(x: [&[f32]; 4], y0: &mut [f32], y1: &mut [f32]) {
    let c = y0.len();
    let [x0, x1, x2, x3] = x.map(|x| &x[..c]);
    let y1 = &mut y1[..c];
    for ch in 0..c {
        y0[ch] = x0[ch] + x1[ch] + x2[ch];
        y1[ch] = x1[ch] - x2[ch] - x3[ch];
    }
}

/// Transforms the input blocks of one row of tiles: `padded` is the image, channels last,
/// padded by one pixel; `ty` the tile row; `dst` (`[tiles, 16, c]`) receives `V = Bᵀ d B` of
/// each tile, element `i·4 + j` for row `i`, column `j`.
fn transform_tile_row(padded: &[f32], c: usize, wp: usize, ty: usize, dst: &mut [f32]) {
    let mut rows = vec![0f32; BLOCK * c];
    crate::simd::wide(|| {
        for (tx, out) in dst.chunks_exact_mut(BLOCK * c).enumerate() {
            // Bᵀ d: combine the block's four input rows, column by column (four neighbouring
            // pixels of a row are 4·c contiguous values).
            let base = |r: usize| ((2 * ty + r) * wp + 2 * tx) * c;
            for j in 0..4 {
                let x = std::array::from_fn(|r| &padded[base(r) + j * c..base(r) + (j + 1) * c]);
                let mut y = split::<4>(&mut rows[j * 4 * c..(j + 1) * 4 * c], c);
                let [y0, y1, y2, y3] = &mut y;
                b_transpose(x, [y0, y1, y2, y3]);
            }
            // (Bᵀ d) B: combine the columns of each row; `rows` holds column j's row i at
            // (j·4 + i)·c.
            let out = split::<BLOCK>(out, c);
            let mut out = out.into_iter();
            for i in 0..4 {
                let x = std::array::from_fn(|j| &rows[(j * 4 + i) * c..(j * 4 + i + 1) * c]);
                let y: [&mut [f32]; 4] = std::array::from_fn(|_| out.next().expect("16 blocks"));
                b_transpose(x, y);
            }
        }
    });
}

/// Transforms the summed products of one row of tiles back: `m` is `[16, tiles, co]` for the
/// whole band, `t0` the band's first tile of this row; `dst` receives the row's two output rows
/// (`[2, ow, co]`, pixel-major).
fn untransform_tile_row(m: &[f32], tiles: usize, co: usize, t0: usize, dst: &mut [f32]) {
    let ow = dst.len() / (2 * co);
    let mut rows = vec![0f32; 8 * co];
    crate::simd::wide(|| {
        for tx in 0..ow / 2 {
            let t = t0 + tx;
            let element = |e: usize| &m[(e * tiles + t) * co..(e * tiles + t + 1) * co];
            // Aᵀ M: combine the four rows of each column; `rows` holds column j's row i at
            // (j·2 + i)·co.
            for j in 0..4 {
                let [y0, y1] = split::<2>(&mut rows[j * 2 * co..(j + 1) * 2 * co], co);
                a_transpose(std::array::from_fn(|i| element(i * 4 + j)), y0, y1);
            }
            // (Aᵀ M) A: combine the columns of each row into the 2×2 output pixels.
            for i in 0..2 {
                let x = std::array::from_fn(|j| &rows[(j * 2 + i) * co..(j * 2 + i + 1) * co]);
                let (left, right) =
                    dst[(i * ow + 2 * tx) * co..(i * ow + 2 * tx + 2) * co].split_at_mut(co);
                a_transpose(x, left, right);
            }
        }
    });
}

/// The convolution of `n` NCHW images `xs` (`[n, c, h, w]`) with the filters whose
/// [`transformed_filters`] are `u`, plus `bias[o]` when given, for a geometry where [`applies`]
/// holds.
/// Returns the NCHW output `[n, co, h, w]` as a flat vector.
pub(super) fn conv2d_forward(
    g: &Geometry,
    xs: &[f32],
    u: &[f32],
    co: usize,
    bias: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    conv2d_forward_banded(g, xs, u, co, bias, BAND_BYTES)
}

/// [`conv2d_forward`] with bands of tile rows whose transformed inputs and products take about
/// `band_bytes` (at least one tile row per band).
pub(super) fn conv2d_forward_banded(
    g: &Geometry,
    xs: &[f32],
    u: &[f32],
    co: usize,
    bias: Option<&[f32]>,
    band_bytes: usize,
) -> candle_core::Result<Vec<f32>> {
    if !applies(g) {
        candle_core::bail!(
            "Winograd convolution: needs a 3×3 kernel, stride 1, padding 1 and an even-sized \
             input, got {g:?}"
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
    if u.len() != c * BLOCK * co {
        candle_core::bail!(
            "Winograd convolution: {} transformed filter values for {c} → {co} channels",
            u.len()
        );
    }
    if let Some(b) = bias {
        check_bias(b, co)?;
    }
    let n = xs.len() / image_len;
    let (th, tw) = (h / 2, w / 2);
    let band_tile_rows = (band_bytes / (BLOCK * tw * (c + co) * 4).max(1)).clamp(1, th);
    let band_tiles = band_tile_rows * tw;
    let padded_len = (h + 2) * (w + 2) * c;
    let v_len = band_tiles * BLOCK * c;
    let m_len = BLOCK * band_tiles * co;
    let product_len = 4 * band_tiles * co;
    let mut out = vec![0f32; n * co * h * w];
    with_scratch(padded_len + v_len + m_len + product_len, |scratch| {
        let (padded, rest) = scratch.split_at_mut(padded_len);
        let (v, rest) = rest.split_at_mut(v_len);
        let (m, product) = rest.split_at_mut(m_len);
        for (image, dst) in xs
            .chunks_exact(image_len)
            .zip(out.chunks_exact_mut(co * h * w))
        {
            to_padded_channels_last(g, image, padded);
            for ty0 in (0..th).step_by(band_tile_rows) {
                let rows = band_tile_rows.min(th - ty0);
                let tiles = rows * tw;
                let v = &mut v[..tiles * BLOCK * c];
                v.par_chunks_exact_mut(tw * BLOCK * c)
                    .enumerate()
                    .for_each(|(r, dst)| transform_tile_row(padded, c, w + 2, ty0 + r, dst));
                let v = &*v;
                // One product per block element, `[tiles, c] · [c, co]`, the 16 spread over
                // the threads (each is too small to be worth splitting).
                let m = &mut m[..BLOCK * tiles * co];
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
                    });
                let m = &*m;
                let product = &mut product[..4 * tiles * co];
                product
                    .par_chunks_exact_mut(2 * w * co)
                    .enumerate()
                    .for_each(|(r, dst)| untransform_tile_row(m, tiles, co, r * tw, dst));
                scatter_band(g, product, co, bias, 2 * ty0 * w, dst);
            }
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::channels_last;
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
            (3, 8, 6, 5, 2, 1 << 20),
            (8, 16, 16, 8, 1, 1),
            (20, 10, 12, 17, 2, 4096),
            (16, 2, 2, 16, 1, 1 << 20),
            (1, 4, 4, 1, 3, 1),
        ] {
            let g = Geometry::new(true, c, (h, w), (3, 3), 1, 1).unwrap();
            assert!(applies(&g));
            let xs = ramp(n * c * h * w, 1);
            let weight = ramp(co * 9 * c, 2);
            let bias = ramp(co, 3);
            let wmat = tap_major(&weight, c, co);
            let u = transformed_filters(&weight, c, co);
            let direct = channels_last::conv2d_forward(&g, &xs, &wmat, co, Some(&bias)).unwrap();
            let fast = conv2d_forward_banded(&g, &xs, &u, co, Some(&bias), band).unwrap();
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
            let unbiased = conv2d_forward_banded(&g, &xs, &u, co, None, band).unwrap();
            for (i, (a, b)) in fast.iter().zip(&unbiased).enumerate() {
                let o = (i / (h * w)) % co;
                assert_eq!(*a, b + bias[o], "bias of channel {o}");
            }
        }
    }

    #[test]
    fn winograd_is_as_accurate_as_the_direct_convolution() {
        // Both against the convolution summed in f64, on values in [-1, 1] and weights in
        // [-0.05, 0.05] (the scale of trained layers).
        let (c, h, w, co) = (32, 16, 12, 16);
        let g = Geometry::new(true, c, (h, w), (3, 3), 1, 1).unwrap();
        let xs = ramp(c * h * w, 4);
        let weight: Vec<f32> = ramp(co * 9 * c, 5).iter().map(|v| v * 0.05).collect();
        let wmat = tap_major(&weight, c, co);
        let direct = channels_last::conv2d_forward(&g, &xs, &wmat, co, None).unwrap();
        let u = transformed_filters(&weight, c, co);
        let fast = conv2d_forward(&g, &xs, &u, co, None).unwrap();
        let (mut worst_direct, mut worst_fast) = (0f64, 0f64);
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
                    worst_direct = worst_direct.max((f64::from(direct[i]) - exact).abs());
                    worst_fast = worst_fast.max((f64::from(fast[i]) - exact).abs());
                }
            }
        }
        assert!(worst_direct > 0.0);
        assert!(
            worst_fast <= 2.0 * worst_direct,
            "Winograd {worst_fast:e} against direct {worst_direct:e}"
        );
    }

    #[test]
    fn only_stride_one_same_size_even_three_by_three_convolutions_apply() {
        let geometry =
            |(h, w), k, stride, pad| Geometry::new(true, 4, (h, w), (k, k), stride, pad).unwrap();
        assert!(applies(&geometry((8, 8), 3, 1, 1)));
        assert!(!applies(&geometry((7, 8), 3, 1, 1)));
        assert!(!applies(&geometry((8, 9), 3, 1, 1)));
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
        )
        .unwrap_err();
        assert!(err.to_string().contains("even-sized"), "{err}");
        let err = conv2d_forward(&g, &[0.0; 10], &[0.0; 64], 1, None).unwrap_err();
        assert!(err.to_string().contains("not whole"), "{err}");
        let err = conv2d_forward(&g, &[0.0; 256], &[0.0; 36], 1, None).unwrap_err();
        assert!(err.to_string().contains("transformed filter"), "{err}");
    }
}
