//! Statistics of generated masks and images, defined exactly as in the reference fixture
//! `augment_stats.json`, with standard errors for comparing two samples.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Number of 8-connected components of the pixels above 0.5 (the background is not counted).
pub fn connected_components(mask: &[f32], h: usize, w: usize) -> usize {
    let mut seen = vec![false; h * w];
    let mut stack = Vec::new();
    let mut count = 0;
    for start in 0..h * w {
        if seen[start] || mask[start] <= 0.5 {
            continue;
        }
        count += 1;
        seen[start] = true;
        stack.push(start);
        while let Some(p) = stack.pop() {
            let (y, x) = (p / w, p % w);
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let q = ny * w + nx;
                    if !seen[q] && mask[q] > 0.5 {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
    }
    count
}

/// The `q`-th percentile (0–100) of sorted values with linear interpolation (numpy's default).
/// Returns NaN for an empty slice.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (pos - lo as f64) * (sorted[hi] - sorted[lo])
}

/// What one generated sample contributes to the statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleStats {
    /// Number of mask pixels equal to 1.
    pub mask_pixels: usize,
    /// Anomalous-pixel fraction, mask pixels / (H·W).
    pub coverage: f64,
    /// 8-connected components of the mask.
    pub components: usize,
    /// Whether the augmented image equals the input exactly (None for mask-only samples).
    pub unchanged: Option<bool>,
    /// Sum of |augmented − input| over mask pixels and channels.
    pub abs_change_in_mask: f64,
    /// Largest |augmented − input| outside the mask.
    pub max_abs_change_outside: f64,
}

impl SampleStats {
    /// Measures one mask and, for phase 3, the input and augmented images (C×H×W each).
    pub fn measure(mask: &[f32], h: usize, w: usize, images: Option<(&[f32], &[f32])>) -> Self {
        let mask_pixels = mask.iter().filter(|&&m| m > 0.5).count();
        let components = if mask_pixels > 0 {
            connected_components(mask, h, w)
        } else {
            0
        };
        let mut stats = SampleStats {
            mask_pixels,
            coverage: mask_pixels as f64 / (h * w) as f64,
            components,
            unchanged: None,
            abs_change_in_mask: 0.0,
            max_abs_change_outside: 0.0,
        };
        if let Some((input, output)) = images {
            stats.unchanged = Some(input == output);
            let plane = h * w;
            for (i, (a, b)) in input.iter().zip(output).enumerate() {
                let d = f64::from((a - b).abs());
                if mask[i % plane] > 0.5 {
                    stats.abs_change_in_mask += d;
                } else {
                    stats.max_abs_change_outside = stats.max_abs_change_outside.max(d);
                }
            }
        }
        stats
    }
}

/// An estimate with its standard error and the sample size behind it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// The value.
    pub value: f64,
    /// Its standard error.
    pub se: f64,
    /// The number of samples it was computed from.
    pub n: usize,
}

/// The fixture's statistics over a set of samples, each with a standard error.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Fraction of all-zero masks (binomial SE).
    pub frac_empty_masks: Estimate,
    /// Mean coverage over non-empty masks (SE std/√n).
    pub coverage_mean: Estimate,
    /// Population standard deviation of the coverage (bootstrap SE).
    pub coverage_std: Estimate,
    /// 10th percentile of the coverage (bootstrap SE).
    pub coverage_p10: Estimate,
    /// Median coverage (bootstrap SE).
    pub coverage_p50: Estimate,
    /// 90th percentile of the coverage (bootstrap SE).
    pub coverage_p90: Estimate,
    /// Mean number of components over non-empty masks (SE std/√n).
    pub mean_components: Estimate,
    /// Fraction of images left exactly unchanged (phase 3 only; binomial SE).
    pub frac_unchanged_images: Option<Estimate>,
    /// Mean over non-empty samples of the per-image mean |change| in the mask (phase 3 only; SE std/√n).
    pub change_per_image_mean: Option<Estimate>,
    /// Pooled mean |change| over all mask pixels (phase 3 only; bootstrap SE).
    pub change_pooled: Option<Estimate>,
    /// Largest |change| outside the masks (phase 3 only).
    pub max_abs_change_outside_mask: Option<f64>,
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

fn binomial(count: usize, n: usize) -> Estimate {
    let p = count as f64 / n as f64;
    Estimate {
        value: p,
        se: (p * (1.0 - p) / n as f64).sqrt(),
        n,
    }
}

fn mean_estimate(values: &[f64]) -> Estimate {
    let (mean, std) = mean_std(values);
    Estimate {
        value: mean,
        se: std / (values.len() as f64).sqrt(),
        n: values.len(),
    }
}

/// Bootstrap standard error of `stat` over `values` with `resamples` seeded resamples.
fn bootstrap_se<T: Copy>(
    values: &[T],
    resamples: usize,
    seed: u64,
    stat: impl Fn(&[T]) -> f64,
) -> f64 {
    if values.is_empty() || resamples < 2 {
        return f64::NAN;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut buf = Vec::with_capacity(values.len());
    let estimates: Vec<f64> = (0..resamples)
        .map(|_| {
            buf.clear();
            buf.extend((0..values.len()).map(|_| values[rng.random_range(0..values.len())]));
            stat(&buf)
        })
        .collect();
    mean_std(&estimates).1
}

impl Summary {
    /// Computes the statistics; `bootstrap` is the number of resamples for the bootstrap SEs.
    pub fn from_samples(samples: &[SampleStats], bootstrap: usize) -> Summary {
        let n = samples.len();
        let nonempty: Vec<&SampleStats> = samples.iter().filter(|s| s.mask_pixels > 0).collect();
        let mut coverage: Vec<f64> = nonempty.iter().map(|s| s.coverage).collect();
        coverage.sort_by(f64::total_cmp);
        let components: Vec<f64> = nonempty.iter().map(|s| s.components as f64).collect();
        let m = coverage.len();
        let sorted_percentile = |q: f64| {
            move |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(f64::total_cmp);
                percentile(&v, q)
            }
        };
        let boot =
            |seed: u64, f: &dyn Fn(&[f64]) -> f64| bootstrap_se(&coverage, bootstrap, seed, f);
        let std_of = |v: &[f64]| mean_std(v).1;
        let est = |value: f64, se: f64| Estimate { value, se, n: m };
        let phase3 = samples.first().is_some_and(|s| s.unchanged.is_some());
        let (frac_unchanged_images, change_per_image_mean, change_pooled, max_outside) = if phase3 {
            let unchanged = samples.iter().filter(|s| s.unchanged == Some(true)).count();
            let channels_pixels: Vec<(f64, f64)> = nonempty
                .iter()
                .map(|s| (s.abs_change_in_mask, s.mask_pixels as f64))
                .collect();
            // The per-image mean divides by 3 channels times the mask pixels, like the fixture.
            let per_image: Vec<f64> = channels_pixels
                .iter()
                .map(|(sum, px)| sum / (3.0 * px))
                .collect();
            let pooled = |v: &[(f64, f64)]| {
                let (s, p) = v.iter().fold((0.0, 0.0), |(s, p), (a, b)| (s + a, p + b));
                s / (3.0 * p)
            };
            let pooled_value = pooled(&channels_pixels);
            let pooled_se = bootstrap_se(&channels_pixels, bootstrap, 6, pooled);
            let max_outside = samples
                .iter()
                .map(|s| s.max_abs_change_outside)
                .fold(0.0, f64::max);
            (
                Some(binomial(unchanged, n)),
                Some(mean_estimate(&per_image)),
                Some(Estimate {
                    value: pooled_value,
                    se: pooled_se,
                    n: m,
                }),
                Some(max_outside),
            )
        } else {
            (None, None, None, None)
        };
        Summary {
            n,
            frac_empty_masks: binomial(n - m, n),
            coverage_mean: mean_estimate(&coverage),
            coverage_std: est(std_of(&coverage), boot(1, &std_of)),
            coverage_p10: est(
                percentile(&coverage, 10.0),
                boot(2, &sorted_percentile(10.0)),
            ),
            coverage_p50: est(
                percentile(&coverage, 50.0),
                boot(3, &sorted_percentile(50.0)),
            ),
            coverage_p90: est(
                percentile(&coverage, 90.0),
                boot(4, &sorted_percentile(90.0)),
            ),
            mean_components: mean_estimate(&components),
            frac_unchanged_images,
            change_per_image_mean,
            change_pooled,
            max_abs_change_outside_mask: max_outside,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_use_eight_connectivity() {
        // Two diagonal pixels touch under 8-connectivity; the isolated one is separate.
        let mask = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        assert_eq!(connected_components(&mask, 3, 4), 2);
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert!((percentile(&v, 10.0) - 1.3).abs() < 1e-12);
        assert!((percentile(&v, 50.0) - 2.5).abs() < 1e-12);
        assert!((percentile(&v, 90.0) - 3.7).abs() < 1e-12);
    }
}
