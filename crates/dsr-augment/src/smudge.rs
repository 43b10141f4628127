//! Phase-3 image-level anomalies ("smudges").

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::augmenters::ANOMALIB_AUGMENTERS;
use crate::buffers::{Image, ImageBatch, Mask, MaskBatch};
use crate::error::{check_size, AugmentError};
use crate::masks::{rotated_noise, threshold_into, NoiseRecipe};
use crate::{child_seeds, Recipe};

/// Number of extra attempts anomalib makes when a smudge mask comes out empty.
const ANOMALIB_RETRIES: usize = 10;

/// The phase-3 smudge generator (anomalib `PerlinAnomalyGenerator` / original
/// `MVTecImageAnomTrainDataset`).
///
/// With probability `1 − p_anomalous` the image is returned unchanged with a zero mask. Otherwise a Perlin
/// mask m is drawn and:
///
/// * [`Recipe::Anomalib`]: the rotated noise (bilinear) becomes a texture `0.5·noise + 0.25` on three
///   channels, passes through 3 distinct augmenters drawn from [`crate::ANOMALIB_AUGMENTERS`] in drawn
///   order, and is pasted with β ~ U[0.2, 1): `out = img·(1−m) + β·texture·m + (1−β)·img·m`. An empty
///   mask is redrawn up to 10 more times.
/// * [`Recipe::Original`]: a solid colour c ~ U[0, 1)³ is pasted with β ~ U[0, 0.8):
///   `out = img·(1−m) + (1−β)·c·m + β·img·m`. The mask has no rescue and no retry. The original code also
///   rotates the training image with probability [`crate::ORIGINAL_PHASE3_IMAGE_ROTATION_P`] beforehand;
///   use [`crate::rotate_images_randomly`] for that.
///
/// Pixels outside the mask are never changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmudgeGenerator {
    /// Which reference the smudges follow.
    pub recipe: Recipe,
    /// Probability that an image receives a smudge; 0.5 in both references.
    pub p_anomalous: f32,
    /// The `RandomSolarize` threshold, drawn once per generator from U[32/255, 128/255] like anomalib's
    /// single generator instance (unused by the original recipe).
    pub solarize_threshold: f32,
}

impl SmudgeGenerator {
    /// Creates a generator, drawing the solarize threshold from `rng`.
    pub fn new<R: Rng + ?Sized>(recipe: Recipe, rng: &mut R) -> Self {
        let solarize_threshold = rng.random_range(32.0f32 / 255.0..128.0 / 255.0);
        SmudgeGenerator {
            recipe,
            p_anomalous: 0.5,
            solarize_threshold,
        }
    }

    /// Sets the probability that an image receives a smudge.
    pub fn with_p_anomalous(mut self, p: f32) -> Result<Self, AugmentError> {
        if !(0.0..=1.0).contains(&p) {
            return Err(AugmentError::Probability(p));
        }
        self.p_anomalous = p;
        Ok(self)
    }

    /// Smudges one 3-channel image whose sides are positive multiples of 32. Returns the augmented image
    /// and its mask.
    pub fn apply<R: Rng + ?Sized>(
        &self,
        image: &Image,
        rng: &mut R,
    ) -> Result<(Image, Mask), AugmentError> {
        image.check()?;
        check_image(image.c, image.h, image.w)?;
        let mut out = image.clone();
        let mut mask = Mask::zeros(image.h, image.w);
        self.apply_into(&mut out.data, &mut mask.data, image.h, image.w, rng)?;
        Ok((out, mask))
    }

    /// Smudges a batch in parallel (one child seed per image drawn from `rng` first, so the result does
    /// not depend on the number of threads). Returns the augmented batch and the N×1×H×W masks.
    pub fn apply_batch<R: Rng + ?Sized>(
        &self,
        images: &ImageBatch,
        rng: &mut R,
    ) -> Result<(ImageBatch, MaskBatch), AugmentError> {
        images.check()?;
        let (h, w) = (images.h, images.w);
        let seeds = child_seeds(rng, images.n);
        let mut out = images.clone();
        let mut masks = MaskBatch {
            n: images.n,
            h,
            w,
            data: vec![0.0; images.n * h * w],
        };
        if images.n == 0 {
            return Ok((out, masks));
        }
        check_image(images.c, h, w)?;
        out.data
            .par_chunks_mut(3 * h * w)
            .zip(masks.data.par_chunks_mut(h * w))
            .zip(seeds.par_iter())
            .try_for_each(|((img, mask), &seed)| {
                self.apply_into(img, mask, h, w, &mut ChaCha8Rng::seed_from_u64(seed))
            })?;
        Ok((out, masks))
    }

    fn apply_into<R: Rng + ?Sized>(
        &self,
        img: &mut [f32],
        mask: &mut [f32],
        h: usize,
        w: usize,
        rng: &mut R,
    ) -> Result<(), AugmentError> {
        if rng.random::<f32>() >= self.p_anomalous {
            mask.fill(0.0);
            return Ok(());
        }
        let plane = h * w;
        let mut scratch = vec![0.0; plane];
        let mut noise = vec![0.0; plane];
        match self.recipe {
            Recipe::Original => {
                rotated_noise(NoiseRecipe::ORIGINAL, h, w, rng, &mut scratch, &mut noise)?;
                threshold_into(&noise, mask);
                let colour: [f32; 3] = [rng.random(), rng.random(), rng.random()];
                let beta = rng.random::<f32>() * 0.8;
                for (ch, &c) in img.chunks_exact_mut(plane).zip(&colour) {
                    for (v, &m) in ch.iter_mut().zip(mask.iter()) {
                        if m > 0.5 {
                            *v = (1.0 - beta) * c + beta * *v;
                        }
                    }
                }
            }
            Recipe::Anomalib => {
                for _ in 0..=ANOMALIB_RETRIES {
                    rotated_noise(
                        NoiseRecipe::ANOMALIB_PHASE3,
                        h,
                        w,
                        rng,
                        &mut scratch,
                        &mut noise,
                    )?;
                    threshold_into(&noise, mask);
                    if mask.iter().any(|&m| m > 0.5) {
                        break;
                    }
                }
                if !mask.iter().any(|&m| m > 0.5) {
                    return Ok(());
                }
                let mut texture: Vec<f32> = Vec::with_capacity(3 * plane);
                for _ in 0..3 {
                    texture.extend(noise.iter().map(|&n| 0.5 * n + 0.25));
                }
                // Three distinct augmenters, in the order drawn (a partial Fisher–Yates shuffle).
                let mut order: Vec<usize> = (0..ANOMALIB_AUGMENTERS.len()).collect();
                for k in 0..3 {
                    let j = rng.random_range(k..order.len());
                    order.swap(k, j);
                    ANOMALIB_AUGMENTERS[order[k]].apply(
                        &mut texture,
                        h,
                        w,
                        self.solarize_threshold,
                        rng,
                    );
                }
                let beta = rng.random_range(0.2f32..1.0);
                for (ch, tex) in img.chunks_exact_mut(plane).zip(texture.chunks_exact(plane)) {
                    for ((v, &t), &m) in ch.iter_mut().zip(tex).zip(mask.iter()) {
                        if m > 0.5 {
                            // Augmenters that do not clamp (invert, solarize, affine) can leave values
                            // outside [0, 1]; clamping keeps the output a convex combination in [0, 1].
                            *v = beta * t.clamp(0.0, 1.0) + (1.0 - beta) * *v;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn check_image(c: usize, h: usize, w: usize) -> Result<(), AugmentError> {
    if c != 3 {
        return Err(AugmentError::Channels(c));
    }
    check_size(h, w)
}
