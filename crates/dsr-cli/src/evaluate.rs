//! `dsr test`: metrics on the test split of an MVTec-style folder, a table, `metrics.json` and an
//! HTML report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dsr_train::data::{Entry, MvtecDataset};
use dsr_train::metrics::{metrics_per_defect_type, EvalCurves, EvalSet, Metrics, GOOD_DEFECT_TYPE};
use dsr_train::postprocess::PostProcessor;
use serde::Serialize;

use crate::io::{load_image, load_mask, write_file};
use crate::model::LoadedModel;
use crate::report;

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
    evaluate_samples(&args.model, &root, samples, &args.out, args.batch)
}

/// Evaluates the model in `model_path` on `samples` of the data set `root`; prints the table and
/// writes `<out>/metrics.json` and `<out>/report.html`.
pub fn evaluate_samples(
    model_path: &Path,
    root: &Path,
    samples: Vec<Sample>,
    out: &Path,
    batch: usize,
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
        samples,
    };
    for chunk in ev.samples.chunks(batch) {
        let mut images = Vec::with_capacity(chunk.len());
        for s in chunk {
            images.push(load_image(&s.path, size)?);
            match &s.mask {
                Some(m) => ev.masks.extend(load_mask(m, size)?),
                None => ev.masks.extend(std::iter::repeat_n(false, pixels)),
            }
            ev.labels.push(s.defect_type != GOOD_DEFECT_TYPE);
        }
        let inputs: Vec<&[f32]> = images.iter().map(|i| i.chw.as_slice()).collect();
        for p in model.predict(&inputs)? {
            ev.scores.push(p.score);
            ev.maps.extend(p.map);
        }
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
