//! Single-octave Perlin noise exactly as DSR generates it.
//!
//! The workspace lists the `noise` crate, but its Perlin functions hash a fixed permutation table and
//! evaluate continuous coordinates with their own gradient set and scaling. DSR's noise is different in
//! ways that change the mask statistics: one fresh random gradient angle per lattice corner on an
//! (rx+1)×(ry+1) grid, the fade 6t⁵−15t⁴+10t³, a √2 factor, independent resolutions per axis, and (in
//! anomalib) generation on the next power of two followed by a crop. It is written by hand here so that
//! the reference behaviour decides every detail.

use std::f32::consts::{PI, SQRT_2};

use rand::Rng;

use crate::error::AugmentError;

/// How the noise grid relates to the requested size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerlinPadding {
    /// Generate on the next power of two of each side and crop the top-left corner (anomalib).
    NextPowerOfTwo,
    /// Generate on the requested size directly (original code); the resolutions must divide it.
    Exact,
}

fn fade(t: f32) -> f32 {
    t * t * t * (t * (t * 6.0 - 15.0) + 10.0)
}

/// Generates an `height`×`width` row-major Perlin noise field with `res_h` cells along the rows and
/// `res_w` along the columns. Values lie roughly in [−1, 1].
///
/// With [`PerlinPadding::NextPowerOfTwo`] the field is generated on the next power of two of each side and
/// cropped, as anomalib does; with [`PerlinPadding::Exact`] the resolutions must divide the sides.
pub fn perlin_noise<R: Rng + ?Sized>(
    height: usize,
    width: usize,
    res_h: usize,
    res_w: usize,
    padding: PerlinPadding,
    rng: &mut R,
) -> Result<Vec<f32>, AugmentError> {
    let mut out = vec![0.0; height * width];
    perlin_noise_into(height, width, res_h, res_w, padding, rng, &mut out)?;
    Ok(out)
}

/// Like [`perlin_noise`], writing into `out` (length `height * width`).
pub(crate) fn perlin_noise_into<R: Rng + ?Sized>(
    height: usize,
    width: usize,
    res_h: usize,
    res_w: usize,
    padding: PerlinPadding,
    rng: &mut R,
    out: &mut [f32],
) -> Result<(), AugmentError> {
    if height == 0 || width == 0 {
        return Err(AugmentError::InvalidSize { height, width });
    }
    if out.len() != height * width {
        return Err(AugmentError::ShapeMismatch {
            shape: vec![height, width],
            len: out.len(),
        });
    }
    let (ph, pw) = match padding {
        PerlinPadding::NextPowerOfTwo => (height.next_power_of_two(), width.next_power_of_two()),
        PerlinPadding::Exact => (height, width),
    };
    if res_h == 0 || res_w == 0 || ph % res_h != 0 || pw % res_w != 0 {
        return Err(AugmentError::InvalidResolution {
            res_h,
            res_w,
            height: ph,
            width: pw,
        });
    }
    let (dh, dw) = (ph / res_h, pw / res_w);
    let stride = res_w + 1;
    // One random direction per lattice corner, drawn row by row like `rand(rx + 1, ry + 1)`.
    let gradients: Vec<(f32, f32)> = (0..(res_h + 1) * stride)
        .map(|_| {
            let angle = 2.0 * PI * rng.random::<f32>();
            (angle.cos(), angle.sin())
        })
        .collect();
    // The position inside a cell is computed exactly as (index mod d) / d instead of accumulating a
    // floating-point `arange`, which is what the reference computes up to rounding.
    let cols: Vec<(usize, f32, f32)> = (0..width)
        .map(|j| {
            let v = (j % dw) as f32 / dw as f32;
            (j / dw, v, fade(v))
        })
        .collect();
    for (i, row) in out.chunks_exact_mut(width).enumerate() {
        let ci = i / dh;
        let u = (i % dh) as f32 / dh as f32;
        let fu = fade(u);
        let g0 = &gradients[ci * stride..(ci + 1) * stride];
        let g1 = &gradients[(ci + 1) * stride..(ci + 2) * stride];
        for (value, &(cj, v, fv)) in row.iter_mut().zip(&cols) {
            let (g00, g01) = (g0[cj], g0[cj + 1]);
            let (g10, g11) = (g1[cj], g1[cj + 1]);
            let n00 = g00.0 * u + g00.1 * v;
            let n10 = g10.0 * (u - 1.0) + g10.1 * v;
            let n01 = g01.0 * u + g01.1 * (v - 1.0);
            let n11 = g11.0 * (u - 1.0) + g11.1 * (v - 1.0);
            let a = n00 + fu * (n10 - n00);
            let b = n01 + fu * (n11 - n01);
            *value = SQRT_2 * (a + fv * (b - a));
        }
    }
    Ok(())
}
