//! Exact evaluation metrics for anomaly detection, following anomalib and torchmetrics.
//!
//! Every curve here is exact: each distinct prediction value is a threshold `t`, a sample (an image
//! score or a pixel of an anomaly map) is predicted positive iff its value is `>= t`, and tied values
//! form one curve point. Image-level metrics take one score and one label per image; pixel-level
//! metrics pool all pixels of all images into one population.
//!
//! The metrics and their reference definitions:
//!
//! * AUROC: trapezoidal area under the ROC curve, with `(0, 0)` prepended (torchmetrics `BinaryROC`
//!   and `auc`, equal to sklearn's `roc_auc_score`).
//! * AP (anomalib's AUPR): the step-wise average precision `sum_k (R_k - R_{k-1}) * P_k` over the
//!   thresholds in descending order (sklearn's `average_precision_score`).
//! * F1Max: the largest `2PR / (P + R + 1e-10)` over the PR curve, and the lowest threshold that
//!   reaches it.
//! * F1 adaptive threshold: the F1Max threshold, or the largest prediction when there is no
//!   positive sample, or the smallest prediction when there is no negative sample.
//! * AUPRO: the area under the per-region-overlap curve up to a false-positive-rate limit (0.3 by
//!   default), normalised by the limit (anomalib's `AUPRO`).
//! * F1 score at a fixed threshold with the post-processor's strict rule `v > T`.
//!
//! Predictions outside `[0, 1]` are used as they are. torchmetrics would pass them through a
//! sigmoid first for AUROC and AP; the sigmoid is strictly increasing, so this changes nothing
//! except where float32 rounding of the sigmoid merges very large or very small values into ties.
//! DSR's scores and maps are probabilities, so the case does not arise in this project.
//!
//! # Example
//!
//! ```
//! use dsr_eval::metrics::{auroc, average_precision, f1_max};
//!
//! let scores = [0.1_f32, 0.4, 0.35, 0.8];
//! let labels = [false, false, true, true];
//! let roc = auroc(&scores, &labels)?;
//! assert!((roc - 0.75).abs() < 1e-12);
//! let ap = average_precision(&scores, &labels)?;
//! assert!((ap - (0.5 * 1.0 + 0.5 * 2.0 / 3.0)).abs() < 1e-12);
//! let best = f1_max(&scores, &labels)?;
//! assert_eq!(best.threshold, 0.35);
//! assert!((best.value - 0.8).abs() < 1e-9);
//! # Ok::<(), dsr_eval::metrics::MetricsError>(())
//! ```

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::postprocess::PostProcessor;

/// The false-positive-rate limit anomalib's default `AUPRO` metric integrates up to.
pub const DEFAULT_FPR_LIMIT: f64 = 0.3;

/// The defect-type name of defect-free images, shared as negatives by every defect type in
/// [`metrics_per_defect_type`] (the MVTec AD convention).
pub const GOOD_DEFECT_TYPE: &str = "good";

/// The largest number of samples one curve accepts (sample indices are stored in 32 bits).
pub const MAX_SAMPLES: usize = u32::MAX as usize;

/// Errors raised by the metrics and the post-processor.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MetricsError {
    /// An input that must hold at least one element is empty.
    #[error("{what} is empty")]
    Empty {
        /// Which input is empty.
        what: &'static str,
    },
    /// Two inputs that must have matching lengths do not.
    #[error("length mismatch: {what} has {got} elements, expected {expected}")]
    LengthMismatch {
        /// Which input has the wrong length.
        what: &'static str,
        /// The length required by the other inputs.
        expected: usize,
        /// The length found.
        got: usize,
    },
    /// A prediction is NaN, so it cannot be ranked.
    #[error("{what} holds NaN at index {index}")]
    NotANumber {
        /// Which input holds the NaN.
        what: &'static str,
        /// The index of the first NaN.
        index: usize,
    },
    /// The metric is undefined because one class has no sample.
    #[error("{metric} is undefined: there is no {class} sample")]
    MissingClass {
        /// The metric that was requested.
        metric: &'static str,
        /// The missing class, `"positive"` or `"negative"`.
        class: &'static str,
    },
    /// More samples than [`MAX_SAMPLES`].
    #[error("{len} samples exceed the supported maximum of {max}")]
    TooManySamples {
        /// The number of samples given.
        len: usize,
        /// The supported maximum.
        max: usize,
    },
    /// The false-positive-rate limit of AUPRO is outside `(0, 1]`.
    #[error("the AUPRO false-positive-rate limit must be in (0, 1], got {0}")]
    InvalidFprLimit(f64),
    /// The image size is zero or does not divide the pixel count.
    #[error("{len} map values cannot be split into images of {height}x{width} pixels")]
    InvalidShape {
        /// The number of map values.
        len: usize,
        /// The image height given.
        height: usize,
        /// The image width given.
        width: usize,
    },
    /// A post-processor could not be read from or written to JSON.
    #[error("post-processor JSON: {0}")]
    Json(String),
}

/// A shorthand for results of this module.
pub type Result<T> = std::result::Result<T, MetricsError>;

/// Maps a float to a `u32` whose unsigned order is the float's numeric order.
///
/// Negative zero is first turned into positive zero so that the two compare equal, as they do in
/// PyTorch. The input must not be NaN.
fn order_key(v: f32) -> u32 {
    let bits = (v + 0.0).to_bits();
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// Inverts [`order_key`].
fn key_value(key: u32) -> f32 {
    if key & 0x8000_0000 != 0 {
        f32::from_bits(key & 0x7fff_ffff)
    } else {
        f32::from_bits(!key)
    }
}

/// Checks that `preds` is non-empty, NaN-free and small enough to be indexed by `u32`.
fn check_preds(preds: &[f32], what: &'static str) -> Result<()> {
    if preds.is_empty() {
        return Err(MetricsError::Empty { what });
    }
    if preds.len() > MAX_SAMPLES {
        return Err(MetricsError::TooManySamples {
            len: preds.len(),
            max: MAX_SAMPLES,
        });
    }
    // A branch-free scan per chunk vectorises; the index is searched only when a NaN exists.
    let has_nan = preds
        .par_chunks(1 << 16)
        .any(|chunk| chunk.iter().fold(false, |acc, v| acc | v.is_nan()));
    if has_nan {
        let index = preds.iter().position(|v| v.is_nan()).unwrap_or(0);
        return Err(MetricsError::NotANumber { what, index });
    }
    Ok(())
}

/// Checks that `targets` has the length of the predictions.
fn check_len(expected: usize, got: usize, what: &'static str) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(MetricsError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}

/// Sorts the predictions once, by value in descending order.
///
/// Each entry packs the complemented order key of the value into the upper 32 bits (so that
/// ascending entries mean descending values) and `payload(i)` of its sample `i` into the lower 32
/// bits: a nonzero payload marks a positive sample, and for pixels it is the ground-truth region the
/// pixel belongs to. Carrying the payload in the entry keeps the passes over the sorted order free
/// of random memory accesses, which would otherwise cost more than the sort itself. The order inside
/// a group of tied values is irrelevant: all consumers read a tie group as a whole.
fn rank_descending(
    preds: &[f32],
    what: &'static str,
    payload: impl Fn(usize) -> u32 + Sync,
) -> Result<Vec<u64>> {
    check_preds(preds, what)?;
    let mut ranked: Vec<u64> = preds
        .par_iter()
        .enumerate()
        .map(|(i, &v)| (u64::from(!order_key(v)) << 32) | u64::from(payload(i)))
        .collect();
    radix_sort_high_word(&mut ranked);
    Ok(ranked)
}

/// The order key (see [`order_key`]) of an entry made by [`rank_descending`].
fn entry_key(entry: u64) -> u32 {
    !((entry >> 32) as u32)
}

/// The payload of an entry made by [`rank_descending`].
fn entry_payload(entry: u64) -> u32 {
    (entry & 0xffff_ffff) as u32
}

/// Sorts entries by their upper 32 bits, ascending, with a stable least-significant-digit radix
/// sort in three passes of 11 bits.
///
/// The sort is linear in the number of entries, which matters for pixel populations of millions
/// of values (100 maps of 256x256 hold 6.5 M). Passes whose digit is the same for every entry are
/// skipped.
fn radix_sort_high_word(data: &mut Vec<u64>) {
    const BITS: u32 = 11;
    const BUCKETS: usize = 1 << BITS;
    const MASK: u64 = (BUCKETS - 1) as u64;
    let n = data.len();
    let mut counts = vec![[0usize; BUCKETS]; 3];
    for &entry in data.iter() {
        for (pass, count) in counts.iter_mut().enumerate() {
            count[((entry >> (32 + BITS * pass as u32)) & MASK) as usize] += 1;
        }
    }
    let mut buffer = vec![0u64; n];
    for (pass, count) in counts.iter().enumerate() {
        if count.contains(&n) {
            continue;
        }
        let mut offsets = [0usize; BUCKETS];
        let mut total = 0;
        for (offset, &c) in offsets.iter_mut().zip(count.iter()) {
            *offset = total;
            total += c;
        }
        let shift = 32 + BITS * pass as u32;
        for &entry in data.iter() {
            let digit = ((entry >> shift) & MASK) as usize;
            buffer[offsets[digit]] = entry;
            offsets[digit] += 1;
        }
        std::mem::swap(data, &mut buffer);
    }
}

/// Calls `f(first, end)` for every group of equal values in a ranking made by [`rank_descending`].
fn for_each_tie_group(ranked: &[u64], mut f: impl FnMut(usize, usize)) {
    let mut start = 0;
    while start < ranked.len() {
        let key = ranked[start] >> 32;
        let mut end = start + 1;
        while end < ranked.len() && ranked[end] >> 32 == key {
            end += 1;
        }
        f(start, end);
        start = end;
    }
}

/// The exact binary classification curve: cumulative true and false positives at every distinct
/// prediction value, thresholds in descending order.
///
/// This is the common base of the ROC and PR curves and of every metric derived from them. Building
/// it sorts the predictions once; every metric afterwards is a linear pass or a binary search.
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryCurve {
    /// Distinct prediction values, strictly descending.
    thresholds: Vec<f32>,
    /// `tps[k]`: the number of positive samples with value `>= thresholds[k]`.
    tps: Vec<u32>,
    /// `fps[k]`: the number of negative samples with value `>= thresholds[k]`.
    fps: Vec<u32>,
    /// The number of positive samples.
    num_positive: u64,
    /// The number of negative samples.
    num_negative: u64,
}

/// The maximum F1 score over a PR curve and the threshold that reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct F1Max {
    /// The maximum of `2PR / (P + R + 1e-10)` over the curve.
    pub value: f64,
    /// The lowest threshold reaching the maximum; samples `>= threshold` are the positives.
    pub threshold: f32,
}

/// The points of a ROC curve, for plotting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RocCurve {
    /// False-positive rates, non-decreasing, starting at 0 and ending at 1.
    pub fpr: Vec<f64>,
    /// True-positive rates, non-decreasing, starting at 0 and ending at 1.
    pub tpr: Vec<f64>,
    /// The threshold of each point, descending; the prepended `(0, 0)` point has `+inf`.
    pub thresholds: Vec<f32>,
}

/// The points of a precision-recall curve in torchmetrics' order, for plotting.
///
/// Points follow the thresholds in ascending order (recall non-increasing); a final point with
/// precision 1 and recall 0 and no threshold closes the curve, so `thresholds` is one shorter than
/// `precision` and `recall`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrCurve {
    /// Precision `tp / (tp + fp)` at each point.
    pub precision: Vec<f64>,
    /// Recall `tp / positives` at each point.
    pub recall: Vec<f64>,
    /// The threshold of each point but the last, ascending.
    pub thresholds: Vec<f32>,
}

impl BinaryCurve {
    /// Builds the curve of predictions `preds` against labels `targets` (`true` = positive,
    /// i.e. anomalous).
    ///
    /// Fails when the inputs are empty, differ in length, hold NaN, or exceed [`MAX_SAMPLES`]. A
    /// single class is accepted here; the metrics that need both classes check for it.
    pub fn new(preds: &[f32], targets: &[bool]) -> Result<Self> {
        check_len(preds.len(), targets.len(), "targets")?;
        let ranked = rank_descending(preds, "predictions", |i| u32::from(targets[i]))?;
        Ok(Self::from_ranked(&ranked))
    }

    /// Builds the curve from a ranking made by [`rank_descending`] whose payload is nonzero exactly
    /// for the positive samples.
    fn from_ranked(ranked: &[u64]) -> Self {
        let mut thresholds = Vec::new();
        let mut tps = Vec::new();
        let mut fps = Vec::new();
        let (mut tp, mut fp) = (0u32, 0u32);
        for_each_tie_group(ranked, |start, end| {
            for &entry in &ranked[start..end] {
                if entry_payload(entry) != 0 {
                    tp += 1;
                } else {
                    fp += 1;
                }
            }
            thresholds.push(key_value(entry_key(ranked[start])));
            tps.push(tp);
            fps.push(fp);
        });
        Self {
            thresholds,
            tps,
            fps,
            num_positive: u64::from(tp),
            num_negative: u64::from(fp),
        }
    }

    /// The number of positive samples.
    pub fn num_positive(&self) -> u64 {
        self.num_positive
    }

    /// The number of negative samples.
    pub fn num_negative(&self) -> u64 {
        self.num_negative
    }

    /// The distinct prediction values, strictly descending.
    pub fn thresholds(&self) -> &[f32] {
        &self.thresholds
    }

    /// Fails unless there is at least one positive sample.
    fn need_positive(&self, metric: &'static str) -> Result<()> {
        if self.num_positive == 0 {
            Err(MetricsError::MissingClass {
                metric,
                class: "positive",
            })
        } else {
            Ok(())
        }
    }

    /// Fails unless both classes are present.
    fn need_both(&self, metric: &'static str) -> Result<()> {
        self.need_positive(metric)?;
        if self.num_negative == 0 {
            Err(MetricsError::MissingClass {
                metric,
                class: "negative",
            })
        } else {
            Ok(())
        }
    }

    /// The area under the ROC curve (trapezoid rule, `(0, 0)` prepended).
    ///
    /// The sum is computed exactly in integers (each trapezoid is
    /// `(fp_k - fp_{k-1}) * (tp_k + tp_{k-1}) / (2 * positives * negatives)`), then divided once.
    /// Fails when either class is missing.
    pub fn auroc(&self) -> Result<f64> {
        self.need_both("AUROC")?;
        let (mut prev_tp, mut prev_fp) = (0u128, 0u128);
        let mut twice_area = 0u128;
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            let (tp, fp) = (u128::from(tp), u128::from(fp));
            twice_area += (fp - prev_fp) * (tp + prev_tp);
            prev_tp = tp;
            prev_fp = fp;
        }
        let denominator = 2.0 * self.num_positive as f64 * self.num_negative as f64;
        Ok(twice_area as f64 / denominator)
    }

    /// The step-wise average precision `sum_k (R_k - R_{k-1}) * P_k` (anomalib's AUPR).
    ///
    /// Fails when there is no positive sample; without negatives every precision is 1 and so is the
    /// result.
    pub fn average_precision(&self) -> Result<f64> {
        self.need_positive("average precision")?;
        let positives = self.num_positive as f64;
        let mut prev_tp = 0u32;
        let mut sum = 0.0f64;
        for (&tp, &fp) in self.tps.iter().zip(&self.fps) {
            if tp != prev_tp {
                let precision = f64::from(tp) / (f64::from(tp) + f64::from(fp));
                sum += f64::from(tp - prev_tp) * precision;
                prev_tp = tp;
            }
        }
        Ok(sum / positives)
    }

    /// The maximum F1 score over the curve and the lowest threshold reaching it (anomalib's
    /// `F1Max`).
    ///
    /// The arg-max is found by exact rational comparison: at a point with `tp` true and `fp` false
    /// positives, `F1 = 2 tp / (tp + fp + positives)`. Fails when there is no positive sample.
    pub fn f1_max(&self) -> Result<F1Max> {
        self.need_positive("F1Max")?;
        let positives = u128::from(self.num_positive);
        // The best point so far as the fraction `best_num / best_den` of `F1 / 2`.
        let (mut best_num, mut best_den, mut best_k) = (0u128, 1u128, 0usize);
        for (k, (&tp, &fp)) in self.tps.iter().zip(&self.fps).enumerate() {
            let num = u128::from(tp);
            let den = num + u128::from(fp) + positives;
            // Thresholds descend, so `>=` keeps the lowest threshold among equal scores.
            if num * best_den >= best_num * den {
                (best_num, best_den, best_k) = (num, den, k);
            }
        }
        let precision =
            f64::from(self.tps[best_k]) / f64::from(self.tps[best_k] + self.fps[best_k]);
        let recall = f64::from(self.tps[best_k]) / self.num_positive as f64;
        let value = 2.0 * precision * recall / (precision + recall + 1e-10);
        Ok(F1Max {
            value,
            threshold: self.thresholds[best_k],
        })
    }

    /// anomalib's `F1AdaptiveThreshold`: the [`F1Max`] threshold, or the largest prediction when
    /// there is no positive sample, or the smallest prediction when there is no negative sample.
    ///
    /// Never fails: the curve always holds at least one threshold.
    pub fn f1_adaptive_threshold(&self) -> f32 {
        let first = self.thresholds[0];
        let last = self.thresholds[self.thresholds.len() - 1];
        if self.num_positive == 0 {
            first
        } else if self.num_negative == 0 {
            last
        } else {
            self.f1_max().map_or(first, |best| best.threshold)
        }
    }

    /// The true and false positives among samples strictly above `threshold`.
    fn counts_above(&self, threshold: f32) -> (u64, u64) {
        // Thresholds descend: the first `n` of them are `> threshold`.
        let n = self.thresholds.partition_point(|&t| t > threshold);
        if n == 0 {
            (0, 0)
        } else {
            (u64::from(self.tps[n - 1]), u64::from(self.fps[n - 1]))
        }
    }

    /// The F1 score of the prediction `value > threshold` (strict, as the post-processor labels
    /// samples), with torchmetrics' convention that `0 / 0` gives 0.
    pub fn f1_score_at(&self, threshold: f32) -> f64 {
        let (tp, fp) = self.counts_above(threshold);
        let false_negatives = self.num_positive - tp;
        let denominator = 2 * tp + fp + false_negatives;
        if denominator == 0 {
            0.0
        } else {
            (2 * tp) as f64 / denominator as f64
        }
    }

    /// The ROC curve points. Fails when either class is missing.
    pub fn roc(&self) -> Result<RocCurve> {
        self.need_both("ROC curve")?;
        let (pos, neg) = (self.num_positive as f64, self.num_negative as f64);
        let mut fpr = Vec::with_capacity(self.thresholds.len() + 1);
        let mut tpr = Vec::with_capacity(self.thresholds.len() + 1);
        let mut thresholds = Vec::with_capacity(self.thresholds.len() + 1);
        fpr.push(0.0);
        tpr.push(0.0);
        thresholds.push(f32::INFINITY);
        for k in 0..self.thresholds.len() {
            fpr.push(f64::from(self.fps[k]) / neg);
            tpr.push(f64::from(self.tps[k]) / pos);
            thresholds.push(self.thresholds[k]);
        }
        Ok(RocCurve {
            fpr,
            tpr,
            thresholds,
        })
    }

    /// The precision-recall curve points. Fails when there is no positive sample.
    pub fn pr(&self) -> Result<PrCurve> {
        self.need_positive("PR curve")?;
        let pos = self.num_positive as f64;
        let n = self.thresholds.len();
        let mut precision = Vec::with_capacity(n + 1);
        let mut recall = Vec::with_capacity(n + 1);
        let mut thresholds = Vec::with_capacity(n);
        for k in (0..n).rev() {
            let (tp, fp) = (f64::from(self.tps[k]), f64::from(self.fps[k]));
            precision.push(tp / (tp + fp));
            recall.push(tp / pos);
            thresholds.push(self.thresholds[k]);
        }
        precision.push(1.0);
        recall.push(0.0);
        Ok(PrCurve {
            precision,
            recall,
            thresholds,
        })
    }
}

/// The area under the ROC curve of `preds` against `targets` (see [`BinaryCurve::auroc`]).
pub fn auroc(preds: &[f32], targets: &[bool]) -> Result<f64> {
    BinaryCurve::new(preds, targets)?.auroc()
}

/// The step-wise average precision (see [`BinaryCurve::average_precision`]).
pub fn average_precision(preds: &[f32], targets: &[bool]) -> Result<f64> {
    BinaryCurve::new(preds, targets)?.average_precision()
}

/// The maximum F1 score and its threshold (see [`BinaryCurve::f1_max`]).
pub fn f1_max(preds: &[f32], targets: &[bool]) -> Result<F1Max> {
    BinaryCurve::new(preds, targets)?.f1_max()
}

/// anomalib's F1 adaptive threshold (see [`BinaryCurve::f1_adaptive_threshold`]).
pub fn f1_adaptive_threshold(preds: &[f32], targets: &[bool]) -> Result<f32> {
    Ok(BinaryCurve::new(preds, targets)?.f1_adaptive_threshold())
}

/// The F1 score of `value > threshold` (see [`BinaryCurve::f1_score_at`]).
pub fn f1_score_at(preds: &[f32], targets: &[bool], threshold: f32) -> Result<f64> {
    Ok(BinaryCurve::new(preds, targets)?.f1_score_at(threshold))
}

/// Labels the 8-connected components of one binary mask of `height` x `width` pixels (row-major).
///
/// Returns one label per pixel (0 = background, components numbered from 1 in row-major order of
/// their first pixel) and the number of components. This is OpenCV's `connectedComponents` with its
/// default connectivity of 8, which anomalib's AUPRO uses. It is written here rather than taken from
/// `imageproc` because it is a few lines of flood fill, while that crate would pull a large
/// dependency tree into the training crate for a single function.
///
/// Fails when `mask.len() != height * width`.
pub fn connected_components(mask: &[bool], height: usize, width: usize) -> Result<(Vec<u32>, u32)> {
    check_len(height * width, mask.len(), "mask")?;
    let mut labels = vec![0u32; mask.len()];
    let mut count = 0u32;
    let mut stack = Vec::new();
    for seed in 0..mask.len() {
        if !mask[seed] || labels[seed] != 0 {
            continue;
        }
        count += 1;
        labels[seed] = count;
        stack.push(seed);
        while let Some(p) = stack.pop() {
            let (y, x) = (p / width, p % width);
            for ny in y.saturating_sub(1)..=(y + 1).min(height - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(width - 1) {
                    let q = ny * width + nx;
                    if mask[q] && labels[q] == 0 {
                        labels[q] = count;
                        stack.push(q);
                    }
                }
            }
        }
    }
    Ok((labels, count))
}

/// The result of [`aupro`]: the normalised area and the truncated curve it integrates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Aupro {
    /// The area under the PRO curve up to the limit, divided by the limit; in `[0, 1]`.
    pub value: f64,
    /// False-positive rates of the curve points, from 0 up to the limit.
    pub fpr: Vec<f64>,
    /// Per-region overlap of the curve points.
    pub pro: Vec<f64>,
}

/// Checks that `len` values split into whole `height` x `width` images.
fn check_shape(len: usize, height: usize, width: usize) -> Result<()> {
    if height == 0 || width == 0 || len % (height * width) != 0 {
        Err(MetricsError::InvalidShape { len, height, width })
    } else {
        Ok(())
    }
}

/// anomalib's AUPRO of anomaly maps `maps` against ground-truth masks `masks`, both holding whole
/// images of `height` x `width` pixels back to back (row-major, image after image).
///
/// The regions are the 8-connected components of each mask (a region never spans two images). One
/// global curve runs over all pixels sorted by value: at threshold `t`, the false-positive rate is the
/// fraction of background pixels (of every image, defective or good) with value `>= t`, and the PRO
/// is the mean over all regions of the fraction of each region's pixels with value `>= t`. Tied
/// values make one point, `(0, 0)` is prepended, the curve is cut at `fpr_limit` (with a linearly
/// interpolated end point when no point falls exactly on it), and its trapezoidal area is divided by
/// `fpr_limit`.
///
/// Fails on empty, mismatched or NaN input, a limit outside `(0, 1]`, or when there is no region or
/// no background pixel.
pub fn aupro(
    maps: &[f32],
    masks: &[bool],
    height: usize,
    width: usize,
    fpr_limit: f64,
) -> Result<Aupro> {
    check_len(maps.len(), masks.len(), "masks")?;
    let regions = Regions::new(masks, height, width)?;
    let ranked = rank_descending(maps, "anomaly maps", |i| regions.labels[i])?;
    regions.aupro(&ranked, fpr_limit)
}

/// The ground-truth regions of a set of masks, labelled uniquely over the whole set.
struct Regions {
    /// The region of every pixel, 0 for background.
    labels: Vec<u32>,
    /// The pixel count of every region, indexed by label; entry 0 counts the background.
    sizes: Vec<u32>,
}

impl Regions {
    /// Labels the 8-connected components of each `height` x `width` mask of `masks`.
    fn new(masks: &[bool], height: usize, width: usize) -> Result<Self> {
        check_shape(masks.len(), height, width)?;
        let pixels = height * width;
        let per_image: Vec<(Vec<u32>, u32)> = masks
            .par_chunks(pixels)
            .map(|mask| connected_components(mask, height, width))
            .collect::<Result<_>>()?;
        let num_regions: usize = per_image.iter().map(|(_, n)| *n as usize).sum();
        // Renumber so that a label names one region of one image.
        let mut labels = Vec::with_capacity(masks.len());
        let mut offset = 0u32;
        for (image_labels, n) in &per_image {
            labels.extend(
                image_labels
                    .iter()
                    .map(|&l| if l == 0 { 0 } else { l + offset }),
            );
            offset += n;
        }
        let mut sizes = vec![0u32; num_regions + 1];
        for &r in &labels {
            sizes[r as usize] += 1;
        }
        Ok(Self { labels, sizes })
    }

    /// AUPRO from a ranking of the maps whose payload is the region label of each pixel.
    fn aupro(&self, ranked: &[u64], fpr_limit: f64) -> Result<Aupro> {
        aupro_ranked(ranked, &self.sizes, fpr_limit)
    }
}

/// [`aupro`] on a ranking of the maps made by [`rank_descending`] with region labels as payload;
/// `sizes` holds the pixel count of every region, background first.
fn aupro_ranked(ranked: &[u64], sizes: &[u32], fpr_limit: f64) -> Result<Aupro> {
    if !(fpr_limit > 0.0 && fpr_limit <= 1.0) {
        return Err(MetricsError::InvalidFprLimit(fpr_limit));
    }
    let num_regions = sizes.len() - 1;
    if num_regions == 0 {
        return Err(MetricsError::MissingClass {
            metric: "AUPRO",
            class: "positive",
        });
    }
    let num_background = u64::from(sizes[0]);
    if num_background == 0 {
        return Err(MetricsError::MissingClass {
            metric: "AUPRO",
            class: "negative",
        });
    }
    let weights: Vec<f64> = sizes
        .iter()
        .map(|&s| if s == 0 { 0.0 } else { 1.0 / f64::from(s) })
        .collect();

    // Walk the global curve until the first point beyond the limit.
    let mut fpr = vec![0.0];
    let mut pro = vec![0.0];
    let mut background = 0u64;
    let mut overlap = 0.0f64;
    let mut beyond: Option<(f64, f64)> = None;
    let mut start = 0;
    while start < ranked.len() && beyond.is_none() {
        let key = ranked[start] >> 32;
        let mut end = start;
        while end < ranked.len() && ranked[end] >> 32 == key {
            let r = entry_payload(ranked[end]);
            if r == 0 {
                background += 1;
            } else {
                overlap += weights[r as usize];
            }
            end += 1;
        }
        let point_fpr = (background as f64 / num_background as f64).min(1.0);
        let point_pro = (overlap / num_regions as f64).min(1.0);
        if point_fpr <= fpr_limit {
            fpr.push(point_fpr);
            pro.push(point_pro);
        } else {
            beyond = Some((point_fpr, point_pro));
        }
        start = end;
    }

    // Close the curve at the limit by linear interpolation towards the first point beyond it.
    let (last_fpr, last_pro) = (fpr[fpr.len() - 1], pro[pro.len() - 1]);
    if last_fpr < fpr_limit {
        if let Some((next_fpr, next_pro)) = beyond {
            let slope = (next_pro - last_pro) / (next_fpr - last_fpr);
            fpr.push(fpr_limit);
            pro.push(last_pro + slope * (fpr_limit - last_fpr));
        }
    }
    let area: f64 = fpr
        .windows(2)
        .zip(pro.windows(2))
        .map(|(f, p)| (f[1] - f[0]) * (p[1] + p[0]) / 2.0)
        .sum();
    let value = area / fpr[fpr.len() - 1];
    Ok(Aupro { value, fpr, pro })
}

/// Predictions and ground truth of an evaluation set, borrowed as flat slices.
///
/// `maps` and `masks` hold `scores.len()` images of `height` x `width` pixels back to back
/// (row-major, image after image). A mask pixel is `true` where the ground truth is anomalous; an
/// image label is `true` for a defective image.
#[derive(Debug, Clone, Copy)]
pub struct EvalSet<'a> {
    /// One anomaly score per image.
    pub scores: &'a [f32],
    /// One label per image, `true` = defective.
    pub labels: &'a [bool],
    /// The anomaly maps, `scores.len() * height * width` values.
    pub maps: &'a [f32],
    /// The ground-truth masks, same layout as `maps`.
    pub masks: &'a [bool],
    /// The image height in pixels.
    pub height: usize,
    /// The image width in pixels.
    pub width: usize,
}

impl<'a> EvalSet<'a> {
    /// Bundles the slices after checking that their lengths agree.
    pub fn new(
        scores: &'a [f32],
        labels: &'a [bool],
        maps: &'a [f32],
        masks: &'a [bool],
        height: usize,
        width: usize,
    ) -> Result<Self> {
        let set = Self {
            scores,
            labels,
            maps,
            masks,
            height,
            width,
        };
        set.validate()?;
        Ok(set)
    }

    /// Checks that the lengths agree and that there is at least one image.
    pub fn validate(&self) -> Result<()> {
        if self.scores.is_empty() {
            return Err(MetricsError::Empty { what: "scores" });
        }
        check_len(self.scores.len(), self.labels.len(), "labels")?;
        check_shape(self.maps.len(), self.height, self.width)?;
        check_len(
            self.scores.len() * self.height * self.width,
            self.maps.len(),
            "maps",
        )?;
        check_len(self.maps.len(), self.masks.len(), "masks")
    }

    /// The number of images.
    pub fn num_images(&self) -> usize {
        self.scores.len()
    }
}

/// The curves of an evaluation set, sorted once and shared by every metric and by the
/// post-processor.
#[derive(Debug, Clone)]
pub struct EvalCurves {
    /// The image-level curve of scores against labels.
    pub image: BinaryCurve,
    /// The pixel-level curve of all map values against all mask pixels.
    pub pixel: BinaryCurve,
    /// The AUPRO result at [`DEFAULT_FPR_LIMIT`], or the reason it is undefined.
    pub aupro: Result<Aupro>,
}

impl EvalCurves {
    /// Sorts the scores and the pixels of `set` and builds every curve.
    pub fn new(set: &EvalSet<'_>) -> Result<Self> {
        set.validate()?;
        let image = BinaryCurve::new(set.scores, set.labels)?;
        // One sort serves every pixel metric: a pixel is positive exactly when it lies in a region.
        let regions = Regions::new(set.masks, set.height, set.width)?;
        let ranked = rank_descending(set.maps, "anomaly maps", |i| regions.labels[i])?;
        let pixel = BinaryCurve::from_ranked(&ranked);
        let aupro = regions.aupro(&ranked, DEFAULT_FPR_LIMIT);
        Ok(Self {
            image,
            pixel,
            aupro,
        })
    }
}

/// The summary metrics of one evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Image-level AUROC of the scores.
    pub image_auroc: f64,
    /// Image-level step-wise average precision (anomalib's image AUPR).
    pub image_ap: f64,
    /// Image-level maximum F1 over all thresholds.
    pub image_f1_max: f64,
    /// The score threshold reaching `image_f1_max` (scores `>=` it are positive).
    pub image_f1_max_threshold: f32,
    /// Image-level F1 of `score > image_threshold` of the post-processor (anomalib's image F1Score).
    pub image_f1: f64,
    /// Pixel-level AUROC over all pixels of all images.
    pub pixel_auroc: f64,
    /// Pixel-level step-wise average precision (anomalib's pixel AUPR).
    pub pixel_ap: f64,
    /// Pixel-level AUPRO up to a false-positive rate of 0.3.
    pub pixel_aupro: f64,
    /// Pixel-level maximum F1 over all thresholds.
    pub pixel_f1_max: f64,
    /// The map threshold reaching `pixel_f1_max` (values `>=` it are positive).
    pub pixel_f1_max_threshold: f32,
    /// Pixel-level F1 of `value > pixel_threshold` of the post-processor (anomalib's pixel F1Score).
    pub pixel_f1: f64,
}

impl Metrics {
    /// Computes every metric of `set`; the two F1 scores use the thresholds of `post` (fitted on a
    /// validation set, possibly `set` itself).
    ///
    /// Fails when the set is malformed or when an image or pixel class is missing.
    pub fn compute(set: &EvalSet<'_>, post: &PostProcessor) -> Result<Self> {
        Self::from_curves(&EvalCurves::new(set)?, post)
    }

    /// Computes every metric from curves built by [`EvalCurves::new`].
    pub fn from_curves(curves: &EvalCurves, post: &PostProcessor) -> Result<Self> {
        let image_best = curves.image.f1_max()?;
        let pixel_best = curves.pixel.f1_max()?;
        Ok(Self {
            image_auroc: curves.image.auroc()?,
            image_ap: curves.image.average_precision()?,
            image_f1_max: image_best.value,
            image_f1_max_threshold: image_best.threshold,
            image_f1: curves.image.f1_score_at(post.image_threshold),
            pixel_auroc: curves.pixel.auroc()?,
            pixel_ap: curves.pixel.average_precision()?,
            pixel_aupro: curves.aupro.as_ref().map_err(Clone::clone)?.value,
            pixel_f1_max: pixel_best.value,
            pixel_f1_max_threshold: pixel_best.threshold,
            pixel_f1: curves.pixel.f1_score_at(post.pixel_threshold),
        })
    }
}

/// Computes [`Metrics`] separately for each defect type.
///
/// `defect_types` names the type of every image of `set`. The images of type [`GOOD_DEFECT_TYPE`]
/// are shared as negatives by every other type, as is customary for MVTec AD; each type's metrics
/// are computed over its own images plus the good ones. The result is keyed by type name, in sorted
/// order, and holds no entry for the good type itself.
pub fn metrics_per_defect_type<S: AsRef<str>>(
    set: &EvalSet<'_>,
    defect_types: &[S],
    post: &PostProcessor,
) -> Result<BTreeMap<String, Metrics>> {
    set.validate()?;
    check_len(set.num_images(), defect_types.len(), "defect types")?;
    let pixels = set.height * set.width;
    let mut names: Vec<&str> = defect_types
        .iter()
        .map(AsRef::as_ref)
        .filter(|t| *t != GOOD_DEFECT_TYPE)
        .collect();
    names.sort_unstable();
    names.dedup();
    let mut out = BTreeMap::new();
    for name in names {
        let chosen: Vec<usize> = (0..set.num_images())
            .filter(|&i| {
                let t = defect_types[i].as_ref();
                t == name || t == GOOD_DEFECT_TYPE
            })
            .collect();
        let scores: Vec<f32> = chosen.iter().map(|&i| set.scores[i]).collect();
        let labels: Vec<bool> = chosen.iter().map(|&i| set.labels[i]).collect();
        let mut maps = Vec::with_capacity(chosen.len() * pixels);
        let mut masks = Vec::with_capacity(chosen.len() * pixels);
        for &i in &chosen {
            maps.extend_from_slice(&set.maps[i * pixels..(i + 1) * pixels]);
            masks.extend_from_slice(&set.masks[i * pixels..(i + 1) * pixels]);
        }
        let subset = EvalSet::new(&scores, &labels, &maps, &masks, set.height, set.width)?;
        out.insert(name.to_owned(), Metrics::compute(&subset, post)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radix_sort_ranks_by_descending_value() {
        let preds = [
            0.5_f32,
            -1.0,
            3.0,
            0.5,
            -0.0,
            0.0,
            f32::INFINITY,
            1e-30,
            -7.25,
        ];
        let ranked = rank_descending(&preds, "predictions", |i| i as u32).unwrap();
        let values: Vec<f32> = ranked
            .iter()
            .map(|&e| preds[entry_payload(e) as usize])
            .collect();
        assert_eq!(
            values,
            [f32::INFINITY, 3.0, 0.5, 0.5, 1e-30, -0.0, 0.0, -1.0, -7.25]
        );
        let mut indices: Vec<usize> = ranked.iter().map(|&e| entry_payload(e) as usize).collect();
        indices.sort_unstable();
        assert_eq!(indices, (0..preds.len()).collect::<Vec<_>>());
    }

    #[test]
    fn order_key_preserves_order_and_merges_zeros() {
        let values = [
            f32::NEG_INFINITY,
            -2.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            0.5,
            3.0,
            f32::INFINITY,
        ];
        for pair in values.windows(2) {
            assert!(order_key(pair[0]) <= order_key(pair[1]), "{pair:?}");
        }
        assert_eq!(order_key(-0.0), order_key(0.0));
        for &v in &values {
            assert_eq!(key_value(order_key(v)), v + 0.0);
        }
    }

    #[test]
    fn connected_components_use_eight_connectivity() {
        // Two 2x2 squares touching at a corner, and a lone pixel.
        #[rustfmt::skip]
        let mask = [
            1, 1, 0, 0, 1,
            1, 1, 0, 0, 0,
            0, 0, 1, 1, 0,
            0, 0, 1, 1, 0,
        ].map(|v| v == 1);
        let (labels, count) = connected_components(&mask, 4, 5).unwrap();
        assert_eq!(count, 2);
        assert_eq!(labels[0], 1);
        assert_eq!(labels[18], 1);
        assert_eq!(labels[4], 2);
        assert_eq!(labels[2], 0);
    }

    #[test]
    fn roc_and_pr_curves_have_expected_points() {
        let curve = BinaryCurve::new(&[0.9, 0.5, 0.5, 0.1], &[true, true, false, false]).unwrap();
        let roc = curve.roc().unwrap();
        assert_eq!(roc.fpr, vec![0.0, 0.0, 0.5, 1.0]);
        assert_eq!(roc.tpr, vec![0.0, 0.5, 1.0, 1.0]);
        assert_eq!(roc.thresholds, vec![f32::INFINITY, 0.9, 0.5, 0.1]);
        let pr = curve.pr().unwrap();
        assert_eq!(pr.thresholds, vec![0.1, 0.5, 0.9]);
        assert_eq!(pr.precision, vec![0.5, 2.0 / 3.0, 1.0, 1.0]);
        assert_eq!(pr.recall, vec![1.0, 1.0, 0.5, 0.0]);
    }
}
