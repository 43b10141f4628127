//! Overlays: a jet heat map blended over the image, mask contours, and text drawn with a tiny
//! built-in bitmap font (so nothing depends on the fonts of the system).

use image::{Rgb, RgbImage};

/// The jet colour of `v` in `[0, 1]` (blue, cyan, yellow, red), the usual piecewise-linear
/// approximation of the classic map.
pub fn jet(v: f32) -> [u8; 3] {
    let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
    let channel = |centre: f32| {
        let x = (1.5 - (4.0 * v - centre).abs()).clamp(0.0, 1.0);
        (x * 255.0).round() as u8
    };
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// Blends the jet colours of `map` (values in `[0, 1]`, row-major, the image's size) over `rgb`
/// with 40 % heat and 60 % image.
pub fn heat_overlay(rgb: &RgbImage, map: &[f32]) -> RgbImage {
    let mut out = rgb.clone();
    for (p, &v) in out.pixels_mut().zip(map) {
        let heat = jet(v);
        for (channel, &h) in p.0.iter_mut().zip(&heat) {
            let blended = 0.6 * f32::from(*channel) + 0.4 * f32::from(h);
            *channel = blended.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Paints the inner boundary of `mask` (pixels of the mask with a 4-neighbour outside it or on
/// the image border) in `colour`.
pub fn draw_contours(img: &mut RgbImage, mask: &[bool], colour: [u8; 3]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if mask.len() != w * h {
        return;
    }
    for y in 0..h {
        for x in 0..w {
            if !mask[y * w + x] {
                continue;
            }
            let edge = x == 0
                || y == 0
                || x + 1 == w
                || y + 1 == h
                || !mask[y * w + x - 1]
                || !mask[y * w + x + 1]
                || !mask[(y - 1) * w + x]
                || !mask[(y + 1) * w + x];
            if edge {
                img.put_pixel(x as u32, y as u32, Rgb(colour));
            }
        }
    }
}

/// The 3×5 glyph of `c` (upper case; lower case is mapped to it): five rows of three bits, the
/// most significant bit on the left. Unknown characters are blank.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        'A' => [0b010, 0b101, 0b111, 0b101, 0b101],
        'B' => [0b110, 0b101, 0b110, 0b101, 0b110],
        'C' => [0b011, 0b100, 0b100, 0b100, 0b011],
        'D' => [0b110, 0b101, 0b101, 0b101, 0b110],
        'E' => [0b111, 0b100, 0b110, 0b100, 0b111],
        'F' => [0b111, 0b100, 0b110, 0b100, 0b100],
        'G' => [0b011, 0b100, 0b101, 0b101, 0b011],
        'H' => [0b101, 0b101, 0b111, 0b101, 0b101],
        'I' => [0b111, 0b010, 0b010, 0b010, 0b111],
        'J' => [0b001, 0b001, 0b001, 0b101, 0b010],
        'K' => [0b101, 0b101, 0b110, 0b101, 0b101],
        'L' => [0b100, 0b100, 0b100, 0b100, 0b111],
        'M' => [0b101, 0b111, 0b111, 0b101, 0b101],
        'N' => [0b110, 0b101, 0b101, 0b101, 0b101],
        'O' => [0b010, 0b101, 0b101, 0b101, 0b010],
        'P' => [0b110, 0b101, 0b110, 0b100, 0b100],
        'Q' => [0b010, 0b101, 0b101, 0b110, 0b011],
        'R' => [0b110, 0b101, 0b110, 0b101, 0b101],
        'S' => [0b011, 0b100, 0b010, 0b001, 0b110],
        'T' => [0b111, 0b010, 0b010, 0b010, 0b010],
        'U' => [0b101, 0b101, 0b101, 0b101, 0b111],
        'V' => [0b101, 0b101, 0b101, 0b101, 0b010],
        'W' => [0b101, 0b101, 0b111, 0b111, 0b101],
        'X' => [0b101, 0b101, 0b010, 0b101, 0b101],
        'Y' => [0b101, 0b101, 0b010, 0b010, 0b010],
        'Z' => [0b111, 0b001, 0b010, 0b100, 0b111],
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b110, 0b001, 0b010, 0b100, 0b111],
        '3' => [0b110, 0b001, 0b010, 0b001, 0b110],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b110, 0b001, 0b110],
        '6' => [0b011, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b110],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        ':' => [0b000, 0b010, 0b000, 0b010, 0b000],
        '=' => [0b000, 0b111, 0b000, 0b111, 0b000],
        _ => [0; 5],
    }
}

/// Writes `text` in `colour` on a black band at the top-left corner of `img`, at twice the glyph
/// size when the image is wide enough; text that does not fit is cut at the right edge.
pub fn draw_text(img: &mut RgbImage, text: &str, colour: [u8; 3]) {
    let n = text.chars().count() as u32;
    let scale = if n * 4 * 2 + 2 <= img.width() { 2 } else { 1 };
    let band_w = (n * 4 * scale + 2).min(img.width());
    let band_h = (5 * scale + 2).min(img.height());
    for y in 0..band_h {
        for x in 0..band_w {
            img.put_pixel(x, y, Rgb([0, 0, 0]));
        }
    }
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        let x0 = 1 + i as u32 * 4 * scale;
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..3u32 {
                if bits & (0b100 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let x = x0 + col * scale + dx;
                        let y = 1 + r as u32 * scale + dy;
                        if x < img.width() && y < img.height() {
                            img.put_pixel(x, y, Rgb(colour));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jet_runs_from_blue_to_red() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        assert_eq!(jet(0.5), [128, 255, 128]);
    }

    #[test]
    fn contours_mark_only_the_boundary() {
        let mut img = RgbImage::new(5, 5);
        let mut mask = vec![false; 25];
        for y in 1..4 {
            for x in 1..4 {
                mask[y * 5 + x] = true;
            }
        }
        draw_contours(&mut img, &mask, [255, 0, 0]);
        assert_eq!(img.get_pixel(1, 1).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(2, 2).0, [0, 0, 0]);
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0]);
    }

    #[test]
    fn text_paints_glyph_pixels() {
        let mut img = RgbImage::new(64, 16);
        draw_text(&mut img, "1", [255, 255, 255]);
        // The top row of '1' is 010: its middle column is lit, scaled by two.
        assert_eq!(img.get_pixel(1 + 2, 1).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(1, 1).0, [0, 0, 0]);
    }
}
