//! The CPU kernels, a layer of their own below the networks: convolutions (im2col products,
//! channels-last products, Winograd's F(4×4, 3×3)) with their gradients, channels-last
//! activations, instance normalisation, bilinear resampling, and the storage helpers they share.
//! They take tensors and plain parameters (strides, paddings, the algorithm to use), never a
//! layer: the layers of [`crate::layers`] hold the weights and call them.
//!
//! Timings and the reasons behind each algorithm choice are in docs/performance.md.

pub(crate) mod bf16;
pub mod conv;
pub(crate) mod nhwc;
pub mod norm;
pub mod resample;
pub(crate) mod simd;
