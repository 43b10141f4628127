//! Image decoding and resizing as the model sees its inputs, with their limits: any channel
//! count or bit depth to RGB `f32` in `[0, 1]`, channel-major, resized with antialiased bilinear
//! interpolation; ground-truth masks binarised and resized nearest-neighbour. Training (dsr-train's
//! data module) and inference read images through these functions, so both see the same values.
//!
//! Every file is checked before it is decoded: an empty file, an unknown format or an image of
//! more pixels than the limit (read from its header) is one [`ImageError`] that names the file.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

/// The file extensions (lower case) that are read as images.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "tif", "tiff", "bmp"];

/// The default pixel limit (width × height) above which an image is refused: 100 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// A file that cannot be read as an image or mask. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file has zero bytes.
    #[error("{} is empty (zero bytes), not an image", .path.display())]
    EmptyFile {
        /// The file.
        path: PathBuf,
    },
    /// A file is not an image in a supported format, or its header is unreadable.
    #[error("{} is not a readable image: {reason}", .path.display())]
    NotAnImage {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The header was read but decoding failed (truncated or corrupt data).
    #[error("{} could not be decoded (truncated or corrupt): {reason}", .path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The image has more pixels than the configured limit (checked from the header, before decoding).
    #[error(
        "{} is {width}x{height} pixels, more than the limit of {limit} pixels",
        .path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The configured limit in pixels.
        limit: u64,
    },
    /// A mask does not have the size of its image.
    #[error(
        "mask {} is {} but its image {} is {}",
        .mask.display(), size_text(.mask_size), .image.display(), size_text(.image_size)
    )]
    MaskSize {
        /// The mask file.
        mask: PathBuf,
        /// The image file.
        image: PathBuf,
        /// Mask width and height.
        mask_size: (u32, u32),
        /// Image width and height.
        image_size: (u32, u32),
    },
}

/// Formats a width and height as `WxH`.
fn size_text(size: &(u32, u32)) -> String {
    format!("{}x{}", size.0, size.1)
}

impl ImageError {
    /// Wraps an I/O error with the path it concerns.
    fn io(path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// What to do with an input that cannot be read. Written `fail` and `skip` in configuration files
/// and on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop at the first bad input with its error.
    #[default]
    Fail,
    /// Leave the input out, report it, and go on with the others.
    Skip,
}

impl std::fmt::Display for OnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnError::Fail => "fail",
            OnError::Skip => "skip",
        })
    }
}

impl std::str::FromStr for OnError {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            other => Err(format!("'{other}' is not an error policy: fail or skip")),
        }
    }
}

/// A decoder message on one line (some decoders put line breaks in theirs), so that every error
/// stays one line that names the file.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Opens an image, checks its size from the header against `max_pixels` and against the memory
/// available, then decodes it. Only regular files are read (a FIFO or device is refused without
/// waiting on it); a JPEG that ends before its end-of-image marker (truncated) is refused, since
/// the decoder would fill the missing part in; the decoder's allocations are limited to the memory
/// available, so an image the machine cannot hold is an error, not an abort.
pub fn decode_checked(path: &Path, max_pixels: u64) -> Result<DynamicImage, ImageError> {
    let mut file = dsr_core::files::open_regular(path).map_err(|e| ImageError::io(path, e))?;
    let meta = file.metadata().map_err(|e| ImageError::io(path, e))?;
    if meta.len() == 0 {
        return Err(ImageError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let not_an_image = |reason: String| ImageError::NotAnImage {
        path: path.to_path_buf(),
        reason,
    };
    let reader = ImageReader::new(std::io::BufReader::new(&mut file))
        .with_guessed_format()
        .map_err(|e| ImageError::io(path, e))?;
    let Some(format) = reader.format() else {
        return Err(not_an_image("unknown format".to_string()));
    };
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| not_an_image(one_line(&e.to_string())))?;
    if width == 0 || height == 0 {
        return Err(not_an_image(format!("zero-sized image {width}x{height}")));
    }
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            width,
            height,
            limit: max_pixels,
        });
    }
    // Decoding holds the file (at most 8 bytes a pixel: 16-bit RGBA), then the conversion to
    // 32-bit float RGB (12 bytes a pixel) for resizing.
    let needed = pixels.saturating_mul(8 + 12).saturating_add(meta.len());
    dsr_core::memory::ensure_fits(
        needed,
        &format!("decoding {width}x{height} pixels"),
        "lower --max-pixels to refuse such images, or free memory",
    )
    .map_err(|reason| ImageError::Decode {
        path: path.to_path_buf(),
        reason,
    })?;
    let bytes = dsr_core::files::read_regular(path).map_err(|e| ImageError::io(path, e))?;
    if format == ImageFormat::Jpeg && jpeg_truncated(&bytes) {
        return Err(ImageError::Decode {
            path: path.to_path_buf(),
            reason: "the JPEG data end before its end-of-image marker (the file is cut short)"
                .to_string(),
        });
    }
    let mut reader = ImageReader::with_format(std::io::Cursor::new(&bytes), format);
    // The size was checked against our own limit above; the decoder may allocate what the
    // machine has (its default limit would refuse large 16-bit images).
    let mut limits = image::Limits::no_limits();
    limits.max_alloc = dsr_core::memory::available_bytes();
    reader.limits(limits);
    reader.decode().map_err(|e| ImageError::Decode {
        path: path.to_path_buf(),
        reason: one_line(&e.to_string()),
    })
}

/// Whether a JPEG file ends before its end-of-image marker: the marker segments are walked from
/// the start of the file and each scan's entropy-coded data are skipped up to the next marker.
/// A file whose structure cannot be followed is left to the decoder (`false`).
///
/// Written here because the decoder behind the `image` crate pads a truncated scan with zeros and
/// returns the image without a word, and no maintained crate reports this.
pub fn jpeg_truncated(b: &[u8]) -> bool {
    if !b.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let len = b.len();
    let mut i = 2;
    loop {
        // The next marker: 0xFF (any number of fill bytes), then its code.
        if i >= len {
            return true;
        }
        if b[i] != 0xFF {
            return false;
        }
        while i < len && b[i] == 0xFF {
            i += 1;
        }
        if i >= len {
            return true;
        }
        let marker = b[i];
        i += 1;
        match marker {
            0xD9 => return false,
            0x01 | 0xD0..=0xD7 => continue,
            _ => {
                if i + 2 > len {
                    return true;
                }
                let seg = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
                if seg < 2 {
                    return false;
                }
                i += seg;
                if i > len {
                    return true;
                }
                if marker == 0xDA {
                    // Entropy-coded data: 0xFF is followed by 0x00 (a stuffed byte), a restart
                    // marker, or the next marker.
                    loop {
                        if i + 1 >= len {
                            return true;
                        }
                        if b[i] == 0xFF {
                            let next = b[i + 1];
                            if next == 0x00 || (0xD0..=0xD7).contains(&next) {
                                i += 2;
                                continue;
                            }
                            if next == 0xFF {
                                i += 1;
                                continue;
                            }
                            break;
                        }
                        i += 1;
                    }
                }
            }
        }
    }
}

/// Converts a decoded image to RGB `f32` in `[0, 1]`, CHW, resized to `height`×`width`.
///
/// Resizing uses `image::imageops::resize` with `FilterType::Triangle` on the 32-bit float RGB
/// buffer: bilinear when upscaling and antialiased (the triangle kernel widened by the scale factor,
/// as torchvision's `Resize(antialias=True)`) when downscaling, without any 8-bit rounding. An image
/// that already has the target size is used as is. Values outside `[0, 1]` (possible only for
/// floating-point TIFF input) are clamped and NaN becomes 0.
pub fn image_to_chw(image: &DynamicImage, height: u32, width: u32) -> Vec<f32> {
    let rgb = image.to_rgb32f();
    let rgb = if rgb.dimensions() == (width, height) {
        rgb
    } else {
        image::imageops::resize(&rgb, width, height, FilterType::Triangle)
    };
    let plane = height as usize * width as usize;
    let mut out = vec![0.0f32; 3 * plane];
    for (x, y, p) in rgb.enumerate_pixels() {
        let i = y as usize * width as usize + x as usize;
        for (c, &v) in p.0.iter().enumerate() {
            out[c * plane + i] = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
        }
    }
    out
}

/// Converts a decoded mask to a binary `f32` mask of `height`×`width` (1×H×W).
///
/// Binarisation rule (for masks that are not strictly black and white, such as JPEG masks with
/// compression noise or masks with antialiased edges): a pixel is anomalous (1.0) when its
/// brightest colour channel is at least half the full scale of the file's bit depth (128 of 255,
/// 32768 of 65535, 0.5 for floating point); alpha is ignored. One exception: a mask whose largest
/// value is exactly 1 (a label image that stores 0 and 1 rather than 0 and 255) marks its pixels
/// of value 1 as anomalous. Resizing uses nearest-neighbour sampling as PyTorch's
/// `interpolate(mode="nearest")`: output pixel `i` reads input pixel `floor(i · in / out)`. A mask
/// that already has the target size is used as is.
pub fn mask_to_binary(mask: &DynamicImage, height: u32, width: u32) -> Vec<f32> {
    let rgb = mask.to_rgb32f();
    let (in_w, in_h) = rgb.dimensions();
    let brightest = |p: &image::Rgb<f32>| p.0.iter().copied().fold(0.0f32, f32::max);
    // One step of the file's integer scale, for the 0/1 label-image exception.
    let step = match mask.color().bytes_per_pixel() / mask.color().channel_count() {
        1 => Some(1.0 / 255.0),
        2 => Some(1.0 / 65535.0),
        _ => None,
    };
    let largest = rgb.pixels().map(brightest).fold(0.0f32, f32::max);
    let threshold = match step {
        Some(step) if (largest - step).abs() < step / 2.0 => step / 2.0,
        _ => 0.5,
    };
    let mut out = vec![0.0f32; height as usize * width as usize];
    for y in 0..height {
        let sy = ((y as u64 * in_h as u64) / height as u64).min(in_h as u64 - 1) as u32;
        for x in 0..width {
            let sx = ((x as u64 * in_w as u64) / width as u64).min(in_w as u64 - 1) as u32;
            if brightest(rgb.get_pixel(sx, sy)) >= threshold {
                out[y as usize * width as usize + x as usize] = 1.0;
            }
        }
    }
    out
}

/// An input image as the model sees it: RGB in `[0, 1]`, channel-major, at the model size.
#[derive(Debug, Clone)]
pub struct ModelImage {
    /// `3 × height × width` values, channel after channel.
    pub chw: Vec<f32>,
    /// The size of the file before resizing, `[height, width]`.
    pub original_size: [usize; 2],
}

impl ModelImage {
    /// The image at the model size as 8-bit RGB (for overlays).
    pub fn to_rgb8(&self, size: [usize; 2]) -> RgbImage {
        let plane = size[0] * size[1];
        let mut rgb = RgbImage::new(size[1] as u32, size[0] as u32);
        for (i, p) in rgb.pixels_mut().enumerate() {
            for (c, v) in p.0.iter_mut().enumerate() {
                *v = (self.chw[c * plane + i] * 255.0).round() as u8;
            }
        }
        rgb
    }
}

/// Decodes `path` (any channel count or bit depth) and resizes it to `size` = `[height, width]`
/// with [`image_to_chw`]; an image already at that size is used as is. An image of more than
/// `max_pixels` pixels (width × height, read from its header) is refused before it is decoded.
pub fn load_image(
    path: &Path,
    size: [usize; 2],
    max_pixels: u64,
) -> Result<ModelImage, ImageError> {
    let img = decode_checked(path, max_pixels)?;
    let original_size = [img.height() as usize, img.width() as usize];
    let chw = image_to_chw(&img, size[0] as u32, size[1] as u32);
    Ok(ModelImage { chw, original_size })
}

/// Reads the ground-truth mask `path` of the image file `image` at `size` with
/// [`mask_to_binary`] (1.0 defective, 0.0 good). The mask must have the size of its image,
/// `image_size` = `[height, width]` (a mask of another size would be stretched onto the wrong
/// pixels); masks of more than `max_pixels` pixels are refused from their header.
pub fn load_mask(
    path: &Path,
    size: [usize; 2],
    max_pixels: u64,
    image: &Path,
    image_size: [usize; 2],
) -> Result<Vec<f32>, ImageError> {
    let m = decode_checked(path, max_pixels)?;
    let mask_size = (m.width(), m.height());
    let image_size = (image_size[1] as u32, image_size[0] as u32);
    if mask_size != image_size {
        return Err(ImageError::MaskSize {
            mask: path.to_path_buf(),
            image: image.to_path_buf(),
            mask_size,
            image_size,
        });
    }
    Ok(mask_to_binary(&m, size[0] as u32, size[1] as u32))
}
