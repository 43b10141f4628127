//! `dsr test`: metrics on the test split of an MVTec-style folder, a table, `metrics.json` and an
//! HTML report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dsr_train::metrics::{metrics_per_defect_type, EvalCurves, EvalSet, Metrics, GOOD_DEFECT_TYPE};
use dsr_train::postprocess::PostProcessor;
use serde::Serialize;

use crate::io::{load_image, load_mask, write_file};
use crate::model::LoadedModel;
use crate::predict::IMAGE_EXTENSIONS;
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

fn sorted_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Lists `<root>/test/<defect>/*` with the masks `<root>/ground_truth/<defect>/<stem>_mask.*`.
pub fn scan_test_split(root: &Path) -> Result<Vec<Sample>> {
    let test = root.join("test");
    if !test.is_dir() {
        bail!(
            "{} has no test folder (expected the MVTec layout <category>/test/<defect>/)",
            root.display()
        );
    }
    let mut types: Vec<PathBuf> = std::fs::read_dir(&test)
        .with_context(|| format!("cannot list {}", test.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    types.sort();
    let mut samples = Vec::new();
    for dir in types {
        let defect_type = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for path in sorted_images(&dir)? {
            let mask = if defect_type == GOOD_DEFECT_TYPE {
                None
            } else {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let gt_dir = root.join("ground_truth").join(&defect_type);
                let found = IMAGE_EXTENSIONS
                    .iter()
                    .map(|ext| gt_dir.join(format!("{stem}_mask.{ext}")))
                    .find(|p| p.is_file());
                Some(found.with_context(|| {
                    format!(
                        "the defective image {} has no mask {}",
                        path.display(),
                        gt_dir.join(format!("{stem}_mask.png")).display()
                    )
                })?)
            };
            samples.push(Sample {
                path,
                defect_type: defect_type.clone(),
                mask,
            });
        }
    }
    if samples.is_empty() {
        bail!("{} holds no test image", test.display());
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
    let model = LoadedModel::load(&args.model)?;
    let root = match &args.category {
        Some(c) => args.data.join(c),
        None => args.data.clone(),
    };
    if !root.is_dir() {
        bail!("the data folder {} does not exist", root.display());
    }
    let samples = scan_test_split(&root)?;
    let size = model.size;
    let pixels = size[0] * size[1];
    let mut ev = Evaluated {
        scores: Vec::with_capacity(samples.len()),
        labels: Vec::with_capacity(samples.len()),
        maps: Vec::with_capacity(samples.len() * pixels),
        masks: Vec::with_capacity(samples.len() * pixels),
        samples,
    };
    for chunk in ev.samples.chunks(args.batch) {
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
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;
    let file = MetricsFile {
        model: args.model.display().to_string(),
        data: root.display().to_string(),
        image_size: size,
        num_images: ev.scores.len(),
        num_defective: ev.labels.iter().filter(|&&l| l).count(),
        threshold_source,
        postprocess: post,
        overall: &overall,
        per_defect_type: &per_type,
    };
    let metrics_path = args.out.join("metrics.json");
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
    let report_path = args.out.join("report.html");
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
