//! Helpers shared by the map studies (`map_study`, `feature_study`, `map_variants`): a finished
//! run opened with its splits and model, images loaded at a size, the four figures of a set of
//! maps, and the normal images' statistics that standardise a map before blending.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use dsr_core::weights::load_checkpoint;
use dsr_core::{DsrModel, Execution, OutputMap};
use dsr_eval::{evaluate, Detector, EvalOptions, Evaluation};
use dsr_train::data::{split_validation, Splits};
use dsr_train::pipeline::samples_of;
use dsr_train::session::{parse_val_split, RunConfig};

/// A finished `dsr train` run: its splits drawn again from its configuration and seed, and its
/// model (`weights/model.safetensors`) at its image size.
pub struct StudyRun {
    /// Training, validation and test entries.
    pub splits: Splits,
    /// The trained model, default execution.
    pub model: DsrModel,
    /// The model's `[height, width]`.
    pub size: [usize; 2],
}

impl StudyRun {
    /// Opens the run folder `run` (its `config.toml` and `weights/model.safetensors`).
    pub fn open(run: &Path) -> Result<Self> {
        let config = run.join("config.toml");
        let text = std::fs::read_to_string(&config)
            .with_context(|| format!("{}: cannot read", config.display()))?;
        let cfg: RunConfig = toml::from_str(&text).context("config.toml")?;
        let listing = cfg.data.listing(cfg.train.seed)?;
        let splits = split_validation(
            &listing,
            parse_val_split(&cfg.data.val_split, cfg.train.seed)?,
        )?;
        let ckpt = load_checkpoint(&run.join("weights/model.safetensors"))?;
        let model_cfg = ckpt.config.context("no configuration in the model")?;
        let size = ckpt.image_size.context("no image size in the model")?;
        let model = ckpt
            .build_model(&model_cfg, &Device::Cpu)?
            .with_execution(Execution::default());
        Ok(Self {
            splits,
            model,
            size,
        })
    }

    /// The validation and test evaluations of the model outputting `map`.
    pub fn evaluate(&self, map: OutputMap) -> Result<(Evaluation, Evaluation)> {
        let det = Detector::new(
            self.model.clone().with_output_map(map),
            self.size,
            None,
            &Device::Cpu,
        )?;
        let options = EvalOptions::default();
        let val = evaluate(&det, samples_of(&self.splits.val), &options)?;
        let test = evaluate(&det, samples_of(&self.splits.test), &options)?;
        Ok((val, test))
    }
}

/// `paths` loaded as a `B×3×size×size` batch (RGB in [0, 1]).
pub fn load(paths: &[PathBuf], size: usize) -> Result<Tensor> {
    let mut data = Vec::new();
    for p in paths {
        let img = dsr_eval::image::load_image(p, [size, size], u64::MAX)?;
        data.extend_from_slice(&img.chw);
    }
    Ok(Tensor::from_vec(
        data,
        (paths.len(), 3, size, size),
        &Device::Cpu,
    )?)
}

/// Image AUROC / pixel AUROC / pixel AP / AUPRO of `ev` with its maps replaced by `maps` and
/// its scores by `scores` (the maximum of each map when `None`).
pub fn figures(ev: &Evaluation, maps: Vec<f32>, scores: Option<Vec<f32>>) -> Result<[f64; 4]> {
    let mut e = ev.clone();
    let px = ev.size[0] * ev.size[1];
    e.scores = match scores {
        Some(s) => s,
        None => maps
            .chunks(px)
            .map(|m| m.iter().cloned().fold(f32::MIN, f32::max))
            .collect(),
    };
    e.maps = maps;
    let post = e.fit_postprocessor()?;
    let m = e.metrics(&post)?;
    Ok([m.image_auroc, m.pixel_auroc, m.pixel_ap, m.pixel_aupro])
}

/// Mean and standard deviation of the maps of the normal images of `ev`.
pub fn normal_stats(ev: &Evaluation, maps: &[f32]) -> (f32, f32) {
    let px = ev.size[0] * ev.size[1];
    let (mut n, mut s, mut s2) = (0f64, 0f64, 0f64);
    for (m, &l) in maps.chunks(px).zip(&ev.labels) {
        if !l {
            for &v in m {
                n += 1.0;
                s += f64::from(v);
                s2 += f64::from(v) * f64::from(v);
            }
        }
    }
    let mean = s / n;
    (mean as f32, (s2 / n - mean * mean).max(1e-12).sqrt() as f32)
}
