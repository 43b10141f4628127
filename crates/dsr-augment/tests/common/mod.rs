//! Shared by the statistics test and the `augment_stats` example: running the generators the way the
//! reference fixture did and comparing the results with `tests/fixtures/augment_stats.json`.
#![allow(dead_code)]

use dsr_augment::stats::{Estimate, SampleStats, Summary};
use dsr_augment::{Image, ImageBatch, MaskGenerator, Recipe, SmudgeGenerator};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::Value;

/// The reference statistics, copied from the shared fixtures.
pub const REFERENCE_JSON: &str = include_str!("../fixtures/augment_stats.json");

/// The real image the fixture used (first PNG of battery_weld train/good).
pub const REAL_IMAGE_PNG: &[u8] = include_bytes!("../fixtures/battery_weld_3-r1.png");

/// Tolerance multiplier: |ours − ref| ≤ K · sqrt(se_ref² + se_ours²).
///
/// With about 100 comparisons in the full table, a 4σ bound gives a family-wide false-alarm probability
/// under 1% (two-sided 6.3e-5 per normal comparison), while a real mismatch of a few percent of a
/// statistic still fails.
pub const K: f64 = 4.0;

/// Which input a phase-3 generator smudges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A constant 0.5 image.
    Grey,
    /// The fixture's real image resized to the target size.
    Real,
}

impl Input {
    pub fn key(self) -> &'static str {
        match self {
            Input::Grey => "grey",
            Input::Real => "real",
        }
    }
}

/// One generator configuration of the fixture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    Phase2(Recipe),
    Phase3(Recipe, Input),
}

impl Generator {
    pub const ALL: [Generator; 6] = [
        Generator::Phase2(Recipe::Anomalib),
        Generator::Phase2(Recipe::Original),
        Generator::Phase3(Recipe::Anomalib, Input::Grey),
        Generator::Phase3(Recipe::Anomalib, Input::Real),
        Generator::Phase3(Recipe::Original, Input::Grey),
        Generator::Phase3(Recipe::Original, Input::Real),
    ];

    /// The fixture's path to this generator's results, below the size key.
    pub fn reference_path(self) -> Vec<&'static str> {
        match self {
            Generator::Phase2(Recipe::Anomalib) => vec!["anomalib_DsrAnomalyGenerator_phase2"],
            Generator::Phase2(Recipe::Original) => vec!["original_recipe_phase2_OURS"],
            Generator::Phase3(Recipe::Anomalib, input) => {
                vec!["anomalib_PerlinAnomalyGenerator_phase3", input.key()]
            }
            Generator::Phase3(Recipe::Original, input) => {
                vec!["original_recipe_phase3_OURS", input.key()]
            }
        }
    }

    pub fn label(self) -> String {
        match self {
            Generator::Phase2(r) => format!("phase2/{r}"),
            Generator::Phase3(r, i) => format!("phase3/{r}/{}", i.key()),
        }
    }
}

/// Decodes the fixture's real image, converts it to RGB and resizes it to `w`×`h` with an antialiased
/// bilinear (triangle) filter, standing in for PIL's BILINEAR resize.
pub fn real_image(h: usize, w: usize) -> Image {
    let decoded = image::load_from_memory(REAL_IMAGE_PNG)
        .expect("the fixture PNG decodes")
        .to_rgb8();
    let resized = image::imageops::resize(
        &decoded,
        w as u32,
        h as u32,
        image::imageops::FilterType::Triangle,
    );
    Image::from_rgb8(h, w, resized.as_raw()).expect("the resized image has the requested size")
}

/// Generates `n` samples of `generator` at `h`×`w` from `seed` and measures them.
pub fn run(generator: Generator, h: usize, w: usize, n: usize, seed: u64) -> Vec<SampleStats> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let chunk = 128;
    let mut samples = Vec::with_capacity(n);
    match generator {
        Generator::Phase2(recipe) => {
            let generator = MaskGenerator::new(recipe);
            let mut left = n;
            while left > 0 {
                let m = left.min(chunk);
                let masks = generator
                    .generate_batch(m, h, w, &mut rng)
                    .expect("valid size");
                samples.extend(
                    (0..m)
                        .into_par_iter()
                        .map(|i| SampleStats::measure(masks.mask(i), h, w, None))
                        .collect::<Vec<_>>(),
                );
                left -= m;
            }
        }
        Generator::Phase3(recipe, input) => {
            // One generator instance per run, as in the fixture (the solarize threshold is drawn once).
            let smudger = SmudgeGenerator::new(recipe, &mut rng);
            let image = match input {
                Input::Grey => Image::filled(3, h, w, 0.5),
                Input::Real => real_image(h, w),
            };
            let mut left = n;
            while left > 0 {
                let m = left.min(chunk);
                let batch = ImageBatch::from_images(&vec![image.clone(); m]).expect("one shape");
                let (out, masks) = smudger.apply_batch(&batch, &mut rng).expect("valid image");
                samples.extend(
                    (0..m)
                        .into_par_iter()
                        .map(|i| {
                            SampleStats::measure(
                                masks.mask(i),
                                h,
                                w,
                                Some((batch.image_slice(i), out.image_slice(i))),
                            )
                        })
                        .collect::<Vec<_>>(),
                );
                left -= m;
            }
        }
    }
    samples
}

/// One line of the comparison table.
#[derive(Debug, Clone)]
pub struct Row {
    pub statistic: &'static str,
    pub ours: f64,
    pub reference: f64,
    pub tolerance: f64,
    pub pass: bool,
}

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn num(v: &Value, path: &[&str]) -> f64 {
    get(v, path)
        .as_f64()
        .unwrap_or_else(|| panic!("fixture lacks {path:?}"))
}

/// The fixture's results for `generator` at `h`×`w`, if it has them.
pub fn reference(h: usize, w: usize, generator: Generator) -> Option<Value> {
    let json: Value = serde_json::from_str(REFERENCE_JSON).expect("the fixture is valid JSON");
    let size = format!("{h}x{w}");
    let mut node = json.get("results")?.get(&size)?;
    for key in generator.reference_path() {
        node = node.get(key)?;
    }
    Some(node.clone())
}

/// Sizes present in the fixture, as (h, w).
pub fn reference_sizes() -> Vec<(usize, usize)> {
    let json: Value = serde_json::from_str(REFERENCE_JSON).expect("the fixture is valid JSON");
    let mut sizes: Vec<(usize, usize)> = json["results"]
        .as_object()
        .expect("results is an object")
        .keys()
        .filter_map(|k| {
            let (h, w) = k.split_once('x')?;
            Some((h.parse().ok()?, w.parse().ok()?))
        })
        .collect();
    sizes.sort();
    sizes
}

/// Compares our summary with the reference node.
///
/// Where the fixture gives a standard error it is used; otherwise the reference's SE is estimated from
/// ours, scaled by the square root of the ratio of sample sizes (both sides sample the same distribution
/// if the port is faithful). Our SEs are binomial, std/√n, or bootstrap (std, percentiles, pooled
/// change).
pub fn compare(ours: &Summary, reference: &Value) -> Vec<Row> {
    let n_ref = num(reference, &["n"]);
    let m_ref = num(reference, &["coverage", "n_nonempty"]);
    let mut rows = Vec::new();
    let mut push = |statistic: &'static str, e: Estimate, r: f64, se_ref: f64| {
        let tolerance = K * (e.se * e.se + se_ref * se_ref).sqrt();
        let pass = (e.value - r).abs() <= tolerance;
        rows.push(Row {
            statistic,
            ours: e.value,
            reference: r,
            tolerance,
            pass,
        });
    };
    let scaled = |e: Estimate, n_ref: f64| e.se * (e.n as f64 / n_ref).sqrt();
    push(
        "frac_empty_masks",
        ours.frac_empty_masks,
        num(reference, &["frac_empty_masks"]),
        num(reference, &["frac_empty_masks_se"]),
    );
    push(
        "coverage.mean",
        ours.coverage_mean,
        num(reference, &["coverage", "mean"]),
        num(reference, &["coverage", "mean_se"]),
    );
    for (name, e, key) in [
        ("coverage.std", ours.coverage_std, "std"),
        ("coverage.p10", ours.coverage_p10, "p10"),
        ("coverage.p50", ours.coverage_p50, "p50"),
        ("coverage.p90", ours.coverage_p90, "p90"),
    ] {
        push(
            name,
            e,
            num(reference, &["coverage", key]),
            scaled(e, m_ref),
        );
    }
    push(
        "mean_components",
        ours.mean_components,
        num(reference, &["mean_components"]),
        scaled(ours.mean_components, m_ref),
    );
    if let Some(e) = ours.frac_unchanged_images {
        let r = num(reference, &["frac_unchanged_images"]);
        push(
            "frac_unchanged_images",
            e,
            r,
            (r * (1.0 - r) / n_ref).sqrt(),
        );
    }
    if let Some(e) = ours.change_per_image_mean {
        let r = num(reference, &["mean_abs_change_in_mask", "per_image_mean"]);
        push("change_in_mask.per_image", e, r, scaled(e, m_ref));
    }
    if let Some(e) = ours.change_pooled {
        let r = num(reference, &["mean_abs_change_in_mask", "pooled"]);
        push("change_in_mask.pooled", e, r, scaled(e, m_ref));
    }
    if let Some(max) = ours.max_abs_change_outside_mask {
        let r = num(reference, &["max_abs_change_outside_mask"]);
        // Pixels outside the mask must be untouched: the tolerance is exactly zero.
        rows.push(Row {
            statistic: "max_abs_change_outside",
            ours: max,
            reference: r,
            tolerance: 0.0,
            pass: max == r,
        });
    }
    rows
}
