//! Image loading and output files: inputs at the model size (through dsr-train's data module, so
//! that training and inference share one pre-processing path), `.npy` maps, PNG encoding and
//! atomic writes.

use std::path::Path;

use anyhow::{Context, Result};
use dsr_train::data::{decode_checked, image_to_chw, mask_to_binary, DEFAULT_MAX_PIXELS};
use image::RgbImage;

/// An input image as the model sees it: RGB in `[0, 1]`, channel-major, at the model size.
pub struct ModelImage {
    /// `3 × height × width` values, channel after channel.
    pub chw: Vec<f32>,
    /// The image at the model size, for the overlays.
    pub rgb: RgbImage,
    /// The size of the file before resizing, `[height, width]`.
    pub original_size: [usize; 2],
}

/// Decodes `path` (any channel count or bit depth) and resizes it to `size` = `[height, width]`
/// as dsr-train's data module does; an image already at that size is used as is. Images of more
/// than [`DEFAULT_MAX_PIXELS`] pixels are refused from their header.
pub fn load_image(path: &Path, size: [usize; 2]) -> Result<ModelImage> {
    load_image_limited(path, size, DEFAULT_MAX_PIXELS)
}

/// [`load_image`] with another pixel limit: an image of more than `max_pixels` pixels (width ×
/// height, read from its header) is refused before it is decoded.
pub fn load_image_limited(path: &Path, size: [usize; 2], max_pixels: u64) -> Result<ModelImage> {
    let img = decode_checked(path, max_pixels)?;
    let original_size = [img.height() as usize, img.width() as usize];
    let chw = image_to_chw(&img, size[0] as u32, size[1] as u32);
    let plane = size[0] * size[1];
    let mut rgb = RgbImage::new(size[1] as u32, size[0] as u32);
    for (i, p) in rgb.pixels_mut().enumerate() {
        for (c, v) in p.0.iter_mut().enumerate() {
            *v = (chw[c * plane + i] * 255.0).round() as u8;
        }
    }
    Ok(ModelImage {
        chw,
        rgb,
        original_size,
    })
}

/// Reads a ground-truth mask at `size` (nearest-neighbour; binarised as dsr-train's data module
/// does: defective where the brightest channel reaches half the full scale, or where a 0/1 label
/// image holds 1). Masks of more than `max_pixels` pixels are refused from their header.
/// The mask must have the size of its image, `image_size` = `[height, width]` of the file
/// `image` (a mask of another size would be stretched onto the wrong pixels).
pub fn load_mask(
    path: &Path,
    size: [usize; 2],
    max_pixels: u64,
    image: &Path,
    image_size: [usize; 2],
) -> Result<Vec<bool>> {
    let img = decode_checked(path, max_pixels).context("reading a ground-truth mask")?;
    let mask_size = [img.height() as usize, img.width() as usize];
    if mask_size != image_size {
        anyhow::bail!(
            "mask {} is {}x{} but its image {} is {}x{}",
            path.display(),
            mask_size[1],
            mask_size[0],
            image.display(),
            image_size[1],
            image_size[0]
        );
    }
    Ok(mask_to_binary(&img, size[0] as u32, size[1] as u32)
        .into_iter()
        .map(|v| v > 0.5)
        .collect())
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
