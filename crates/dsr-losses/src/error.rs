//! The error type of this crate.

/// Everything that can go wrong when a loss is evaluated.
///
/// Shape and parameter problems are detected before any arithmetic runs, so they name the
/// offending argument; failures inside candle itself are passed through unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LossError {
    /// An input tensor does not have the shape the loss expects.
    #[error("{name}: expected shape {expected}, got {got:?}")]
    Shape {
        /// The argument whose shape is wrong.
        name: &'static str,
        /// A description of the expected shape, with the sizes that are already fixed.
        expected: String,
        /// The shape that was passed.
        got: Vec<usize>,
    },
    /// A scalar hyper-parameter is outside its valid range.
    #[error("{name} = {value} is invalid: {reason}")]
    Parameter {
        /// The parameter's name.
        name: &'static str,
        /// The rejected value.
        value: f64,
        /// Why the value is rejected.
        reason: &'static str,
    },
    /// A class-label tensor holds a label outside `0..classes`.
    #[error("{name}: labels must lie in 0..{classes}, found values from {min} to {max}")]
    LabelRange {
        /// The argument holding the labels.
        name: &'static str,
        /// The number of classes of the prediction.
        classes: usize,
        /// The smallest label found.
        min: f64,
        /// The largest label found.
        max: f64,
    },
    /// An error raised by candle while computing the loss.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The result type of every fallible function in this crate.
pub type Result<T> = std::result::Result<T, LossError>;

impl From<LossError> for candle_core::Error {
    /// Converts a loss error into a candle error, so that `?` works in code that returns
    /// `candle_core::Result`; wrapped candle errors are unwrapped again.
    fn from(err: LossError) -> Self {
        match err {
            LossError::Candle(inner) => inner,
            other => candle_core::Error::wrap(other),
        }
    }
}
