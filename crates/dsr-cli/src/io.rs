//! Image loading and output files: decoding and resizing inputs to the model size, `.npy` maps,
//! PNG encoding and atomic writes.
//!
//! The loader here is the command's own small one; once dsr-train's data module is available,
//! the image decoding and resizing should move to it so that training and inference share one
//! pre-processing path.

use std::path::Path;

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};

/// An input image as the model sees it: RGB in `[0, 1]`, channel-major, at the model size.
pub struct ModelImage {
    /// `3 × height × width` values, channel after channel.
    pub chw: Vec<f32>,
    /// The image at the model size, for the overlays.
    pub rgb: RgbImage,
    /// The size of the file before resizing, `[height, width]`.
    pub original_size: [usize; 2],
}

/// Decodes `path` (any channel count or bit depth the `image` crate reads) and resizes it to
/// `size` = `[height, width]` with bilinear filtering; an image already at that size is used as is.
pub fn load_image(path: &Path, size: [usize; 2]) -> Result<ModelImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))?
        .decode()
        .with_context(|| format!("{} is not a readable image", path.display()))?;
    let original_size = [img.height() as usize, img.width() as usize];
    if original_size[0] == 0 || original_size[1] == 0 {
        bail!("{} is an empty image", path.display());
    }
    let (h, w) = (size[0] as u32, size[1] as u32);
    let eight_bit = matches!(
        img,
        DynamicImage::ImageLuma8(_)
            | DynamicImage::ImageLumaA8(_)
            | DynamicImage::ImageRgb8(_)
            | DynamicImage::ImageRgba8(_)
    );
    let mut chw = vec![0f32; 3 * size[0] * size[1]];
    let plane = size[0] * size[1];
    let rgb = if eight_bit {
        // 8-bit images are divided by 255 exactly as anomalib's `to_tensor` does.
        let mut rgb = img.to_rgb8();
        if rgb.dimensions() != (w, h) {
            rgb = image::imageops::resize(&rgb, w, h, FilterType::Triangle);
        }
        for (i, p) in rgb.pixels().enumerate() {
            for (c, &v) in p.0.iter().enumerate() {
                chw[c * plane + i] = f32::from(v) / 255.0;
            }
        }
        rgb
    } else {
        // Deeper images (16-bit, float) keep their precision through the resize.
        let mut rgb = img.to_rgb32f();
        if rgb.dimensions() != (w, h) {
            rgb = image::imageops::resize(&rgb, w, h, FilterType::Triangle);
        }
        for (i, p) in rgb.pixels().enumerate() {
            for (c, &v) in p.0.iter().enumerate() {
                chw[c * plane + i] = v.clamp(0.0, 1.0);
            }
        }
        DynamicImage::ImageRgb32F(rgb).to_rgb8()
    };
    Ok(ModelImage {
        chw,
        rgb,
        original_size,
    })
}

/// Reads a ground-truth mask and resizes it to `size` with nearest-neighbour sampling; a pixel
/// is defective when its grey value is above half the range.
pub fn load_mask(path: &Path, size: [usize; 2]) -> Result<Vec<bool>> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open the mask {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read the mask {}", path.display()))?
        .decode()
        .with_context(|| format!("the mask {} is not a readable image", path.display()))?;
    let mut luma = img.to_luma8();
    let (h, w) = (size[0] as u32, size[1] as u32);
    if luma.dimensions() != (w, h) {
        luma = image::imageops::resize(&luma, w, h, FilterType::Nearest);
    }
    Ok(luma.pixels().map(|p| p.0[0] > 127).collect())
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    dsr_core::weights::write_atomic(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Encodes an RGB image as PNG bytes.
pub fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .context("cannot encode a PNG image")?;
    Ok(out.into_inner())
}

/// The bytes of a little-endian float32 `.npy` file (format version 1.0) of shape
/// `height × width`.
///
/// The header is written by hand: it is one short line of text, and doing so spares the command
/// a dependency on an array library it would use for nothing else.
pub fn npy_bytes(values: &[f32], height: usize, width: usize) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({height}, {width}), }}");
    // The magic (6 bytes), the version (2) and the header length (2) precede the header, which
    // ends with a newline and is padded with spaces so that the data start on a 64-byte boundary.
    let unpadded = 10 + header.len() + 1;
    let padding = (64 - unpadded % 64) % 64;
    header.push_str(&" ".repeat(padding));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * values.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Standard base64 (with padding) of `bytes`, for images embedded in the HTML report.
pub fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(TABLE[(n >> 18) as usize & 63] as char);
        out.push(TABLE[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            TABLE[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            TABLE[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_describes_the_array() {
        let bytes = npy_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3);
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"));
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + header_len + 24);
        assert_eq!(
            &bytes[10 + header_len..10 + header_len + 4],
            &1f32.to_le_bytes()
        );
    }

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
