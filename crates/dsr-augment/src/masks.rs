//! Phase-2 masks: thresholded, rotated Perlin noise.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::buffers::{Image, ImageBatch, Mask, MaskBatch};
use crate::error::{check_size, AugmentError};
use crate::perlin::{perlin_noise_into, PerlinPadding};
use crate::warp::{rotation, warp_planes, Interp};
use crate::{child_seeds, Recipe};

/// Noise values strictly above this become mask pixels (both recipes).
pub(crate) const THRESHOLD: f32 = 0.5;

/// Probability with which the original code rotates the training image in phase 2.
pub const ORIGINAL_PHASE2_IMAGE_ROTATION_P: f32 = 0.4;

/// Probability with which the original code rotates the training image in phase 3.
pub const ORIGINAL_PHASE3_IMAGE_ROTATION_P: f32 = 0.3;

/// How one Perlin field is turned into a rotated noise field.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoiseRecipe {
    pub padding: PerlinPadding,
    pub rescue: bool,
    pub interp: Interp,
}

impl NoiseRecipe {
    /// anomalib `DsrAnomalyGenerator`: padded noise, rescue, nearest rotation.
    pub const ANOMALIB_PHASE2: NoiseRecipe = NoiseRecipe {
        padding: PerlinPadding::NextPowerOfTwo,
        rescue: true,
        interp: Interp::Nearest,
    };
    /// anomalib `PerlinAnomalyGenerator`: padded noise, rescue, bilinear rotation with torchvision fill.
    pub const ANOMALIB_PHASE3: NoiseRecipe = NoiseRecipe {
        padding: PerlinPadding::NextPowerOfTwo,
        rescue: true,
        interp: Interp::BilinearTorch,
    };
    /// Original code: noise on the exact size, no rescue, imgaug-style bilinear rotation.
    pub const ORIGINAL: NoiseRecipe = NoiseRecipe {
        padding: PerlinPadding::Exact,
        rescue: false,
        interp: Interp::BilinearZero,
    };
}

/// Draws scales 2^[0, 6) per axis, generates the noise, applies the rescue if the recipe has one and
/// rotates the field by U[−90°, 90°]. `scratch` and `out` hold `h * w` values each.
pub(crate) fn rotated_noise<R: Rng + ?Sized>(
    recipe: NoiseRecipe,
    h: usize,
    w: usize,
    rng: &mut R,
    scratch: &mut [f32],
    out: &mut [f32],
) -> Result<(), AugmentError> {
    let res_h = 1usize << rng.random_range(0..6u32);
    let res_w = 1usize << rng.random_range(0..6u32);
    perlin_noise_into(h, w, res_h, res_w, recipe.padding, rng, scratch)?;
    if recipe.rescue && !scratch.iter().any(|&v| v > THRESHOLD) {
        // anomalib rescales noise with no value above the threshold to [0, 1] and then to [−1, 1], so
        // its maximum becomes 1 and some pixels survive the threshold unless the rotation moves them out.
        let (lo, hi) = scratch
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let span = hi - lo;
        if span > 0.0 {
            for v in scratch.iter_mut() {
                *v = (*v - lo) / span * 2.0 - 1.0;
            }
        }
    }
    let angle = rng.random_range(-90.0f32..=90.0);
    warp_planes(scratch, out, h, w, &rotation(h, w, angle), recipe.interp);
    Ok(())
}

/// Writes `noise > 0.5` as 0/1 into `mask`.
pub(crate) fn threshold_into(noise: &[f32], mask: &mut [f32]) {
    for (m, &v) in mask.iter_mut().zip(noise) {
        *m = if v > THRESHOLD { 1.0 } else { 0.0 };
    }
}

/// The phase-2 mask generator (anomalib `DsrAnomalyGenerator` / original `TrainWholeImageDataset`).
///
/// Each mask is, with probability `p_anomalous`, the thresholded rotated Perlin noise of the recipe, and
/// otherwise all zero. Scales are 2^a × 2^b with a, b uniform in {0, …, 5}, the first along the rows.
///
/// * [`Recipe::Anomalib`]: noise generated on the next power of two and cropped; if no value exceeds 0.5
///   the noise is rescaled to [−1, 1]; rotation by U[−90°, 90°] with nearest interpolation.
/// * [`Recipe::Original`]: noise generated on the exact size; no rescue (the mask may be empty); rotation
///   with bilinear interpolation. The original code also rotates the training image with probability
///   [`ORIGINAL_PHASE2_IMAGE_ROTATION_P`]; use [`rotate_images_randomly`] for that.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskGenerator {
    /// Which reference the masks follow.
    pub recipe: Recipe,
    /// Probability that a mask is anomalous (non-zero); 0.5 in both references.
    pub p_anomalous: f32,
}

impl MaskGenerator {
    /// A generator with the reference probability 0.5.
    pub fn new(recipe: Recipe) -> Self {
        MaskGenerator {
            recipe,
            p_anomalous: 0.5,
        }
    }

    /// Sets the probability that a mask is anomalous.
    pub fn with_p_anomalous(mut self, p: f32) -> Result<Self, AugmentError> {
        if !(0.0..=1.0).contains(&p) {
            return Err(AugmentError::Probability(p));
        }
        self.p_anomalous = p;
        Ok(self)
    }

    /// Generates one `h`×`w` mask. Both sides must be positive multiples of 32.
    pub fn generate<R: Rng + ?Sized>(
        &self,
        h: usize,
        w: usize,
        rng: &mut R,
    ) -> Result<Mask, AugmentError> {
        check_size(h, w)?;
        let mut mask = Mask::zeros(h, w);
        let mut scratch = vec![0.0; h * w];
        self.generate_into(h, w, rng, &mut scratch, &mut mask.data)?;
        Ok(mask)
    }

    fn generate_into<R: Rng + ?Sized>(
        &self,
        h: usize,
        w: usize,
        rng: &mut R,
        scratch: &mut [f32],
        out: &mut [f32],
    ) -> Result<(), AugmentError> {
        if rng.random::<f32>() >= self.p_anomalous {
            out.fill(0.0);
            return Ok(());
        }
        let recipe = match self.recipe {
            Recipe::Anomalib => NoiseRecipe::ANOMALIB_PHASE2,
            Recipe::Original => NoiseRecipe::ORIGINAL,
        };
        let mut noise = vec![0.0; h * w];
        rotated_noise(recipe, h, w, rng, scratch, &mut noise)?;
        threshold_into(&noise, out);
        Ok(())
    }

    /// Generates `n` masks in parallel, stored as N×1×H×W.
    ///
    /// One child seed per mask is drawn from `rng` first, so the batch depends only on the state of `rng`,
    /// never on the number of threads.
    pub fn generate_batch<R: Rng + ?Sized>(
        &self,
        n: usize,
        h: usize,
        w: usize,
        rng: &mut R,
    ) -> Result<MaskBatch, AugmentError> {
        check_size(h, w)?;
        let seeds = child_seeds(rng, n);
        let mut data = vec![0.0; n * h * w];
        data.par_chunks_mut(h * w)
            .zip(seeds.par_iter())
            .try_for_each(|(out, &seed)| {
                let mut child = ChaCha8Rng::seed_from_u64(seed);
                let mut scratch = vec![0.0; h * w];
                self.generate_into(h, w, &mut child, &mut scratch, out)
            })?;
        Ok(MaskBatch { n, h, w, data })
    }
}

impl Default for MaskGenerator {
    fn default() -> Self {
        MaskGenerator::new(Recipe::default())
    }
}

/// The original code's training-image rotation: with probability `probability` the image is rotated by
/// U[−90°, 90°] about its centre, bilinear, with black (0) borders. Returns whether it was rotated.
pub fn rotate_image_randomly<R: Rng + ?Sized>(
    image: &mut Image,
    probability: f32,
    rng: &mut R,
) -> Result<bool, AugmentError> {
    if !(0.0..=1.0).contains(&probability) {
        return Err(AugmentError::Probability(probability));
    }
    image.check()?;
    Ok(rotate_slice(
        &mut image.data,
        image.h,
        image.w,
        probability,
        rng,
    ))
}

fn rotate_slice<R: Rng + ?Sized>(
    data: &mut [f32],
    h: usize,
    w: usize,
    probability: f32,
    rng: &mut R,
) -> bool {
    if rng.random::<f32>() >= probability {
        return false;
    }
    let angle = rng.random_range(-90.0f32..=90.0);
    let src = data.to_vec();
    warp_planes(
        &src,
        data,
        h,
        w,
        &rotation(h, w, angle),
        Interp::BilinearZero,
    );
    true
}

/// Applies [`rotate_image_randomly`] to every image of a batch in parallel (one child seed per image).
/// Returns, per image, whether it was rotated.
pub fn rotate_images_randomly<R: Rng + ?Sized>(
    batch: &mut ImageBatch,
    probability: f32,
    rng: &mut R,
) -> Result<Vec<bool>, AugmentError> {
    if !(0.0..=1.0).contains(&probability) {
        return Err(AugmentError::Probability(probability));
    }
    batch.check()?;
    let (h, w) = (batch.h, batch.w);
    let size = batch.c * h * w;
    let seeds = child_seeds(rng, batch.n);
    if size == 0 {
        return Ok(vec![false; batch.n]);
    }
    Ok(batch
        .data
        .par_chunks_mut(size)
        .zip(seeds.par_iter())
        .map(|(img, &seed)| {
            rotate_slice(img, h, w, probability, &mut ChaCha8Rng::seed_from_u64(seed))
        })
        .collect())
}
