//! The errors of inference and evaluation.

use std::path::PathBuf;

use crate::image::ImageError;
use crate::metrics::MetricsError;

/// Everything that can go wrong between a checkpoint, images and metrics. Messages name the file
/// concerned; the cause follows in the error's source chain.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The model file does not exist.
    #[error("the model file {} does not exist", .0.display())]
    MissingModel(PathBuf),
    /// The model file could not be read.
    #[error("cannot read the model {}", .path.display())]
    ReadModel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: dsr_core::Error,
    },
    /// The checkpoint does not record its configuration.
    #[error(
        "{} does not record its model configuration; convert it first with `dsr convert --config JSON_FILE`",
        .0.display()
    )]
    NoConfig(PathBuf),
    /// The recorded image size does not suit the network.
    #[error("the image size recorded in {}", .path.display())]
    ImageSize {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: dsr_core::Error,
    },
    /// The stored post-processor is not valid.
    #[error("the '{key}' metadata of {} is not a valid post-processor", .path.display())]
    PostProcessor {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: &'static str,
        /// Why.
        #[source]
        source: MetricsError,
    },
    /// The network could not be built from the checkpoint's tensors.
    #[error("cannot build the model of {}", .path.display())]
    BuildModel {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: dsr_core::Error,
    },
    /// The forward pass failed.
    #[error("inference failed")]
    Inference(#[source] dsr_core::Error),
    /// An image or mask could not be read.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A defective sample has no ground-truth mask.
    #[error("the defective image {} has no ground-truth mask", .0.display())]
    MissingMask(PathBuf),
    /// No sample could be read.
    #[error("none of the {0} images could be read")]
    NothingRead(usize),
    /// The metrics could not be computed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An invalid setting.
    #[error("{0}")]
    Config(String),
}

/// Results of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
