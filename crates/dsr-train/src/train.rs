//! Phases 2 and 3 of DSR training: the schedule, the seeded training step, and
//! checkpoints from which a killed run resumes as if it had never stopped.
//!
//! Every random draw of step `s` (which images, the Perlin masks, the phase-2 code picks, the
//! phase-3 smudges) comes from generators seeded by `(seed, stream, s)`, so a run is a pure
//! function of its configuration, its data and its seed, and resuming needs no generator state.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dsr_augment::{ImageBatch, MaskGenerator, Recipe, SmudgeGenerator};
use dsr_core::init::{init_seeded, InitScheme};
use dsr_core::weights::{load_safetensors, save_checkpoint, Checkpoint, DISCRETE_PREFIX};
use dsr_core::{DsrConfig, DsrModel, Execution, SeededRandomness};
use dsr_losses::{second_stage_loss, third_stage_loss, FocalKind, SecondStageInputs};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::optim::{Adam, AdamConfig};

/// Metadata key of the trainer state (JSON) in a training checkpoint.
pub const META_TRAIN_STATE: &str = "dsr.train_state";

/// Key prefixes of the modules trained in phase 2.
pub const PHASE2_PREFIXES: [&str; 4] = [
    "subspace_restriction_module_hi.",
    "subspace_restriction_module_lo.",
    "image_reconstruction_network.",
    "anomaly_detection_module.",
];
/// The largest batch accepted (a corrupt configuration must not reserve memory for millions of
/// images).
pub const MAX_BATCH_SIZE: usize = 4096;

/// The longest schedule accepted, in steps (2^40: far beyond any run, small enough that step
/// arithmetic cannot overflow).
pub const MAX_STEPS: u64 = 1 << 40;

/// Key prefix of the module trained in phase 3.
pub const PHASE3_PREFIX: &str = "upsampling_module.";

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A model or weight error.
    #[error(transparent)]
    Core(#[from] dsr_core::Error),
    /// A tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A loss error.
    #[error(transparent)]
    Loss(#[from] dsr_losses::LossError),
    /// An augmentation error.
    #[error(transparent)]
    Augment(#[from] dsr_augment::AugmentError),
    /// A data-set file or folder could not be used; the message names it and says what to fix.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// The validation could not run (an unreadable image or mask, metrics of a set without
    /// both classes); the message names the file or says what is missing.
    #[error(transparent)]
    Eval(#[from] dsr_eval::EvalError),
    /// The configuration cannot be trained; the message says why.
    #[error("invalid training configuration: {0}")]
    Config(String),
    /// A loss became NaN or infinite; the last checkpoint is kept.
    #[error("the {phase} loss became {value} at step {step}: training stopped (lower the learning rate; the last checkpoint is intact)")]
    NonFinite {
        /// The phase.
        phase: Phase,
        /// The step at which it happened.
        step: u64,
        /// The offending value.
        value: f64,
    },
    /// An optimizer step made a weight NaN or infinite (the loss itself was still finite).
    #[error("the {phase} update at step {step} made the weight '{name}' NaN or infinite: training stopped (lower the learning rate; the last checkpoint is intact)")]
    NonFiniteWeights {
        /// The phase.
        phase: Phase,
        /// The step whose update produced it.
        step: u64,
        /// The first parameter found non-finite.
        name: String,
    },
    /// Training finished and the model was written, but the validation that places its
    /// thresholds could not run.
    #[error("training finished and the model was written to {model} without thresholds, but the validation could not run: {message}; `dsr test --model {model}` evaluates it once the data are fixed")]
    Unvalidated {
        /// The model file written.
        model: String,
        /// Why the validation failed.
        message: String,
    },
    /// A checkpoint does not fit this run.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Result type of training.
pub type Result<T> = std::result::Result<T, TrainError>;

/// The two training schedules.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    /// The original code: a fixed number of iterations per phase, the phase-2 learning rate
    /// divided by 10 after `lr_drop_fraction` of phase 2 (100k + 50k iterations in the paper's
    /// code).
    Original {
        /// Iterations of phase 2.
        phase2_steps: u64,
        /// Iterations of phase 3.
        phase3_steps: u64,
        /// Fraction of phase 2 after which the learning rate drops ×0.1.
        lr_drop_fraction: f64,
    },
    /// anomalib: epochs over the training set, the first `upsampling_train_ratio` of them
    /// (truncated) phase 2, the rest phase 3.
    Anomalib {
        /// Total epochs.
        epochs: u64,
        /// Fraction of the epochs spent in phase 2.
        upsampling_train_ratio: f64,
        /// anomalib defines a step learning-rate schedule for phase 2 but never steps it: with
        /// `true` the rate stays constant (compatibility), with `false` it drops ×0.1 after 80 %
        /// of phase 2 as intended.
        never_stepped_scheduler: bool,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Original {
            phase2_steps: 100_000,
            phase3_steps: 50_000,
            lr_drop_fraction: 0.8,
        }
    }
}

/// The training phase of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Subspace, reconstruction and detection modules on feature-space anomalies.
    Phase2,
    /// The upsampling module on image-level smudges.
    Phase3,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Phase2 => "phase-2",
            Phase::Phase3 => "phase-3",
        })
    }
}

/// Everything that defines a phase-2/3 run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Model hyper-parameters (the discrete part must match the pretrained weights).
    pub model: DsrConfig,
    /// Training image size `[H, W]` (multiples of 32, at least 64).
    pub image_size: [usize; 2],
    /// Images per step.
    pub batch_size: usize,
    /// Adam hyper-parameters of both optimizers.
    pub adam: AdamConfig,
    /// Phase lengths and learning-rate schedule.
    pub schedule: Schedule,
    /// Focal loss variant.
    pub focal: FocalKind,
    /// Anomaly generator recipe.
    pub recipe: Recipe,
    /// Initialisation of the trained modules.
    pub init: InitScheme,
    /// Seed of every random draw.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: DsrConfig::default(),
            image_size: [256, 256],
            batch_size: 8,
            adam: AdamConfig::default(),
            schedule: Schedule::default(),
            focal: FocalKind::default(),
            recipe: Recipe::default(),
            init: InitScheme::default(),
            seed: 0,
        }
    }
}

/// Checks that `v` is a finite fraction in `[0, 1]`; `name` names the setting in the message.
pub fn check_fraction(name: &str, v: f64) -> std::result::Result<(), String> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "{name} must be a fraction between 0 and 1, got {v}"
        ))
    }
}

impl Schedule {
    /// Checks the fractions of the schedule (in `[0, 1]`) and its lengths (at most
    /// [`MAX_STEPS`]).
    pub fn validate(&self) -> std::result::Result<(), String> {
        match *self {
            Schedule::Original {
                phase2_steps,
                phase3_steps,
                lr_drop_fraction,
            } => {
                check_fraction("train.schedule.lr_drop_fraction", lr_drop_fraction)?;
                if phase2_steps
                    .checked_add(phase3_steps)
                    .is_none_or(|total| total > MAX_STEPS)
                {
                    return Err(format!(
                        "{phase2_steps} + {phase3_steps} steps is more than the {MAX_STEPS} accepted"
                    ));
                }
                Ok(())
            }
            Schedule::Anomalib {
                epochs,
                upsampling_train_ratio,
                ..
            } => {
                check_fraction(
                    "train.schedule.upsampling_train_ratio",
                    upsampling_train_ratio,
                )?;
                if epochs > MAX_STEPS {
                    return Err(format!(
                        "{epochs} epochs is more than the {MAX_STEPS} accepted"
                    ));
                }
                Ok(())
            }
        }
    }
}

impl TrainConfig {
    /// Checks every setting against its domain before anything is allocated: the model, the
    /// image size, the batch size (1 to [`MAX_BATCH_SIZE`]), Adam's hyper-parameters and the
    /// schedule.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        dsr_core::config::validate_image_size(self.image_size[0], self.image_size[1])?;
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return Err(TrainError::Config(format!(
                "batch_size must lie between 1 and {MAX_BATCH_SIZE}, got {}",
                self.batch_size
            )));
        }
        self.adam
            .validate("train.adam")
            .map_err(TrainError::Config)?;
        self.schedule.validate().map_err(TrainError::Config)?;
        Ok(())
    }

    /// Checks that a training step of this configuration fits in the memory available (an
    /// estimate from measured peaks); the error says what is needed and what to lower.
    pub fn check_memory(&self) -> Result<()> {
        let [h, w] = self.image_size;
        dsr_core::memory::ensure_fits(
            dsr_core::memory::training_bytes(&self.model, self.batch_size, self.image_size),
            &format!(
                "a training step on batches of {} images of {h}×{w}",
                self.batch_size
            ),
            "lower the batch size (--batch) or the image size (--image-size)",
        )
        .map_err(TrainError::Config)
    }
}

/// Phase lengths in steps, resolved for a data set size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Steps of phase 2.
    pub phase2_steps: u64,
    /// Steps of phase 3.
    pub phase3_steps: u64,
    /// First phase-2 step with the reduced learning rate, if any.
    pub lr_drop_step: Option<u64>,
}

impl Plan {
    /// Resolves `cfg`'s schedule for `num_images` training images.
    pub fn new(cfg: &TrainConfig, num_images: usize) -> Result<Self> {
        if num_images == 0 {
            return Err(TrainError::Config("the training set is empty".into()));
        }
        match cfg.schedule {
            Schedule::Original {
                phase2_steps,
                phase3_steps,
                lr_drop_fraction,
            } => {
                if phase2_steps
                    .checked_add(phase3_steps)
                    .is_none_or(|total| total > MAX_STEPS)
                {
                    return Err(TrainError::Config(format!(
                        "{phase2_steps} + {phase3_steps} steps is more than the {MAX_STEPS} accepted"
                    )));
                }
                Ok(Plan {
                    phase2_steps,
                    phase3_steps,
                    lr_drop_step: Some((phase2_steps as f64 * lr_drop_fraction) as u64),
                })
            }
            Schedule::Anomalib {
                epochs,
                upsampling_train_ratio,
                never_stepped_scheduler,
            } => {
                let per_epoch = num_images.div_ceil(cfg.batch_size.max(1)) as u64;
                let phase2_epochs = ((epochs as f64 * upsampling_train_ratio) as u64).min(epochs);
                let anneal_epoch = (0.8 * phase2_epochs as f64) as u64;
                let too_long = || {
                    TrainError::Config(format!(
                        "{epochs} epochs of {per_epoch} steps is more than the {MAX_STEPS} steps accepted"
                    ))
                };
                epochs
                    .checked_mul(per_epoch)
                    .filter(|&total| total <= MAX_STEPS)
                    .ok_or_else(too_long)?;
                Ok(Plan {
                    phase2_steps: phase2_epochs * per_epoch,
                    phase3_steps: (epochs - phase2_epochs) * per_epoch,
                    lr_drop_step: (!never_stepped_scheduler).then_some(anneal_epoch * per_epoch),
                })
            }
        }
    }

    /// Total steps.
    pub fn total(&self) -> u64 {
        self.phase2_steps + self.phase3_steps
    }
}

/// Losses and state after one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The step just taken (0-based).
    pub step: u64,
    /// Its phase.
    pub phase: Phase,
    /// Learning rate used.
    pub lr: f64,
    /// The loss and its terms.
    pub losses: BTreeMap<String, f64>,
}

/// The state written into a checkpoint's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    phase2_optimizer_steps: u64,
    phase3_optimizer_steps: u64,
    config: TrainConfig,
}

/// Generator of one random stream at one step.
fn step_rng(seed: u64, stream: u64, step: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng.set_word_pos((step as u128) << 32);
    rng
}

const STREAM_ORDER: u64 = 1;
const STREAM_MASKS: u64 = 2;
const STREAM_CODES: u64 = 3;
const STREAM_SMUDGE: u64 = 4;
const STREAM_INIT: u64 = 5;

/// Phase-2/3 trainer over an in-memory training set.
pub struct Trainer {
    cfg: TrainConfig,
    plan: Plan,
    varmap: VarMap,
    model: DsrModel,
    opt_d: Adam,
    opt_u: Adam,
    smudges: SmudgeGenerator,
    images: ImageBatch,
    device: Device,
    step: u64,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("plan", &self.plan)
            .field("step", &self.step)
            .field("images", &self.images.n)
            .finish()
    }
}

impl Trainer {
    /// A fresh run: the discrete model from `discrete` (keys with the `discrete_latent_model.`
    /// prefix, e.g. [`dsr_core::weights::load_discrete_pckl`]), the trained modules initialised
    /// from the seed, over `images` (N×3×H×W at the configured size).
    pub fn new(
        cfg: TrainConfig,
        discrete: &Checkpoint,
        images: ImageBatch,
        device: &Device,
    ) -> Result<Self> {
        let trainer = Self::build(cfg, images, device)?;
        init_seeded(
            &trainer.varmap,
            trainer.cfg.seed ^ (STREAM_INIT << 56),
            trainer.cfg.init,
            &{
                let mut p: Vec<&str> = PHASE2_PREFIXES.to_vec();
                p.push(PHASE3_PREFIX);
                p
            },
        )?;
        let data = trainer.varmap.data().lock().expect("varmap lock");
        let mut missing = Vec::new();
        for (key, var) in data.iter().filter(|(k, _)| k.starts_with(DISCRETE_PREFIX)) {
            match discrete.tensors.get(key) {
                Some(t) if t.dims() == var.as_tensor().dims() => var.set(&t.to_device(device)?)?,
                Some(t) => {
                    return Err(TrainError::Checkpoint {
                        path: discrete.path.display().to_string(),
                        message: format!(
                            "tensor '{key}' has shape {:?}, the configuration needs {:?}",
                            t.dims(),
                            var.as_tensor().dims()
                        ),
                    })
                }
                None => missing.push(key.clone()),
            }
        }
        drop(data);
        if !missing.is_empty() {
            return Err(TrainError::Checkpoint {
                path: discrete.path.display().to_string(),
                message: format!(
                    "missing {} discrete-model tensors, e.g. '{}'",
                    missing.len(),
                    missing[0]
                ),
            });
        }
        Ok(trainer)
    }

    fn build(cfg: TrainConfig, images: ImageBatch, device: &Device) -> Result<Self> {
        cfg.validate()?;
        if images.c != 3 || [images.h, images.w] != cfg.image_size {
            return Err(TrainError::Config(format!(
                "training images are {}×{}×{}, the configuration needs 3×{}×{}",
                images.c, images.h, images.w, cfg.image_size[0], cfg.image_size[1]
            )));
        }
        let plan = Plan::new(&cfg, images.n)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = DsrModel::new(&cfg.model, vb)?;
        let (d_params, u_params) = {
            let data = varmap.data().lock().expect("varmap lock");
            let pick = |f: &dyn Fn(&str) -> bool| -> Vec<(String, candle_core::Var)> {
                data.iter()
                    .filter(|(k, _)| f(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            };
            (
                pick(&|k| PHASE2_PREFIXES.iter().any(|p| k.starts_with(p))),
                pick(&|k| k.starts_with(PHASE3_PREFIX)),
            )
        };
        let opt_d = Adam::new(d_params, cfg.adam)?;
        let opt_u = Adam::new(u_params, cfg.adam)?;
        let smudges = SmudgeGenerator::new(
            cfg.recipe,
            &mut step_rng(cfg.seed, STREAM_SMUDGE, u64::MAX >> 32),
        );
        Ok(Self {
            cfg,
            plan,
            varmap,
            model,
            opt_d,
            opt_u,
            smudges,
            images,
            device: device.clone(),
            step: 0,
        })
    }

    /// The trainer with its model computing under `exec` (convolution algorithm, recomputation
    /// of activations in the backward); the results are the same either way within the
    /// convolutions' rounding, bit for bit for the recomputation.
    pub fn with_execution(mut self, exec: Execution) -> Self {
        self.model = self.model.with_execution(exec);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The resolved phase lengths.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Changes the lengths of phases 2 and 3 of an `Original` schedule while phase 2 runs (a
    /// budgeted run re-planned from the step times it measures). Refused when the schedule is
    /// anomalib's (counted in epochs), when phase 2 would end before the next step, or when the
    /// learning-rate drop would move across a step already taken.
    pub fn replan(&mut self, phase2_steps: u64, phase3_steps: u64) -> Result<()> {
        let Schedule::Original {
            lr_drop_fraction, ..
        } = self.cfg.schedule
        else {
            return Err(TrainError::Config(
                "only a schedule counted in steps can be re-planned".into(),
            ));
        };
        if phase2_steps <= self.step || self.step >= self.plan.phase2_steps {
            return Err(TrainError::Config(format!(
                "phase 2 cannot end at step {phase2_steps} after {} steps",
                self.step
            )));
        }
        let schedule = Schedule::Original {
            phase2_steps,
            phase3_steps,
            lr_drop_fraction,
        };
        let cfg = TrainConfig {
            schedule,
            ..self.cfg.clone()
        };
        let plan = Plan::new(&cfg, self.images.n)?;
        let taken = |d: Option<u64>| d.map(|d| d.min(self.step));
        if taken(plan.lr_drop_step) != taken(self.plan.lr_drop_step) {
            return Err(TrainError::Config(format!(
                "phase 2 of {phase2_steps} steps would move the learning-rate drop across steps already taken ({})",
                self.step
            )));
        }
        self.cfg = cfg;
        self.plan = plan;
        Ok(())
    }

    /// Steps taken so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Whether every step of the plan has been taken.
    pub fn is_done(&self) -> bool {
        self.step >= self.plan.total()
    }

    /// The phase of the next step.
    pub fn phase(&self) -> Phase {
        if self.step < self.plan.phase2_steps {
            Phase::Phase2
        } else {
            Phase::Phase3
        }
    }

    /// The model being trained.
    pub fn model(&self) -> &DsrModel {
        &self.model
    }

    /// The model's current weights as a model for inference: plain tensors outside the autograd
    /// graph (sharing the trained values' storage), which run exactly as a model loaded from a
    /// saved file does, under the trainer's convolution algorithm, and build no graph. It keeps
    /// no transformed filters (its weights change with the next step).
    pub fn inference_model(&self) -> Result<DsrModel> {
        let tensors = self
            .model_tensors()
            .into_iter()
            .map(|(k, v)| (k, v.detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &self.device);
        Ok(DsrModel::new(&self.cfg.model, vb)?.with_execution(self.model.execution()))
    }

    /// The model's tensors under their PyTorch keys.
    pub fn model_tensors(&self) -> HashMap<String, Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// The images of step `step`: consecutive slots of per-epoch seeded permutations.
    fn batch_indices(&self, step: u64) -> Vec<usize> {
        let n = self.images.n as u64;
        let b = self.cfg.batch_size as u64;
        let mut current_epoch = u64::MAX;
        let mut perm: Vec<usize> = Vec::new();
        (step * b..step * b + b)
            .map(|i| {
                let epoch = i / n;
                if epoch != current_epoch {
                    current_epoch = epoch;
                    perm = (0..self.images.n).collect();
                    let mut rng = step_rng(self.cfg.seed, STREAM_ORDER, epoch);
                    for j in (1..perm.len()).rev() {
                        perm.swap(j, rng.random_range(0..=j));
                    }
                }
                perm[(i % n) as usize]
            })
            .collect()
    }

    fn batch(&self, step: u64) -> Result<ImageBatch> {
        let plane = 3 * self.images.h * self.images.w;
        let idx = self.batch_indices(step);
        let mut data = Vec::with_capacity(idx.len() * plane);
        for i in idx.iter() {
            data.extend_from_slice(self.images.image_slice(*i));
        }
        Ok(ImageBatch::new(
            idx.len(),
            3,
            self.images.h,
            self.images.w,
            data,
        )?)
    }

    fn tensor(&self, data: Vec<f32>, shape: (usize, usize, usize, usize)) -> Result<Tensor> {
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(&self.device)?)
    }

    /// The learning rate of the phase-2 optimizer at `step`.
    pub fn phase2_lr(&self, step: u64) -> f64 {
        match self.plan.lr_drop_step {
            Some(drop) if step >= drop => self.cfg.adam.lr * 0.1,
            _ => self.cfg.adam.lr,
        }
    }

    /// Takes the next step of the plan.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let step = self.step;
        let phase = self.phase();
        let batch = self.batch(step)?;
        let (b, h, w) = (batch.n, batch.h, batch.w);
        let mut losses = BTreeMap::new();
        let lr;
        match phase {
            Phase::Phase2 => {
                let masks = MaskGenerator::new(self.cfg.recipe).generate_batch(
                    b,
                    h,
                    w,
                    &mut step_rng(self.cfg.seed, STREAM_MASKS, step),
                )?;
                let image = self.tensor(batch.data, (b, 3, h, w))?;
                let mask = self.tensor(masks.data, (b, 1, h, w))?;
                let mut codes =
                    SeededRandomness::from_rng(step_rng(self.cfg.seed, STREAM_CODES, step));
                let out = self.model.forward_phase2(&image, &mask, &mut codes)?;
                let loss = second_stage_loss(
                    &SecondStageInputs {
                        recon_feat_hi: &out.recon_feat_hi,
                        quantized_hi: &out.embedding_bot,
                        recon_feat_lo: &out.recon_feat_lo,
                        quantized_lo: &out.embedding_top,
                        image: &image,
                        object_specific_image: &out.obj_spec_image,
                        anomaly_map: &out.anomaly_map,
                        true_anomaly_map: &out.true_anomaly_map,
                    },
                    self.cfg.focal,
                )?;
                let total = scalar(&loss.total)?;
                for (name, t) in [
                    ("l2_hi", &loss.l2_hi),
                    ("l2_lo", &loss.l2_lo),
                    ("l2_img_x10", &loss.l2_img_x10),
                    ("focal", &loss.focal),
                ] {
                    losses.insert(name.to_string(), scalar(t)?);
                }
                losses.insert("loss".into(), total);
                if !total.is_finite() {
                    return Err(TrainError::NonFinite {
                        phase,
                        step,
                        value: total,
                    });
                }
                lr = self.phase2_lr(step);
                self.opt_d.set_lr(lr);
                self.opt_d.backward_step(&loss.total)?;
                if let Some(name) = self.opt_d.first_non_finite()? {
                    return Err(TrainError::NonFiniteWeights {
                        phase,
                        step,
                        name: name.to_string(),
                    });
                }
            }
            Phase::Phase3 => {
                let (smudged, masks) = self
                    .smudges
                    .apply_batch(&batch, &mut step_rng(self.cfg.seed, STREAM_SMUDGE, step))?;
                let image = self.tensor(smudged.data, (b, 3, h, w))?;
                let mask = self.tensor(masks.data, (b, 1, h, w))?;
                let probs = self.model.forward_phase3(&image)?;
                let loss = third_stage_loss(&probs, &mask, self.cfg.focal)?;
                let total = scalar(&loss)?;
                losses.insert("loss".into(), total);
                if !total.is_finite() {
                    return Err(TrainError::NonFinite {
                        phase,
                        step,
                        value: total,
                    });
                }
                lr = self.cfg.adam.lr;
                self.opt_u.backward_step(&loss)?;
                if let Some(name) = self.opt_u.first_non_finite()? {
                    return Err(TrainError::NonFiniteWeights {
                        phase,
                        step,
                        name: name.to_string(),
                    });
                }
            }
        }
        self.step += 1;
        Ok(StepReport {
            step,
            phase,
            lr,
            losses,
        })
    }

    /// Writes a training checkpoint (model, both optimizer states, step, configuration)
    /// atomically to `path`.
    ///
    /// A state holding a NaN or an infinite value is never written: the error says which tensor,
    /// and the previous checkpoint at `path` stays as it was. A failed write (a full disk) leaves
    /// the previous checkpoint intact too, and the error says so.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.model_tensors();
        for (k, v) in self
            .opt_d
            .state_tensors("optim.phase2.")
            .into_iter()
            .chain(self.opt_u.state_tensors("optim.phase3."))
        {
            tensors.insert(k, v);
        }
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        for name in names {
            let t = &tensors[name];
            let probe = t
                .affine(0.0, 0.0)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            if probe != 0.0 {
                return Err(TrainError::Checkpoint {
                    path: path.display().to_string(),
                    message: format!(
                        "not written: '{name}' holds NaN or infinite values (the previous checkpoint, if any, is intact)"
                    ),
                });
            }
        }
        let state = TrainState {
            step: self.step,
            phase2_optimizer_steps: self.opt_d.steps(),
            phase3_optimizer_steps: self.opt_u.steps(),
            config: self.cfg.clone(),
        };
        let mut extra = BTreeMap::new();
        extra.insert(
            META_TRAIN_STATE.to_string(),
            serde_json::to_string(&state).map_err(|e| TrainError::Config(e.to_string()))?,
        );
        save_checkpoint(
            path,
            &tensors,
            &self.cfg.model,
            Some(self.cfg.image_size),
            &extra,
        )?;
        Ok(())
    }

    /// Resumes the run saved in `path` over the same `images`.
    pub fn resume(path: &Path, images: ImageBatch, device: &Device) -> Result<Self> {
        let ckpt = load_safetensors(path)?;
        let bad = |message: String| TrainError::Checkpoint {
            path: path.display().to_string(),
            message,
        };
        let state: TrainState =
            serde_json::from_str(ckpt.metadata.get(META_TRAIN_STATE).ok_or_else(|| {
                bad(format!(
                    "not a training checkpoint (no '{META_TRAIN_STATE}' metadata)"
                ))
            })?)
            .map_err(|e| bad(format!("'{META_TRAIN_STATE}' is not valid: {e}")))?;
        // The configuration must fit the tensors the file holds before anything is built, so
        // that a corrupt configuration cannot ask for more memory than the file's own tensors.
        state
            .config
            .model
            .validate()
            .map_err(|e| bad(format!("'{META_TRAIN_STATE}': {e}")))?;
        for (key, shape) in state.config.model.state_dict_shapes()? {
            match ckpt.tensors.get(&key) {
                None => return Err(bad(format!("missing tensor '{key}'"))),
                Some(t) if t.dims() != shape.as_slice() => {
                    return Err(bad(format!(
                        "tensor '{key}' has shape {:?}, the configuration in '{META_TRAIN_STATE}' needs {shape:?}",
                        t.dims()
                    )))
                }
                Some(_) => {}
            }
        }
        let mut trainer = Self::build(state.config, images, device)?;
        {
            let data = trainer.varmap.data().lock().expect("varmap lock");
            for (key, var) in data.iter() {
                let t = ckpt
                    .tensors
                    .get(key)
                    .ok_or_else(|| bad(format!("missing tensor '{key}'")))?;
                if t.dims() != var.as_tensor().dims() {
                    return Err(bad(format!(
                        "tensor '{key}' has shape {:?}, expected {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    )));
                }
                var.set(&t.to_device(device)?)?;
            }
        }
        trainer
            .opt_d
            .load_state("optim.phase2.", &ckpt.tensors, state.phase2_optimizer_steps)
            .map_err(bad)?;
        trainer
            .opt_u
            .load_state("optim.phase3.", &ckpt.tensors, state.phase3_optimizer_steps)
            .map_err(bad)?;
        trainer.step = state.step;
        Ok(trainer)
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
