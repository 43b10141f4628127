//! The errors of model export.

use std::path::PathBuf;

/// Everything that can go wrong between a checkpoint and an exported model file. Messages name
/// the file concerned; the cause follows in the error's source chain.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The checkpoint could not be read or made into a detector (missing file, bad tensors, no
    /// configuration, invalid post-processor …).
    #[error(transparent)]
    Model(#[from] dsr_eval::EvalError),
    /// The opset asked for is not one the exporter writes.
    #[error("opset {0} is not supported: choose one from {min} to {max}", min = crate::MIN_OPSET, max = crate::MAX_OPSET)]
    Opset(i64),
    /// The graph could not be built (a tensor missing or unreadable).
    #[error("cannot build the ONNX graph: {0}")]
    Graph(String),
    /// The model could not be serialised.
    #[error("cannot serialise the ONNX model: {0}")]
    Encode(String),
    /// The output path holds a file this program did not write.
    #[error(
        "{} already exists and is not an ONNX model written by `dsr export`; remove it or choose another output",
        .0.display()
    )]
    WouldOverwrite(PathBuf),
    /// The output could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: dsr_core::Error,
    },
}

impl From<candle_core::Error> for ExportError {
    fn from(e: candle_core::Error) -> Self {
        ExportError::Graph(e.to_string())
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, ExportError>;
