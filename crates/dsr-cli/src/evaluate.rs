//! `dsr test`: metrics on the test split of an MVTec-style folder, a table, `metrics.json` and an
//! HTML report.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dsr_train::data::{Entry, MvtecDataset, DEFAULT_MAX_PIXELS};
use dsr_train::metrics::{metrics_per_defect_type, EvalCurves, EvalSet, Metrics, GOOD_DEFECT_TYPE};
use dsr_train::postprocess::PostProcessor;
use serde::Serialize;

use crate::io::{load_image_limited, load_mask, write_file};
use crate::model::LoadedModel;
use crate::report;
use crate::OnError;

/// The options of `dsr test`.
pub struct TestArgs {
    /// The checkpoint.
    pub model: PathBuf,
    /// The data set root (or the category folder itself).
    pub data: PathBuf,
    /// The category sub-folder, if `data` is the root of several.
    pub category: Option<String>,
    /// The output folder.
    pub out: PathBuf,
    /// Images per forward pass.
    pub batch: usize,
    /// What to do with an image or mask that cannot be read, and the pixel limit.
    pub options: EvalOptions,
}

/// How `dsr test` treats unreadable inputs.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Stop at the first unreadable image or mask, or leave the sample out and report it.
    pub on_error: OnError,
    /// Images and masks with more pixels than this (from their header) are refused.
    pub max_pixels: u64,
}

impl Default for EvalOptions {
    /// Stop at the first bad file; the default pixel limit.
    fn default() -> Self {
        Self {
            on_error: OnError::Fail,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// A test sample left out under `--on-error skip`.
#[derive(Serialize)]
struct SkippedSample {
    path: String,
    error: String,
}

/// One test image with its ground truth.
pub struct Sample {
    /// The image file.
    pub path: PathBuf,
    /// The defect type (the sub-folder of `test/`), `good` for defect-free images.
    pub defect_type: String,
    /// The mask file, for defective images.
    pub mask: Option<PathBuf>,
}

/// Lists the test split of an MVTec-layout data set (see dsr-train's data module).
pub fn scan_test_split(data: &Path, category: Option<&str>) -> Result<(PathBuf, Vec<Sample>)> {
    let dataset = MvtecDataset::open(data, category)?;
    let samples = samples_from_entries(&dataset.listing.test, &dataset.root)?;
    Ok((dataset.root, samples))
}

/// Turns labelled data-set entries of `root` into test samples; every defective image needs its
/// mask.
pub fn samples_from_entries(entries: &[Entry], root: &Path) -> Result<Vec<Sample>> {
    let mut samples = Vec::with_capacity(entries.len());
    for entry in entries {
        if entry.label && entry.mask_path.is_none() {
            bail!(
                "the defective image {} has no ground-truth mask under {}",
                entry.path.display(),
                root.join("ground_truth").join(&entry.defect_type).display()
            );
        }
        samples.push(Sample {
            path: entry.path.clone(),
            defect_type: entry.defect_type.clone(),
            mask: entry.mask_path.clone(),
        });
    }
    if samples.is_empty() {
        bail!("{} holds no test image", root.join("test").display());
    }
    Ok(samples)
}

#[derive(Serialize)]
struct MetricsFile<'a> {
    model: String,
    data: String,
    image_size: [usize; 2],
    num_images: usize,
    num_defective: usize,
    threshold_source: &'a str,
    postprocess: PostProcessor,
    overall: &'a Metrics,
    per_defect_type: &'a BTreeMap<String, Metrics>,
    skipped: &'a [SkippedSample],
}

/// Everything the report needs about the evaluated set.
pub struct Evaluated {
    /// The test images.
    pub samples: Vec<Sample>,
    /// The raw image scores.
    pub scores: Vec<f32>,
    /// The image labels.
    pub labels: Vec<bool>,
    /// The raw maps, image after image.
    pub maps: Vec<f32>,
    /// The masks, image after image.
    pub masks: Vec<bool>,
}

/// Runs `dsr test`.
pub fn run(args: &TestArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let (root, samples) = scan_test_split(&args.data, args.category.as_deref())?;
    evaluate_samples(
        &args.model,
        &root,
        samples,
        &args.out,
        args.batch,
        &args.options,
        &Known::default(),
    )
}

/// Scores and raw maps the same model already computed for some images (the validation pass of
/// a training run whose validation set is the test set), so that the test does not infer them
/// a second time.
#[derive(Debug, Default)]
pub struct Known<'a> {
    index: HashMap<&'a Path, usize>,
    scores: &'a [f32],
    maps: &'a [f32],
}

impl<'a> Known<'a> {
    /// `scores[i]` and the `i`-th map of `maps` belong to `paths[i]`; nothing is known when the
    /// lengths do not agree.
    pub fn new(paths: &'a [PathBuf], scores: &'a [f32], maps: &'a [f32]) -> Self {
        if paths.is_empty() || paths.len() != scores.len() || maps.len() % paths.len() != 0 {
            return Self::default();
        }
        Self {
            index: paths
                .iter()
                .enumerate()
                .map(|(i, p)| (p.as_path(), i))
                .collect(),
            scores,
            maps,
        }
    }

    /// The score and map of `path`, when known at `pixels` pixels per map.
    fn get(&self, path: &Path, pixels: usize) -> Option<(f32, &'a [f32])> {
        let &i = self.index.get(path)?;
        if self.maps.len() != self.scores.len() * pixels {
            return None;
        }
        Some((self.scores[i], &self.maps[i * pixels..(i + 1) * pixels]))
    }
}

/// Evaluates the model in `model_path` on `samples` of the data set `root`; prints the table and
/// writes `<out>/metrics.json` and `<out>/report.html`. The score and map of an image found in
/// `known` are taken from there instead of inferred. Unreadable images and masks stop it, or
/// under [`OnError::Skip`] such a sample is reported on stderr, left out of every metric and
/// listed under `skipped` in `metrics.json`.
pub fn evaluate_samples(
    model_path: &Path,
    root: &Path,
    samples: Vec<Sample>,
    out: &Path,
    batch: usize,
    options: &EvalOptions,
    known: &Known<'_>,
) -> Result<()> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let model = LoadedModel::load(model_path)?;
    let size = model.size;
    let pixels = size[0] * size[1];
    let mut ev = Evaluated {
        scores: Vec::with_capacity(samples.len()),
        labels: Vec::with_capacity(samples.len()),
        maps: Vec::with_capacity(samples.len() * pixels),
        masks: Vec::with_capacity(samples.len() * pixels),
        samples: Vec::with_capacity(samples.len()),
    };
    let mut skipped = Vec::new();
    let mut samples = samples.into_iter().peekable();
    while samples.peek().is_some() {
        let mut images = Vec::with_capacity(batch);
        for s in samples.by_ref().take(batch) {
            let loaded = load_image_limited(&s.path, size, options.max_pixels).and_then(|img| {
                let mask = match &s.mask {
                    Some(m) => load_mask(m, size, options.max_pixels, &s.path, img.original_size)?,
                    None => vec![false; pixels],
                };
                Ok((img, mask))
            });
            match loaded {
                Ok((img, mask)) => {
                    images.push(img);
                    ev.masks.extend(mask);
                    ev.labels.push(s.defect_type != GOOD_DEFECT_TYPE);
                    ev.samples.push(s);
                }
                Err(e) if options.on_error == OnError::Skip => {
                    eprintln!("skipping {}: {e:#}", s.path.display());
                    skipped.push(SkippedSample {
                        path: s.path.display().to_string(),
                        error: format!("{e:#}"),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        if images.is_empty() {
            continue;
        }
        let first = ev.samples.len() - images.len();
        let reused: Vec<Option<(f32, &[f32])>> = ev.samples[first..]
            .iter()
            .map(|s| known.get(&s.path, pixels))
            .collect();
        let inputs: Vec<&[f32]> = images
            .iter()
            .zip(&reused)
            .filter(|(_, r)| r.is_none())
            .map(|(i, _)| i.chw.as_slice())
            .collect();
        let mut predicted = if inputs.is_empty() {
            Vec::new()
        } else {
            model.predict(&inputs)?
        }
        .into_iter();
        for r in reused {
            match r {
                Some((score, map)) => {
                    ev.scores.push(score);
                    ev.maps.extend_from_slice(map);
                }
                None => {
                    let p = predicted
                        .next()
                        .context("the model returned fewer predictions than images")?;
                    ev.scores.push(p.score);
                    ev.maps.extend(p.map);
                }
            }
        }
    }
    if ev.samples.is_empty() {
        bail!(
            "none of the {} test images of {} could be read",
            skipped.len(),
            root.display()
        );
    }
    if !skipped.is_empty() {
        println!(
            "{} test image(s) skipped (see `skipped` in metrics.json)",
            skipped.len()
        );
    }
    let set = EvalSet::new(
        &ev.scores, &ev.labels, &ev.maps, &ev.masks, size[0], size[1],
    )?;
    let curves = EvalCurves::new(&set)?;
    let (post, threshold_source) = match model.post {
        Some(p) => (p, "the post-processor stored in the checkpoint"),
        None => (
            PostProcessor::from_curves(&curves.image, &curves.pixel),
            "no post-processor in the checkpoint: F1 is computed at the F1-max threshold of this test set",
        ),
    };
    let overall = Metrics::from_curves(&curves, &post).with_context(|| {
        format!(
            "cannot compute the metrics of {} (it needs both good and defective images, and defective pixels)",
            root.display()
        )
    })?;
    let types: Vec<&str> = ev.samples.iter().map(|s| s.defect_type.as_str()).collect();
    let per_type = metrics_per_defect_type(&set, &types, &post)
        .context("cannot compute the per-defect-type metrics")?;
    print_table(&overall, &per_type);
    println!("F1 thresholds: {threshold_source}");
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output folder {}", out.display()))?;
    let file = MetricsFile {
        model: model_path.display().to_string(),
        data: root.display().to_string(),
        image_size: size,
        num_images: ev.scores.len(),
        num_defective: ev.labels.iter().filter(|&&l| l).count(),
        threshold_source,
        postprocess: post,
        overall: &overall,
        per_defect_type: &per_type,
        skipped: &skipped,
    };
    let metrics_path = out.join("metrics.json");
    write_file(
        &metrics_path,
        serde_json::to_string_pretty(&file)?.as_bytes(),
    )?;
    let html = report::html(&report::ReportInput {
        title: &root.display().to_string(),
        model: &model,
        post: &post,
        threshold_source,
        overall: &overall,
        per_type: &per_type,
        curves: &curves,
        evaluated: &ev,
    })?;
    let report_path = out.join("report.html");
    write_file(&report_path, html.as_bytes())?;
    println!(
        "wrote {} and {}",
        metrics_path.display(),
        report_path.display()
    );
    Ok(())
}

/// The column names and values of one table row.
pub fn metric_columns(m: &Metrics) -> [(&'static str, f64); 9] {
    [
        ("image AUROC", m.image_auroc),
        ("image AP", m.image_ap),
        ("image F1max", m.image_f1_max),
        ("image F1", m.image_f1),
        ("pixel AUROC", m.pixel_auroc),
        ("pixel AP", m.pixel_ap),
        ("AUPRO", m.pixel_aupro),
        ("pixel F1max", m.pixel_f1_max),
        ("pixel F1", m.pixel_f1),
    ]
}

fn print_table(overall: &Metrics, per_type: &BTreeMap<String, Metrics>) {
    let width = per_type
        .keys()
        .map(String::len)
        .chain(std::iter::once("overall".len()))
        .max()
        .unwrap_or(7);
    let mut header = format!("{:width$}", "");
    for (name, _) in metric_columns(overall) {
        header.push_str(&format!(" {name:>11}"));
    }
    println!("{header}");
    let rows =
        std::iter::once(("overall", overall)).chain(per_type.iter().map(|(k, v)| (k.as_str(), v)));
    for (name, m) in rows {
        let mut line = format!("{name:width$}");
        for (_, v) in metric_columns(m) {
            line.push_str(&format!(" {v:>11.4}"));
        }
        println!("{line}");
    }
}

#[cfg(test)]
mod known_tests {
    use super::*;

    #[test]
    fn known_maps_are_found_by_path_and_inconsistent_input_is_ignored() {
        let paths = vec![PathBuf::from("a.png"), PathBuf::from("b.png")];
        let scores = [0.25f32, 0.75];
        let maps = [1f32, 2., 3., 4., 5., 6., 7., 8.];
        let known = Known::new(&paths, &scores, &maps);
        assert_eq!(known.get(Path::new("b.png"), 4), Some((0.75, &maps[4..8])));
        assert_eq!(known.get(Path::new("a.png"), 4), Some((0.25, &maps[0..4])));
        assert_eq!(known.get(Path::new("c.png"), 4), None);
        // A map size that does not match the model's is never used.
        assert_eq!(known.get(Path::new("a.png"), 3), None);
        // Lengths that disagree: nothing is known.
        let none = Known::new(&paths, &scores[..1], &maps);
        assert_eq!(none.get(Path::new("a.png"), 4), None);
    }
}
