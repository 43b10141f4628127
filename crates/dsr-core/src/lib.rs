//! # dsr-core
//!
//! The networks of DSR ("DSR – A Dual Subspace Re-Projection Network for Surface Anomaly
//! Detection", Zavrtanik, Kristan, Skočaj, ECCV 2022) on candle, weight-compatible with
//! anomalib's `DsrModel` and the original code: every tensor is named by its PyTorch state_dict
//! key.
//!
//! Architecture invariant: this crate knows networks, their configuration and weight files;
//! it knows nothing about data sets, augmentation, schedules, metrics or the command line.
//!
//! * [`DsrConfig`]: hyper-parameters (reference defaults, or [`DsrConfig::tiny`] for tests).
//! * [`DsrModel`]: the whole model with typed entry points — [`DsrModel::infer`] (anomaly map
//!   and score), [`DsrModel::forward_phase2`] and [`DsrModel::forward_phase3`] (training).
//! * [`DiscreteLatentModel`], [`VectorQuantizer`]: the pretrained part (trainable on its own for
//!   phase 1, with the EMA codebook update).
//! * [`weights`]: our safetensors checkpoints, the official `.pckl`, anomalib `.ckpt`.
//! * [`cache`]: where `cargo xtask fetch-weights` puts the pretrained discrete model.
//!
//! candle 0.11 traps avoided here (each has a test): `max_pool2d`'s backward is scaled by 1/k²
//! (we pool by reshape + max), `upsample_nearest2d`'s backward overwrites gradients (we upsample
//! by broadcast), `upsample_bilinear2d` has no backward (we ship an operator with its adjoint),
//! and the CPU random generator cannot be seeded (every random draw here comes from a seeded
//! [`anomaly::Randomness`]).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use dsr_core::{DsrConfig, DsrModel};
//!
//! # fn main() -> dsr_core::Result<()> {
//! let cfg = DsrConfig::tiny();
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let model = DsrModel::new(&cfg, vb)?;
//! let image = Tensor::zeros((1, 3, 64, 64), DType::F32, &Device::Cpu)?;
//! let out = model.infer(&image)?;
//! assert_eq!(out.anomaly_map.dims(), &[1, 64, 64]);
//! assert_eq!(out.pred_score.dims(), &[1]);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod activation;
pub mod anomaly;
pub mod anomaly_detection;
pub mod atomic;
pub mod cache;
pub mod config;
pub mod discrete;
mod error;
pub mod exec;
pub mod feature_memory;
pub mod files;
pub mod init;
pub mod kernels;
pub mod layers;
pub mod memory;
pub mod model;
pub mod quantizer;
pub mod reconstruction;
pub mod subspace;
pub mod unet;
pub mod upsampling;
pub mod weights;

pub use anomaly::{Randomness, RecordedDraws, SeededRandomness};
pub use config::DsrConfig;
pub use discrete::DiscreteLatentModel;
pub use error::{Error, Result};
pub use exec::{ConvAlgorithm, Execution, Precision};
pub use model::{DsrModel, EvalTrace, Inference, OutputMap, Phase2Output};
pub use quantizer::{Quantized, VectorQuantizer};
pub use weights::Checkpoint;
