//! Decoding, conversion, resizing and per-file errors of the data module, on images generated into
//! a temporary folder.

use std::fs;
use std::path::{Path, PathBuf};

use dsr_eval::image::ImageError;
use dsr_train::data::{load_batch, load_image, load_sample, DataError, Entry, LoadConfig, OnError};
use image::{ImageBuffer, Luma, LumaA, Rgb, Rgba};

mod tempdir;
use tempdir::TempDir;

/// Writes a palette PNG with the given RGB palette and one index per pixel.
fn write_palette_png(path: &Path, width: u32, height: u32, palette: &[u8], indices: &[u8]) {
    let file = fs::File::create(path).expect("create png");
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_palette(palette.to_vec());
    let mut writer = encoder.write_header().expect("png header");
    writer.write_image_data(indices).expect("png data");
}

/// Reads channel `c` of pixel (`x`, `y`) of a CHW image of width `w` and height `h`.
fn at(image: &[f32], h: usize, w: usize, c: usize, x: usize, y: usize) -> f32 {
    image[c * h * w + y * w + x]
}

fn entry(path: PathBuf, mask_path: Option<PathBuf>, label: bool) -> Entry {
    Entry {
        path,
        mask_path,
        label,
        defect_type: if label { "defect" } else { "good" }.to_string(),
    }
}

#[test]
fn gray8_is_replicated_to_rgb() {
    let dir = TempDir::new("data-decode", "gray8");
    let p = dir.path("g.png");
    ImageBuffer::from_fn(4, 3, |x, _| Luma([if x == 0 { 0u8 } else { 128 }]))
        .save(&p)
        .unwrap();
    let img = load_image(&p, &LoadConfig::new(3, 4)).unwrap();
    assert_eq!(img.len(), 3 * 3 * 4);
    for c in 0..3 {
        assert_eq!(at(&img, 3, 4, c, 0, 1), 0.0);
        assert!((at(&img, 3, 4, c, 2, 1) - 128.0 / 255.0).abs() < 1e-6);
    }
}

#[test]
fn gray16_uses_the_full_range() {
    let dir = TempDir::new("data-decode", "gray16");
    let p = dir.path("g16.png");
    let values = [0u16, 32768, 65535, 1000];
    ImageBuffer::from_fn(4, 1, |x, _| Luma([values[x as usize]]))
        .save(&p)
        .unwrap();
    let img = load_image(&p, &LoadConfig::new(1, 4)).unwrap();
    for c in 0..3 {
        for (x, &v) in values.iter().enumerate() {
            assert!((at(&img, 1, 4, c, x, 0) - v as f32 / 65535.0).abs() < 1e-6);
        }
    }
    assert_eq!(at(&img, 1, 4, 0, 2, 0), 1.0);
}

#[test]
fn gray_alpha_and_rgba_drop_alpha() {
    let dir = TempDir::new("data-decode", "alpha");
    let la = dir.path("la.png");
    ImageBuffer::from_pixel(2, 2, LumaA([200u8, 0]))
        .save(&la)
        .unwrap();
    let img = load_image(&la, &LoadConfig::new(2, 2)).unwrap();
    assert!(img.iter().all(|&v| (v - 200.0 / 255.0).abs() < 1e-6));

    let rgba = dir.path("rgba.png");
    ImageBuffer::from_pixel(2, 2, Rgba([255u8, 0, 51, 10]))
        .save(&rgba)
        .unwrap();
    let img = load_image(&rgba, &LoadConfig::new(2, 2)).unwrap();
    assert_eq!(at(&img, 2, 2, 0, 1, 1), 1.0);
    assert_eq!(at(&img, 2, 2, 1, 1, 1), 0.0);
    assert!((at(&img, 2, 2, 2, 1, 1) - 0.2).abs() < 1e-6);

    let rgba16 = dir.path("rgba16.png");
    ImageBuffer::from_pixel(2, 2, Rgba([65535u16, 0, 13107, 0]))
        .save(&rgba16)
        .unwrap();
    let img = load_image(&rgba16, &LoadConfig::new(2, 2)).unwrap();
    assert_eq!(at(&img, 2, 2, 0, 0, 0), 1.0);
    assert_eq!(at(&img, 2, 2, 1, 0, 0), 0.0);
    assert!((at(&img, 2, 2, 2, 0, 0) - 0.2).abs() < 1e-6);
}

#[test]
fn rgb_channel_order_is_kept_in_png_bmp_and_tiff() {
    let dir = TempDir::new("data-decode", "rgb");
    let pixel = |x: u32, y: u32| Rgb([(x * 60) as u8, (y * 80) as u8, 255u8]);
    for ext in ["png", "bmp", "tiff"] {
        let p = dir.path(&format!("rgb.{ext}"));
        ImageBuffer::from_fn(3, 2, pixel).save(&p).unwrap();
        let img = load_image(&p, &LoadConfig::new(2, 3)).unwrap();
        for y in 0..2 {
            for x in 0..3 {
                let expected = pixel(x as u32, y as u32);
                for c in 0..3 {
                    let want = expected.0[c] as f32 / 255.0;
                    assert!(
                        (at(&img, 2, 3, c, x, y) - want).abs() < 1e-6,
                        "{ext} pixel ({x},{y}) channel {c}"
                    );
                }
            }
        }
    }
    let p16 = dir.path("rgb16.tiff");
    ImageBuffer::from_pixel(2, 2, Rgb([65535u16, 0, 32768]))
        .save(&p16)
        .unwrap();
    let img = load_image(&p16, &LoadConfig::new(2, 2)).unwrap();
    assert_eq!(at(&img, 2, 2, 0, 0, 0), 1.0);
    assert_eq!(at(&img, 2, 2, 1, 0, 0), 0.0);
    assert!((at(&img, 2, 2, 2, 0, 0) - 32768.0 / 65535.0).abs() < 1e-6);
}

#[test]
fn palette_png_expands_to_its_colours() {
    let dir = TempDir::new("data-decode", "palette");
    let p = dir.path("pal.png");
    let palette = [255u8, 0, 0, 0, 255, 0, 10, 20, 30];
    write_palette_png(&p, 3, 1, &palette, &[2, 0, 1]);
    let img = load_image(&p, &LoadConfig::new(1, 3)).unwrap();
    for (x, &index) in [2usize, 0, 1].iter().enumerate() {
        for c in 0..3 {
            let want = palette[index * 3 + c] as f32 / 255.0;
            assert!((at(&img, 1, 3, c, x, 0) - want).abs() < 1e-6);
        }
    }
}

#[test]
fn jpeg_constant_gray_decodes_close_to_its_value() {
    let dir = TempDir::new("data-decode", "jpeg");
    let p = dir.path("g.jpg");
    ImageBuffer::from_pixel(16, 16, Luma([100u8]))
        .save(&p)
        .unwrap();
    let img = load_image(&p, &LoadConfig::new(16, 16)).unwrap();
    assert!(img.iter().all(|&v| (v - 100.0 / 255.0).abs() < 2.0 / 255.0));
}

#[test]
fn resizing_a_constant_image_keeps_it_constant() {
    let dir = TempDir::new("data-decode", "constant");
    let big = dir.path("big.png");
    ImageBuffer::from_pixel(300, 200, Rgb([30u8, 128, 250]))
        .save(&big)
        .unwrap();
    let small = dir.path("small.png");
    ImageBuffer::from_pixel(10, 7, Rgb([30u8, 128, 250]))
        .save(&small)
        .unwrap();
    for p in [big, small] {
        let img = load_image(&p, &LoadConfig::new(64, 48)).unwrap();
        assert_eq!(img.len(), 3 * 64 * 48);
        for (c, want) in [30.0f32, 128.0, 250.0].iter().enumerate() {
            let plane = &img[c * 64 * 48..(c + 1) * 64 * 48];
            assert!(plane.iter().all(|&v| (v - want / 255.0).abs() < 1e-5));
        }
    }
}

#[test]
fn downscaling_is_antialiased() {
    // A one-pixel checkerboard downscaled by 3: a non-antialiased bilinear resize would land on
    // single pixels and give 0 or 1, an antialiased one averages to about one half.
    let dir = TempDir::new("data-decode", "antialias");
    let p = dir.path("checker.png");
    ImageBuffer::from_fn(48, 48, |x, y| {
        Luma([if (x + y) % 2 == 0 { 255u8 } else { 0 }])
    })
    .save(&p)
    .unwrap();
    let img = load_image(&p, &LoadConfig::new(16, 16)).unwrap();
    assert!(img.iter().all(|&v| (0.3..=0.7).contains(&v)), "{img:?}");
}

#[test]
fn an_image_at_the_model_size_is_returned_unchanged() {
    let dir = TempDir::new("data-decode", "same-size");
    let p = dir.path("same.png");
    let pixel = |x: u32, y: u32| Rgb([(x * 7 + y) as u8, (x * y) as u8, (255 - x * 3) as u8]);
    ImageBuffer::from_fn(32, 24, pixel).save(&p).unwrap();
    let img = load_image(&p, &LoadConfig::new(24, 32)).unwrap();
    for y in 0..24 {
        for x in 0..32 {
            for c in 0..3 {
                let want = pixel(x as u32, y as u32).0[c] as f32 / 255.0;
                assert_eq!(at(&img, 24, 32, c, x, y), want);
            }
        }
    }
}

#[test]
fn masks_are_binarised_and_resized_with_nearest() {
    let dir = TempDir::new("data-decode", "mask");
    let image = dir.path("img.png");
    ImageBuffer::from_pixel(4, 4, Luma([9u8]))
        .save(&image)
        .unwrap();
    // Values 0, 127, 128 and 255: anomalous from half the full scale (128 of 255) up, so that
    // the compression noise of a JPEG mask and the grey rim of an antialiased one do not count.
    let mask = dir.path("img_mask.png");
    ImageBuffer::from_fn(4, 4, |x, y| {
        Luma([[0u8, 128, 255, 127][((x + y) % 4) as usize]])
    })
    .save(&mask)
    .unwrap();
    let same = load_sample(
        &entry(image.clone(), Some(mask.clone()), true),
        &LoadConfig::new(4, 4),
        true,
    )
    .unwrap();
    let m = same.mask.unwrap();
    for y in 0..4 {
        for x in 0..4 {
            let want = if matches!((x + y) % 4, 1 | 2) {
                1.0
            } else {
                0.0
            };
            assert_eq!(m[y * 4 + x], want);
        }
    }
    // Nearest to 2x2 reads input pixels (0,0), (2,0), (0,2) and (2,2).
    let half = load_sample(
        &entry(image, Some(mask), true),
        &LoadConfig::new(2, 2),
        true,
    )
    .unwrap();
    assert_eq!(half.mask.unwrap(), vec![0.0, 1.0, 1.0, 0.0]);

    // A 0/1 label image (largest value 1) marks its ones, in 8 and in 16 bits.
    let label = dir.path("label_mask.png");
    ImageBuffer::from_fn(4, 1, |x, _| Luma([(x % 2) as u8]))
        .save(&label)
        .unwrap();
    let label_image = dir.path("label.png");
    ImageBuffer::from_pixel(4, 1, Luma([9u8]))
        .save(&label_image)
        .unwrap();
    let s = load_sample(
        &entry(label_image, Some(label), true),
        &LoadConfig::new(1, 4),
        true,
    )
    .unwrap();
    assert_eq!(s.mask.unwrap(), vec![0.0, 1.0, 0.0, 1.0]);
    // An RGB mask counts its brightest channel; a JPEG-like noisy mask keeps only its defect.
    let noisy = dir.path("noisy_mask.png");
    ImageBuffer::from_fn(4, 1, |x, _| {
        Rgb([
            [3u8, 0, 250, 90][x as usize],
            0,
            [0u8, 200, 0, 9][x as usize],
        ])
    })
    .save(&noisy)
    .unwrap();
    let noisy_image = dir.path("noisy.png");
    ImageBuffer::from_pixel(4, 1, Luma([9u8]))
        .save(&noisy_image)
        .unwrap();
    let s = load_sample(
        &entry(noisy_image, Some(noisy), true),
        &LoadConfig::new(1, 4),
        true,
    )
    .unwrap();
    assert_eq!(s.mask.unwrap(), vec![0.0, 1.0, 1.0, 0.0]);

    // A 16-bit 0/1 label image too.
    let image16 = dir.path("b.png");
    ImageBuffer::from_pixel(2, 1, Luma([9u8]))
        .save(&image16)
        .unwrap();
    let mask16 = dir.path("b_mask.png");
    ImageBuffer::from_fn(2, 1, |x, _| Luma([x as u16]))
        .save(&mask16)
        .unwrap();
    let s = load_sample(
        &entry(image16, Some(mask16), true),
        &LoadConfig::new(1, 2),
        true,
    )
    .unwrap();
    assert_eq!(s.mask.unwrap(), vec![0.0, 1.0]);
}

#[test]
fn normal_images_get_zero_masks_and_no_mask_without_masks() {
    let dir = TempDir::new("data-decode", "zero-mask");
    let image = dir.path("good.png");
    ImageBuffer::from_pixel(3, 3, Luma([9u8]))
        .save(&image)
        .unwrap();
    let e = entry(image, None, false);
    let with = load_sample(&e, &LoadConfig::new(2, 2), true).unwrap();
    assert_eq!(with.mask, Some(vec![0.0; 4]));
    let without = load_sample(&e, &LoadConfig::new(2, 2), false).unwrap();
    assert_eq!(without.mask, None);
    assert!(!without.label);
    assert_eq!(without.defect_type, "good");
}

/// Asserts that the error message names the file.
fn assert_names(err: &DataError, path: &Path) {
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dir = TempDir::new("data-decode", "errors");
    let cfg = LoadConfig::new(8, 8);

    let empty = dir.path("empty.png");
    fs::write(&empty, b"").unwrap();
    let err = load_image(&empty, &cfg).unwrap_err();
    assert!(
        matches!(err, DataError::Image(ImageError::EmptyFile { .. })),
        "{err:?}"
    );
    assert_names(&err, &empty);

    let text = dir.path("text.png");
    fs::write(&text, b"this is not an image at all").unwrap();
    let err = load_image(&text, &cfg).unwrap_err();
    assert!(
        matches!(err, DataError::Image(ImageError::NotAnImage { .. })),
        "{err:?}"
    );
    assert_names(&err, &text);

    let good = dir.path("good.png");
    ImageBuffer::from_fn(64, 64, |x, y| Rgb([(x * 3) as u8, (y * 3) as u8, 7u8]))
        .save(&good)
        .unwrap();
    let bytes = fs::read(&good).unwrap();
    let truncated = dir.path("truncated.png");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_image(&truncated, &cfg).unwrap_err();
    assert!(
        matches!(err, DataError::Image(ImageError::Decode { .. })),
        "{err:?}"
    );
    assert_names(&err, &truncated);

    let missing = dir.path("missing.png");
    let err = load_image(&missing, &cfg).unwrap_err();
    assert!(
        matches!(err, DataError::Image(ImageError::Io { .. })),
        "{err:?}"
    );
    assert_names(&err, &missing);

    let limited = LoadConfig {
        max_pixels: 1000,
        ..cfg
    };
    let err = load_image(&good, &limited).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Image(ImageError::TooLarge {
                width: 64,
                height: 64,
                limit: 1000,
                ..
            })
        ),
        "{err:?}"
    );
    assert_names(&err, &good);

    let mask = dir.path("good_mask.png");
    ImageBuffer::from_pixel(32, 64, Luma([255u8]))
        .save(&mask)
        .unwrap();
    let err = load_sample(&entry(good.clone(), Some(mask.clone()), true), &cfg, true).unwrap_err();
    assert!(
        matches!(err, DataError::Image(ImageError::MaskSize { .. })),
        "{err:?}"
    );
    assert_names(&err, &mask);
    assert_names(&err, &good);

    let err = load_sample(&entry(good.clone(), None, true), &cfg, true).unwrap_err();
    assert!(matches!(err, DataError::MissingMask { .. }), "{err:?}");
    assert_names(&err, &good);

    let err = load_image(&good, &LoadConfig::new(0, 8)).unwrap_err();
    assert!(matches!(err, DataError::Config(_)), "{err:?}");
}

#[test]
fn on_error_skip_reports_and_fail_returns_the_first_error() {
    let dir = TempDir::new("data-decode", "policy");
    let a = dir.path("a.png");
    let b = dir.path("b.png");
    let c = dir.path("c.png");
    let d = dir.path("d.png");
    ImageBuffer::from_pixel(4, 4, Luma([10u8]))
        .save(&a)
        .unwrap();
    fs::write(&b, b"").unwrap();
    fs::write(&c, b"not an image").unwrap();
    ImageBuffer::from_pixel(4, 4, Luma([20u8]))
        .save(&d)
        .unwrap();
    let entries: Vec<Entry> = [&a, &b, &c, &d]
        .iter()
        .map(|p| entry(p.to_path_buf(), None, false))
        .collect();

    let fail = LoadConfig::new(2, 2);
    let err = load_batch(&entries, &fail, false).unwrap_err();
    assert!(
        matches!(err, DataError::Image(ImageError::EmptyFile { .. })),
        "{err:?}"
    );
    assert_names(&err, &b);

    let skip = LoadConfig {
        on_error: OnError::Skip,
        ..fail
    };
    let batch = load_batch(&entries, &skip, false).unwrap();
    assert_eq!(batch.len(), 2);
    assert_eq!(batch.paths, vec![a.clone(), d.clone()]);
    assert_eq!(batch.images.len(), 2 * 3 * 4);
    assert!((batch.images[0] - 10.0 / 255.0).abs() < 1e-6);
    assert!((batch.images[12] - 20.0 / 255.0).abs() < 1e-6);
    assert_eq!(batch.skipped.len(), 2);
    assert_names(&batch.skipped[0], &b);
    assert_names(&batch.skipped[1], &c);
}

#[test]
fn batches_convert_to_tensors_of_the_right_shape() {
    let dir = TempDir::new("data-decode", "tensors");
    let a = dir.path("a.png");
    let am = dir.path("a_mask.png");
    let b = dir.path("b.png");
    ImageBuffer::from_pixel(5, 5, Rgb([1u8, 2, 3]))
        .save(&a)
        .unwrap();
    ImageBuffer::from_pixel(5, 5, Luma([255u8]))
        .save(&am)
        .unwrap();
    ImageBuffer::from_pixel(6, 6, Rgb([4u8, 5, 6]))
        .save(&b)
        .unwrap();
    let entries = vec![entry(a, Some(am), true), entry(b, None, false)];
    let batch = load_batch(&entries, &LoadConfig::new(4, 3), true).unwrap();
    assert_eq!(batch.labels, vec![true, false]);
    let (images, masks) = batch.into_tensors(&candle_core::Device::Cpu).unwrap();
    assert_eq!(images.dims(), &[2, 3, 4, 3]);
    let masks = masks.unwrap();
    assert_eq!(masks.dims(), &[2, 1, 4, 3]);
    let sums: Vec<f32> = masks
        .flatten_from(1)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(sums, vec![12.0, 0.0]);
}
