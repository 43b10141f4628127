//! Model input sizes that keep the shape of the training images.
//!
//! DSR takes images whose sides are multiples of 32. Squashing a 400×256 weld photo or a 256×645
//! commutator scan into a square shrinks one direction two to five times more than the other, and
//! thin defects along that direction vanish. [`size_for_aspect`] picks, for a pixel budget (for
//! example 128×128), the allowed height and width whose ratio is closest to the training images'
//! median ratio ([`median_aspect`]), so the same compute keeps both directions' detail alike.

use std::path::{Path, PathBuf};

use dsr_eval::image::ImageError;

use crate::data::DataError;

/// The smallest side DSR accepts (its encoders downsample eight times, the U-Nets 32 times).
const MIN_SIDE: usize = 64;
/// Sides are multiples of this.
const SIDE_STEP: usize = 32;
/// A chosen size may hold this much more or less than the budget (a factor): close enough in
/// cost, wide enough to leave ratios to choose from.
const AREA_TOLERANCE: f64 = 1.25;

/// The width / height ratio of one image, read from its header (nothing is decoded).
pub fn aspect_of(path: &Path) -> Result<f64, DataError> {
    let io = |source| {
        DataError::Image(ImageError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let reader = image::ImageReader::open(path)
        .map_err(io)?
        .with_guessed_format()
        .map_err(io)?;
    let (w, h) = reader.into_dimensions().map_err(|e| {
        DataError::Image(ImageError::NotAnImage {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    })?;
    if w == 0 || h == 0 {
        return Err(DataError::Image(ImageError::NotAnImage {
            path: path.to_path_buf(),
            reason: format!("its header says {w}×{h} pixels"),
        }));
    }
    Ok(f64::from(w) / f64::from(h))
}

/// The median width / height ratio of `paths` (the training images), from their headers.
pub fn median_aspect(paths: &[PathBuf]) -> Result<f64, DataError> {
    if paths.is_empty() {
        return Err(DataError::Config(
            "no training images to take the image shape from".into(),
        ));
    }
    let mut ratios = paths
        .iter()
        .map(|p| aspect_of(p))
        .collect::<Result<Vec<f64>, DataError>>()?;
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    Ok(if n % 2 == 1 {
        ratios[n / 2]
    } else {
        // The geometric mean of the middle two: a ratio and its inverse stay symmetric.
        (ratios[n / 2 - 1] * ratios[n / 2]).sqrt()
    })
}

/// The `[height, width]` (multiples of 32, at least 64, at most `max_side`) holding between
/// `pixels / 1.25` and `pixels · 1.25` pixels whose width / height is closest to `aspect` (on a
/// log scale, so 2:1 and 1:2 are equally far from square); ties go to the area closest to
/// `pixels`. A square budget with `aspect` 1 gives the square back.
pub fn size_for_aspect(pixels: usize, aspect: f64, max_side: usize) -> [usize; 2] {
    let target = pixels.max(MIN_SIDE * MIN_SIDE) as f64;
    let aspect = if aspect.is_finite() && aspect > 0.0 {
        aspect
    } else {
        1.0
    };
    let max_side = max_side.max(MIN_SIDE) / SIDE_STEP * SIDE_STEP;
    let sides: Vec<usize> = (MIN_SIDE..=max_side).step_by(SIDE_STEP).collect();
    let mut best: Option<([usize; 2], (f64, f64))> = None;
    for &h in &sides {
        for &w in &sides {
            let area = (h * w) as f64;
            if area > target * AREA_TOLERANCE || area < target / AREA_TOLERANCE {
                continue;
            }
            let key = (
                ((w as f64 / h as f64).ln() - aspect.ln()).abs(),
                (area.ln() - target.ln()).abs(),
            );
            let better = match &best {
                None => true,
                Some((_, k)) => {
                    key.0 < k.0 - 1e-12 || ((key.0 - k.0).abs() <= 1e-12 && key.1 < k.1)
                }
            };
            if better {
                best = Some(([h, w], key));
            }
        }
    }
    // No allowed size lies within the tolerance only when the budget is far above max_side²:
    // then the largest square is the closest in cost.
    best.map_or([max_side, max_side], |(s, _)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_square_budget_keeps_the_shape_of_the_images() {
        // Square images: the square itself.
        assert_eq!(size_for_aspect(128 * 128, 1.0, 1024), [128, 128]);
        assert_eq!(size_for_aspect(256 * 256, 1.0, 1024), [256, 256]);
        // 400×256 photos (1.56): 96×160 (1.67) at 15 360 pixels.
        assert_eq!(size_for_aspect(128 * 128, 400.0 / 256.0, 1024), [96, 160]);
        // 256×645 scans (0.40), tall: 192×96 (0.5).
        assert_eq!(size_for_aspect(128 * 128, 256.0 / 645.0, 1024), [192, 96]);
        // A ratio and its inverse give transposed sizes.
        let a = size_for_aspect(128 * 128, 1.8, 1024);
        let b = size_for_aspect(128 * 128, 1.0 / 1.8, 1024);
        assert_eq!(a, [b[1], b[0]]);
        // Every answer is a valid size within the area tolerance.
        for aspect in [0.1, 0.3, 0.7, 1.0, 1.3, 2.0, 5.0, 20.0, f64::NAN, 0.0] {
            for pixels in [64 * 64, 100 * 100, 128 * 128, 256 * 256] {
                let [h, w] = size_for_aspect(pixels, aspect, 1024);
                assert!(dsr_core::config::validate_image_size(h, w).is_ok());
                let area = (h * w) as f64;
                let target = pixels.max(64 * 64) as f64;
                assert!(area <= target * 1.25 + 1e-9 && area >= target / 1.25 - 1e-9);
            }
        }
        // The side limit holds.
        let [h, w] = size_for_aspect(1024 * 1024, 4.0, 1024);
        assert!(h <= 1024 && w <= 1024);
    }

    #[test]
    fn the_median_ratio_comes_from_the_headers() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (i, (w, h)) in [(40u32, 20u32), (30, 20), (64, 32), (10, 10)]
            .iter()
            .enumerate()
        {
            let p = dir.path().join(format!("{i}.png"));
            image::GrayImage::new(*w, *h).save(&p).unwrap();
            paths.push(p);
        }
        // Ratios 2, 1.5, 2, 1: the middle two are 1.5 and 2.
        let m = median_aspect(&paths).unwrap();
        assert!((m - (3.0f64).sqrt()).abs() < 1e-12, "{m}");
        assert!((median_aspect(&paths[..3]).unwrap() - 2.0).abs() < 1e-12);
        let bad = dir.path().join("bad.png");
        std::fs::write(&bad, b"not an image").unwrap();
        let err = median_aspect(&[paths[0].clone(), bad.clone()]).unwrap_err();
        assert!(err.to_string().contains("bad.png"), "{err}");
        assert!(median_aspect(&[]).is_err());
    }
}
