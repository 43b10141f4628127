//! Bad and unusual images and data folders: each input either loads (converted to RGB) or fails
//! with one line naming the file and what to fix, never a panic. The test prints every outcome
//! (the table in docs/reliability.md).

use std::fs;
use std::path::{Path, PathBuf};

use dsr_eval::image::{decode_checked, ImageError};
use dsr_train::data::{
    list_images, load_image, load_images, DataError, Entry, FolderDataset, FolderLayout,
    LoadConfig, MvtecDataset, OnError, DEFAULT_MAX_PIXELS,
};
use image::{ImageBuffer, ImageFormat, Luma, LumaA, Rgb, RgbImage, Rgba};

mod tempdir;
use tempdir::TempDir;

/// Writes bits most significant first, with JPEG's 0xFF byte stuffing.
struct Bits {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

impl Bits {
    fn put(&mut self, value: u32, len: u32) {
        for i in (0..len).rev() {
            self.acc = (self.acc << 1) | ((value >> i) & 1);
            self.n += 1;
            if self.n == 8 {
                self.byte();
            }
        }
    }
    fn byte(&mut self) {
        let b = self.acc as u8;
        self.out.push(b);
        if b == 0xff {
            self.out.push(0);
        }
        self.acc = 0;
        self.n = 0;
    }
    fn finish(mut self) -> Vec<u8> {
        while self.n != 0 {
            self.put(1, 1);
        }
        self.out
    }
}

/// A minimal baseline JPEG of 8×8 pixels with four components (Adobe CMYK, no colour transform),
/// each a constant `values[c]` ∈ {1, 128, 255}: one DC-only block per component.
fn cmyk_jpeg(values: [u8; 4]) -> Vec<u8> {
    let mut j = vec![0xff, 0xd8];
    // APP14 "Adobe", version 100, flags 0, transform 0 (CMYK stored as is).
    j.extend_from_slice(&[0xff, 0xee, 0, 14]);
    j.extend_from_slice(b"Adobe");
    j.extend_from_slice(&[0, 100, 0, 0, 0, 0, 0]);
    // One quantisation table of ones.
    j.extend_from_slice(&[0xff, 0xdb, 0, 67, 0]);
    j.extend_from_slice(&[1u8; 64]);
    // SOF0: 8 bits, 8×8, 4 components, no subsampling, table 0.
    j.extend_from_slice(&[0xff, 0xc0, 0, 20, 8, 0, 8, 0, 8, 4]);
    for id in 1..=4u8 {
        j.extend_from_slice(&[id, 0x11, 0]);
    }
    // DC table: category 0 = "0", category 10 = "10". AC table: end of block = "0".
    let mut counts = [0u8; 16];
    counts[0] = 1;
    counts[1] = 1;
    j.extend_from_slice(&[0xff, 0xc4, 0, 21, 0x00]);
    j.extend_from_slice(&counts);
    j.extend_from_slice(&[0, 10]);
    let mut counts = [0u8; 16];
    counts[0] = 1;
    j.extend_from_slice(&[0xff, 0xc4, 0, 20, 0x10]);
    j.extend_from_slice(&counts);
    j.push(0);
    // Scan of the four components.
    j.extend_from_slice(&[0xff, 0xda, 0, 14, 4]);
    for id in 1..=4u8 {
        j.extend_from_slice(&[id, 0x00]);
    }
    j.extend_from_slice(&[0, 63, 0]);
    let mut bits = Bits {
        out: Vec::new(),
        acc: 0,
        n: 0,
    };
    for v in values {
        // A sample is DC/8 + 128 with a quantiser of 1.
        match v {
            128 => bits.put(0, 1),
            255 => {
                bits.put(0b10, 2);
                bits.put(1016, 10);
            }
            1 => {
                bits.put(0b10, 2);
                bits.put(1023 - 1016, 10);
            }
            other => panic!("value {other} is not encodable here"),
        }
        bits.put(0, 1); // end of block
    }
    j.extend_from_slice(&bits.finish());
    j.extend_from_slice(&[0xff, 0xd9]);
    j
}

/// A PNG of `width`×`height` that stops after its header and the first bytes of its pixel stream
/// (a few dozen bytes whatever the size it claims).
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut p = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    p.extend_from_slice(&13u32.to_be_bytes());
    p.extend_from_slice(&ihdr);
    p.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // The start of a pixel stream (a zlib header only), so that the header can be read.
    let idat = b"IDAT\x78\x9c";
    p.extend_from_slice(&2u32.to_be_bytes());
    p.extend_from_slice(idat);
    p.extend_from_slice(&crc32(idat).to_be_bytes());
    p
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn textured(w: u32, h: u32) -> RgbImage {
    ImageBuffer::from_fn(w, h, |x, y| Rgb([(x * 9) as u8, (y * 5) as u8, 77]))
}

fn encode(img: &image::DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Loads `path` at 8×8, prints the outcome line and returns it.
fn outcome(name: &str, path: &Path) -> Result<Vec<f32>, DataError> {
    let r = load_image(path, &LoadConfig::new(8, 8));
    match &r {
        Ok(v) => println!("| {name} | loads: RGB, {} values in [0, 1] |", v.len()),
        Err(e) => {
            let line = e.to_string();
            println!("| {name} | error: `{line}` |");
            assert!(line.contains(&path.display().to_string()), "{line}");
            assert!(!line.contains('\n'), "{line}");
        }
    }
    r
}

#[test]
fn every_kind_of_image_loads_or_names_the_file() {
    let dir = TempDir::new("bad-inputs", "kinds");
    let rgb = image::DynamicImage::ImageRgb8(textured(16, 12));
    let png = encode(&rgb, ImageFormat::Png);
    let jpeg = encode(&rgb, ImageFormat::Jpeg);
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path(name);
        fs::write(&p, bytes).unwrap();
        p
    };

    // Works, converted to RGB.
    let loads: Vec<(&str, PathBuf)> = vec![
        ("RGB PNG", write("rgb.png", &png)),
        ("PNG bytes named .jpg", write("png-inside.jpg", &png)),
        ("JPEG bytes named .png", write("jpeg-inside.png", &jpeg)),
        ("JPEG bytes named .bmp", write("jpeg-inside.bmp", &jpeg)),
        (
            "16-bit RGB PNG",
            write(
                "rgb16.png",
                &encode(
                    &image::DynamicImage::ImageRgb16(ImageBuffer::from_pixel(
                        5,
                        5,
                        Rgb([65535u16, 0, 32768]),
                    )),
                    ImageFormat::Png,
                ),
            ),
        ),
        (
            "16-bit grey PNG",
            write(
                "gray16.png",
                &encode(
                    &image::DynamicImage::ImageLuma16(ImageBuffer::from_pixel(
                        5,
                        5,
                        Luma([1000u16]),
                    )),
                    ImageFormat::Png,
                ),
            ),
        ),
        (
            "RGBA PNG",
            write(
                "rgba.png",
                &encode(
                    &image::DynamicImage::ImageRgba8(ImageBuffer::from_pixel(
                        5,
                        5,
                        Rgba([10u8, 20, 30, 0]),
                    )),
                    ImageFormat::Png,
                ),
            ),
        ),
        (
            "grey + alpha PNG",
            write(
                "la.png",
                &encode(
                    &image::DynamicImage::ImageLumaA8(ImageBuffer::from_pixel(
                        5,
                        5,
                        LumaA([10u8, 200]),
                    )),
                    ImageFormat::Png,
                ),
            ),
        ),
        (
            "8-bit grey PNG",
            write(
                "gray.png",
                &encode(
                    &image::DynamicImage::ImageLuma8(ImageBuffer::from_pixel(5, 5, Luma([99u8]))),
                    ImageFormat::Png,
                ),
            ),
        ),
        (
            "grey JPEG",
            write(
                "gray.jpg",
                &encode(
                    &image::DynamicImage::ImageLuma8(ImageBuffer::from_pixel(16, 16, Luma([99u8]))),
                    ImageFormat::Jpeg,
                ),
            ),
        ),
        (
            "1×1 PNG",
            write(
                "one.png",
                &encode(
                    &image::DynamicImage::ImageRgb8(ImageBuffer::from_pixel(
                        1,
                        1,
                        Rgb([1u8, 2, 3]),
                    )),
                    ImageFormat::Png,
                ),
            ),
        ),
        ("BMP", write("rgb.bmp", &encode(&rgb, ImageFormat::Bmp))),
        ("TIFF", write("rgb.tif", &encode(&rgb, ImageFormat::Tiff))),
    ];
    for (name, path) in &loads {
        let v = outcome(name, path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(v.len(), 3 * 64);
        assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
    }
    // A palette PNG.
    let pal = dir.path("palette.png");
    {
        let file = fs::File::create(&pal).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 2, 1);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![255, 0, 0, 0, 0, 255]);
        enc.write_header()
            .unwrap()
            .write_image_data(&[0, 1])
            .unwrap();
    }
    let v = outcome("palette PNG", &pal).unwrap();
    assert_eq!((v[0], v[64], v[128 + 7]), (1.0, 0.0, 1.0));

    // CMYK JPEG (Adobe, inverted as Photoshop writes it): converted to RGB.
    let cmyk = write("cmyk.jpg", &cmyk_jpeg([255, 1, 128, 255]));
    let decoded = decode_checked(&cmyk, DEFAULT_MAX_PIXELS).unwrap();
    println!("CMYK JPEG decodes as {:?}", decoded.color());
    let v = outcome("CMYK JPEG (Adobe APP14)", &cmyk).unwrap();
    let (r, g, b) = (v[0], v[64], v[128]);
    println!("CMYK (255, 1, 128, 255) -> RGB ({r:.3}, {g:.3}, {b:.3})");
    assert!(v[..64].iter().all(|&x| x == r) && v[64..128].iter().all(|&x| x == g));
    assert!(
        (r - 1.0).abs() < 0.02 && g < 0.02 && (b - 0.5).abs() < 0.02,
        "{r} {g} {b}"
    );

    // Errors naming the file.
    let errors: Vec<(&str, PathBuf, &str)> = vec![
        (
            "zero bytes",
            write("empty.png", b""),
            "is empty (zero bytes)",
        ),
        (
            "text named .png",
            write("text.png", b"hello, I am not an image"),
            "is not a readable image",
        ),
        (
            "truncated PNG (half)",
            write("half.png", &png[..png.len() / 2]),
            "could not be decoded (truncated or corrupt)",
        ),
        (
            "truncated PNG (header only)",
            write("head.png", &png[..40]),
            "unexpected end of file",
        ),
        (
            "truncated JPEG (half)",
            write("half.jpg", &jpeg[..jpeg.len() / 2]),
            "Not enough bytes",
        ),
        (
            "PNG signature only",
            write("sig.png", &png[..8]),
            "is not a readable image",
        ),
        (
            "20000×20000 PNG (header only)",
            write("huge.png", &png_header_only(20000, 20000)),
            "is 20000x20000 pixels, more than the limit of 100000000 pixels",
        ),
        (
            "0×0 PNG header",
            write("zero.png", &png_header_only(0, 0)),
            "is not a readable image",
        ),
    ];
    for (name, path, needle) in &errors {
        let e = outcome(name, path).unwrap_err();
        assert!(e.to_string().contains(needle), "{name}: {e}");
    }
    // A smaller pixel limit refuses by the header too.
    let e = load_image(
        &loads[0].1,
        &LoadConfig {
            max_pixels: 100,
            ..LoadConfig::new(8, 8)
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Image(ImageError::TooLarge {
                width: 16,
                height: 12,
                limit: 100,
                ..
            })
        ),
        "{e:?}"
    );

    // A folder where a file is expected.
    let folder = dir.path("folder.png");
    fs::create_dir_all(&folder).unwrap();
    let e = outcome("a folder named .png", &folder).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Image(ImageError::Io { .. } | ImageError::NotAnImage { .. })
        ),
        "{e:?}"
    );
}

/// Whether this process can read files whatever their permissions (root).
fn permissions_are_bypassed(dir: &TempDir) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.path("probe");
    fs::write(&probe, b"x").unwrap();
    fs::set_permissions(&probe, fs::Permissions::from_mode(0o000)).unwrap();
    let readable = fs::read(&probe).is_ok();
    let _ = fs::remove_file(&probe);
    readable
}

#[test]
fn unreadable_files_and_folders_are_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("bad-inputs", "perm");
    let img = dir.path("locked.png");
    textured(8, 8).save(&img).unwrap();
    let sub = dir.path("locked-dir");
    fs::create_dir_all(&sub).unwrap();
    textured(8, 8).save(sub.join("a.png")).unwrap();
    if permissions_are_bypassed(&dir) {
        println!(
            "permission test skipped: this process reads chmod-000 files (running as root); \
             the same error path is covered by reading a folder and listing a file below"
        );
    } else {
        fs::set_permissions(&img, fs::Permissions::from_mode(0o000)).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o000)).unwrap();
        let e = load_image(&img, &LoadConfig::new(8, 8)).unwrap_err();
        assert!(
            matches!(e, DataError::Image(ImageError::Io { .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains("locked.png"), "{e}");
        let e = list_images(&sub).unwrap_err();
        assert!(e.to_string().contains("locked-dir"), "{e}");
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The same I/O error path without permissions: listing a file as a folder.
    let e = list_images(&img).unwrap_err();
    println!("| listing a file as a folder | error: `{e}` |");
    assert!(matches!(e, DataError::Io { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("cannot read {}", img.display())),
        "{e}"
    );
}

fn gray(path: &Path, v: u8) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    ImageBuffer::from_pixel(6, 4, Luma([v])).save(path).unwrap();
}

#[test]
fn bad_data_folders_say_what_to_fix() {
    let tmp = TempDir::new("bad-inputs", "folders");
    let report = |name: &str, e: &DataError| println!("| {name} | error: `{e}` |");

    // Masks: two files with one stem in the mask folder.
    let root = tmp.path("dup-mask");
    gray(&root.join("train/good/000.png"), 1);
    gray(&root.join("test/good/000.png"), 1);
    gray(&root.join("test/crack/000.png"), 1);
    gray(&root.join("ground_truth/crack/000_mask.png"), 255);
    gray(&root.join("ground_truth/crack/000_mask.bmp"), 255);
    let e = MvtecDataset::open(&root, None).unwrap_err();
    report("two masks with one stem", &e);
    assert!(matches!(e, DataError::DuplicateStem { .. }), "{e:?}");
    assert!(e.to_string().contains("000_mask"), "{e}");

    // Same stem, two extensions, in a defect folder (mask lookup would be ambiguous).
    let root = tmp.path("dup-image");
    gray(&root.join("train/good/000.png"), 1);
    gray(&root.join("test/crack/a.png"), 1);
    gray(&root.join("test/crack/a.jpg"), 1);
    gray(&root.join("ground_truth/crack/a_mask.png"), 255);
    let e = MvtecDataset::open(&root, None).unwrap_err();
    report("a.png and a.jpg in one defect folder", &e);
    assert!(e.to_string().contains("duplicate file stem \"a\""), "{e}");

    // Empty training folder (only non-image files in it).
    let root = tmp.path("empty-train");
    fs::create_dir_all(root.join("train/good")).unwrap();
    fs::write(root.join("train/good/notes.txt"), b"x").unwrap();
    fs::create_dir_all(root.join("test/good")).unwrap();
    let e = MvtecDataset::open(&root, None).unwrap_err();
    report("train/good without images", &e);
    assert!(matches!(e, DataError::EmptyTrain { .. }), "{e:?}");

    // Folder layout: every normal image moved to the test split leaves no training image.
    let normal = tmp.path("normal");
    gray(&normal.join("a.png"), 1);
    let layout = FolderLayout {
        normal_split_ratio: 1.0,
        ..FolderLayout::new(&normal, None)
    };
    let e = FolderDataset::open(&layout).unwrap_err();
    report("folder layout, normal_split_ratio 1.0", &e);
    assert!(matches!(e, DataError::EmptyTrain { .. }), "{e:?}");

    // Folder layout: a missing mask, and a mask folder that is a file.
    let abnormal = tmp.path("abnormal");
    gray(&abnormal.join("x.png"), 1);
    let masks = tmp.path("masks");
    fs::create_dir_all(&masks).unwrap();
    let layout = FolderLayout {
        mask_dir: Some(masks.clone()),
        ..FolderLayout::new(&normal, Some(abnormal.clone()))
    };
    let e = FolderDataset::open(&layout).unwrap_err();
    report("folder layout, abnormal image without mask", &e);
    assert!(matches!(e, DataError::MissingMask { .. }), "{e:?}");
    let layout = FolderLayout {
        mask_dir: Some(abnormal.join("x.png")),
        ..FolderLayout::new(&normal, Some(abnormal))
    };
    let e = FolderDataset::open(&layout).unwrap_err();
    report("folder layout, mask folder is a file", &e);
    assert!(matches!(e, DataError::MissingFolder { .. }), "{e:?}");
}

#[test]
fn skip_or_fail_over_a_set_of_images() {
    let dir = TempDir::new("bad-inputs", "policy");
    let good = dir.path("good.png");
    textured(8, 8).save(&good).unwrap();
    let bad = dir.path("bad.png");
    fs::write(&bad, b"not an image").unwrap();
    let entry = |p: &Path| Entry {
        path: p.to_path_buf(),
        mask_path: None,
        label: false,
        defect_type: "good".into(),
    };
    let both = [entry(&good), entry(&bad)];
    let fail = LoadConfig::new(8, 8);
    let e = load_images(&both, &fail, false).unwrap_err();
    assert!(e.to_string().contains("bad.png"), "{e}");
    let skip = LoadConfig {
        on_error: OnError::Skip,
        ..fail
    };
    let batch = load_images(&both, &skip, false).unwrap();
    assert_eq!(batch.paths, vec![good.clone()]);
    assert_eq!(batch.skipped.len(), 1);
    assert!(batch.skipped[0].to_string().contains("bad.png"));
    let e = load_images(&[entry(&bad), entry(&bad)], &skip, false).unwrap_err();
    println!("| every training image unreadable (skip) | error: `{e}` |");
    assert!(
        matches!(e, DataError::NothingLoaded { count: 2, .. }),
        "{e:?}"
    );
    assert_eq!("skip".parse::<OnError>().unwrap(), OnError::Skip);
    assert_eq!(OnError::Fail.to_string(), "fail");
    assert!("maybe".parse::<OnError>().is_err());
}
