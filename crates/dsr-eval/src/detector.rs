//! [`Detector`]: a checkpoint turned into a model ready to score images, with its input size and
//! its post-processor.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use dsr_core::weights::load_checkpoint;
use dsr_core::{DsrModel, Execution};

use crate::error::{EvalError, Result};
use crate::image::{load_image, DEFAULT_MAX_PIXELS};
use crate::postprocess::{PostProcessor, METADATA_KEY};

/// The input size used when a checkpoint does not record one, `[height, width]`.
pub const DEFAULT_IMAGE_SIZE: [usize; 2] = [256, 256];

/// The threshold of the raw score and of the raw map's pixels when no post-processor is stored:
/// the model's outputs are probabilities, so an image or pixel above one half is anomalous.
pub const FALLBACK_THRESHOLD: f32 = 0.5;

/// One image's answer: the raw anomaly map (`height × width`, row-major) and the raw score.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// The per-pixel anomaly probability.
    pub map: Vec<f32>,
    /// The image score.
    pub score: f32,
}

/// A model ready for inference, with what its checkpoint says about pre- and post-processing.
#[derive(Debug, Clone)]
pub struct Detector {
    model: DsrModel,
    size: [usize; 2],
    post: Option<PostProcessor>,
    device: Device,
    path: Option<PathBuf>,
}

impl Detector {
    /// Reads the checkpoint `path` (our safetensors, an anomalib `.ckpt`, a full `.pckl`) and
    /// builds its model for inference on the CPU under `exec`; the configuration must be recorded
    /// in the file, the input size is the recorded one (else [`DEFAULT_IMAGE_SIZE`]) and the
    /// post-processor the one stored under [`METADATA_KEY`], if any.
    pub fn load(path: &Path, exec: Execution) -> Result<Self> {
        Self::load_on(path, exec, &Device::Cpu)
    }

    /// [`Detector::load`] with the model on `device` (a CUDA GPU, say; images are moved there
    /// batch by batch).
    pub fn load_on(path: &Path, exec: Execution, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(EvalError::MissingModel(path.to_path_buf()));
        }
        let ckpt = load_checkpoint(path).map_err(|source| EvalError::ReadModel {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = ckpt
            .config
            .ok_or_else(|| EvalError::NoConfig(path.to_path_buf()))?;
        let size = ckpt.image_size.unwrap_or(DEFAULT_IMAGE_SIZE);
        cfg.validate_image_size(size[0], size[1])
            .map_err(|source| EvalError::ImageSize {
                path: path.to_path_buf(),
                source,
            })?;
        let post =
            match ckpt.metadata.get(METADATA_KEY) {
                Some(json) => Some(PostProcessor::from_json(json).map_err(|source| {
                    EvalError::PostProcessor {
                        path: path.to_path_buf(),
                        key: METADATA_KEY,
                        source,
                    }
                })?),
                None => None,
            };
        let device = device.clone();
        let model = ckpt
            .into_inference_model(&cfg, &device, exec)
            .map_err(|source| EvalError::BuildModel {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            model,
            size,
            post,
            device,
            path: Some(path.to_path_buf()),
        })
    }

    /// A detector over a model already in memory (for example the one being trained) that runs
    /// on `device` at `size` = `[height, width]`, with an optional post-processor.
    pub fn new(
        model: DsrModel,
        size: [usize; 2],
        post: Option<PostProcessor>,
        device: &Device,
    ) -> Result<Self> {
        model
            .config()
            .validate_image_size(size[0], size[1])
            .map_err(|e| EvalError::Config(e.to_string()))?;
        Ok(Self {
            model,
            size,
            post,
            device: device.clone(),
            path: None,
        })
    }

    /// The network.
    pub fn model(&self) -> &DsrModel {
        &self.model
    }

    /// The input size `[height, width]`.
    pub fn size(&self) -> [usize; 2] {
        self.size
    }

    /// The post-processor stored with the weights, if any.
    pub fn post(&self) -> Option<&PostProcessor> {
        self.post.as_ref()
    }

    /// The checkpoint file, for a detector read from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Checks that inference on batches of `batch` images fits in the memory available (an
    /// estimate from measured peaks, see [`dsr_core::memory`]); the error says what is needed and
    /// which batch would fit.
    pub fn check_batch_memory(&self, batch: usize) -> Result<()> {
        let cfg = self.model.config();
        let needed = dsr_core::memory::inference_bytes(cfg, batch, self.size);
        let one = dsr_core::memory::inference_bytes(cfg, 1, self.size).max(1);
        let [h, w] = self.size;
        let advice = match dsr_core::memory::available_bytes() {
            Some(available) if one <= available => {
                format!("use a batch of at most {} (--batch)", (available / one).max(1))
            }
            _ => format!(
                "a single {h}×{w} image is too large for this machine; use a model of a smaller image size"
            ),
        };
        dsr_core::memory::ensure_fits(
            needed,
            &format!("inference on batches of {batch} images of {h}×{w}"),
            &advice,
        )
        .map_err(EvalError::Config)
    }

    /// Runs the model on images given as `3 × H × W` channel-major buffers at the model size
    /// (see [`crate::image::load_image`]).
    pub fn predict(&self, images: &[&[f32]]) -> Result<Vec<Prediction>> {
        let [h, w] = self.size;
        let mut flat = Vec::new();
        images
            .len()
            .checked_mul(3 * h * w)
            .and_then(|n| flat.try_reserve_exact(n).ok())
            .ok_or_else(|| {
                EvalError::Config(format!(
                    "a batch of {} images of {h}×{w} does not fit in memory; use a smaller batch",
                    images.len()
                ))
            })?;
        for img in images {
            if img.len() != 3 * h * w {
                return Err(EvalError::Config(format!(
                    "an input holds {} values, the model takes 3×{h}×{w}",
                    img.len()
                )));
            }
            flat.extend_from_slice(img);
        }
        let batch = Tensor::from_vec(flat, (images.len(), 3, h, w), &self.device)?;
        let out = self.model.infer(&batch).map_err(EvalError::Inference)?;
        let maps = out.anomaly_map.flatten_all()?.to_vec1::<f32>()?;
        let scores = out.pred_score.to_vec1::<f32>()?;
        let model = || {
            self.path
                .as_ref()
                .map_or_else(|| "being trained".to_string(), |p| p.display().to_string())
        };
        for (index, (&score, map)) in scores.iter().zip(maps.chunks(h * w)).enumerate() {
            let bad = if !score.is_finite() {
                Some(("score", score))
            } else {
                map.iter()
                    .find(|v| !v.is_finite())
                    .map(|&v| ("anomaly map value", v))
            };
            if let Some((what, value)) = bad {
                return Err(EvalError::NonFinite {
                    model: model(),
                    image: format!("input {} of its batch", index + 1),
                    index,
                    what,
                    value,
                });
            }
        }
        Ok(scores
            .into_iter()
            .zip(maps.chunks(h * w))
            .map(|(score, map)| Prediction {
                map: map.to_vec(),
                score,
            })
            .collect())
    }

    /// Reads the image file `path` (refused above [`DEFAULT_MAX_PIXELS`] pixels), resizes it to
    /// the model size and scores it.
    pub fn predict_file(&self, path: &Path) -> Result<Prediction> {
        let image = load_image(path, self.size, DEFAULT_MAX_PIXELS)?;
        let mut out = self
            .predict(&[&image.chw])
            .map_err(|e| e.naming_inputs(&[path]))?;
        out.pop()
            .ok_or_else(|| EvalError::Config("the model returned no prediction".into()))
    }

    /// The normalised map when there is a post-processor, else the raw map.
    pub fn display_map(&self, raw: &[f32]) -> Vec<f32> {
        match &self.post {
            Some(post) => post.normalize_map(raw),
            None => raw.to_vec(),
        }
    }

    /// The predicted mask: above the pixel threshold, or above [`FALLBACK_THRESHOLD`] of the raw
    /// probability when there is no post-processor.
    pub fn pixel_mask(&self, raw: &[f32]) -> Vec<bool> {
        match &self.post {
            Some(post) => post.pixel_mask(raw),
            None => raw.iter().map(|&v| v > FALLBACK_THRESHOLD).collect(),
        }
    }

    /// The predicted image label: above the image threshold, or above [`FALLBACK_THRESHOLD`] of
    /// the raw score when there is no post-processor.
    pub fn image_label(&self, score: f32) -> bool {
        match &self.post {
            Some(post) => post.image_label(score),
            None => score > FALLBACK_THRESHOLD,
        }
    }
}
