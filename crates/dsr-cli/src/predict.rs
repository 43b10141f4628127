//! `dsr predict`: anomaly maps, scores and overlays for a list of images.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::io::{load_image, npy_bytes, png_bytes, write_file, ModelImage};
use crate::model::LoadedModel;
use crate::render::{draw_contours, draw_text, heat_overlay};
use crate::OnError;
use dsr_train::data::IMAGE_EXTENSIONS;

/// The options of `dsr predict`.
pub struct PredictArgs {
    /// The checkpoint.
    pub model: PathBuf,
    /// Files, folders or glob patterns.
    pub inputs: Vec<String>,
    /// The output folder.
    pub out: PathBuf,
    /// Write raw maps even when a post-processor is stored.
    pub raw: bool,
    /// What to do with an input that cannot be read.
    pub on_error: OnError,
    /// Images per forward pass.
    pub batch: usize,
}

#[derive(Serialize)]
struct Row {
    path: String,
    overlay: String,
    map: String,
    original_size: [usize; 2],
    score: f32,
    normalized_score: Option<f32>,
    label: &'static str,
}

#[derive(Serialize)]
struct Skipped {
    path: String,
    error: String,
}

#[derive(Serialize)]
struct Report<'a> {
    model: String,
    image_size: [usize; 2],
    map_values: &'a str,
    label_rule: &'a str,
    predictions: &'a [Row],
    skipped: &'a [Skipped],
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Expands files, folders (their images, sorted) and glob patterns (matches, sorted) into a
/// list of files. Inputs that name nothing are returned as problems.
pub fn expand_inputs(inputs: &[String]) -> (Vec<PathBuf>, Vec<(String, String)>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for input in inputs {
        let path = Path::new(input);
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.is_file() && is_image(p))
                        .collect();
                    found.sort();
                    if found.is_empty() {
                        problems.push((input.clone(), "the folder holds no image".to_string()));
                    }
                    files.extend(found);
                }
                Err(e) => problems.push((input.clone(), format!("cannot list the folder: {e}"))),
            }
        } else if path.exists() {
            files.push(path.to_path_buf());
        } else if input.contains(['*', '?', '[']) {
            match glob::glob(input) {
                Ok(paths) => {
                    let mut found: Vec<PathBuf> = paths
                        .filter_map(|p| p.ok())
                        .filter(|p| p.is_file())
                        .collect();
                    found.sort();
                    if found.is_empty() {
                        problems.push((input.clone(), "the pattern matches no file".to_string()));
                    }
                    files.extend(found);
                }
                Err(e) => problems.push((input.clone(), format!("not a valid pattern: {e}"))),
            }
        } else {
            problems.push((input.clone(), "no such file or folder".to_string()));
        }
    }
    (files, problems)
}

/// Output stems, unique within the run: a repeated stem gets `_2`, `_3`, … appended.
fn unique_stem(path: &Path, used: &mut HashSet<String>) -> String {
    let base = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".to_string());
    let mut stem = base.clone();
    let mut n = 2;
    while !used.insert(stem.clone()) {
        stem = format!("{base}_{n}");
        n += 1;
    }
    stem
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Runs `dsr predict`.
pub fn run(args: &PredictArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let model = LoadedModel::load(&args.model)?;
    let (files, problems) = expand_inputs(&args.inputs);
    let mut skipped: Vec<Skipped> = Vec::new();
    for (input, problem) in problems {
        if args.on_error == OnError::Fail {
            bail!("{input}: {problem}");
        }
        eprintln!("skipping {input}: {problem}");
        skipped.push(Skipped {
            path: input,
            error: problem,
        });
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;
    let raw_maps = args.raw || model.post.is_none();
    let map_values = if raw_maps { "raw" } else { "normalized" };
    let label_rule = if model.post.is_some() {
        "post-processor thresholds stored in the checkpoint"
    } else {
        "no post-processor in the checkpoint: raw score and map value > 0.5"
    };
    let [h, w] = model.size;
    let mut rows = Vec::new();
    let mut used = HashSet::new();
    for chunk in files.chunks(args.batch) {
        let mut loaded: Vec<(&PathBuf, ModelImage)> = Vec::new();
        for path in chunk {
            match load_image(path, model.size) {
                Ok(img) => loaded.push((path, img)),
                Err(e) => {
                    if args.on_error == OnError::Fail {
                        return Err(e);
                    }
                    eprintln!("skipping {}: {e:#}", path.display());
                    skipped.push(Skipped {
                        path: path.display().to_string(),
                        error: format!("{e:#}"),
                    });
                }
            }
        }
        if loaded.is_empty() {
            continue;
        }
        let inputs: Vec<&[f32]> = loaded.iter().map(|(_, img)| img.chw.as_slice()).collect();
        let predictions = model.predict(&inputs)?;
        for ((path, img), pred) in loaded.iter().zip(predictions) {
            let stem = unique_stem(path, &mut used);
            let shown = model.display_map(&pred.map);
            let mut overlay = heat_overlay(&img.rgb, &shown);
            draw_contours(&mut overlay, &model.pixel_mask(&pred.map), [255, 0, 0]);
            let anomalous = model.image_label(pred.score);
            let label = if anomalous { "anomalous" } else { "normal" };
            let normalized_score = model.post.map(|p| p.normalize_score(pred.score));
            let text = format!("{:.3} {label}", normalized_score.unwrap_or(pred.score));
            let colour = if anomalous {
                [255, 64, 64]
            } else {
                [64, 255, 64]
            };
            draw_text(&mut overlay, &text, colour);
            let png_path = args.out.join(format!("{stem}.png"));
            write_file(&png_path, &png_bytes(&overlay)?)?;
            let npy_path = args.out.join(format!("{stem}.npy"));
            let values = if raw_maps { &pred.map } else { &shown };
            write_file(&npy_path, &npy_bytes(values, h, w))?;
            rows.push(Row {
                path: path.display().to_string(),
                overlay: png_path.display().to_string(),
                map: npy_path.display().to_string(),
                original_size: img.original_size,
                score: pred.score,
                normalized_score,
                label,
            });
        }
    }
    let mut csv = String::from("path,score,normalized_score,label,map_values,overlay,map\n");
    for r in &rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            csv_field(&r.path),
            r.score,
            r.normalized_score
                .map(|v| v.to_string())
                .unwrap_or_default(),
            r.label,
            map_values,
            csv_field(&r.overlay),
            csv_field(&r.map),
        ));
    }
    write_file(&args.out.join("predictions.csv"), csv.as_bytes())?;
    let report = Report {
        model: model.path.display().to_string(),
        image_size: model.size,
        map_values,
        label_rule,
        predictions: &rows,
        skipped: &skipped,
    };
    let json = serde_json::to_string_pretty(&report)?;
    write_file(&args.out.join("predictions.json"), json.as_bytes())?;
    println!(
        "{} image(s) predicted, {} skipped; maps are {map_values}; results in {}",
        rows.len(),
        skipped.len(),
        args.out.display()
    );
    if rows.is_empty() {
        bail!("no input image could be predicted");
    }
    Ok(())
}
