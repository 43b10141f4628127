//! Phase 1, which neither reference implementation ships: pretraining the discrete latent model
//! (encoders, EMA codebooks, general decoder) on any folder of images.
//!
//! Loss = MSE(reconstruction, image) + the two commitment terms (0.25 · MSE(sg[q], f)); the
//! codebooks follow the EMA update of the original quantizer. Codes that no input selected
//! during the last `reseed_every` steps are re-seeded from recent encoder outputs: without it
//! the codebooks collapse to a handful of codes within tens of steps. The result holds the 40
//! tensors of the official `vq_model_pretrained_128_4096.pckl` under the same names (with the
//! `discrete_latent_model.` prefix in our safetensors format), so it loads exactly like it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use dsr_augment::ImageBatch;
use dsr_core::discrete::DiscreteLatentModel;
use dsr_core::init::{init_seeded, InitScheme};
use dsr_core::quantizer::{EmaConfig, VectorQuantizer};
use dsr_core::weights::{save_checkpoint, DISCRETE_PREFIX};
use dsr_core::{DsrConfig, Execution};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::optim::{Adam, AdamConfig};
use crate::train::{Result, TrainError};

/// Everything that defines a phase-1 run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Model hyper-parameters (only the discrete part is trained).
    pub model: DsrConfig,
    /// Side of the square random crops (a multiple of 32, at least 64).
    pub crop: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Steps to take.
    pub steps: u64,
    /// Adam hyper-parameters (the paper: lr 2e-4).
    pub adam: AdamConfig,
    /// EMA codebook update parameters.
    pub ema_decay: f64,
    /// Commitment weight.
    pub commitment_cost: f64,
    /// Re-seed codes unused for this many steps (0 disables).
    pub reseed_every: u64,
    /// Seed of every random draw.
    pub seed: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            model: DsrConfig::default(),
            crop: 128,
            batch_size: 16,
            steps: 2000,
            adam: AdamConfig::default(),
            ema_decay: 0.99,
            commitment_cost: 0.25,
            reseed_every: 100,
            seed: 0,
        }
    }
}

impl PretrainConfig {
    /// Checks every setting against its domain: the model, the crop size, the batch size (1 to
    /// [`crate::train::MAX_BATCH_SIZE`]), the number of steps, Adam's hyper-parameters, the EMA
    /// decay (in [0, 1)) and the commitment cost (finite, at least 0).
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        dsr_core::config::validate_image_size(self.crop, self.crop)?;
        let max = crate::train::MAX_BATCH_SIZE;
        if self.batch_size == 0 || self.batch_size > max {
            return Err(TrainError::Config(format!(
                "pretrain.batch_size must lie between 1 and {max}, got {}",
                self.batch_size
            )));
        }
        if self.steps > crate::train::MAX_STEPS {
            return Err(TrainError::Config(format!(
                "pretrain.steps {} is more than the {} accepted",
                self.steps,
                crate::train::MAX_STEPS
            )));
        }
        self.adam
            .validate("pretrain.adam")
            .map_err(TrainError::Config)?;
        if !(self.ema_decay.is_finite() && (0.0..1.0).contains(&self.ema_decay)) {
            return Err(TrainError::Config(format!(
                "pretrain.ema_decay must lie in [0, 1) (the reference uses 0.99), got {}",
                self.ema_decay
            )));
        }
        if !(self.commitment_cost.is_finite() && self.commitment_cost >= 0.0) {
            return Err(TrainError::Config(format!(
                "pretrain.commitment_cost must be a finite number of at least 0 (the reference uses 0.25), got {}",
                self.commitment_cost
            )));
        }
        Ok(())
    }

    /// Checks that a phase-1 step fits in the memory available (an estimate from measured
    /// peaks).
    pub fn check_memory(&self) -> Result<()> {
        dsr_core::memory::ensure_fits(
            dsr_core::memory::training_bytes(&self.model, self.batch_size, [self.crop, self.crop]),
            &format!(
                "a phase-1 step on batches of {} crops of {1}×{1}",
                self.batch_size, self.crop
            ),
            "lower the phase-1 batch size or crop",
        )
        .map_err(TrainError::Config)
    }
}

/// Losses and codebook usage after one phase-1 step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainReport {
    /// The step just taken (0-based).
    pub step: u64,
    /// Total loss.
    pub loss: f64,
    /// Reconstruction MSE.
    pub recon_mse: f64,
    /// Perplexity of the coarse (top) codebook in this batch.
    pub perplexity_top: f64,
    /// Perplexity of the fine (bottom) codebook in this batch.
    pub perplexity_bot: f64,
    /// Coarse codes used since the last re-seeding window started.
    pub codes_used_top: usize,
    /// Fine codes used since the last re-seeding window started.
    pub codes_used_bot: usize,
    /// Codes re-seeded at this step (coarse + fine).
    pub reseeded: usize,
}

/// The phase-1 trainer over an in-memory image set (N×3×H×W, H and W ≥ crop).
pub struct Pretrainer {
    cfg: PretrainConfig,
    varmap: VarMap,
    model: DiscreteLatentModel,
    opt: Adam,
    images: ImageBatch,
    device: Device,
    step: u64,
    used_top: Vec<bool>,
    used_bot: Vec<bool>,
    exec: Execution,
}

impl std::fmt::Debug for Pretrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pretrainer")
            .field("step", &self.step)
            .field("images", &self.images.n)
            .finish()
    }
}

fn is_codebook(key: &str) -> bool {
    key.contains("._embedding.") || key.ends_with("._ema_w") || key.ends_with("._ema_cluster_size")
}

impl Pretrainer {
    /// A fresh run from seeded weights. Codebooks start from encoder outputs of the first
    /// batch, so that every code begins near the data.
    pub fn new(cfg: PretrainConfig, images: ImageBatch, device: &Device) -> Result<Self> {
        Self::with_execution(cfg, images, device, Execution::default())
    }

    /// [`Pretrainer::new`] whose forwards (the codebooks' seeding included) and their backward
    /// compute under `exec`.
    pub fn with_execution(
        cfg: PretrainConfig,
        images: ImageBatch,
        device: &Device,
        exec: Execution,
    ) -> Result<Self> {
        cfg.validate()?;
        cfg.check_memory()?;
        if images.n == 0 || images.c != 3 || images.h < cfg.crop || images.w < cfg.crop {
            return Err(TrainError::Config(format!(
                "phase 1 needs at least one 3-channel image of at least {0}×{0} pixels, got {1} images of {2}×{3}×{4}",
                cfg.crop, images.n, images.c, images.h, images.w
            )));
        }
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = DiscreteLatentModel::new(&cfg.model, vb)?;
        init_seeded(&varmap, cfg.seed, InitScheme::Pytorch, &[])?;
        let params: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .filter(|(k, _)| !is_codebook(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let opt = Adam::new(params, cfg.adam)?;
        let k = cfg.model.num_embeddings;
        let mut trainer = Self {
            cfg,
            varmap,
            model,
            opt,
            images,
            device: device.clone(),
            step: 0,
            used_top: vec![false; k],
            used_bot: vec![false; k],
            exec,
        };
        trainer.seed_codebooks_from_data()?;
        Ok(trainer)
    }

    fn batch(&self, step: u64) -> Result<Tensor> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed);
        rng.set_stream(11);
        rng.set_word_pos((step as u128) << 32);
        let (h, w, c) = (self.images.h, self.images.w, self.cfg.crop);
        let mut data = Vec::with_capacity(self.cfg.batch_size * 3 * c * c);
        for _ in 0..self.cfg.batch_size {
            let i = rng.random_range(0..self.images.n);
            let (y0, x0) = (rng.random_range(0..=h - c), rng.random_range(0..=w - c));
            let img = self.images.image_slice(i);
            for ch in 0..3 {
                for y in y0..y0 + c {
                    let row = ch * h * w + y * w;
                    data.extend_from_slice(&img[row + x0..row + x0 + c]);
                }
            }
        }
        Ok(
            Tensor::from_vec(data, (self.cfg.batch_size, 3, c, c), &Device::Cpu)?
                .to_device(&self.device)?,
        )
    }

    /// Replaces every code by a random encoder output of a first batch.
    fn seed_codebooks_from_data(&mut self) -> Result<()> {
        let image = self.batch(u64::MAX >> 33)?;
        let ema = self.ema();
        let out = self
            .exec
            .run(|| self.model.forward_pretrain(&image, &ema))?;
        let k = self.cfg.model.num_embeddings as u32;
        let all: Vec<u32> = (0..k).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed ^ 0x5eed);
        reseed(self.model.vq_top(), &all, &out.z_t, &mut rng)?;
        reseed(self.model.vq_bot(), &all, &out.z_b, &mut rng)?;
        Ok(())
    }

    fn ema(&self) -> EmaConfig {
        EmaConfig {
            decay: self.cfg.ema_decay,
            epsilon: 1e-5,
            commitment_cost: self.cfg.commitment_cost,
        }
    }

    /// Steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Whether all configured steps are done.
    pub fn is_done(&self) -> bool {
        self.step >= self.cfg.steps
    }

    /// One phase-1 step.
    pub fn train_step(&mut self) -> Result<PretrainReport> {
        let step = self.step;
        let image = self.batch(step)?;
        let out = self
            .exec
            .run(|| self.model.forward_pretrain(&image, &self.ema()))?;
        let recon = (&out.recon - &image)?.sqr()?.mean_all()?;
        let loss = ((&recon + &out.top.commitment_loss)? + &out.bot.commitment_loss)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(TrainError::NonFinite {
                phase: crate::train::Phase::Phase2,
                step,
                value,
            });
        }
        self.opt.backward_step(&loss)?;
        for (used, idx) in [
            (&mut self.used_top, &out.top.output.indices),
            (&mut self.used_bot, &out.bot.output.indices),
        ] {
            for i in idx.flatten_all()?.to_vec1::<u32>()? {
                used[i as usize] = true;
            }
        }
        let codes_used_top = self.used_top.iter().filter(|u| **u).count();
        let codes_used_bot = self.used_bot.iter().filter(|u| **u).count();
        let mut reseeded = 0;
        if self.cfg.reseed_every > 0 && (step + 1) % self.cfg.reseed_every == 0 {
            let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed ^ step.rotate_left(17));
            for (used, vq, z) in [
                (&mut self.used_top, self.model.vq_top(), &out.z_t),
                (&mut self.used_bot, self.model.vq_bot(), &out.z_b),
            ] {
                let dead: Vec<u32> = used
                    .iter()
                    .enumerate()
                    .filter(|(_, u)| !**u)
                    .map(|(i, _)| i as u32)
                    .collect();
                reseed(vq, &dead, z, &mut rng)?;
                reseeded += dead.len();
                used.iter_mut().for_each(|u| *u = false);
            }
        }
        self.step += 1;
        Ok(PretrainReport {
            step,
            loss: value,
            recon_mse: recon.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            perplexity_top: out.top.perplexity,
            perplexity_bot: out.bot.perplexity,
            codes_used_top,
            codes_used_bot,
            reseeded,
        })
    }

    /// The trained discrete model's 40 tensors under full DSR keys (`discrete_latent_model.…`).
    pub fn discrete_tensors(&self) -> HashMap<String, Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter()
            .map(|(k, v)| (format!("{DISCRETE_PREFIX}{k}"), v.as_tensor().clone()))
            .collect()
    }

    /// Writes the discrete model (atomically) in our safetensors format; it loads like the
    /// official `.pckl` (`dsr_core::weights::load_checkpoint`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut extra = BTreeMap::new();
        extra.insert("dsr.pretrain_steps".to_string(), self.step.to_string());
        save_checkpoint(
            path,
            &self.discrete_tensors(),
            &self.cfg.model,
            Some([self.cfg.crop, self.cfg.crop]),
            &extra,
        )?;
        Ok(())
    }
}

/// Replaces `codes` of `vq` by random rows of the feature map `z` (`B×D×h×w`), with a little
/// noise so that re-seeded codes do not coincide.
fn reseed(vq: &VectorQuantizer, codes: &[u32], z: &Tensor, rng: &mut ChaCha8Rng) -> Result<()> {
    if codes.is_empty() {
        return Ok(());
    }
    let (b, d, h, w) = z.dims4()?;
    let rows = z
        .detach()
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((b * h * w, d))?;
    let picks: Vec<u32> = codes
        .iter()
        .map(|_| rng.random_range(0..(b * h * w) as u32))
        .collect();
    let idx = Tensor::from_vec(picks, codes.len(), z.device())?;
    let noise: Vec<f32> = (0..codes.len() * d)
        .map(|_| (rng.random::<f32>() - 0.5) * 1e-3)
        .collect();
    let noise = Tensor::from_vec(noise, (codes.len(), d), z.device())?;
    let vectors = (rows.index_select(&idx, 0)? + noise)?;
    vq.reseed_codes(codes, &vectors)?;
    Ok(())
}
