//! dsr-train: data sets, training phases, checkpoints and evaluation of the DSR surface-anomaly
//! detector ("DSR – A Dual Subspace Re-Projection Network for Surface Anomaly Detection",
//! Zavrtanik, Kristan and Skočaj, ECCV 2022).
//!
//! Architecture invariant: dsr-train knows data sets, phases, checkpoints and metrics, never the
//! CLI.
//!
//! The evaluation part follows anomalib: [`metrics`] holds the exact image- and pixel-level metrics
//! (AUROC, average precision, F1Max, AUPRO, F1 at a threshold) and [`postprocess`] the default
//! post-processor (adaptive thresholds and min-max normalisation).
//!
//! # Example
//!
//! ```
//! use dsr_train::metrics::{EvalSet, Metrics};
//! use dsr_train::postprocess::PostProcessor;
//!
//! // Three images of 2x2 pixels: one good, two defective.
//! let scores = [0.1_f32, 0.7, 0.6];
//! let labels = [false, true, true];
//! let maps = [
//!     0.1, 0.2, 0.0, 0.1, //
//!     0.9, 0.1, 0.2, 0.0, //
//!     0.3, 0.8, 0.7, 0.1,
//! ];
//! let masks = [
//!     false, false, false, false, //
//!     true, false, false, false, //
//!     false, true, true, false,
//! ];
//! let set = EvalSet::new(&scores, &labels, &maps, &masks, 2, 2)?;
//! let post = PostProcessor::fit(&scores, &labels, &maps, &masks)?;
//! let metrics = Metrics::compute(&set, &post)?;
//! assert_eq!(metrics.image_auroc, 1.0);
//! assert_eq!(metrics.pixel_auroc, 1.0);
//! assert!((metrics.pixel_aupro - 1.0).abs() < 1e-12);
//! # Ok::<(), dsr_train::metrics::MetricsError>(())
//! ```

#![deny(missing_docs)]

pub mod budget;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod pipeline;
pub mod postprocess;
pub mod pretrain;
pub mod session;
pub mod train;
