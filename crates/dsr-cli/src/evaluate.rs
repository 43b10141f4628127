//! `dsr test`: metrics on the test split of an MVTec-style folder, a table, `metrics.json` and an
//! HTML report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dsr_eval::metrics::{metrics_per_defect_type, Metrics};
use dsr_eval::{evaluate, Detector, EvalOptions, Evaluation, Execution, PostProcessor, Skipped};
use dsr_train::data::{Entry, MvtecDataset};
use dsr_train::pipeline::samples_of;
use serde::Serialize;

use crate::guard::OutputDir;
use crate::report;

/// The options of `dsr test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The checkpoint.
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// The data set folder: a category folder, or the root holding categories (with
    /// --category).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// The category sub-folder of --data. Default: --data is the category folder itself.
    #[arg(long, value_name = "C")]
    pub category: Option<String>,
    /// The output folder (created if missing).
    #[arg(long, value_name = "DIR", default_value = "results")]
    pub out: PathBuf,
    /// Images per forward pass (1 to 4096; checked against the memory available).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = crate::parse_batch)]
    pub batch: usize,
    /// What to do with a test image or mask that cannot be read: stop (fail), or leave the
    /// sample out of the metrics and list it under `skipped` in metrics.json (skip).
    #[arg(long, value_name = "POLICY", default_value_t = dsr_eval::OnError::Fail, value_parser = crate::parse_on_error)]
    pub on_error: dsr_eval::OnError,
    /// Refuse images and masks of more pixels than this (width × height, read from the file
    /// header before decoding).
    #[arg(long, value_name = "N", default_value_t = dsr_eval::image::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// The compute device.
    #[arg(long, value_enum, default_value_t = crate::train::DeviceArg::Cpu)]
    pub device: crate::train::DeviceArg,
}

/// Lists the test split of an MVTec-layout data set (see dsr-train's data module).
pub fn scan_test_split(
    data: &Path,
    category: Option<&str>,
) -> Result<(PathBuf, Vec<dsr_eval::Sample>)> {
    let dataset = MvtecDataset::open(data, category)?;
    let samples = samples_from_entries(&dataset.listing.test, &dataset.root)?;
    Ok((dataset.root, samples))
}

/// Turns labelled data-set entries of `root` into test samples; every defective image needs its
/// mask.
pub fn samples_from_entries(entries: &[Entry], root: &Path) -> Result<Vec<dsr_eval::Sample>> {
    if let Some(entry) = entries.iter().find(|e| e.label && e.mask_path.is_none()) {
        bail!(
            "the defective image {} has no ground-truth mask under {}",
            entry.path.display(),
            root.join("ground_truth").join(&entry.defect_type).display()
        );
    }
    if entries.is_empty() {
        bail!("{} holds no test image", root.join("test").display());
    }
    Ok(samples_of(entries))
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
    skipped: &'a [Skipped],
}

/// Runs `dsr test`.
pub fn run(args: &TestArgs, exec: Execution) -> Result<()> {
    if args.max_pixels == 0 {
        bail!("--max-pixels must be at least 1");
    }
    if let Some(c) = &args.category {
        dsr_train::session::check_category(c)?;
    }
    let (root, samples) = scan_test_split(&args.data, args.category.as_deref())?;
    let detector = Detector::load_on(&args.model, exec, &args.device.device()?)?;
    let mut out = open_output(&args.out, &samples, &detector)?;
    let options = EvalOptions {
        batch: args.batch,
        on_error: args.on_error,
        max_pixels: args.max_pixels,
    };
    let evaluation = evaluate_set(&detector, &root, samples, &options)?;
    write_results(&detector, &root, &evaluation, &mut out)
}

/// Takes the output folder of a test of `samples` by `detector` (before anything is evaluated):
/// it must not be a folder of the test images, and its `metrics.json` and `report.html`, if
/// present, must be files this program wrote.
pub fn open_output(
    out: &Path,
    samples: &[dsr_eval::Sample],
    detector: &Detector,
) -> Result<OutputDir> {
    let reads: Vec<PathBuf> = samples
        .iter()
        .flat_map(|s| std::iter::once(s.path.clone()).chain(s.mask.clone()))
        .collect();
    let model: Vec<PathBuf> = detector.path().map(Path::to_path_buf).into_iter().collect();
    let dir = OutputDir::open(out, &reads, &model, "dsr test")?;
    dir.check("metrics.json")?;
    dir.check("report.html")?;
    Ok(dir)
}

/// [`evaluate`] with the skipped samples reported on standard error; names `root` when nothing
/// could be read.
pub fn evaluate_set(
    detector: &Detector,
    root: &Path,
    samples: Vec<dsr_eval::Sample>,
    options: &EvalOptions,
) -> Result<Evaluation> {
    let count = samples.len();
    let evaluation = match evaluate(detector, samples, options) {
        Err(dsr_eval::EvalError::NothingRead(_)) => bail!(
            "none of the {count} test images of {} could be read",
            root.display()
        ),
        other => other?,
    };
    for s in &evaluation.skipped {
        eprintln!("skipping {}: {}", s.path, s.error);
    }
    if !evaluation.skipped.is_empty() {
        println!(
            "{} test image(s) skipped (see `skipped` in metrics.json)",
            evaluation.skipped.len()
        );
    }
    Ok(evaluation)
}

/// The metrics of `evaluation` (made by `detector` on the data set `root`): prints the table and
/// writes `<out>/metrics.json` and `<out>/report.html`. Without a post-processor stored with the
/// model, F1 is computed at the F1-max thresholds of this set, and the outputs say so.
pub fn write_results(
    detector: &Detector,
    root: &Path,
    evaluation: &Evaluation,
    out_dir: &mut OutputDir,
) -> Result<()> {
    let curves = evaluation.curves()?;
    let (post, threshold_source) = match detector.post() {
        Some(p) => (*p, "the post-processor stored in the checkpoint"),
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
    let per_type = metrics_per_defect_type(&evaluation.set()?, &evaluation.defect_types(), &post)
        .context("cannot compute the per-defect-type metrics")?;
    print_table(&overall, &per_type);
    println!("F1 thresholds: {threshold_source}");
    let model_name = detector
        .path()
        .map_or_else(String::new, |p| p.display().to_string());
    let file = MetricsFile {
        model: model_name,
        data: root.display().to_string(),
        image_size: detector.size(),
        num_images: evaluation.scores.len(),
        num_defective: evaluation.num_defective(),
        threshold_source,
        postprocess: post,
        overall: &overall,
        per_defect_type: &per_type,
        skipped: &evaluation.skipped,
    };
    let metrics_path = out_dir.write(
        "metrics.json",
        serde_json::to_string_pretty(&file)?.as_bytes(),
    )?;
    let html = report::html(&report::ReportInput {
        title: &root.display().to_string(),
        model: detector,
        post: &post,
        threshold_source,
        overall: &overall,
        per_type: &per_type,
        curves: &curves,
        evaluated: evaluation,
    })?;
    let report_path = out_dir.write("report.html", html.as_bytes())?;
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
