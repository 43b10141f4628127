//! Pieces of a training run shared by [`crate::session`] and the CLI: loading training images
//! into one batch, evaluating a model on a labelled set with anomalib's metrics and
//! post-processing, and the small model configuration of the demo.

use std::time::Instant;

use candle_core::Device;
use dsr_augment::ImageBatch;
use dsr_core::{DsrConfig, DsrModel};
use serde::{Deserialize, Serialize};

use crate::data::{load_batch, load_images, Entry, LoadConfig};
use crate::metrics::{EvalSet, Metrics};
use crate::postprocess::PostProcessor;
use crate::train::TrainError;

/// Model outputs on a labelled set, with the metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    /// Metrics with the post-processor fitted on the same set (anomalib's default validation).
    pub metrics: Metrics,
    /// The fitted post-processor.
    pub postprocess: PostProcessor,
    /// Raw image scores.
    pub scores: Vec<f32>,
    /// Image labels.
    pub labels: Vec<bool>,
    /// The evaluated images, in the order of `scores`.
    #[serde(skip)]
    pub paths: Vec<std::path::PathBuf>,
    /// The raw anomaly maps at the model's size, image after image (kept so that a following
    /// test on the same images need not infer them again).
    #[serde(skip)]
    pub maps: Vec<f32>,
    /// Seconds spent in inference.
    pub inference_seconds: f64,
}

/// Runs `model` over `entries` (labelled, with masks) and computes the metrics.
pub fn evaluate(
    model: &DsrModel,
    entries: &[Entry],
    size: [usize; 2],
    batch: usize,
    device: &Device,
) -> Result<Evaluation, TrainError> {
    let cfg = LoadConfig::new(size[0] as u32, size[1] as u32);
    let (mut scores, mut labels, mut maps, mut masks) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    for chunk in entries.chunks(batch.max(1)) {
        let loaded =
            load_batch(chunk, &cfg, true).map_err(|e| TrainError::Config(e.to_string()))?;
        labels.extend(loaded.labels.iter().copied());
        masks.extend(loaded.masks.iter().flatten().map(|&v| v > 0.5));
        let (images, _) = loaded.into_tensors(device)?;
        let out = model.infer(&images)?;
        scores.extend(out.pred_score.to_vec1::<f32>()?);
        maps.extend(out.anomaly_map.flatten_all()?.to_vec1::<f32>()?);
    }
    let inference_seconds = start.elapsed().as_secs_f64();
    let metric_err = |e: crate::metrics::MetricsError| TrainError::Config(format!("metrics: {e}"));
    let postprocess = PostProcessor::fit(&scores, &labels, &maps, &masks).map_err(metric_err)?;
    let set =
        EvalSet::new(&scores, &labels, &maps, &masks, size[0], size[1]).map_err(metric_err)?;
    let metrics = Metrics::compute(&set, &postprocess).map_err(metric_err)?;
    Ok(Evaluation {
        metrics,
        postprocess,
        scores,
        labels,
        paths: entries.iter().map(|e| e.path.clone()).collect(),
        maps,
        inference_seconds,
    })
}

/// Loads `entries` (no masks) at `size` into one batch; the first unreadable file is an error.
pub fn load_image_batch(entries: &[Entry], size: [usize; 2]) -> Result<ImageBatch, TrainError> {
    let cfg = LoadConfig::new(size[0] as u32, size[1] as u32);
    Ok(load_image_batch_with(entries, &cfg)?.0)
}

/// Loads `entries` (no masks) into one batch at `cfg`'s size, under its error policy and pixel
/// limit; returns the batch and the files skipped (with why). Nothing loadable is an error.
pub fn load_image_batch_with(
    entries: &[Entry],
    cfg: &LoadConfig,
) -> Result<(ImageBatch, Vec<crate::data::DataError>), TrainError> {
    let loaded = load_images(entries, cfg, false)?;
    let batch = ImageBatch::new(
        loaded.len(),
        3,
        cfg.height as usize,
        cfg.width as usize,
        loaded.images,
    )?;
    Ok((batch, loaded.skipped))
}

/// A small, fast configuration for demos and smoke runs: the tiny-ish model widths used in
/// the CPU demo, at `size`×`size`.
pub fn small_model() -> DsrConfig {
    DsrConfig {
        latent_anomaly_strength: 0.2,
        embedding_dim: 32,
        num_embeddings: 256,
        num_hiddens: 32,
        num_residual_layers: 2,
        num_residual_hiddens: 16,
        anomaly_detection_module_base_width: 16,
        upsampling_module_base_width: 16,
    }
}

/// A phase-2/3 trainer for `model` over `batch` synthetic images of `size`×`size` (a fixed
/// pattern in [0, 1]) with a discrete model of seeded random weights: the work of real training
/// steps without data or pretrained weights, for benchmarks and smoke runs. The schedule is
/// `phase2_steps` then `phase3_steps` steps (original schedule), seed 0.
pub fn synthetic_trainer(
    model: DsrConfig,
    size: usize,
    batch: usize,
    phase2_steps: u64,
    phase3_steps: u64,
    device: &Device,
) -> Result<crate::train::Trainer, TrainError> {
    use crate::train::{Schedule, TrainConfig, Trainer};
    let tensors = DsrModel::seeded_weights(&model, 0)?
        .into_iter()
        .filter(|(k, _)| k.starts_with("discrete_latent_model."))
        .collect();
    let discrete = dsr_core::Checkpoint {
        path: "seeded random weights".into(),
        tensors,
        config: Some(model),
        image_size: None,
        metadata: Default::default(),
    };
    let data = (0..batch * 3 * size * size)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let images = ImageBatch::new(batch, 3, size, size, data)?;
    let cfg = TrainConfig {
        model,
        image_size: [size, size],
        batch_size: batch,
        schedule: Schedule::Original {
            phase2_steps,
            phase3_steps,
            lr_drop_fraction: 0.8,
        },
        ..TrainConfig::default()
    };
    Trainer::new(cfg, &discrete, images, device)
}
