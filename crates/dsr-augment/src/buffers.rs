//! Plain CHW buffers exchanged with the trainer.

use crate::error::AugmentError;

/// A single-channel mask, row-major, values 0.0 or 1.0.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// `h * w` values, row-major.
    pub data: Vec<f32>,
}

impl Mask {
    /// An all-zero (normal) mask.
    pub fn zeros(h: usize, w: usize) -> Self {
        Mask {
            h,
            w,
            data: vec![0.0; h * w],
        }
    }

    /// Wraps a buffer, checking its length.
    pub fn new(h: usize, w: usize, data: Vec<f32>) -> Result<Self, AugmentError> {
        if data.len() != h * w {
            return Err(AugmentError::ShapeMismatch {
                shape: vec![h, w],
                len: data.len(),
            });
        }
        Ok(Mask { h, w, data })
    }

    /// Number of pixels equal to 1.
    pub fn count(&self) -> usize {
        self.data.iter().filter(|&&v| v > 0.5).count()
    }

    /// Whether no pixel is set.
    pub fn is_empty(&self) -> bool {
        self.data.iter().all(|&v| v <= 0.5)
    }
}

/// A channel-first (CHW) image with values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Number of channels (3 for RGB).
    pub c: usize,
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// `c * h * w` values, channel-major then row-major.
    pub data: Vec<f32>,
}

impl Image {
    /// An image whose every value is `value`.
    pub fn filled(c: usize, h: usize, w: usize, value: f32) -> Self {
        Image {
            c,
            h,
            w,
            data: vec![value; c * h * w],
        }
    }

    /// Wraps a buffer, checking its length.
    pub fn new(c: usize, h: usize, w: usize, data: Vec<f32>) -> Result<Self, AugmentError> {
        if data.len() != c * h * w {
            return Err(AugmentError::ShapeMismatch {
                shape: vec![c, h, w],
                len: data.len(),
            });
        }
        Ok(Image { c, h, w, data })
    }

    /// Builds an image from interleaved 8-bit RGB pixels (HWC), scaling by 1/255.
    pub fn from_rgb8(h: usize, w: usize, rgb: &[u8]) -> Result<Self, AugmentError> {
        if rgb.len() != 3 * h * w {
            return Err(AugmentError::ShapeMismatch {
                shape: vec![h, w, 3],
                len: rgb.len(),
            });
        }
        let plane = h * w;
        let mut data = vec![0.0; 3 * plane];
        for (p, px) in rgb.chunks_exact(3).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                data[ch * plane + p] = f32::from(v) / 255.0;
            }
        }
        Ok(Image { c: 3, h, w, data })
    }

    pub(crate) fn check(&self) -> Result<(), AugmentError> {
        if self.data.len() != self.c * self.h * self.w {
            return Err(AugmentError::ShapeMismatch {
                shape: vec![self.c, self.h, self.w],
                len: self.data.len(),
            });
        }
        Ok(())
    }
}

/// A batch of masks stored contiguously as N×1×H×W, ready for `Tensor::from_vec`.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskBatch {
    /// Number of masks.
    pub n: usize,
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// `n * h * w` values.
    pub data: Vec<f32>,
}

impl MaskBatch {
    /// The `i`-th mask as a slice of `h * w` values.
    pub fn mask(&self, i: usize) -> &[f32] {
        let plane = self.h * self.w;
        &self.data[i * plane..(i + 1) * plane]
    }

    /// Splits the batch into individual masks.
    pub fn to_masks(&self) -> Vec<Mask> {
        (0..self.n)
            .map(|i| Mask {
                h: self.h,
                w: self.w,
                data: self.mask(i).to_vec(),
            })
            .collect()
    }
}

/// A batch of images stored contiguously as N×C×H×W, ready for `Tensor::from_vec`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBatch {
    /// Number of images.
    pub n: usize,
    /// Channels per image.
    pub c: usize,
    /// Height in pixels.
    pub h: usize,
    /// Width in pixels.
    pub w: usize,
    /// `n * c * h * w` values.
    pub data: Vec<f32>,
}

impl ImageBatch {
    /// Wraps a contiguous N×C×H×W buffer, checking its length.
    pub fn new(
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        data: Vec<f32>,
    ) -> Result<Self, AugmentError> {
        if data.len() != n * c * h * w {
            return Err(AugmentError::ShapeMismatch {
                shape: vec![n, c, h, w],
                len: data.len(),
            });
        }
        Ok(ImageBatch { n, c, h, w, data })
    }

    /// Concatenates images of one shape into a batch.
    pub fn from_images(images: &[Image]) -> Result<Self, AugmentError> {
        let Some(first) = images.first() else {
            return Ok(ImageBatch {
                n: 0,
                c: 0,
                h: 0,
                w: 0,
                data: Vec::new(),
            });
        };
        let mut data = Vec::with_capacity(images.len() * first.data.len());
        for img in images {
            img.check()?;
            if (img.c, img.h, img.w) != (first.c, first.h, first.w) {
                return Err(AugmentError::MixedShapes);
            }
            data.extend_from_slice(&img.data);
        }
        Ok(ImageBatch {
            n: images.len(),
            c: first.c,
            h: first.h,
            w: first.w,
            data,
        })
    }

    /// The `i`-th image as a slice of `c * h * w` values.
    pub fn image_slice(&self, i: usize) -> &[f32] {
        let size = self.c * self.h * self.w;
        &self.data[i * size..(i + 1) * size]
    }

    /// A copy of the `i`-th image.
    pub fn image(&self, i: usize) -> Image {
        Image {
            c: self.c,
            h: self.h,
            w: self.w,
            data: self.image_slice(i).to_vec(),
        }
    }

    pub(crate) fn check(&self) -> Result<(), AugmentError> {
        if self.data.len() != self.n * self.c * self.h * self.w {
            return Err(AugmentError::ShapeMismatch {
                shape: vec![self.n, self.c, self.h, self.w],
                len: self.data.len(),
            });
        }
        Ok(())
    }
}
