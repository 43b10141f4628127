//! `dsr predict`: anomaly maps, scores and overlays for a list of images.
//!
//! Every output file is written atomically, and each finished image is recorded as one line of
//! `<out>/predictions.jsonl` (after its `.png` and `.npy`), so that `--resume` after an
//! interruption (even `kill -9`) skips the images whose outputs are complete and writes tables
//! that cover every image.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::guard::{fnv64, path_text, OutputDir};
use crate::io::{npy_bytes, png_bytes};
use crate::render::{draw_contours, draw_text, heat_overlay};
use dsr_eval::image::{load_image, ModelImage, IMAGE_EXTENSIONS};
use dsr_eval::{Detector, Execution, OnError};

/// The options of `dsr predict`.
#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// The checkpoint (its `dsr.image_size` sets the input size; default 256×256).
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// Image files, folders (every image inside, sorted) or glob patterns (quote them).
    #[arg(required = true, value_name = "PATHS")]
    pub paths: Vec<String>,
    /// The output folder (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Write the raw anomaly maps in the .npy files even when the checkpoint stores a
    /// post-processor. Default: normalised maps when it does, raw maps when it does not.
    #[arg(long)]
    pub raw: bool,
    /// What to do with an input that cannot be read: report it on standard error and go on
    /// with the others (skip), or stop at the first bad input with exit code 1 (fail).
    #[arg(long, value_name = "POLICY", default_value_t = OnError::Skip, value_parser = crate::parse_on_error)]
    pub on_error: OnError,
    /// Images per forward pass (1 to 4096; checked against the memory available).
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = crate::parse_batch)]
    pub batch: usize,
    /// Continue an interrupted run into the same --out: images whose .png and .npy are
    /// already there and complete (and recorded in <OUT>/predictions.jsonl) are not predicted
    /// again, and the tables cover every image.
    #[arg(long)]
    pub resume: bool,
    /// Refuse images of more pixels than this (width × height, read from the file header
    /// before decoding).
    #[arg(long, value_name = "N", default_value_t = dsr_eval::image::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// The compute device.
    #[arg(long, value_enum, default_value_t = crate::train::DeviceArg::Cpu)]
    pub device: crate::train::DeviceArg,
    /// Predict only shard I of N (0 ≤ I < N): the inputs at positions k of the expanded list
    /// with k mod N = I, under the names a whole run gives them. The N shards, each into its
    /// own --out, together give exactly the rows of one run (see docs/deploy.md).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::shard::Shard>,
}

/// The journal of finished images inside the output folder.
pub const JOURNAL: &str = "predictions.jsonl";

#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
struct Row {
    path: String,
    overlay: String,
    map: String,
    original_size: [usize; 2],
    score: f32,
    normalized_score: Option<f32>,
    label: String,
}

/// The first line of the journal: what the outputs depend on besides the image.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct JournalHeader {
    model_bytes: u64,
    model_fnv64: String,
    raw: bool,
}

/// A journal line of one finished image: its row, what the input file was when it was read,
/// and a check over the row, the input and both output files (a row edited by hand, an input
/// changed since, or an output replaced is predicted again).
#[derive(Serialize, Deserialize)]
struct Done {
    stem: String,
    row: Row,
    input: InputStamp,
    check: String,
}

/// The size, modification time and FNV-1a hash of an input file.
#[derive(Serialize, Deserialize, PartialEq, Clone, Debug)]
struct InputStamp {
    bytes: u64,
    mtime_ns: u128,
    fnv64: String,
}

impl InputStamp {
    fn of(path: &Path) -> Option<Self> {
        let bytes = dsr_core::files::read_regular(path).ok()?;
        let mtime_ns = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Some(Self {
            bytes: bytes.len() as u64,
            mtime_ns,
            fnv64: format!("{:016x}", fnv64(&bytes)),
        })
    }
}

/// The check of a journal line: FNV-1a over the row (its output paths without the folder, so
/// that the journal does not depend on where `--out` is), the stem, the input stamp and the bytes
/// of the overlay and the map.
fn line_check(stem: &str, row: &Row, input: &InputStamp, png: &[u8], npy: &[u8]) -> Result<String> {
    let row = Row {
        overlay: format!("{stem}.png"),
        map: format!("{stem}.npy"),
        ..row.clone()
    };
    let text = serde_json::to_string(&(stem, &row, input))?;
    Ok(format!(
        "{:016x}",
        fnv64(format!("{text}{:016x}{:016x}", fnv64(png), fnv64(npy)).as_bytes())
    ))
}

/// FNV-1a (64 bits) of a file: identifies the model a folder of outputs was made with.
fn fingerprint(path: &Path) -> Result<(u64, String)> {
    let bytes = dsr_core::files::read_regular(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok((bytes.len() as u64, format!("{:016x}", fnv64(&bytes))))
}

/// Whether `bytes` are a complete `.npy` of a `h`×`w` float32 map as [`npy_bytes`] writes it.
fn npy_complete(bytes: &[u8], h: usize, w: usize) -> bool {
    if bytes.len() < 10 || &bytes[..8] != b"\x93NUMPY\x01\x00" {
        return false;
    }
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let shape = format!("'shape': ({h}, {w})");
    bytes.len() == 10 + header + 4 * h * w
        && std::str::from_utf8(&bytes[10..10 + header]).is_ok_and(|t| t.contains(&shape))
}

/// Whether `b` is a PNG that ends with its IEND chunk.
fn png_complete(b: &[u8]) -> bool {
    const IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xae, 0x42, 0x60, 0x82];
    b.starts_with(b"\x89PNG\r\n\x1a\n") && b.ends_with(&IEND)
}

/// The journal of a previous run into `out`: its finished images by stem, when its header
/// matches `header`. A header of another model or `--raw` setting is an error.
fn read_journal(path: &Path, header: &JournalHeader) -> Result<HashMap<String, Done>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut lines = text.lines();
    match lines.next().map(serde_json::from_str::<JournalHeader>) {
        Some(Ok(h)) if &h == header => {}
        Some(Ok(_)) => bail!(
            "{} was written with another model or --raw setting; predict into another --out, or run without --resume to start over",
            path.display()
        ),
        // A journal cut before its first line ended: nothing was finished.
        _ => return Ok(HashMap::new()),
    }
    // A last line cut by the interruption does not parse and is ignored.
    Ok(lines
        .filter_map(|l| serde_json::from_str::<Done>(l).ok())
        .map(|d| (d.stem.clone(), d))
        .collect())
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
    let base = crate::guard::output_stem(path);
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

/// The row of `done` when it still holds for the input `path` and the outputs in `out`: the
/// input file unchanged (size, time, hash), the row consistent with the model (names, finite
/// score, label), and the line's check over the row and both output files intact.
fn still_valid(done: &Done, path: &Path, stem: &str, out: &Path, model: &Detector) -> Option<Row> {
    let row = &done.row;
    let [h, w] = model.size();
    let png_path = out.join(format!("{stem}.png"));
    let npy_path = out.join(format!("{stem}.npy"));
    let consistent = row.path == path_text(path)
        && row.overlay == png_path.display().to_string()
        && row.map == npy_path.display().to_string()
        && row.score.is_finite()
        && row.label
            == if model.image_label(row.score) {
                "anomalous"
            } else {
                "normal"
            }
        && row.normalized_score == model.post().map(|p| p.normalize_score(row.score));
    if !consistent || InputStamp::of(path).as_ref() != Some(&done.input) {
        return None;
    }
    let png = dsr_core::files::read_regular(&png_path).ok()?;
    let npy = dsr_core::files::read_regular(&npy_path).ok()?;
    let check = line_check(stem, row, &done.input, &png, &npy).ok()?;
    (png_complete(&png) && npy_complete(&npy, h, w) && check == done.check).then(|| row.clone())
}

/// Runs `dsr predict`.
pub fn run(args: &PredictArgs, exec: Execution) -> Result<()> {
    if args.max_pixels == 0 {
        bail!("--max-pixels must be at least 1");
    }
    let model = Detector::load_on(&args.model, exec, &args.device.device()?)?;
    let (files, problems) = expand_inputs(&args.paths);
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
    model.check_batch_memory(args.batch.min(files.len()).max(1))?;
    let mut out = OutputDir::open(
        &args.out,
        &files,
        std::slice::from_ref(&args.model),
        "dsr predict",
    )?;
    let raw_maps = args.raw || model.post().is_none();
    let map_values = if raw_maps { "raw" } else { "normalized" };
    let label_rule = if model.post().is_some() {
        "post-processor thresholds stored in the checkpoint"
    } else {
        "no post-processor in the checkpoint: raw score and map value > 0.5"
    };
    let [h, w] = model.size();
    // Output names depend on the input list only, so that a resumed run names every image as
    // the interrupted one did.
    let mut used = HashSet::new();
    let stems: Vec<String> = files.iter().map(|p| unique_stem(p, &mut used)).collect();
    let (files, stems) = match args.shard {
        Some(shard) => (shard.select(files), shard.select(stems)),
        None => (files, stems),
    };
    // Every output is checked before anything is written: none may be an input or a file this
    // program did not write.
    for stem in &stems {
        out.check(&format!("{stem}.png"))?;
        out.check(&format!("{stem}.npy"))?;
    }
    for name in ["predictions.csv", "predictions.json", JOURNAL] {
        out.check(name)?;
    }

    let (model_bytes, model_fnv64) = fingerprint(&args.model)?;
    let header = JournalHeader {
        model_bytes,
        model_fnv64,
        raw: raw_maps,
    };
    let journal_path = args.out.join(JOURNAL);
    let previous = if args.resume {
        read_journal(&journal_path, &header)?
    } else {
        HashMap::new()
    };
    let mut rows: Vec<Option<Row>> = vec![None; files.len()];
    let mut kept_lines: Vec<String> = Vec::new();
    let mut reused = 0;
    for (i, (path, stem)) in files.iter().zip(&stems).enumerate() {
        if let Some(done) = previous.get(stem) {
            if let Some(row) = still_valid(done, path, stem, &args.out, &model) {
                rows[i] = Some(row);
                kept_lines.push(serde_json::to_string(done)?);
                reused += 1;
            }
        }
    }
    // The journal is rewritten with what is kept, then appended to image by image.
    let mut journal_text = serde_json::to_string(&header)? + "\n";
    for line in &kept_lines {
        journal_text += line;
        journal_text.push('\n');
    }
    out.write(JOURNAL, journal_text.as_bytes())?;
    let mut journal = out.append(JOURNAL)?;
    if args.resume {
        println!(
            "resuming: {reused} of {} image(s) already done in {}",
            files.len(),
            args.out.display()
        );
    }

    let todo: Vec<usize> = (0..files.len()).filter(|&i| rows[i].is_none()).collect();
    for chunk in todo.chunks(args.batch) {
        let mut loaded: Vec<(usize, ModelImage, InputStamp)> = Vec::new();
        for &i in chunk {
            let path = &files[i];
            let read = load_image(path, [h, w], args.max_pixels)
                .map_err(anyhow::Error::from)
                .and_then(|img| {
                    let stamp = InputStamp::of(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    Ok((img, stamp))
                });
            match read {
                Ok((img, stamp)) => loaded.push((i, img, stamp)),
                Err(e) => {
                    if args.on_error == OnError::Fail {
                        return Err(e);
                    }
                    let error = crate::error_line(&e);
                    eprintln!("skipping {}: {error}", path.display());
                    skipped.push(Skipped {
                        path: path_text(path),
                        error,
                    });
                }
            }
        }
        if loaded.is_empty() {
            continue;
        }
        let inputs: Vec<&[f32]> = loaded
            .iter()
            .map(|(_, img, _)| img.chw.as_slice())
            .collect();
        let paths: Vec<&Path> = loaded.iter().map(|(i, _, _)| files[*i].as_path()).collect();
        let predictions = model
            .predict(&inputs)
            .map_err(|e| e.naming_inputs(&paths))?;
        for ((i, img, stamp), pred) in loaded.into_iter().zip(predictions) {
            let (path, stem) = (&files[i], &stems[i]);
            let shown = model.display_map(&pred.map);
            let mut overlay = heat_overlay(&img.to_rgb8([h, w]), &shown);
            draw_contours(&mut overlay, &model.pixel_mask(&pred.map), [255, 0, 0]);
            let anomalous = model.image_label(pred.score);
            let label = if anomalous { "anomalous" } else { "normal" };
            let normalized_score = model.post().map(|p| p.normalize_score(pred.score));
            let text = format!("{:.3} {label}", normalized_score.unwrap_or(pred.score));
            let colour = if anomalous {
                [255, 64, 64]
            } else {
                [64, 255, 64]
            };
            draw_text(&mut overlay, &text, colour);
            let png = png_bytes(&overlay)?;
            let png_path = out.write(&format!("{stem}.png"), &png)?;
            let values = if raw_maps { &pred.map } else { &shown };
            let npy = npy_bytes(values, h, w);
            let npy_path = out.write(&format!("{stem}.npy"), &npy)?;
            let row = Row {
                path: path_text(path),
                // Output names are UTF-8 (escaped from the input's): these paths are usable.
                overlay: png_path.display().to_string(),
                map: npy_path.display().to_string(),
                original_size: img.original_size,
                score: pred.score,
                normalized_score,
                label: label.to_string(),
            };
            // One write per line: an interruption loses at most this line, and the image is
            // then predicted again.
            let check = line_check(stem, &row, &stamp, &png, &npy)?;
            let line = serde_json::to_string(&Done {
                stem: stem.clone(),
                row: row.clone(),
                input: stamp,
                check,
            })? + "\n";
            journal
                .write_all(line.as_bytes())
                .with_context(|| format!("cannot write {}", journal_path.display()))?;
            rows[i] = Some(row);
        }
    }
    let rows: Vec<Row> = rows.into_iter().flatten().collect();
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
    out.write("predictions.csv", csv.as_bytes())?;
    let report = Report {
        model: path_text(&args.model),
        image_size: [h, w],
        map_values,
        label_rule,
        predictions: &rows,
        skipped: &skipped,
    };
    let json = serde_json::to_string_pretty(&report)?;
    out.write("predictions.json", json.as_bytes())?;
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
