//! The one evaluation loop: a [`Detector`] over labelled images, the raw scores and maps with
//! their ground truth, ready for the metrics. `dsr test`, the end of `dsr train` and the
//! validation of a training run all go through [`evaluate`].

use std::path::PathBuf;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::detector::Detector;
use crate::error::{EvalError, Result};
use crate::image::{load_image, load_mask, OnError, DEFAULT_MAX_PIXELS};
use crate::metrics::{EvalCurves, EvalSet, Metrics};
use crate::postprocess::PostProcessor;

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The image file.
    pub path: PathBuf,
    /// `true` for a defective image.
    pub label: bool,
    /// The defect type (`good` for defect-free images).
    pub defect_type: String,
    /// The ground-truth mask file; a defect-free image without one is good everywhere, a
    /// defective image needs one.
    pub mask: Option<PathBuf>,
}

/// How [`evaluate`] reads its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalOptions {
    /// Images per forward pass.
    pub batch: usize,
    /// Stop at the first unreadable image or mask, or leave the sample out and list it.
    pub on_error: OnError,
    /// Images and masks with more pixels than this (from their header) are refused.
    pub max_pixels: u64,
}

impl Default for EvalOptions {
    /// Batches of 8, stop at the first bad file, the default pixel limit.
    fn default() -> Self {
        Self {
            batch: 8,
            on_error: OnError::Fail,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

/// A sample left out under [`OnError::Skip`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The image file.
    pub path: String,
    /// Why it was left out.
    pub error: String,
}

/// The model's raw outputs on a labelled set, with the ground truth.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The evaluated samples, in the order of `scores`.
    pub samples: Vec<Sample>,
    /// The model size `[height, width]` of the maps and masks.
    pub size: [usize; 2],
    /// The raw image scores.
    pub scores: Vec<f32>,
    /// The image labels.
    pub labels: Vec<bool>,
    /// The raw anomaly maps, image after image.
    pub maps: Vec<f32>,
    /// The ground-truth masks at the model size, image after image.
    pub masks: Vec<bool>,
    /// The samples left out under [`OnError::Skip`].
    pub skipped: Vec<Skipped>,
    /// Seconds spent reading images and in inference.
    pub seconds: f64,
}

impl Evaluation {
    /// The set as the metrics take it.
    pub fn set(&self) -> Result<EvalSet<'_>> {
        let [h, w] = self.size;
        Ok(EvalSet::new(
            &self.scores,
            &self.labels,
            &self.maps,
            &self.masks,
            h,
            w,
        )?)
    }

    /// The exact image and pixel curves.
    pub fn curves(&self) -> Result<EvalCurves> {
        Ok(EvalCurves::new(&self.set()?)?)
    }

    /// anomalib's default post-processor fitted on this set (what validation stores).
    pub fn fit_postprocessor(&self) -> Result<PostProcessor> {
        Ok(PostProcessor::fit(
            &self.scores,
            &self.labels,
            &self.maps,
            &self.masks,
        )?)
    }

    /// Every metric of this set; the F1 scores at the thresholds of `post`.
    pub fn metrics(&self, post: &PostProcessor) -> Result<Metrics> {
        Ok(Metrics::compute(&self.set()?, post)?)
    }

    /// The defect type of every evaluated sample.
    pub fn defect_types(&self) -> Vec<&str> {
        self.samples
            .iter()
            .map(|s| s.defect_type.as_str())
            .collect()
    }

    /// The number of defective images.
    pub fn num_defective(&self) -> usize {
        self.labels.iter().filter(|&&l| l).count()
    }
}

/// Reads one sample at `size`: the image values and the binary mask.
fn read_sample(
    sample: &Sample,
    size: [usize; 2],
    max_pixels: u64,
) -> Result<(Vec<f32>, Vec<bool>)> {
    let image = load_image(&sample.path, size, max_pixels)?;
    let mask = match &sample.mask {
        Some(m) => load_mask(m, size, max_pixels, &sample.path, image.original_size)?
            .into_iter()
            .map(|v| v > 0.5)
            .collect(),
        None if !sample.label => vec![false; size[0] * size[1]],
        None => return Err(EvalError::MissingMask(sample.path.clone())),
    };
    Ok((image.chw, mask))
}

/// Runs `detector` over `samples` in batches of `options.batch` (images of a batch are read in
/// parallel) and collects the raw scores and maps with the ground truth. An unreadable image or
/// mask stops it, or under [`OnError::Skip`] the sample is left out and listed in
/// [`Evaluation::skipped`]; a set of which nothing can be read is an error.
pub fn evaluate(
    detector: &Detector,
    samples: Vec<Sample>,
    options: &EvalOptions,
) -> Result<Evaluation> {
    if options.batch == 0 {
        return Err(EvalError::Config(
            "the batch size must be at least 1".into(),
        ));
    }
    let size = detector.size();
    let pixels = size[0] * size[1];
    // What the machine must hold: the batch's inference, and the maps and masks of every sample
    // (kept for the metrics: 4 + 1 bytes a pixel).
    detector.check_batch_memory(options.batch.min(samples.len()).max(1))?;
    let kept = (samples.len() as u64).saturating_mul(pixels as u64 * 5);
    dsr_core::memory::ensure_fits(
        kept,
        &format!(
            "keeping the maps of {} images of {}×{} for the metrics",
            samples.len(),
            size[0],
            size[1]
        ),
        "evaluate fewer images, or a model of a smaller image size",
    )
    .map_err(EvalError::Config)?;
    let start = Instant::now();
    let mut ev = Evaluation {
        samples: Vec::new(),
        size,
        scores: Vec::new(),
        labels: Vec::new(),
        maps: Vec::new(),
        masks: Vec::new(),
        skipped: Vec::new(),
        seconds: 0.0,
    };
    let reserve = |e: std::collections::TryReserveError| {
        EvalError::Config(format!(
            "cannot reserve memory for the maps of {} images: {e}",
            samples.len()
        ))
    };
    ev.maps
        .try_reserve_exact(samples.len().saturating_mul(pixels))
        .map_err(reserve)?;
    ev.masks
        .try_reserve_exact(samples.len().saturating_mul(pixels))
        .map_err(reserve)?;
    let total = samples.len();
    let mut samples = samples.into_iter().peekable();
    while samples.peek().is_some() {
        let chunk: Vec<Sample> = samples.by_ref().take(options.batch).collect();
        let read: Vec<Result<(Vec<f32>, Vec<bool>)>> = chunk
            .par_iter()
            .map(|s| read_sample(s, size, options.max_pixels))
            .collect();
        let mut images = Vec::with_capacity(chunk.len());
        for (sample, result) in chunk.into_iter().zip(read) {
            match result {
                Ok((image, mask)) => {
                    images.push(image);
                    ev.masks.extend(mask);
                    ev.labels.push(sample.label);
                    ev.samples.push(sample);
                }
                Err(e) if options.on_error == OnError::Skip && is_input_error(&e) => {
                    ev.skipped.push(Skipped {
                        path: sample.path.display().to_string(),
                        error: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        if images.is_empty() {
            continue;
        }
        let inputs: Vec<&[f32]> = images.iter().map(Vec::as_slice).collect();
        let first = ev.samples.len() - images.len();
        let paths: Vec<&std::path::Path> = ev.samples[first..]
            .iter()
            .map(|s| s.path.as_path())
            .collect();
        let predictions = detector
            .predict(&inputs)
            .map_err(|e| e.naming_inputs(&paths))?;
        for p in predictions {
            ev.scores.push(p.score);
            ev.maps.extend(p.map);
        }
    }
    if ev.samples.is_empty() {
        return Err(EvalError::NothingRead(total));
    }
    ev.seconds = start.elapsed().as_secs_f64();
    Ok(ev)
}

/// Whether `e` is about one input file (what [`OnError::Skip`] leaves out).
fn is_input_error(e: &EvalError) -> bool {
    matches!(e, EvalError::Image(_) | EvalError::MissingMask(_))
}
