//! Loading a checkpoint for inference and running batches through it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use dsr_core::weights::load_checkpoint;
use dsr_core::DsrModel;
use dsr_train::postprocess::{PostProcessor, METADATA_KEY};

/// The input size used when a checkpoint does not record one, `[height, width]`.
pub const DEFAULT_IMAGE_SIZE: [usize; 2] = [256, 256];

/// A model ready for inference, with what its checkpoint says about pre- and post-processing.
pub struct LoadedModel {
    /// The checkpoint file.
    pub path: PathBuf,
    /// The network.
    pub model: DsrModel,
    /// The input size `[height, width]`.
    pub size: [usize; 2],
    /// The post-processor stored with the weights, if any.
    pub post: Option<PostProcessor>,
}

/// One image's answer: the raw anomaly map (`height × width`, row-major) and the raw score.
pub struct Prediction {
    /// The per-pixel anomaly probability.
    pub map: Vec<f32>,
    /// The image score.
    pub score: f32,
}

impl LoadedModel {
    /// Reads `path` and builds the model; the configuration must be recorded in the file.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!("the model file {} does not exist", path.display());
        }
        let ckpt = load_checkpoint(path)
            .with_context(|| format!("cannot read the model {}", path.display()))?;
        let cfg = ckpt.config.with_context(|| {
            format!(
                "{} does not record its model configuration; convert it first with `dsr convert --config JSON_FILE`",
                path.display()
            )
        })?;
        let size = ckpt.image_size.unwrap_or(DEFAULT_IMAGE_SIZE);
        cfg.validate_image_size(size[0], size[1])
            .with_context(|| format!("the image size recorded in {}", path.display()))?;
        let post = match ckpt.metadata.get(METADATA_KEY) {
            Some(json) => Some(PostProcessor::from_json(json).with_context(|| {
                format!(
                    "the '{METADATA_KEY}' metadata of {} is not a valid post-processor",
                    path.display()
                )
            })?),
            None => None,
        };
        let model = ckpt
            .build_model(&cfg, &Device::Cpu)
            .with_context(|| format!("cannot build the model of {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            model,
            size,
            post,
        })
    }

    /// Runs the model on images given as `3 × H × W` channel-major buffers at the model size.
    pub fn predict(&self, images: &[&[f32]]) -> Result<Vec<Prediction>> {
        let [h, w] = self.size;
        let mut flat = Vec::with_capacity(images.len() * 3 * h * w);
        for img in images {
            flat.extend_from_slice(img);
        }
        let batch = Tensor::from_vec(flat, (images.len(), 3, h, w), &Device::Cpu)?;
        let out = self.model.infer(&batch).context("inference failed")?;
        let maps = out.anomaly_map.flatten_all()?.to_vec1::<f32>()?;
        let scores = out.pred_score.to_vec1::<f32>()?;
        Ok(scores
            .into_iter()
            .zip(maps.chunks(h * w))
            .map(|(score, map)| Prediction {
                map: map.to_vec(),
                score,
            })
            .collect())
    }

    /// The normalised map when there is a post-processor, else the raw map.
    pub fn display_map(&self, raw: &[f32]) -> Vec<f32> {
        match &self.post {
            Some(post) => post.normalize_map(raw),
            None => raw.to_vec(),
        }
    }

    /// The predicted mask: above the pixel threshold, or above 0.5 of the raw probability when
    /// there is no post-processor.
    pub fn pixel_mask(&self, raw: &[f32]) -> Vec<bool> {
        match &self.post {
            Some(post) => post.pixel_mask(raw),
            None => raw.iter().map(|&v| v > 0.5).collect(),
        }
    }

    /// The predicted image label: above the image threshold, or above 0.5 of the raw score when
    /// there is no post-processor.
    pub fn image_label(&self, score: f32) -> bool {
        match &self.post {
            Some(post) => post.image_label(score),
            None => score > 0.5,
        }
    }
}
