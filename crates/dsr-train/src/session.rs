//! A training run on disk: the run configuration (TOML with `section.key=value` overrides), the
//! results folder in anomalib's layout, checkpoints every N steps, the `metrics.jsonl` log, and
//! resumption after an interruption.
//!
//! A run folder `<results>/dsr/<dataset>/<category>/vN/` holds:
//!
//! | file | written | content |
//! |---|---|---|
//! | `config.toml` | at the start | the resolved [`RunConfig`] |
//! | `metrics.jsonl` | every step | one JSON object per step (phase, step, lr, loss terms, time) |
//! | `weights/vq.safetensors` | after phase 1 | the pretrained discrete model (when phase 1 ran) |
//! | `weights/last.safetensors` | every `checkpoint_every` steps and at the end | model, both optimizer states, step, configuration |
//! | `weights/model.safetensors` | at the end | the model and its post-processor (`dsr.postprocess`), ready for `predict` |
//! | `validation.json` | at the end | metrics on the validation set that placed the thresholds |
//!
//! Every file is written atomically (temporary file, fsync, rename); a run killed at any moment
//! resumes from `last.safetensors` with [`Session::resume`] and continues exactly as if it had
//! not stopped (the per-step random streams are seeded by the step number). Phase 1 is not
//! checkpointed: a run stopped during phase 1 repeats it.
//!
//! # Example
//!
//! ```
//! use dsr_train::session::RunConfig;
//!
//! let cfg = RunConfig::from_toml_str("[train]\nbatch_size = 4\n[output]\ncheckpoint_every = 10\n")?
//!     .with_overrides(&["train.seed=7".to_string(), "data.root=\"/data/bottle\"".to_string()])?;
//! assert_eq!(cfg.train.batch_size, 4);
//! assert_eq!(cfg.train.seed, 7);
//! assert_eq!(cfg.output.checkpoint_every, 10);
//! assert_eq!(cfg.data.root.to_str(), Some("/data/bottle"));
//! # Ok::<(), dsr_train::train::TrainError>(())
//! ```

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use dsr_core::weights::{
    load_checkpoint, save_checkpoint, write_atomic, Checkpoint, META_OUTPUT_MAP,
};
use dsr_core::{Execution, OutputMap};
use dsr_eval::postprocess::METADATA_KEY;
use dsr_eval::{evaluate, Detector, EvalOptions, Evaluation, Metrics, PostProcessor};
use serde::{Deserialize, Serialize};

use crate::budget::{replan_steps, Deadline};
use crate::codebook::GeneralCodebook;
use crate::data::{
    split_validation, Entry, FolderDataset, FolderLayout, Listing, LoadConfig, MvtecDataset,
    OnError, ValSplit, DEFAULT_MAX_PIXELS,
};
use crate::pipeline::{load_image_batch_with, samples_of};
use crate::pretrain::{PretrainConfig, PretrainReport, Pretrainer};
use crate::train::{Phase, Result, Schedule, StepReport, TrainConfig, TrainError, Trainer};

/// The run configuration file inside a run folder.
pub const CONFIG_FILE: &str = "config.toml";
/// The per-step log inside a run folder.
pub const METRICS_LOG: &str = "metrics.jsonl";
/// The weights folder inside a run folder.
pub const WEIGHTS_DIR: &str = "weights";
/// The resumable training checkpoint inside the weights folder.
pub const LAST_CHECKPOINT: &str = "last.safetensors";
/// The final model inside the weights folder.
pub const MODEL_FILE: &str = "model.safetensors";
/// The metrics on the validation set (which placed the thresholds) inside a run folder.
pub const VALIDATION_FILE: &str = "validation.json";
/// The phase-1 result inside the weights folder.
pub const VQ_FILE: &str = "vq.safetensors";
/// The lock file of a run folder: one `dsr train` at a time works in a run folder.
pub const LOCK_FILE: &str = ".dsr-lock";

/// Checks everything about a run that can be checked before training: the configuration, the
/// data listing and its splits (the validation set, and with `test` the test set, must hold
/// both good and defective images, every defective one with its mask), the discrete-model file,
/// and the memory a training step needs. Returns the splits.
pub fn preflight(cfg: &RunConfig, test: bool) -> Result<crate::data::Splits> {
    cfg.validate()?;
    cfg.train.check_memory()?;
    if let Some(w) = &cfg.vq.weights {
        dsr_core::files::check_regular(w).map_err(|e| TrainError::Checkpoint {
            path: w.display().to_string(),
            message: format!("cannot read the discrete-model weights: {e}"),
        })?;
    }
    let listing = cfg.data.listing(cfg.train.seed)?;
    let splits = split_validation(
        &listing,
        parse_val_split(&cfg.data.val_split, cfg.train.seed)?,
    )
    .map_err(|e| config_error(e.to_string()))?;
    let [h, w] = cfg.train.image_size;
    // The training images are held in memory as f32 RGB (phase 1 at its crop's size or larger).
    let side = |s: usize| {
        s.max(if cfg.vq.pretrain {
            cfg.pretrain.crop
        } else {
            0
        }) as u64
    };
    dsr_core::memory::ensure_fits(
        (splits.train.len() as u64)
            .saturating_mul(12)
            .saturating_mul(side(h))
            .saturating_mul(side(w)),
        &format!(
            "holding the {} training images at {h}×{w}",
            splits.train.len()
        ),
        "lower the image size (--image-size)",
    )
    .map_err(config_error)?;
    // The validation's inference (after training) must fit too.
    let eval_batch = cfg.data.eval_batch.min(splits.val.len()).max(1);
    dsr_core::memory::ensure_fits(
        dsr_core::memory::inference_bytes(&cfg.train.model, eval_batch, cfg.train.image_size),
        &format!("the validation's inference on batches of {eval_batch} images of {h}×{w}"),
        "lower data.eval_batch or the image size",
    )
    .map_err(config_error)?;
    let root = cfg.data.display_root();
    let mut sets = vec![("validation", &splits.val)];
    if test {
        sets.push(("test", &splits.test));
    }
    for (name, set) in sets {
        let defective = set.iter().filter(|e| e.label).count();
        if defective == 0 || defective == set.len() {
            return Err(config_error(format!(
                "the {name} set of {} holds {} good and {defective} defective images: thresholds and metrics need both (add defective images with masks{}, or change data.val_split)",
                root.display(),
                set.len() - defective,
                if name == "test" { "; or train with --no-test" } else { "" }
            )));
        }
        if let Some(e) = set.iter().find(|e| e.label && e.mask_path.is_none()) {
            return Err(config_error(format!(
                "the defective image {} of the {name} set has no mask: the pixel thresholds and metrics need one for every defective image (give the mask folder, --mask-dir, or ground_truth/<defect>/<stem>_mask.png)",
                e.path.display()
            )));
        }
    }
    Ok(splits)
}

/// Where the data come from and how they are split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// The data set folder (MVTec AD layout): a category folder, or the root of several.
    pub root: PathBuf,
    /// The category sub-folder of `root`, if `root` holds several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Where the validation set that places the thresholds comes from: `"same_as_test"`
    /// (anomalib's default for MVTec AD) or `"from_test:F"` (a label-stratified fraction F of the
    /// test set, removed from it).
    pub val_split: String,
    /// Images per inference batch in the validation.
    pub eval_batch: usize,
    /// The generic folder layout instead of MVTec's: the folder of normal (defect-free) images.
    /// When set, `root` and `category` are not used for listing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normal_dir: Option<PathBuf>,
    /// Folder layout: abnormal test images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abnormal_dir: Option<PathBuf>,
    /// Folder layout: normal test images (default: `normal_split_ratio` of `normal_dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normal_test_dir: Option<PathBuf>,
    /// Folder layout: masks of the abnormal images, matched by stem (`<stem>_mask.*`, `<stem>.*`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_dir: Option<PathBuf>,
    /// Folder layout: the fraction of `normal_dir` moved to the test set without
    /// `normal_test_dir` (anomalib's 0.2).
    pub normal_split_ratio: f64,
    /// A training image that cannot be read: `"fail"` (stop, the default) or `"skip"` (report
    /// it and train on the others).
    pub on_error: OnError,
    /// Images with more pixels (width × height, read from the header before decoding) are
    /// refused.
    pub max_pixels: u64,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            root: PathBuf::new(),
            category: None,
            val_split: "same_as_test".into(),
            eval_batch: 8,
            normal_dir: None,
            abnormal_dir: None,
            normal_test_dir: None,
            mask_dir: None,
            normal_split_ratio: 0.2,
            on_error: OnError::Fail,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

impl DataSection {
    /// The folder that names the data set: `root`, or for the folder layout `normal_dir`'s
    /// parent.
    pub fn display_root(&self) -> PathBuf {
        match &self.normal_dir {
            Some(n) => n
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            None => self.root.clone(),
        }
    }

    /// Lists the data set (MVTec layout, or the folder layout when `normal_dir` is set).
    pub fn listing(&self, seed: u64) -> Result<Listing> {
        match &self.normal_dir {
            Some(normal) => {
                let layout = FolderLayout {
                    normal_dir: normal.clone(),
                    abnormal_dir: self.abnormal_dir.clone(),
                    normal_test_dir: self.normal_test_dir.clone(),
                    mask_dir: self.mask_dir.clone(),
                    normal_split_ratio: self.normal_split_ratio,
                    seed,
                };
                Ok(FolderDataset::open(&layout)
                    .map_err(|e| config_error(e.to_string()))?
                    .listing)
            }
            None => Ok(MvtecDataset::open(&self.root, self.category.as_deref())
                .map_err(|e| config_error(e.to_string()))?
                .listing),
        }
    }
}

/// Where the discrete latent model (phase 1) comes from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VqSection {
    /// A pretrained discrete model (official `.pckl`, our safetensors, anomalib `model.ckpt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<PathBuf>,
    /// Without `weights`: run phase 1 on the training images (settings in `[pretrain]`).
    pub pretrain: bool,
    /// Without `weights`: start from the general codebook shipped for the model's widths
    /// ([`GeneralCodebook`]); excludes `pretrain`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub general: bool,
}

impl VqSection {
    /// Where the discrete model comes from, in words (`dsr.run` metadata, logs).
    pub fn source(&self) -> String {
        match &self.weights {
            Some(p) => p.display().to_string(),
            None if self.general => "the shipped general codebook for the model's widths".into(),
            None if self.pretrain => "phase 1 on the training images".into(),
            None => "none".into(),
        }
    }
}

/// Which map the trained model outputs as its anomaly map (`output.map`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapChoice {
    /// The best one on the validation set ([`choose_candidate`]).
    #[default]
    Auto,
    /// The upsampling module's refined mask (the reference's output).
    Refined,
    /// The anomaly detection module's own mask.
    Detection,
    /// The feature memory's distance map (needs `output.feature_memory`).
    Memory,
    /// The detection mask and the memory's distance map combined, with the blend weight that
    /// is best on the validation set (needs `output.feature_memory`).
    Combined,
}

impl MapChoice {
    /// Its name in the run configuration.
    pub fn name(self) -> &'static str {
        match self {
            MapChoice::Auto => "auto",
            MapChoice::Refined => "refined",
            MapChoice::Detection => "detection",
            MapChoice::Memory => "memory",
            MapChoice::Combined => "combined",
        }
    }
}

/// Where results go and how often checkpoints are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSection {
    /// The results root; runs go to `<results>/dsr/<dataset>/<category>/vN/`.
    pub results: PathBuf,
    /// Write `weights/last.safetensors` every this many phase-2/3 steps (and at the end).
    pub checkpoint_every: u64,
    /// The anomaly map the model outputs: `"auto"` (every map is measured on the validation
    /// set and the best one is kept), `"refined"`, `"detection"`, `"memory"` or `"combined"`.
    /// Recorded in the model file (`dsr.output_map`).
    pub map: MapChoice,
    /// Keep a memory of the training images' features in the model
    /// ([`dsr_core::feature_memory`]), so that the memory and combined maps are measured too.
    pub feature_memory: bool,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            results: PathBuf::from("results"),
            checkpoint_every: 100,
            map: MapChoice::Auto,
            feature_memory: true,
        }
    }
}

/// The summed pixel figures (pixel AUROC + pixel AP + AUPRO) by which `output.map = "auto"`
/// compares the maps; the image score does not depend on the map.
pub fn map_quality(m: &dsr_eval::Metrics) -> f64 {
    m.pixel_auroc + m.pixel_ap + m.pixel_aupro
}

/// The weights of the distance map tried for the combined map (chosen on validation).
pub const BLEND_WEIGHTS: [f32; 3] = [0.5, 1.0, 2.0];

/// One map measured on the validation set.
#[derive(Debug, Clone)]
pub struct MapCandidate {
    /// Which map.
    pub map: OutputMap,
    /// Its blend, for the combined map.
    pub blend: Option<dsr_core::feature_memory::Blend>,
    /// The validation predictions with this map.
    pub evaluation: Evaluation,
    /// The post-processor fitted on them.
    pub postprocess: PostProcessor,
    /// The validation metrics.
    pub metrics: Metrics,
}

impl MapCandidate {
    /// Fits the post-processor on `evaluation` and measures it.
    pub fn measure(
        map: OutputMap,
        blend: Option<dsr_core::feature_memory::Blend>,
        evaluation: Evaluation,
    ) -> Result<Self> {
        let postprocess = evaluation.fit_postprocessor()?;
        let metrics = evaluation.metrics(&postprocess)?;
        Ok(Self {
            map,
            blend,
            evaluation,
            postprocess,
            metrics,
        })
    }

    /// Its name in reports: the map's, with the blend weight for the combined map.
    pub fn label(&self) -> String {
        match self.blend {
            Some(b) => format!("{} (memory weight {})", self.map, b.weight),
            None => self.map.to_string(),
        }
    }
}

/// The index of the map to output under `choice`: for [`MapChoice::Auto`] the candidate of the
/// highest [`map_quality`], leaving out the refined map when phase 3 took no step (the
/// upsampling module is untrained); the earlier candidate on a tie or an undefined figure. For
/// [`MapChoice::Combined`] the best of the combined candidates. `None` when no candidate fits.
pub fn choose_candidate(
    choice: MapChoice,
    candidates: &[MapCandidate],
    phase3_trained: bool,
) -> Option<usize> {
    let allowed = |c: &MapCandidate| match choice {
        MapChoice::Auto => phase3_trained || c.map != OutputMap::Refined,
        MapChoice::Refined => c.map == OutputMap::Refined,
        MapChoice::Detection => c.map == OutputMap::Detection,
        MapChoice::Memory => c.map == OutputMap::Memory,
        MapChoice::Combined => c.map == OutputMap::Combined,
    };
    let mut best: Option<(usize, f64)> = None;
    for (i, c) in candidates.iter().enumerate().filter(|(_, c)| allowed(c)) {
        let q = map_quality(&c.metrics);
        match best {
            None => best = Some((i, q)),
            Some((_, bq)) if q > bq => best = Some((i, q)),
            Some(_) => {}
        }
    }
    best.map(|(i, _)| i)
}

/// Mean and standard deviation of the map values of the defect-free images of `ev`; `None`
/// when it has none or the values do not vary.
fn normal_statistics(ev: &Evaluation) -> Option<(f32, f32)> {
    let px = ev.size[0] * ev.size[1];
    let (mut n, mut sum, mut sq) = (0f64, 0f64, 0f64);
    for (map, _) in ev.maps.chunks(px).zip(&ev.labels).filter(|(_, &l)| !l) {
        for &v in map {
            n += 1.0;
            sum += f64::from(v);
            sq += f64::from(v) * f64::from(v);
        }
    }
    if n == 0.0 {
        return None;
    }
    let mean = sum / n;
    let std = (sq / n - mean * mean).max(0.0).sqrt();
    (std > 1e-12 && std.is_finite()).then_some((mean as f32, std as f32))
}

/// The blends to try for the combined map ([`BLEND_WEIGHTS`]), standardised on the defect-free
/// validation images of the detection and distance evaluations; none when either cannot be
/// standardised.
pub fn blends(
    detection: &Evaluation,
    distance: &Evaluation,
) -> Vec<dsr_core::feature_memory::Blend> {
    match (normal_statistics(detection), normal_statistics(distance)) {
        (Some((dm, ds)), Some((mm, ms))) => BLEND_WEIGHTS
            .iter()
            .map(|&weight| dsr_core::feature_memory::Blend {
                weight,
                detection_mean: dm,
                detection_std: ds,
                memory_mean: mm,
                memory_std: ms,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The combined map of `memory` (with its blend) from flat detection and distance maps, by
/// the same tensor arithmetic as inference.
fn combine_maps(
    memory: &dsr_core::feature_memory::FeatureMemory,
    detection: &[f32],
    distance: &[f32],
) -> Result<Vec<f32>> {
    let dev = Device::Cpu;
    let memory = memory.to_device(&dev)?;
    let d = candle_core::Tensor::from_slice(detection, (1, detection.len()), &dev)?;
    let m = candle_core::Tensor::from_slice(distance, (1, distance.len()), &dev)?;
    Ok(memory.combine(&d, &m)?.flatten_all()?.to_vec1()?)
}

/// The feature memory of `model`'s discrete model on the training `images`, encoded in batches
/// of `batch` on `device`, at most [`dsr_core::feature_memory::default_capacity`] rows.
pub fn feature_memory_of(
    model: &dsr_core::DsrModel,
    images: &dsr_augment::ImageBatch,
    batch: usize,
    device: &Device,
) -> Result<dsr_core::feature_memory::FeatureMemory> {
    use dsr_core::feature_memory::{default_capacity, FeatureMemory};
    let per = images.c * images.h * images.w;
    let mut features = Vec::new();
    for chunk in images.data.chunks(per * batch.max(1)) {
        let n = chunk.len() / per;
        let x = candle_core::Tensor::from_slice(chunk, (n, images.c, images.h, images.w), device)?;
        let encoded = model.discrete().encode(&x)?;
        features.push(FeatureMemory::features(&encoded)?);
    }
    let channels = 2 * model.config().num_hiddens;
    Ok(FeatureMemory::from_features(
        &features,
        default_capacity(channels),
    )?)
}

/// Everything that defines a training run; the `config.toml` of a run folder.
///
/// `[train.model]` is the model; `[pretrain]` takes it over (its own `model` is ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// The data set.
    pub data: DataSection,
    /// The discrete latent model.
    pub vq: VqSection,
    /// Phase 1 (used when `vq.pretrain` is set and `vq.weights` is absent).
    pub pretrain: PretrainConfig,
    /// Phases 2 and 3.
    pub train: TrainConfig,
    /// Results and checkpoints.
    pub output: OutputSection,
}

fn config_error(message: impl Into<String>) -> TrainError {
    TrainError::Config(message.into())
}

impl RunConfig {
    /// Parses a TOML run configuration; missing keys take their defaults, unknown keys are an
    /// error.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg: RunConfig =
            toml::from_str(text).map_err(|e| config_error(toml_error_line(&e, Some(text))))?;
        Ok(cfg.synced())
    }

    /// Reads a TOML run configuration file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text =
            dsr_core::files::read_regular_to_string(path).map_err(|e| TrainError::Checkpoint {
                path: path.display().to_string(),
                message: format!("cannot read the run configuration: {e}"),
            })?;
        Self::from_toml_str(&text).map_err(|e| TrainError::Checkpoint {
            path: path.display().to_string(),
            message: format!(
                "{e}; fix the file (or run `dsr train --print-config` for a valid one)"
            ),
        })
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| config_error(e.to_string()))
    }

    /// Applies `section.key=value` overrides (TOML values; a bare word is taken as a string),
    /// e.g. `train.batch_size=4`, `train.schedule.phase2_steps=500`, `data.category="bottle"`.
    pub fn with_overrides(&self, overrides: &[String]) -> Result<Self> {
        if overrides.is_empty() {
            return Ok(self.clone().synced());
        }
        let mut root = toml::Value::try_from(self).map_err(|e| config_error(e.to_string()))?;
        for item in overrides {
            let (key, raw) = item.split_once('=').ok_or_else(|| {
                config_error(format!(
                    "override '{item}' is not of the form section.key=value"
                ))
            })?;
            let value = parse_toml_value(raw.trim());
            let path: Vec<&str> = key.trim().split('.').collect();
            let mut node = &mut root;
            for (i, part) in path.iter().enumerate() {
                let table = node.as_table_mut().ok_or_else(|| {
                    config_error(format!(
                        "override '{item}': '{}' is not a section",
                        path[..i].join(".")
                    ))
                })?;
                if i + 1 == path.len() {
                    table.insert(part.to_string(), value.clone());
                    break;
                }
                node = table
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
            }
        }
        let cfg: RunConfig = root.try_into().map_err(|e: toml::de::Error| {
            config_error(format!(
                "after the overrides: {}",
                toml_error_line(&e, None)
            ))
        })?;
        Ok(cfg.synced())
    }

    /// Copies the model and seed of `[train]` into `[pretrain]`.
    fn synced(mut self) -> Self {
        self.pretrain.model = self.train.model;
        self
    }

    /// Checks what can be checked before any data are read.
    pub fn validate(&self) -> Result<()> {
        if self.pretrain.model != self.train.model {
            return Err(config_error(
                "pretrain.model differs from train.model (phase 1 trains the discrete part of \
                 train.model; leave pretrain.model out)",
            ));
        }
        self.train.validate()?;
        if let Some(c) = &self.data.category {
            check_category(c)?;
        }
        // Every section is checked against its domain, used or not (a value out of its domain
        // must not wait in the file until a later run uses it).
        self.pretrain.validate()?;
        if self.vq.pretrain && self.vq.weights.is_none() {
            self.pretrain.check_memory()?;
            let [h, w] = self.train.image_size;
            if self.pretrain.crop > h.min(w) {
                return Err(config_error(format!(
                    "pretrain.crop {} is larger than the training images ({h}×{w}), from which the phase-1 crops are cut; use a crop of at most {}",
                    self.pretrain.crop,
                    h.min(w)
                )));
            }
        }
        if matches!(self.output.map, MapChoice::Memory | MapChoice::Combined)
            && !self.output.feature_memory
        {
            return Err(config_error(format!(
                "output.map = \"{}\" needs the feature memory: set output.feature_memory = true or choose another map",
                self.output.map.name()
            )));
        }
        let ratio = self.data.normal_split_ratio;
        if !(ratio.is_finite() && (0.0..1.0).contains(&ratio)) {
            return Err(config_error(format!(
                "data.normal_split_ratio must lie in [0, 1) (anomalib uses 0.2), got {ratio}"
            )));
        }
        if self.data.max_pixels == 0 {
            return Err(config_error("data.max_pixels must be at least 1"));
        }
        if self.data.eval_batch > crate::train::MAX_BATCH_SIZE {
            return Err(config_error(format!(
                "data.eval_batch must lie between 1 and {}, got {}",
                crate::train::MAX_BATCH_SIZE,
                self.data.eval_batch
            )));
        }
        if self.data.root.as_os_str().is_empty() && self.data.normal_dir.is_none() {
            return Err(config_error(
                "no data folder: set data.root (--data), or data.normal_dir (--normal-dir) for the folder layout",
            ));
        }
        if self.output.checkpoint_every == 0 {
            return Err(config_error("output.checkpoint_every must be at least 1"));
        }
        if self.data.eval_batch == 0 {
            return Err(config_error("data.eval_batch must be at least 1"));
        }
        parse_val_split(&self.data.val_split, self.train.seed)?;
        if self.vq.general {
            if self.vq.weights.is_some() || self.vq.pretrain {
                return Err(config_error(
                    "vq.general excludes vq.weights and vq.pretrain: choose one source of the \
                     discrete model",
                ));
            }
            if GeneralCodebook::for_config(&self.train.model).is_none() {
                return Err(config_error(
                    "vq.general: no general codebook is shipped for these model widths (the \
                     small and reference presets have one); pretrain phase 1 instead \
                     (--pretrain) or pass --vq-weights FILE",
                ));
            }
        }
        Ok(())
    }
}

/// Checks that a category is the name of one sub-folder of the data set: not empty, not `.` or
/// `..`, no path separator, not absolute (a category such as `../x` would put the run folder
/// outside the results folder).
pub fn check_category(c: &str) -> Result<()> {
    let mut parts = Path::new(c).components();
    let plain = matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(n)), None) if n == std::ffi::OsStr::new(c)
    );
    if !plain || c.contains(['/', '\\']) {
        return Err(config_error(format!(
            "data.category '{c}' is not the name of a sub-folder of the data set (no '/', '..' or absolute path); give the folder's name, e.g. bottle"
        )));
    }
    Ok(())
}

/// A TOML error on one line: its message, where it is (line and column), the offending text.
pub fn toml_error_line(e: &toml::de::Error, text: Option<&str>) -> String {
    match (e.span(), text) {
        (Some(span), Some(text)) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            let message = e.message().trim().replace('\n', " ");
            format!("line {line}, column {column}: {message}")
        }
        // Without the text the error's own report (which names the key) is put on one line.
        _ => e
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Parses a TOML value; text that is not one is taken as a string.
fn parse_toml_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

/// Parses `data.val_split`.
pub fn parse_val_split(text: &str, seed: u64) -> Result<ValSplit> {
    match text.split_once(':') {
        None if text == "same_as_test" => Ok(ValSplit::SameAsTest),
        Some(("from_test", f)) => {
            let fraction: f64 = f.parse().map_err(|_| {
                config_error(format!("data.val_split '{text}': '{f}' is not a number"))
            })?;
            if !(fraction > 0.0 && fraction < 1.0) {
                return Err(config_error(format!(
                    "data.val_split '{text}': the fraction must lie strictly between 0 and 1"
                )));
            }
            Ok(ValSplit::FromTest { fraction, seed })
        }
        _ => Err(config_error(format!(
            "data.val_split '{text}' is not one of \"same_as_test\", \"from_test:F\" (a normal-only \
             split of the training set cannot place an F1 threshold)"
        ))),
    }
}

/// The `(dataset, category)` names of a data folder for the results layout: `root/category`,
/// or for a category folder given directly, its parent's name and its own.
pub fn dataset_and_category(root: &Path, category: Option<&str>) -> (String, String) {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "data".into())
    };
    let abs = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    match category {
        Some(c) if abs.join(c).join("train").is_dir() => (name(&abs), c.to_string()),
        _ => (
            abs.parent().map(name).unwrap_or_else(|| "data".into()),
            name(&abs),
        ),
    }
}

/// A run folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    /// The folder, `<results>/dsr/<dataset>/<category>/vN/`.
    pub path: PathBuf,
}

impl RunDir {
    /// Creates the next free `vN` folder (from `v0`) under `<results>/dsr/<dataset>/<category>/`.
    pub fn create_next(results: &Path, dataset: &str, category: &str) -> Result<Self> {
        let parent = results.join("dsr").join(dataset).join(category);
        std::fs::create_dir_all(&parent).map_err(|e| io_error(&parent, e))?;
        for n in 0.. {
            let path = parent.join(format!("v{n}"));
            // create_dir (not _all) fails if another run took the number meanwhile.
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    let dir = RunDir { path };
                    std::fs::create_dir_all(dir.weights_dir())
                        .map_err(|e| io_error(&dir.weights_dir(), e))?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_error(&path, e)),
            }
        }
        unreachable!("an unbounded range always yields a free number")
    }

    /// An existing run folder (it must hold `config.toml`).
    pub fn open(path: &Path) -> Result<Self> {
        let dir = RunDir {
            path: path.to_path_buf(),
        };
        if !dir.config_path().is_file() {
            return Err(TrainError::Checkpoint {
                path: path.display().to_string(),
                message: format!("not a run folder (no {CONFIG_FILE})"),
            });
        }
        Ok(dir)
    }

    /// `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.path.join(CONFIG_FILE)
    }
    /// `metrics.jsonl`.
    pub fn metrics_log_path(&self) -> PathBuf {
        self.path.join(METRICS_LOG)
    }
    /// `weights/`.
    pub fn weights_dir(&self) -> PathBuf {
        self.path.join(WEIGHTS_DIR)
    }
    /// `weights/last.safetensors`.
    pub fn last_checkpoint(&self) -> PathBuf {
        self.weights_dir().join(LAST_CHECKPOINT)
    }
    /// `weights/model.safetensors`.
    pub fn model_path(&self) -> PathBuf {
        self.weights_dir().join(MODEL_FILE)
    }
    /// `weights/vq.safetensors`.
    pub fn vq_path(&self) -> PathBuf {
        self.weights_dir().join(VQ_FILE)
    }
}

fn io_error(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// What happened during a session, for progress display.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// The data were listed and split.
    Data {
        /// Training images.
        train: usize,
        /// Validation images.
        val: usize,
        /// Test images.
        test: usize,
    },
    /// A phase begins (or continues after a resume at step `done`).
    PhaseStart {
        /// 1, 2 or 3.
        phase: u8,
        /// Steps already taken in this phase.
        done: u64,
        /// Steps of this phase.
        total: u64,
    },
    /// A training image was skipped (`data.on_error = "skip"`).
    Skipped {
        /// What went wrong, naming the file.
        message: String,
    },
    /// A phase-1 step.
    Pretrain(PretrainReport),
    /// A phase-2/3 step.
    Train(StepReport),
    /// A checkpoint was written.
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// Steps taken.
        step: u64,
    },
    /// The run resumed from a checkpoint.
    Resumed {
        /// The checkpoint.
        path: PathBuf,
        /// Steps already taken.
        step: u64,
    },
    /// A budgeted run changed its phase lengths to end by its deadline.
    Replanned {
        /// Steps taken.
        step: u64,
        /// The new length of phase 2.
        phase2_steps: u64,
        /// The new length of phase 3.
        phase3_steps: u64,
        /// The phase-2 step time measured since the last re-planning, seconds.
        step_seconds: f64,
    },
    /// Every map was measured on the validation set and one was chosen as the output.
    OutputMap {
        /// The map the model outputs ([`MapCandidate::label`]).
        chosen: String,
        /// Each measured map and its validation metrics, in the order they were measured.
        measured: Vec<(String, dsr_eval::Metrics)>,
    },
    /// The validation finished and the final model was written.
    Finished {
        /// `weights/model.safetensors`.
        model: PathBuf,
    },
}

/// The result of [`Session::run`].
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// `weights/model.safetensors`, with its post-processor.
    pub model: PathBuf,
    /// The evaluation on the validation set (which fitted the post-processor).
    pub validation: Evaluation,
    /// The post-processor fitted on the validation set (stored with the model).
    pub postprocess: PostProcessor,
    /// The validation metrics at the fitted post-processor's thresholds.
    pub metrics: Metrics,
    /// The test entries (for the test evaluation that follows).
    pub test: Vec<Entry>,
}

/// One training run in its run folder (locked while the session exists).
#[derive(Debug, Clone)]
pub struct Session {
    cfg: RunConfig,
    dir: RunDir,
    exec: Execution,
    deadline: Option<Deadline>,
    _lock: std::sync::Arc<dsr_core::files::FolderLock>,
}

fn lock_run(dir: &RunDir) -> Result<std::sync::Arc<dsr_core::files::FolderLock>> {
    dsr_core::files::FolderLock::acquire(&dir.path, LOCK_FILE, "dsr train")
        .map(std::sync::Arc::new)
        .map_err(|e| TrainError::Checkpoint {
            path: dir.path.display().to_string(),
            message: match e.kind() {
                std::io::ErrorKind::WouldBlock => e.to_string().replacen(
                    &format!("{} is", dir.path.display()),
                    "the run folder is",
                    1,
                ),
                _ => format!("cannot lock the run folder: {e}"),
            },
        })
}

impl Session {
    /// Starts a new run: validates `cfg`, creates the next `vN` folder and writes `config.toml`.
    /// Everything [`preflight`] checks (without the test split) is checked before the folder is
    /// made, so a run that cannot train leaves nothing behind.
    pub fn create(cfg: RunConfig) -> Result<Self> {
        preflight(&cfg, false)?;
        let (dataset, category) = match &cfg.data.normal_dir {
            Some(_) => dataset_and_category(&cfg.data.display_root(), None),
            None => dataset_and_category(&cfg.data.root, cfg.data.category.as_deref()),
        };
        let dir = RunDir::create_next(&cfg.output.results, &dataset, &category)?;
        let lock = lock_run(&dir)?;
        write_atomic(&dir.config_path(), cfg.to_toml()?.as_bytes())?;
        Ok(Self {
            cfg,
            dir,
            exec: Execution::default(),
            deadline: None,
            _lock: lock,
        })
    }

    /// The configuration of the run in `path` (its `config.toml`), read without taking the run
    /// (e.g. to print it while the run goes on).
    pub fn read_config(path: &Path) -> Result<RunConfig> {
        let dir = RunDir::open(path)?;
        RunConfig::from_toml_file(&dir.config_path())
    }

    /// Reopens the run in `path` (its `config.toml`) to continue it.
    /// Another process working in the same folder is refused (the folder is locked).
    pub fn resume(path: &Path) -> Result<Self> {
        let dir = RunDir::open(path)?;
        let lock = lock_run(&dir)?;
        let cfg = RunConfig::from_toml_file(&dir.config_path())?;
        cfg.validate()?;
        Ok(Self {
            cfg,
            dir,
            exec: Execution::default(),
            deadline: None,
            _lock: lock,
        })
    }

    /// Whether the run can continue from where it stopped with [`Session::resume`]: a
    /// checkpoint of phase 2/3 or the phase-1 result is in its folder.
    pub fn can_resume(&self) -> bool {
        self.dir.last_checkpoint().is_file() || self.dir.vq_path().is_file()
    }

    /// The session with its models computing under `exec` (convolution algorithm, recomputation
    /// of activations); not part of the run's configuration, so it may differ on resume.
    pub fn with_execution(mut self, exec: Execution) -> Self {
        self.exec = exec;
        self
    }

    /// The session re-planning phases 2 and 3 to end by `deadline`: about every
    /// [`crate::budget::REPLAN_INTERVAL_SECONDS`] of phase 2, from the step time it measures, until the
    /// learning-rate drop (see [`replan_steps`]). The new lengths go into `config.toml` and the
    /// next checkpoint.
    pub fn with_deadline(mut self, deadline: Deadline) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The deadline it re-plans to, if any.
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    /// How its models compute.
    pub fn execution(&self) -> Execution {
        self.exec
    }

    /// The configuration.
    pub fn config(&self) -> &RunConfig {
        &self.cfg
    }

    /// The run folder.
    pub fn dir(&self) -> &RunDir {
        &self.dir
    }

    /// Runs (or continues) phases 1–3, then validates and writes `weights/model.safetensors`.
    pub fn run(
        &self,
        device: &Device,
        on_event: &mut dyn FnMut(&SessionEvent),
    ) -> Result<RunOutcome> {
        let cfg = &self.cfg;
        let size = cfg.train.image_size;
        let splits = preflight(cfg, false)?;
        on_event(&SessionEvent::Data {
            train: splits.train.len(),
            val: splits.val.len(),
            test: splits.test.len(),
        });
        let images = self.load_training_images(&splits.train, size, on_event)?;
        let start = Instant::now();

        let last = self.dir.last_checkpoint();
        let mut trainer = if last.is_file() {
            let trainer = Trainer::resume(&last, images, device)?.with_execution(self.exec);
            if !same_but_lengths(trainer.config(), &cfg.train) {
                return Err(TrainError::Checkpoint {
                    path: last.display().to_string(),
                    message: format!(
                        "written with another training configuration than {}",
                        self.dir.config_path().display()
                    ),
                });
            }
            on_event(&SessionEvent::Resumed {
                path: last.clone(),
                step: trainer.step(),
            });
            trainer
        } else {
            let discrete = self.discrete(&splits.train, device, start, on_event)?;
            Trainer::new(cfg.train.clone(), &discrete, images, device)?.with_execution(self.exec)
        };
        let mut log = MetricsLog::open(&self.dir.metrics_log_path(), Some(trainer.step()))?;

        // A re-planned run's checkpoint may hold other phase lengths than `config.toml` (a
        // stop between the two writes): the checkpoint's are the ones its steps followed.
        let mut run_cfg = cfg.clone();
        if run_cfg.train != *trainer.config() {
            run_cfg.train = trainer.config().clone();
            write_atomic(&self.dir.config_path(), run_cfg.to_toml()?.as_bytes())?;
        }
        let mut phase = None;
        let mut window = ReplanWindow::new(trainer.step());
        while !trainer.is_done() {
            let step = trainer.step();
            let plan = *trainer.plan();
            if phase != Some(trainer.phase()) {
                phase = Some(trainer.phase());
                let (number, done, total) = match trainer.phase() {
                    Phase::Phase2 => (2, step, plan.phase2_steps),
                    Phase::Phase3 => (3, step - plan.phase2_steps, plan.phase3_steps),
                };
                on_event(&SessionEvent::PhaseStart {
                    phase: number,
                    done,
                    total,
                });
            }
            let report = trainer.train_step()?;
            log.append(&serde_json::json!({
                "phase": report.phase,
                "step": report.step,
                "lr": report.lr,
                "losses": report.losses,
                "elapsed_s": start.elapsed().as_secs_f64(),
            }))?;
            on_event(&SessionEvent::Train(report));
            if let Some(deadline) = &self.deadline {
                if let Some((phase2_steps, phase3_steps, observed)) =
                    window.replan(&trainer, deadline)
                {
                    trainer.replan(phase2_steps, phase3_steps)?;
                    run_cfg.train = trainer.config().clone();
                    write_atomic(&self.dir.config_path(), run_cfg.to_toml()?.as_bytes())?;
                    on_event(&SessionEvent::Replanned {
                        step: trainer.step(),
                        phase2_steps,
                        phase3_steps,
                        step_seconds: observed,
                    });
                }
            }
            if trainer.step() % cfg.output.checkpoint_every == 0 || trainer.is_done() {
                trainer.save(&last)?;
                on_event(&SessionEvent::Checkpoint {
                    path: last.clone(),
                    step: trainer.step(),
                });
            }
        }

        // Every map is measured on the validation set; the model outputs the chosen one.
        let plan = *trainer.plan();
        let mut model = trainer.inference_model()?;
        if cfg.output.feature_memory {
            let train_images = self.load_training_images(&splits.train, size, &mut |_| {})?;
            let memory = feature_memory_of(&model, &train_images, cfg.data.eval_batch, device)?;
            model = model.with_feature_memory(memory);
        }
        let options = EvalOptions {
            batch: cfg.data.eval_batch,
            ..EvalOptions::default()
        };
        let eval_map = |map: OutputMap| -> Result<Evaluation> {
            let validator = Detector::new(model.clone().with_output_map(map), size, None, device)?;
            Ok(evaluate(&validator, samples_of(&splits.val), &options)?)
        };
        let evaluated = (|| -> Result<Vec<MapCandidate>> {
            let mut maps = vec![OutputMap::Refined, OutputMap::Detection];
            if cfg.output.feature_memory {
                maps.push(OutputMap::Memory);
            }
            let evaluations = maps
                .iter()
                .map(|&m| eval_map(m))
                .collect::<Result<Vec<_>>>()?;
            let mut candidates = Vec::new();
            for (&map, ev) in maps.iter().zip(&evaluations) {
                candidates.push(MapCandidate::measure(map, None, ev.clone())?);
            }
            if let (Some(memory), [_, detection, distance]) =
                (model.feature_memory(), evaluations.as_slice())
            {
                for blend in blends(detection, distance) {
                    let memory = memory.clone().with_blend(blend);
                    let mut ev = detection.clone();
                    ev.maps = combine_maps(&memory, &detection.maps, &distance.maps)?;
                    candidates.push(MapCandidate::measure(OutputMap::Combined, Some(blend), ev)?);
                }
            }
            Ok(candidates)
        })();
        let candidates = match evaluated {
            Ok(c) => c,
            Err(e) => {
                // The trained model is not thrown away: it is written without thresholds (the
                // map of the modules trained), then the problem is reported.
                let map = if plan.phase3_steps > 0 {
                    OutputMap::Refined
                } else {
                    OutputMap::Detection
                };
                let mut extra = BTreeMap::new();
                extra.insert(META_OUTPUT_MAP.to_string(), map.to_string());
                extra.insert("dsr.train_steps".into(), trainer.step().to_string());
                let path = self.dir.model_path();
                save_checkpoint(
                    &path,
                    &trainer.model_tensors(),
                    &cfg.train.model,
                    Some(size),
                    &extra,
                )?;
                return Err(TrainError::Unvalidated {
                    model: path.display().to_string(),
                    message: e.to_string(),
                });
            }
        };
        let chosen = choose_candidate(cfg.output.map, &candidates, plan.phase3_steps > 0)
            .ok_or_else(|| {
                config_error(format!(
                    "output.map = \"{}\" was not measured (the feature memory is off, or the validation set has no defect-free image to fit the combined map on)",
                    cfg.output.map.name()
                ))
            })?;
        let maps: serde_json::Map<String, serde_json::Value> = candidates
            .iter()
            .map(|c| (c.label(), serde_json::json!(c.metrics)))
            .collect();
        on_event(&SessionEvent::OutputMap {
            chosen: candidates[chosen].label(),
            measured: candidates.iter().map(|c| (c.label(), c.metrics)).collect(),
        });
        let MapCandidate {
            map: output_map,
            blend,
            evaluation: validation,
            postprocess,
            metrics,
        } = candidates.into_iter().nth(chosen).expect("chosen index");
        let mut tensors = trainer.model_tensors();
        if let Some(memory) = model.feature_memory() {
            tensors.insert(
                dsr_core::feature_memory::MEMORY_ROWS_KEY.to_string(),
                memory.rows().to_device(&Device::Cpu)?,
            );
        }
        let mut extra = BTreeMap::new();
        extra.insert(META_OUTPUT_MAP.to_string(), output_map.to_string());
        if let Some(blend) = blend {
            extra.insert(
                dsr_core::feature_memory::META_FEATURE_MEMORY.to_string(),
                serde_json::to_string(&blend).map_err(|e| config_error(e.to_string()))?,
            );
        }
        extra.insert(
            METADATA_KEY.to_string(),
            postprocess
                .to_json()
                .map_err(|e| config_error(e.to_string()))?,
        );
        extra.insert("dsr.train_steps".into(), trainer.step().to_string());
        extra.insert(
            "dsr.run".into(),
            serde_json::json!({
                "data": cfg.data.root.display().to_string(),
                "category": cfg.data.category,
                "val_split": cfg.data.val_split,
                "recipe": cfg.train.recipe.to_string(),
                "discrete_model": cfg.vq.source(),
                "seed": cfg.train.seed,
            })
            .to_string(),
        );
        let summary = serde_json::json!({
            "val_split": cfg.data.val_split,
            "num_images": validation.scores.len(),
            "num_defective": validation.num_defective(),
            "metrics": metrics,
            "output_map": output_map,
            "maps": maps,
            "postprocess": postprocess,
            "inference_seconds": validation.seconds,
        });
        write_atomic(
            &self.dir.path.join(VALIDATION_FILE),
            serde_json::to_string_pretty(&summary)
                .map_err(|e| config_error(e.to_string()))?
                .as_bytes(),
        )?;
        let model = self.dir.model_path();
        save_checkpoint(&model, &tensors, &cfg.train.model, Some(size), &extra)?;
        on_event(&SessionEvent::Finished {
            model: model.clone(),
        });
        Ok(RunOutcome {
            model,
            validation,
            postprocess,
            metrics,
            test: splits.test,
        })
    }

    /// The training images at `size`, under `data.on_error` and `data.max_pixels`.
    fn load_training_images(
        &self,
        entries: &[Entry],
        size: [usize; 2],
        on_event: &mut dyn FnMut(&SessionEvent),
    ) -> Result<dsr_augment::ImageBatch> {
        let mut load = LoadConfig::new(size[0] as u32, size[1] as u32);
        load.on_error = self.cfg.data.on_error;
        load.max_pixels = self.cfg.data.max_pixels;
        let (images, skipped) = load_image_batch_with(entries, &load)?;
        for e in skipped {
            on_event(&SessionEvent::Skipped {
                message: e.to_string(),
            });
        }
        Ok(images)
    }

    /// The discrete model: given weights, the phase-1 result of an earlier attempt, or phase 1.
    fn discrete(
        &self,
        train: &[Entry],
        device: &Device,
        start: Instant,
        on_event: &mut dyn FnMut(&SessionEvent),
    ) -> Result<Checkpoint> {
        let cfg = &self.cfg;
        if let Some(path) = &cfg.vq.weights {
            return Ok(load_checkpoint(path)?);
        }
        if cfg.vq.general {
            let codebook = GeneralCodebook::for_config(&cfg.train.model).ok_or_else(|| {
                config_error("vq.general: no general codebook is shipped for these model widths")
            })?;
            return Ok(codebook.checkpoint()?);
        }
        let vq = self.dir.vq_path();
        if vq.is_file() {
            return Ok(load_checkpoint(&vq)?);
        }
        if !cfg.vq.pretrain {
            return Err(config_error(
                "no discrete-model weights: pass --vq-weights FILE, run `cargo xtask \
                 fetch-weights` for the official ones, or pretrain phase 1 on the training \
                 images (--pretrain)",
            ));
        }
        let size = cfg.train.image_size;
        let crop = cfg.pretrain.crop;
        let images =
            self.load_training_images(train, [crop.max(size[0]), crop.max(size[1])], on_event)?;
        let pre_cfg = PretrainConfig {
            model: cfg.train.model,
            ..cfg.pretrain.clone()
        };
        let mut pre = Pretrainer::with_execution(pre_cfg, images, device, self.exec)?;
        // Phase 1 restarts from zero after an interruption: drop its old log lines.
        let mut log = MetricsLog::open(&self.dir.metrics_log_path(), None)?;
        on_event(&SessionEvent::PhaseStart {
            phase: 1,
            done: 0,
            total: cfg.pretrain.steps,
        });
        while !pre.is_done() {
            let report = pre.train_step()?;
            let mut line =
                serde_json::to_value(&report).map_err(|e| config_error(e.to_string()))?;
            if let Some(obj) = line.as_object_mut() {
                obj.insert("phase".into(), "phase1".into());
                obj.insert("elapsed_s".into(), start.elapsed().as_secs_f64().into());
            }
            log.append(&line)?;
            on_event(&SessionEvent::Pretrain(report));
        }
        pre.save(&vq)?;
        on_event(&SessionEvent::Checkpoint {
            path: vq.clone(),
            step: cfg.pretrain.steps,
        });
        Ok(load_checkpoint(&vq)?)
    }
}

/// Whether two training configurations differ at most in the lengths of phases 2 and 3 of a
/// schedule counted in steps (what re-planning changes).
fn same_but_lengths(a: &TrainConfig, b: &TrainConfig) -> bool {
    let unlengthed = |c: &TrainConfig| match c.schedule {
        Schedule::Original {
            lr_drop_fraction, ..
        } => TrainConfig {
            schedule: Schedule::Original {
                phase2_steps: 0,
                phase3_steps: 0,
                lr_drop_fraction,
            },
            ..c.clone()
        },
        _ => c.clone(),
    };
    unlengthed(a) == unlengthed(b)
}

/// The phase-2 steps timed since the last re-planning of a budgeted run.
struct ReplanWindow {
    since: Instant,
    first_step: u64,
}

impl ReplanWindow {
    /// A window opening after the step about to be taken (the first step of a process is a
    /// warm-up: slower than the rest).
    fn new(step: u64) -> Self {
        Self {
            since: Instant::now(),
            first_step: step + 1,
        }
    }

    /// New phase lengths, and the step time they come from, when the window has lasted
    /// the deadline's interval of phase 2 and the lengths change; the window restarts.
    fn replan(&mut self, trainer: &Trainer, deadline: &Deadline) -> Option<(u64, u64, f64)> {
        let step = trainer.step();
        if step <= self.first_step {
            // The warm-up step just ended: time from here.
            self.since = Instant::now();
            return None;
        }
        let elapsed = self.since.elapsed().as_secs_f64();
        let plan = *trainer.plan();
        if elapsed < deadline.interval_seconds || step >= plan.phase2_steps {
            return None;
        }
        let Schedule::Original {
            lr_drop_fraction, ..
        } = trainer.config().schedule
        else {
            return None;
        };
        let observed = elapsed / (step - self.first_step) as f64;
        self.since = Instant::now();
        self.first_step = step;
        let (p2, p3) = replan_steps(
            deadline.seconds_left(),
            step,
            plan.phase2_steps,
            plan.phase3_steps,
            observed,
            &deadline.plan.times,
            lr_drop_fraction,
        )?;
        ((p2, p3) != (plan.phase2_steps, plan.phase3_steps)).then_some((p2, p3, observed))
    }
}

/// The append-only `metrics.jsonl`.
struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log for appending, first dropping the lines a resumed run will write again
    /// and a half-written last line: with `Some(n)`, the phase-2/3 lines of steps `>= n`
    /// (phase-1 lines stay); with `None` (phase 1 starts over), every line.
    fn open(path: &Path, keep_before: Option<u64>) -> Result<Self> {
        if path.is_file() {
            let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
            let mut kept = String::new();
            for line in text.lines() {
                let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let step = value.get("step").and_then(|s| s.as_u64()).unwrap_or(0);
                let phase1 = value.get("phase").and_then(|p| p.as_str()) == Some("phase1");
                let keep = match keep_before {
                    None => false,
                    Some(n) => phase1 || step < n,
                };
                if keep {
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
            if kept.len() != text.len() {
                write_atomic(path, kept.as_bytes())?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one line (flushed; a crash loses at most the line being written).
    fn append(&mut self, value: &serde_json::Value) -> Result<()> {
        let mut line = value.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| io_error(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_accepts_replanned_lengths_and_nothing_else() {
        let base = RunConfig::default().train;
        let lengths = |p2, p3| TrainConfig {
            schedule: Schedule::Original {
                phase2_steps: p2,
                phase3_steps: p3,
                lr_drop_fraction: 0.8,
            },
            ..base.clone()
        };
        assert!(same_but_lengths(&lengths(100, 0), &lengths(87, 3)));
        let mut other = lengths(87, 3);
        other.adam.lr *= 2.0;
        assert!(!same_but_lengths(&lengths(100, 0), &other));
        let other_drop = TrainConfig {
            schedule: Schedule::Original {
                phase2_steps: 100,
                phase3_steps: 0,
                lr_drop_fraction: 0.5,
            },
            ..base.clone()
        };
        assert!(!same_but_lengths(&lengths(100, 0), &other_drop));
        let epochs = |n| TrainConfig {
            schedule: Schedule::Anomalib {
                epochs: n,
                upsampling_train_ratio: 0.7,
                never_stepped_scheduler: false,
            },
            ..base.clone()
        };
        assert!(same_but_lengths(&epochs(10), &epochs(10)));
        assert!(!same_but_lengths(&epochs(10), &epochs(12)));
    }

    #[test]
    fn the_toml_round_trips_and_overrides_reach_nested_fields() {
        let cfg = RunConfig::default()
            .with_overrides(&[
                "train.schedule.phase2_steps=12".into(),
                "train.adam.lr=1e-3".into(),
                "train.recipe=original".into(),
                "data.category=bottle".into(),
                "train.model.embedding_dim=16".into(),
            ])
            .unwrap();
        match cfg.train.schedule {
            crate::train::Schedule::Original { phase2_steps, .. } => assert_eq!(phase2_steps, 12),
            other => panic!("{other:?}"),
        }
        assert_eq!(cfg.train.adam.lr, 1e-3);
        assert_eq!(cfg.train.recipe, dsr_augment::Recipe::Original);
        assert_eq!(cfg.data.category.as_deref(), Some("bottle"));
        // [pretrain] follows the model of [train].
        assert_eq!(cfg.pretrain.model.embedding_dim, 16);
        let back = RunConfig::from_toml_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn the_output_map_is_the_better_one_unless_chosen_or_phase_3_is_untrained() {
        let metrics = |pixel_auroc: f64, pixel_ap: f64, pixel_aupro: f64| dsr_eval::Metrics {
            image_auroc: 0.9,
            image_ap: 0.9,
            image_f1_max: 0.9,
            image_f1_max_threshold: 0.5,
            image_f1: 0.9,
            pixel_auroc,
            pixel_ap,
            pixel_aupro,
            pixel_f1_max: 0.3,
            pixel_f1_max_threshold: 0.5,
            pixel_f1: 0.3,
        };
        let weak = metrics(0.70, 0.20, 0.40);
        let strong = metrics(0.80, 0.25, 0.45);
        let strongest = metrics(0.85, 0.30, 0.50);
        assert!((map_quality(&strong) - 1.5).abs() < 1e-12);
        let ev = Evaluation {
            samples: Vec::new(),
            size: [1, 1],
            scores: Vec::new(),
            labels: Vec::new(),
            maps: Vec::new(),
            masks: Vec::new(),
            skipped: Vec::new(),
            seconds: 0.0,
        };
        let post = PostProcessor {
            image_threshold: 0.5,
            pixel_threshold: 0.5,
            image_min: 0.0,
            image_max: 1.0,
            pixel_min: 0.0,
            pixel_max: 1.0,
        };
        let blend = dsr_core::feature_memory::Blend {
            weight: 1.0,
            detection_mean: 0.0,
            detection_std: 1.0,
            memory_mean: 0.0,
            memory_std: 1.0,
        };
        let cand = |map: OutputMap, m: &Metrics| MapCandidate {
            map,
            blend: (map == OutputMap::Combined).then_some(blend),
            evaluation: ev.clone(),
            postprocess: post,
            metrics: *m,
        };
        use MapChoice::*;
        let two = |r: &Metrics, d: &Metrics| {
            vec![cand(OutputMap::Refined, r), cand(OutputMap::Detection, d)]
        };
        assert_eq!(choose_candidate(Auto, &two(&weak, &strong), true), Some(1));
        assert_eq!(choose_candidate(Auto, &two(&strong, &weak), true), Some(0));
        assert_eq!(choose_candidate(Auto, &two(&weak, &weak), true), Some(0));
        assert_eq!(choose_candidate(Auto, &two(&strong, &weak), false), Some(1));
        assert_eq!(
            choose_candidate(Refined, &two(&weak, &strong), true),
            Some(0)
        );
        assert_eq!(
            choose_candidate(Detection, &two(&strong, &weak), true),
            Some(1)
        );
        assert_eq!(choose_candidate(Memory, &two(&strong, &weak), true), None);
        let all = vec![
            cand(OutputMap::Refined, &weak),
            cand(OutputMap::Detection, &strong),
            cand(OutputMap::Memory, &weak),
            cand(OutputMap::Combined, &weak),
            cand(OutputMap::Combined, &strongest),
        ];
        assert_eq!(choose_candidate(Auto, &all, false), Some(4));
        assert_eq!(choose_candidate(Combined, &all, true), Some(4));
        assert_eq!(choose_candidate(Memory, &all, true), Some(2));
        assert_eq!(all[4].label(), "combined (memory weight 1)");
        assert_eq!(all[1].label(), "detection");
        let off = RunConfig::default()
            .with_overrides(&[
                "output.map=\"combined\"".to_string(),
                "output.feature_memory=false".to_string(),
            ])
            .and_then(|c| c.validate().map(|_| c));
        assert!(off.is_err());
        let cfg = RunConfig::default()
            .with_overrides(&["output.map=\"detection\"".to_string()])
            .unwrap();
        assert_eq!(cfg.output.map, Detection);
        assert!(RunConfig::default()
            .with_overrides(&["output.map=\"sharpest\"".to_string()])
            .is_err());
    }

    #[test]
    fn phase_1_always_trains_the_model_of_train() {
        let mut cfg = RunConfig::default();
        cfg.train.model = dsr_core::DsrConfig::tiny();
        let synced = cfg.with_overrides(&[]).unwrap();
        assert_eq!(synced.pretrain.model, dsr_core::DsrConfig::tiny());
        cfg.data.root = "x".into();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("pretrain.model"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = RunConfig::from_toml_str("[train]\nbatch_sise = 4\n").unwrap_err();
        assert!(e.to_string().contains("batch_sise"), "{e}");
        let e = RunConfig::default()
            .with_overrides(&["train.batch_size=lots".into()])
            .unwrap_err();
        assert!(e.to_string().contains("batch_size"), "{e}");
        let e = RunConfig::default()
            .with_overrides(&["train.seed".into()])
            .unwrap_err();
        assert!(e.to_string().contains("section.key=value"), "{e}");
        for bad in ["from_train:0.2", "from_test:1.5", "half"] {
            assert!(parse_val_split(bad, 0).is_err(), "{bad}");
        }
        assert_eq!(
            parse_val_split("from_test:0.5", 3).unwrap(),
            ValSplit::FromTest {
                fraction: 0.5,
                seed: 3
            }
        );
        let mut cfg = RunConfig::default();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("data.root"));
        cfg.data.root = "x".into();
        cfg.output.checkpoint_every = 0;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("checkpoint_every"));
    }

    #[test]
    fn the_log_drops_lines_a_resumed_run_rewrites_and_half_written_ones() {
        let dir = std::env::temp_dir().join(format!("dsr-session-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(METRICS_LOG);
        let text = "{\"phase\":\"phase1\",\"step\":0}\n{\"phase\":\"phase1\",\"step\":1}\n\
                    {\"phase\":\"phase2\",\"step\":0}\n{\"phase\":\"phase2\",\"step\":1}\n\
                    {\"phase\":\"phase2\",\"step\":2}\n{\"phase\":\"pha";
        std::fs::write(&path, text).unwrap();
        let mut log = MetricsLog::open(&path, Some(1)).unwrap();
        log.append(&serde_json::json!({"phase": "phase2", "step": 1}))
            .unwrap();
        drop(log);
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            kept,
            "{\"phase\":\"phase1\",\"step\":0}\n{\"phase\":\"phase1\",\"step\":1}\n\
             {\"phase\":\"phase2\",\"step\":0}\n{\"phase\":\"phase2\",\"step\":1}\n"
        );
        MetricsLog::open(&path, None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_folders_count_up_and_names_follow_the_data_folder() {
        let dir = std::env::temp_dir().join(format!("dsr-session-dirs-{}", std::process::id()));
        let a = RunDir::create_next(&dir, "mvtec", "bottle").unwrap();
        let b = RunDir::create_next(&dir, "mvtec", "bottle").unwrap();
        assert!(a.path.ends_with("dsr/mvtec/bottle/v0"));
        assert!(b.path.ends_with("dsr/mvtec/bottle/v1"));
        assert!(b.weights_dir().is_dir());
        assert!(RunDir::open(&a.path).is_err(), "no config.toml yet");
        let data = dir.join("mvtec");
        std::fs::create_dir_all(data.join("bottle/train")).unwrap();
        assert_eq!(
            dataset_and_category(&data, Some("bottle")),
            ("mvtec".to_string(), "bottle".to_string())
        );
        assert_eq!(
            dataset_and_category(&data.join("bottle"), None),
            ("mvtec".to_string(), "bottle".to_string())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
