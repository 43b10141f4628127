//! Writes PNG grids of phase-2 masks and phase-3 smudged images.
//!
//! `cargo run --release -p dsr-augment --example preview -- --data DIR --recipe anomalib|original --n 16 --out DIR`
//!
//! `--data` is an MVTec-style category folder (images are read from `DIR/train/good`, or from `DIR` itself
//! if it has no such folder); images are resized to `--size` (default 256) squared. Optional `--seed S`.

use std::path::{Path, PathBuf};

use dsr_augment::preview::{image_grid, mask_grid, RgbImage};
use dsr_augment::{Image, ImageBatch, MaskGenerator, Recipe, SmudgeGenerator};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Args {
    data: PathBuf,
    recipe: Recipe,
    n: usize,
    out: PathBuf,
    size: usize,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut data = None;
    let mut recipe = Recipe::default();
    let mut n = 16;
    let mut out = PathBuf::from("preview");
    let mut size = 256;
    let mut seed = 0;
    let mut i = 0;
    while i < raw.len() {
        let value = raw
            .get(i + 1)
            .ok_or_else(|| format!("{} needs a value", raw[i]))?;
        match raw[i].as_str() {
            "--data" => data = Some(PathBuf::from(value)),
            "--recipe" => recipe = value.parse().map_err(|e| format!("{e}"))?,
            "--n" => {
                n = value
                    .parse()
                    .map_err(|_| "--n takes a number".to_string())?
            }
            "--out" => out = PathBuf::from(value),
            "--size" => {
                size = value
                    .parse()
                    .map_err(|_| "--size takes a number".to_string())?
            }
            "--seed" => {
                seed = value
                    .parse()
                    .map_err(|_| "--seed takes a number".to_string())?
            }
            other => return Err(format!("unknown argument {other}")),
        }
        i += 2;
    }
    let data = data.ok_or("--data DIR is required")?;
    Ok(Args {
        data,
        recipe,
        n,
        out,
        size,
        seed,
    })
}

fn load_images(dir: &Path, n: usize, size: usize) -> Result<Vec<Image>, String> {
    let good = dir.join("train").join("good");
    let dir = if good.is_dir() {
        good
    } else {
        dir.to_path_buf()
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no PNG or JPEG images in {}", dir.display()));
    }
    (0..n)
        .map(|i| {
            let path = &files[i % files.len()];
            let img = image::open(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .to_rgb8();
            let img = image::imageops::resize(
                &img,
                size as u32,
                size as u32,
                image::imageops::FilterType::Triangle,
            );
            Image::from_rgb8(size, size, img.as_raw()).map_err(|e| e.to_string())
        })
        .collect()
}

fn save(grid: &RgbImage, path: &Path) -> Result<(), String> {
    image::save_buffer(
        path,
        &grid.pixels,
        grid.width as u32,
        grid.height as u32,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| format!("{}: {e}", path.display()))
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let columns = (args.n as f64).sqrt().ceil() as usize;

    let masks = MaskGenerator::new(args.recipe)
        .generate_batch(args.n, args.size, args.size, &mut rng)
        .map_err(|e| e.to_string())?;
    let mask_path = args.out.join(format!("phase2_masks_{}.png", args.recipe));
    save(&mask_grid(&masks, columns), &mask_path)?;

    let images = ImageBatch::from_images(&load_images(&args.data, args.n, args.size)?)
        .map_err(|e| e.to_string())?;
    let smudger = SmudgeGenerator::new(args.recipe, &mut rng);
    let (augmented, smudge_masks) = smudger
        .apply_batch(&images, &mut rng)
        .map_err(|e| e.to_string())?;
    let image_path = args.out.join(format!("phase3_images_{}.png", args.recipe));
    save(
        &image_grid(&augmented, Some(&smudge_masks), columns),
        &image_path,
    )?;
    let smudge_mask_path = args.out.join(format!("phase3_masks_{}.png", args.recipe));
    save(&mask_grid(&smudge_masks, columns), &smudge_mask_path)?;
    println!(
        "wrote {}, {} and {}",
        mask_path.display(),
        image_path.display(),
        smudge_mask_path.display()
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("preview: {e}");
        std::process::exit(1);
    }
}
