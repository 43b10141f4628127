//! Preview grids of masks and images as 8-bit RGB buffers, for writing to PNG by a caller.

use crate::buffers::{ImageBatch, MaskBatch};

/// An interleaved 8-bit RGB picture.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes, row-major RGB.
    pub pixels: Vec<u8>,
}

fn to_byte(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Lays out `tiles` (each a function from (row, column, channel) to a value in [0, 1]) on a grid with
/// `columns` columns, separated by `gap` white pixels.
fn grid(
    count: usize,
    h: usize,
    w: usize,
    columns: usize,
    gap: usize,
    value: impl Fn(usize, usize, usize, usize) -> f32,
) -> RgbImage {
    let columns = columns.max(1).min(count.max(1));
    let rows = count.div_ceil(columns);
    let width = columns * w + (columns + 1) * gap;
    let height = rows * h + (rows + 1) * gap;
    let mut pixels = vec![255u8; width * height * 3];
    for t in 0..count {
        let (gy, gx) = (t / columns, t % columns);
        let oy = gap + gy * (h + gap);
        let ox = gap + gx * (w + gap);
        for y in 0..h {
            for x in 0..w {
                let base = ((oy + y) * width + ox + x) * 3;
                for ch in 0..3 {
                    pixels[base + ch] = to_byte(value(t, y, x, ch));
                }
            }
        }
    }
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// A grid of masks (white = anomalous) with `columns` columns.
pub fn mask_grid(masks: &MaskBatch, columns: usize) -> RgbImage {
    let (h, w) = (masks.h, masks.w);
    grid(masks.n, h, w, columns, 2, |t, y, x, _| {
        masks.mask(t)[y * w + x]
    })
}

/// A grid of images with their mask outlines drawn in red; pass `None` for no outlines.
///
/// Single-channel images are shown in grey; only the first three channels of others are shown.
pub fn image_grid(images: &ImageBatch, masks: Option<&MaskBatch>, columns: usize) -> RgbImage {
    let (c, h, w) = (images.c, images.h, images.w);
    let plane = h * w;
    grid(images.n, h, w, columns, 2, |t, y, x, ch| {
        if let Some(m) = masks {
            let mask = m.mask(t);
            let inside = mask[y * w + x] > 0.5;
            let edge = inside
                && (y == 0
                    || x == 0
                    || y + 1 == h
                    || x + 1 == w
                    || mask[(y - 1) * w + x] <= 0.5
                    || mask[(y + 1) * w + x] <= 0.5
                    || mask[y * w + x - 1] <= 0.5
                    || mask[y * w + x + 1] <= 0.5);
            if edge {
                return if ch == 0 { 1.0 } else { 0.0 };
            }
        }
        let channel = if c >= 3 { ch } else { 0 };
        images.image_slice(t)[channel * plane + y * w + x]
    })
}
