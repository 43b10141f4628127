//! The ten texture augmenters of anomalib's `PerlinAnomalyGenerator`, with torchvision
//! semantics on float CHW RGB planes.
//!
//! The texture they act on is `0.5 · noise + 0.25`, so values outside [0, 1] occur away from the mask;
//! each operation handles them the way torchvision does (clamping where torchvision clamps), and the
//! smudge generator clamps the final texture into [0, 1].

use rand::Rng;

use crate::warp::{rotation, warp_planes, Interp, Inverse};

/// One of the ten augmenters from which anomalib draws three distinct ones per smudge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnomalibAugmenter {
    /// `ColorJitter(contrast=(0.5, 2.0))`: blend with the mean of the grayscale image.
    Contrast,
    /// `RandomPhotometricDistort` reduced to brightness in [0.8, 1.2]: scale and clamp.
    Brightness,
    /// `RandomAdjustSharpness(2.0, p=1)`: blend with a 3×3 smoothed copy (borders untouched).
    Sharpness,
    /// `ColorJitter(hue=±50/360, saturation=(0.5, 1.5))`, the two adjustments in random order.
    HueSaturation,
    /// `RandomSolarize(threshold, p=1)` with the generator's fixed threshold.
    Solarize,
    /// `RandomPosterize(4, p=1)` on the 8-bit quantised image.
    Posterize,
    /// `RandomInvert(p=1)`: 1 − x.
    Invert,
    /// `AutoAugment()` with the ImageNet policy.
    AutoAugment,
    /// `RandomEqualize(p=1)`: per-channel histogram equalisation on 8-bit values.
    Equalize,
    /// `RandomAffine(degrees=45, bilinear, fill=0)`.
    Affine,
}

/// The ten augmenters in anomalib's order.
pub const ANOMALIB_AUGMENTERS: [AnomalibAugmenter; 10] = [
    AnomalibAugmenter::Contrast,
    AnomalibAugmenter::Brightness,
    AnomalibAugmenter::Sharpness,
    AnomalibAugmenter::HueSaturation,
    AnomalibAugmenter::Solarize,
    AnomalibAugmenter::Posterize,
    AnomalibAugmenter::Invert,
    AnomalibAugmenter::AutoAugment,
    AnomalibAugmenter::Equalize,
    AnomalibAugmenter::Affine,
];

impl AnomalibAugmenter {
    /// Applies the augmenter in place to a 3×`h`×`w` planar RGB buffer.
    ///
    /// `solarize_threshold` is the threshold drawn once per generator (only [`Self::Solarize`] uses it).
    pub fn apply<R: Rng + ?Sized>(
        self,
        img: &mut [f32],
        h: usize,
        w: usize,
        solarize_threshold: f32,
        rng: &mut R,
    ) {
        match self {
            AnomalibAugmenter::Contrast => {
                let f = rng.random_range(0.5f32..=2.0);
                adjust_contrast(img, h, w, f);
            }
            AnomalibAugmenter::Brightness => {
                let f = rng.random_range(0.8f32..=1.2);
                for v in img.iter_mut() {
                    *v = (*v * f).clamp(0.0, 1.0);
                }
            }
            AnomalibAugmenter::Sharpness => adjust_sharpness(img, h, w, 2.0),
            AnomalibAugmenter::HueSaturation => {
                let saturation = rng.random_range(0.5f32..=1.5);
                let hue = rng.random_range(-50.0f32 / 360.0..=50.0 / 360.0);
                if rng.random::<bool>() {
                    adjust_saturation(img, h, w, saturation);
                    adjust_hue(img, h, w, hue);
                } else {
                    adjust_hue(img, h, w, hue);
                    adjust_saturation(img, h, w, saturation);
                }
            }
            AnomalibAugmenter::Solarize => solarize(img, solarize_threshold),
            AnomalibAugmenter::Posterize => posterize(img, 4),
            AnomalibAugmenter::Invert => invert(img),
            AnomalibAugmenter::AutoAugment => auto_augment(img, h, w, rng),
            AnomalibAugmenter::Equalize => equalize(img, h, w),
            AnomalibAugmenter::Affine => {
                let angle = rng.random_range(-45.0f32..=45.0);
                warp(img, h, w, &rotation(h, w, angle), Interp::BilinearTorch);
            }
        }
    }
}

fn warp(img: &mut [f32], h: usize, w: usize, m: &Inverse, interp: Interp) {
    let src = img.to_vec();
    warp_planes(&src, img, h, w, m, interp);
}

/// torchvision's ITU-R 601-2 luma weights.
fn grayscale(img: &[f32], plane: usize) -> Vec<f32> {
    (0..plane)
        .map(|p| 0.2989 * img[p] + 0.587 * img[plane + p] + 0.114 * img[2 * plane + p])
        .collect()
}

fn blend_value(x: f32, other: f32, factor: f32) -> f32 {
    (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)
}

fn adjust_contrast(img: &mut [f32], h: usize, w: usize, factor: f32) {
    let plane = h * w;
    let gray = grayscale(img, plane);
    let mean = gray.iter().map(|&v| f64::from(v)).sum::<f64>() as f32 / plane as f32;
    for v in img.iter_mut() {
        *v = blend_value(*v, mean, factor);
    }
}

fn adjust_saturation(img: &mut [f32], h: usize, w: usize, factor: f32) {
    let plane = h * w;
    let gray = grayscale(img, plane);
    for ch in img.chunks_exact_mut(plane) {
        for (v, &g) in ch.iter_mut().zip(&gray) {
            *v = blend_value(*v, g, factor);
        }
    }
}

fn adjust_sharpness(img: &mut [f32], h: usize, w: usize, factor: f32) {
    if h < 3 || w < 3 {
        return;
    }
    let plane = h * w;
    for ch in img.chunks_exact_mut(plane) {
        let src = ch.to_vec();
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                let mut sum = 0.0;
                for dy in 0..3 {
                    for dx in 0..3 {
                        sum += src[(y + dy - 1) * w + x + dx - 1];
                    }
                }
                // Kernel [[1,1,1],[1,5,1],[1,1,1]] / 13: the centre weighs 5, i.e. 4 more than the rest.
                let blurred = (sum + 4.0 * src[y * w + x]) / 13.0;
                ch[y * w + x] = blend_value(src[y * w + x], blurred, factor);
            }
        }
        // Border pixels blend with themselves, which only clamps them.
        for y in 0..h {
            for x in 0..w {
                if y == 0 || x == 0 || y == h - 1 || x == w - 1 {
                    ch[y * w + x] = ch[y * w + x].clamp(0.0, 1.0);
                }
            }
        }
    }
}

fn adjust_hue(img: &mut [f32], h: usize, w: usize, shift: f32) {
    let plane = h * w;
    for p in 0..plane {
        let r = img[p].clamp(0.0, 1.0);
        let g = img[plane + p].clamp(0.0, 1.0);
        let b = img[2 * plane + p].clamp(0.0, 1.0);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        let s = if max > 0.0 { delta / max } else { 0.0 };
        let mut hue = if delta == 0.0 {
            0.0
        } else if max == r {
            ((g - b) / delta).rem_euclid(6.0) / 6.0
        } else if max == g {
            ((b - r) / delta + 2.0) / 6.0
        } else {
            ((r - g) / delta + 4.0) / 6.0
        };
        hue = (hue + shift).rem_euclid(1.0);
        let (r, g, b) = hsv_to_rgb(hue, s, max);
        img[p] = r;
        img[plane + p] = g;
        img[2 * plane + p] = b;
    }
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match (i as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

fn solarize(img: &mut [f32], threshold: f32) {
    for v in img.iter_mut() {
        if *v >= threshold {
            *v = 1.0 - *v;
        }
    }
}

fn invert(img: &mut [f32]) {
    for v in img.iter_mut() {
        *v = 1.0 - *v;
    }
}

/// torchvision's float → uint8 conversion (`to_dtype(..., scale=True)`): x·(256 − ε), truncated.
fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * (256.0 - 1e-3)) as u8
}

fn posterize(img: &mut [f32], bits: u32) {
    let mask = !(0xFFu8 >> bits);
    for v in img.iter_mut() {
        *v = f32::from(to_u8(*v) & mask) / 255.0;
    }
}

fn equalize(img: &mut [f32], h: usize, w: usize) {
    let plane = h * w;
    for ch in img.chunks_exact_mut(plane) {
        let q: Vec<u8> = ch.iter().map(|&v| to_u8(v)).collect();
        let mut hist = [0usize; 256];
        for &v in &q {
            hist[v as usize] += 1;
        }
        // torchvision: step = (number of pixels outside the last non-empty bin) / 255; a zero step leaves
        // the channel unchanged (apart from the 8-bit quantisation).
        let last = hist.iter().rposition(|&c| c > 0).unwrap_or(0);
        let step = (plane - hist[last]) / 255;
        if step == 0 {
            for (v, &u) in ch.iter_mut().zip(&q) {
                *v = f32::from(u) / 255.0;
            }
            continue;
        }
        let mut lut = [0u8; 256];
        let mut cumulative = 0usize;
        for (i, &count) in hist.iter().enumerate() {
            lut[i] = ((cumulative + step / 2) / step).min(255) as u8;
            cumulative += count;
        }
        for (v, &u) in ch.iter_mut().zip(&q) {
            *v = f32::from(lut[u as usize]) / 255.0;
        }
    }
}

fn autocontrast(img: &mut [f32], h: usize, w: usize) {
    let plane = h * w;
    for ch in img.chunks_exact_mut(plane) {
        let (lo, hi) = ch
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let (lo, scale) = if hi > lo {
            (lo, 1.0 / (hi - lo))
        } else {
            (0.0, 1.0)
        };
        for v in ch.iter_mut() {
            *v = ((*v - lo) * scale).clamp(0.0, 1.0);
        }
    }
}

/// The operations that appear in torchvision's ImageNet AutoAugment policy.
#[derive(Debug, Clone, Copy)]
enum AutoOp {
    Posterize,
    Rotate,
    Solarize,
    AutoContrast,
    Equalize,
    Color,
    Contrast,
    Sharpness,
    ShearX,
    Invert,
}

/// torchvision's `AutoAugmentPolicy.IMAGENET`: 25 sub-policies of two (operation, probability,
/// magnitude bin) steps each.
const IMAGENET_POLICY: [[(AutoOp, f32, usize); 2]; 25] = {
    use AutoOp::*;
    [
        [(Posterize, 0.4, 8), (Rotate, 0.6, 9)],
        [(Solarize, 0.6, 5), (AutoContrast, 0.6, 0)],
        [(Equalize, 0.8, 0), (Equalize, 0.6, 0)],
        [(Posterize, 0.6, 7), (Posterize, 0.6, 6)],
        [(Equalize, 0.4, 0), (Solarize, 0.2, 4)],
        [(Equalize, 0.4, 0), (Rotate, 0.8, 8)],
        [(Solarize, 0.6, 3), (Equalize, 0.6, 0)],
        [(Posterize, 0.8, 5), (Equalize, 1.0, 0)],
        [(Rotate, 0.2, 3), (Solarize, 0.6, 8)],
        [(Equalize, 0.6, 0), (Posterize, 0.4, 6)],
        [(Rotate, 0.8, 8), (Color, 0.4, 0)],
        [(Rotate, 0.4, 9), (Equalize, 0.6, 0)],
        [(Equalize, 0.0, 0), (Equalize, 0.8, 0)],
        [(Invert, 0.6, 0), (Equalize, 1.0, 0)],
        [(Color, 0.6, 4), (Contrast, 1.0, 8)],
        [(Rotate, 0.8, 8), (Color, 1.0, 2)],
        [(Color, 0.8, 8), (Solarize, 0.8, 7)],
        [(Sharpness, 0.4, 7), (Invert, 0.6, 0)],
        [(ShearX, 0.6, 5), (Equalize, 1.0, 0)],
        [(Color, 0.4, 0), (Equalize, 0.6, 0)],
        [(Equalize, 0.4, 0), (Solarize, 0.2, 4)],
        [(Solarize, 0.6, 5), (AutoContrast, 0.6, 0)],
        [(Invert, 0.6, 0), (Equalize, 1.0, 0)],
        [(Color, 0.6, 4), (Contrast, 1.0, 8)],
        [(Equalize, 0.8, 0), (Equalize, 0.6, 0)],
    ]
};

/// Magnitude of bin `bin` out of 10 on a linear scale from `lo` to `hi`.
fn linspace(lo: f32, hi: f32, bin: usize) -> f32 {
    lo + (hi - lo) * bin as f32 / 9.0
}

fn auto_augment<R: Rng + ?Sized>(img: &mut [f32], h: usize, w: usize, rng: &mut R) {
    let policy = IMAGENET_POLICY[rng.random_range(0..IMAGENET_POLICY.len())];
    for (op, p, bin) in policy {
        if rng.random::<f32>() > p {
            continue;
        }
        let sign = if rng.random::<bool>() { -1.0 } else { 1.0 };
        match op {
            AutoOp::Posterize => {
                let bits = 8 - (bin as f32 / 2.25).round() as u32;
                posterize(img, bits);
            }
            AutoOp::Rotate => {
                let angle = sign * linspace(0.0, 30.0, bin);
                warp(img, h, w, &rotation(h, w, angle), Interp::Nearest);
            }
            AutoOp::Solarize => solarize(img, linspace(1.0, 0.0, bin)),
            AutoOp::AutoContrast => autocontrast(img, h, w),
            AutoOp::Equalize => equalize(img, h, w),
            AutoOp::Color => adjust_saturation(img, h, w, 1.0 + sign * linspace(0.0, 0.9, bin)),
            AutoOp::Contrast => adjust_contrast(img, h, w, 1.0 + sign * linspace(0.0, 0.9, bin)),
            AutoOp::Sharpness => adjust_sharpness(img, h, w, 1.0 + sign * linspace(0.0, 0.9, bin)),
            AutoOp::ShearX => {
                // torchvision shears about the top-left corner: source x = x + s·(y + 0.5).
                let s = sign * linspace(0.0, 0.3, bin);
                warp(
                    img,
                    h,
                    w,
                    &[1.0, s, 0.5 * s, 0.0, 1.0, 0.0],
                    Interp::Nearest,
                );
            }
            AutoOp::Invert => invert(img),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn invert_twice_is_identity() {
        let mut img: Vec<f32> = (0..48).map(|v| v as f32 / 47.0).collect();
        let orig = img.clone();
        invert(&mut img);
        invert(&mut img);
        for (a, b) in img.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn equalize_spreads_a_narrow_histogram() {
        // Large enough that torchvision's step (pixels outside the top bin / 255) is not zero.
        let (h, w) = (64, 64);
        let mut img: Vec<f32> = (0..3 * h * w)
            .map(|i| 0.4 + 0.1 * ((i % (h * w)) as f32 / (h * w) as f32))
            .collect();
        equalize(&mut img, h, w);
        let (lo, hi) = img
            .iter()
            .fold((1.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(lo < 0.05 && hi > 0.9, "range {lo}..{hi}");
    }

    #[test]
    fn posterize_keeps_four_bits() {
        let mut img = vec![0.5f32, 0.99, 0.01];
        posterize(&mut img, 4);
        for v in img {
            let q = (v * 255.0).round() as u32;
            assert_eq!(q & 0x0F, 0);
        }
    }

    #[test]
    fn every_augmenter_keeps_valid_values_in_range() {
        let (h, w) = (32, 32);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for aug in ANOMALIB_AUGMENTERS {
            for _ in 0..20 {
                let mut img: Vec<f32> = (0..3 * h * w).map(|_| rng.random::<f32>()).collect();
                aug.apply(&mut img, h, w, 0.3, &mut rng);
                assert!(
                    img.iter().all(|v| (-1e-6..=1.0 + 1e-6).contains(v)),
                    "{aug:?}"
                );
            }
        }
    }
}
