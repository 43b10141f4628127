//! `dsr augment`: PNG grids of what the model is trained on (phase-2 masks, phase-3 smudged
//! images with their masks).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use dsr_augment::preview::{image_grid, mask_grid, RgbImage};
use dsr_augment::{ImageBatch, MaskGenerator, Recipe, SmudgeGenerator};
use dsr_train::data::{list_images, load_image, LoadConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::guard::OutputDir;
use crate::io::png_bytes;

/// The options of `dsr augment`.
#[derive(Debug, clap::Args)]
pub struct AugmentArgs {
    /// A category folder (its train/good is used) or a folder of images.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// The recipe: original or anomalib.
    #[arg(long, value_name = "RECIPE", default_value = "anomalib")]
    pub recipe: Recipe,
    /// Samples per grid (1 to 4096; checked against the memory available).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = crate::parse_batch)]
    pub n: usize,
    /// The output folder.
    #[arg(long, value_name = "DIR", default_value = "augment-preview")]
    pub out: PathBuf,
    /// Image side (a multiple of 32).
    #[arg(long, value_name = "PX", default_value_t = 256)]
    pub size: usize,
    /// Seed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
}

fn save(grid: &RgbImage, out: &mut OutputDir, name: &str) -> Result<PathBuf> {
    let img = image::RgbImage::from_raw(grid.width as u32, grid.height as u32, grid.pixels.clone())
        .context("internal error: the grid buffer does not match its size")?;
    out.write(name, &png_bytes(&img)?)
}

/// Runs `dsr augment`; returns the files written.
pub fn run(a: &AugmentArgs) -> Result<Vec<PathBuf>> {
    dsr_core::config::validate_image_size(a.size, a.size)?;
    let good = a.data.join("train").join("good");
    let dir = if good.is_dir() { good } else { a.data.clone() };
    if !dir.is_dir() {
        bail!("the image folder {} does not exist", dir.display());
    }
    let files = list_images(&dir)?;
    if files.is_empty() {
        bail!("no image files in {}", dir.display());
    }
    // The images, their smudged copies (f32, 3 channels), two sets of masks, and the grids (8-bit
    // RGB): about 40 bytes a pixel of each sample.
    let pixels = (a.n as u64) * (a.size as u64) * (a.size as u64);
    dsr_core::memory::ensure_fits(
        pixels.saturating_mul(40),
        &format!("{} samples of {1}×{1}", a.n, a.size),
        "lower --n or --size",
    )
    .map_err(anyhow::Error::msg)?;
    let mut out = OutputDir::open(&a.out, &files, &[], "dsr augment")?;
    let names = [
        format!("phase2_masks_{}.png", a.recipe),
        format!("phase3_images_{}.png", a.recipe),
        format!("phase3_masks_{}.png", a.recipe),
    ];
    for name in &names {
        out.check(name)?;
    }
    let cfg = LoadConfig::new(a.size as u32, a.size as u32);
    let mut data = Vec::new();
    data.try_reserve_exact(a.n * 3 * a.size * a.size)
        .context("cannot reserve memory for the samples")?;
    for i in 0..a.n {
        data.extend(load_image(&files[i % files.len()], &cfg)?);
    }
    let images = ImageBatch::new(a.n, 3, a.size, a.size, data)?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let columns = (a.n as f64).sqrt().ceil() as usize;
    let masks = MaskGenerator::new(a.recipe).generate_batch(a.n, a.size, a.size, &mut rng)?;
    let smudger = SmudgeGenerator::new(a.recipe, &mut rng);
    let (smudged, smudge_masks) = smudger.apply_batch(&images, &mut rng)?;
    let written = vec![
        save(&mask_grid(&masks, columns), &mut out, &names[0])?,
        save(
            &image_grid(&smudged, Some(&smudge_masks), columns),
            &mut out,
            &names[1],
        )?,
        save(&mask_grid(&smudge_masks, columns), &mut out, &names[2])?,
    ];
    for p in &written {
        println!("wrote {}", p.display());
    }
    Ok(written)
}
