//! The error type of the crate.

use thiserror::Error;

/// Everything that can go wrong when asking for synthetic anomalies.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AugmentError {
    /// A side is zero or is not a multiple of 32.
    ///
    /// Both recipes need every Perlin resolution 1, 2, …, 32 to divide the side the noise is generated on.
    #[error("invalid size {height}x{width}: both sides must be positive multiples of 32")]
    InvalidSize {
        /// The requested height.
        height: usize,
        /// The requested width.
        width: usize,
    },
    /// A Perlin resolution is zero or does not divide the side it applies to.
    #[error("Perlin resolution {res_h}x{res_w} does not divide the noise size {height}x{width}")]
    InvalidResolution {
        /// Resolution along the rows.
        res_h: usize,
        /// Resolution along the columns.
        res_w: usize,
        /// Height the noise is generated on.
        height: usize,
        /// Width the noise is generated on.
        width: usize,
    },
    /// A buffer's length does not match the shape it claims.
    #[error("buffer of length {len} does not match shape {shape:?}")]
    ShapeMismatch {
        /// The declared shape.
        shape: Vec<usize>,
        /// The actual number of elements.
        len: usize,
    },
    /// The phase-3 generators work on 3-channel (RGB) images only.
    #[error("expected a 3-channel image, got {0} channels")]
    Channels(usize),
    /// Images of a batch must share one shape.
    #[error("images of a batch must share one shape")]
    MixedShapes,
    /// A probability outside [0, 1].
    #[error("probability {0} is outside [0, 1]")]
    Probability(f32),
    /// A recipe name other than "anomalib" or "original".
    #[error("unknown recipe {0:?}: expected \"anomalib\" or \"original\"")]
    UnknownRecipe(String),
}

/// Checks that a mask or image side pair is usable by the generators.
pub(crate) fn check_size(height: usize, width: usize) -> Result<(), AugmentError> {
    if height == 0 || width == 0 || height % 32 != 0 || width % 32 != 0 {
        return Err(AugmentError::InvalidSize { height, width });
    }
    Ok(())
}
