//! Pieces of a training run shared by [`crate::session`] and the CLI: loading training images
//! into one batch, data-set entries as the evaluation's labelled samples, and the small model
//! configuration of the demo.

use candle_core::Device;
use dsr_augment::ImageBatch;
use dsr_core::{DsrConfig, DsrModel};

use crate::data::{load_images, Entry, LoadConfig};
use crate::train::TrainError;

/// The labelled samples of data-set entries, for [`dsr_eval::evaluate`].
pub fn samples_of(entries: &[Entry]) -> Vec<dsr_eval::Sample> {
    entries
        .iter()
        .map(|e| dsr_eval::Sample {
            path: e.path.clone(),
            label: e.label,
            defect_type: e.defect_type.clone(),
            mask: e.mask_path.clone(),
        })
        .collect()
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
