//! dsr-train: data sets, training phases and checkpoints of the DSR surface-anomaly detector
//! ("DSR – A Dual Subspace Re-Projection Network for Surface Anomaly Detection", Zavrtanik,
//! Kristan and Skočaj, ECCV 2022).
//!
//! Architecture invariant: dsr-train knows data sets, augmentation, losses, phases, schedules
//! and checkpoints, never the CLI.
//!
//! Inference, post-processing, metrics and the evaluation loop (validation included) live in
//! dsr-eval, below this crate.

#![deny(missing_docs)]

pub mod budget;
pub mod codebook;
pub mod data;
pub mod optim;
pub mod pipeline;
pub mod pretrain;
pub mod session;
pub mod sizing;
pub mod train;
