//! The error type of `dsr-core`.

use std::path::PathBuf;

/// Errors raised while building, loading or running a DSR model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The configuration is not usable; the message says which field and why.
    #[error("invalid DSR configuration: {0}")]
    Config(String),

    /// What was asked for cannot run on this machine; the message says what is missing.
    #[error("not supported on this machine: {0}")]
    Unsupported(String),

    /// An input tensor has a shape the model cannot take.
    #[error("invalid input: {0}")]
    Input(String),

    /// A weight file could not be read or does not match the model.
    #[error("{}: {message}", path.display())]
    Weights {
        /// The file that was being read or written.
        path: PathBuf,
        /// What is wrong with it, in words a user can act on.
        message: String,
    },

    /// An I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file that was being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A file could not be written (for example because the disk is full). Files are written
    /// through a temporary file and a rename, so the previous file at that path, if any, is
    /// unchanged.
    #[error(
        "cannot write {}: {source}; {}",
        path.display(),
        if *previous_kept {
            "the previous version of this file is intact"
        } else {
            "no file was written there"
        }
    )]
    Write {
        /// The file that was being written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
        /// Whether a previous file is still at `path` (unchanged).
        previous_kept: bool,
    },

    /// The source of phase-2 randomness could not deliver a draw (for example a recorded tape
    /// ran out or holds a draw of another kind).
    #[error("phase-2 randomness: {0}")]
    Randomness(String),
}

impl Error {
    /// Builds a [`Error::Weights`] for `path` with `message`.
    pub fn weights(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Weights {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// The result type of `dsr-core`.
pub type Result<T> = std::result::Result<T, Error>;
