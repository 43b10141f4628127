//! anomalib's default post-processor: adaptive thresholds and min-max normalisation.
//!
//! On a validation set it records the F1 adaptive threshold and the minimum and maximum of the image
//! scores and of the anomaly-map pixels. Afterwards it maps every raw value `v` to
//! `clamp((v - T) / (max - min) + 0.5, 0, 1)`, so the threshold lands on 0.5, and labels a value
//! anomalous when its normalised value is strictly above 0.5, i.e. when `v > T` (a value exactly at
//! the threshold, which F1Max counts as positive, is labelled normal).
//!
//! # Example
//!
//! ```
//! use dsr_eval::postprocess::PostProcessor;
//!
//! // Two validation images of 1x2 pixels; the second is defective in its right pixel.
//! let scores = [0.2_f32, 0.9];
//! let labels = [false, true];
//! let maps = [0.1_f32, 0.3, 0.2, 0.8];
//! let masks = [false, false, false, true];
//! let post = PostProcessor::fit(&scores, &labels, &maps, &masks)?;
//! assert_eq!(post.image_threshold, 0.9);
//! assert_eq!(post.normalize_score(0.9), 0.5);
//! assert!(!post.image_label(0.9));
//! assert_eq!(post.pixel_threshold, 0.8);
//! assert_eq!(post.normalize_map(&[0.8, 0.0, 5.0]), vec![0.5, 0.0, 1.0]);
//! assert_eq!(post.pixel_mask(&[0.8, 0.81]), vec![false, true]);
//! # Ok::<(), dsr_eval::metrics::MetricsError>(())
//! ```

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::metrics::{BinaryCurve, MetricsError, Result};

/// The checkpoint metadata key under which the post-processor is stored as JSON.
pub const METADATA_KEY: &str = "dsr.postprocess";

/// Thresholds and normalisation statistics fitted on a validation set (anomalib's default
/// `PostProcessor` state).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PostProcessor {
    /// The F1 adaptive threshold of the image scores.
    pub image_threshold: f32,
    /// The F1 adaptive threshold of the anomaly-map pixels.
    pub pixel_threshold: f32,
    /// The smallest validation image score.
    pub image_min: f32,
    /// The largest validation image score.
    pub image_max: f32,
    /// The smallest validation anomaly-map value.
    pub pixel_min: f32,
    /// The largest validation anomaly-map value.
    pub pixel_max: f32,
}

/// Maps `v` to `clamp((v - threshold) / (max - min) + 0.5, 0, 1)`.
///
/// The arithmetic is done in f64 and rounded once to f32. When `max - min` is not a positive finite
/// number (all validation values equal, or a corrupted state with `max < min`), the division is
/// replaced by its limit: 1 above the threshold, 0 below it and 0.5 exactly at it. anomalib divides
/// by zero there and gets the same 1 and 0 but NaN at the threshold; 0.5 keeps the output in
/// `[0, 1]` and still labels the value normal. A NaN input stays NaN.
fn normalize(v: f32, threshold: f32, min: f32, max: f32) -> f32 {
    let range = f64::from(max) - f64::from(min);
    if range > 0.0 && range.is_finite() {
        let shifted = (f64::from(v) - f64::from(threshold)) / range + 0.5;
        shifted.clamp(0.0, 1.0) as f32
    } else if v > threshold {
        1.0
    } else if v < threshold {
        0.0
    } else if v.is_nan() {
        f32::NAN
    } else {
        0.5
    }
}

impl PostProcessor {
    /// Fits the post-processor on validation predictions.
    ///
    /// `maps` and `masks` hold the anomaly maps and ground-truth masks of all images back to back;
    /// their layout does not matter here, only that they have the same length. The thresholds follow
    /// anomalib's `F1AdaptiveThreshold`, including its fallbacks: without any positive the threshold
    /// is the largest value, without any negative the smallest. Fails on empty, mismatched or NaN
    /// input.
    pub fn fit(scores: &[f32], labels: &[bool], maps: &[f32], masks: &[bool]) -> Result<Self> {
        let image = BinaryCurve::new(scores, labels)?;
        let pixel = BinaryCurve::new(maps, masks)?;
        Ok(Self::from_curves(&image, &pixel))
    }

    /// Fits the post-processor from already built image and pixel curves.
    pub fn from_curves(image: &BinaryCurve, pixel: &BinaryCurve) -> Self {
        // The curves hold the distinct values in descending order, so their ends are the extremes.
        let extremes = |curve: &BinaryCurve| {
            let t = curve.thresholds();
            (t[t.len() - 1], t[0])
        };
        let (image_min, image_max) = extremes(image);
        let (pixel_min, pixel_max) = extremes(pixel);
        Self {
            image_threshold: image.f1_adaptive_threshold(),
            pixel_threshold: pixel.f1_adaptive_threshold(),
            image_min,
            image_max,
            pixel_min,
            pixel_max,
        }
    }

    /// The normalised image score in `[0, 1]`; the image threshold maps to 0.5.
    pub fn normalize_score(&self, score: f32) -> f32 {
        normalize(score, self.image_threshold, self.image_min, self.image_max)
    }

    /// The normalised anomaly map, value by value, in `[0, 1]`; the pixel threshold maps to 0.5.
    pub fn normalize_map(&self, map: &[f32]) -> Vec<f32> {
        map.par_iter()
            .map(|&v| normalize(v, self.pixel_threshold, self.pixel_min, self.pixel_max))
            .collect()
    }

    /// Normalises an anomaly map in place (see [`PostProcessor::normalize_map`]).
    pub fn normalize_map_in_place(&self, map: &mut [f32]) {
        map.par_iter_mut()
            .for_each(|v| *v = normalize(*v, self.pixel_threshold, self.pixel_min, self.pixel_max));
    }

    /// The predicted image label: `true` (anomalous) iff the normalised score is above 0.5, which is
    /// decided exactly as `score > image_threshold` so that float rounding cannot flip it.
    pub fn image_label(&self, score: f32) -> bool {
        score > self.image_threshold
    }

    /// The predicted mask: `true` where the raw map value is above the pixel threshold (equivalently,
    /// where the normalised value is above 0.5).
    pub fn pixel_mask(&self, map: &[f32]) -> Vec<bool> {
        map.par_iter().map(|&v| v > self.pixel_threshold).collect()
    }

    /// Serialises the post-processor to the JSON stored under [`METADATA_KEY`].
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| MetricsError::Json(e.to_string()))
    }

    /// Reads a post-processor from the JSON stored under [`METADATA_KEY`]; every value must be a
    /// finite number (a number too large for f32 would become infinite).
    pub fn from_json(json: &str) -> Result<Self> {
        let post: Self =
            serde_json::from_str(json).map_err(|e| MetricsError::Json(e.to_string()))?;
        for (name, v) in [
            ("image_threshold", post.image_threshold),
            ("pixel_threshold", post.pixel_threshold),
            ("image_min", post.image_min),
            ("image_max", post.image_max),
            ("pixel_min", post.pixel_min),
            ("pixel_max", post.pixel_max),
        ] {
            if !v.is_finite() {
                return Err(MetricsError::Json(format!(
                    "{name} is {v}, not a finite number"
                )));
            }
        }
        Ok(post)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degenerate_range_gives_step_function() {
        let post = PostProcessor {
            image_threshold: 0.4,
            pixel_threshold: 0.4,
            image_min: 0.4,
            image_max: 0.4,
            pixel_min: 0.4,
            pixel_max: 0.4,
        };
        assert_eq!(post.normalize_score(0.5), 1.0);
        assert_eq!(post.normalize_score(0.3), 0.0);
        assert_eq!(post.normalize_score(0.4), 0.5);
        assert!(!post.image_label(0.4));
        assert_eq!(post.normalize_map(&[0.5, 0.4, 0.3]), vec![1.0, 0.5, 0.0]);
    }

    #[test]
    fn json_round_trip_is_exact() {
        let post = PostProcessor {
            image_threshold: 0.46875,
            pixel_threshold: 0.370_117_2,
            image_min: 0.28125,
            image_max: 0.96875,
            pixel_min: 0.0,
            pixel_max: 1.0,
        };
        let json = post.to_json().unwrap();
        assert_eq!(PostProcessor::from_json(&json).unwrap(), post);
        assert!(matches!(
            PostProcessor::from_json("{\"image_threshold\": 1}"),
            Err(MetricsError::Json(_))
        ));
    }
}
