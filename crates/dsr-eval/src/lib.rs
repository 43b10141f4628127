//! # dsr-eval
//!
//! Inference and evaluation of the DSR surface-anomaly detector: a checkpoint becomes a
//! [`Detector`] (model, input size, post-processor and the rule when none is stored), images are
//! decoded and resized as the model was trained on them ([`image`]), raw outputs become labels
//! and normalised maps ([`postprocess`]), and one loop ([`evaluate()`]) scores a labelled set for
//! the exact metrics of anomalib ([`metrics`]).
//!
//! Architecture invariant: this crate knows checkpoints, images, post-processing and metrics
//! through dsr-core; it never knows training (no data-set layouts, augmentation, losses or
//! schedules) nor the command line.
//!
//! Scoring one image:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let (model_path, image_path) = dsr_eval_doc::fixture_model()?;
//! use dsr_eval::{Detector, Execution};
//!
//! let detector = Detector::load(&model_path, Execution::default())?;
//! let prediction = detector.predict_file(&image_path)?;
//! let [height, width] = detector.size();
//! assert_eq!(prediction.map.len(), height * width);
//! let anomalous = detector.image_label(prediction.score);
//! println!("score {:.4}, anomalous: {anomalous}", prediction.score);
//! # Ok(())
//! # }
//! # mod dsr_eval_doc { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/support/fixture_model.rs")); }
//! ```

#![deny(missing_docs)]

pub mod detector;
mod error;
pub mod evaluate;
pub mod image;
pub mod metrics;
pub mod postprocess;

pub use detector::{Detector, Prediction, DEFAULT_IMAGE_SIZE};
pub use dsr_core::{ConvAlgorithm, Execution, Precision};
pub use error::{EvalError, Result};
pub use evaluate::{evaluate, EvalOptions, Evaluation, Sample, Skipped};
pub use image::OnError;
pub use metrics::Metrics;
pub use postprocess::PostProcessor;
