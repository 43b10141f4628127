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
    /// The model gave a NaN or infinite score or map value: its weights overflow on this input,
    /// so no answer is given (a NaN score would otherwise be labelled as if it meant something).
    #[error("the model {model} gives a non-finite {what} ({value}) for {image}: its weights overflow on this input, so there is no meaningful answer; use another checkpoint (or retrain it with a lower learning rate)")]
    NonFinite {
        /// The checkpoint file (or a description of the model in memory).
        model: String,
        /// The image (the input's position in its batch until [`EvalError::naming_inputs`]
        /// names its file).
        image: String,
        /// The input's position in its batch.
        index: usize,
        /// `score` or `anomaly map value`.
        what: &'static str,
        /// The first non-finite value.
        value: f32,
    },
}

impl EvalError {
    /// A [`EvalError::NonFinite`] of a batch whose inputs are the files `inputs` names the file;
    /// every other error is returned as is.
    pub fn naming_inputs(self, inputs: &[&std::path::Path]) -> Self {
        match self {
            EvalError::NonFinite {
                model,
                index,
                what,
                value,
                image,
            } => EvalError::NonFinite {
                image: inputs.get(index).map_or(image, |p| p.display().to_string()),
                model,
                index,
                what,
                value,
            },
            other => other,
        }
    }
}

/// Results of this crate.
pub type Result<T, E = EvalError> = std::result::Result<T, E>;
