//! Property tests: shapes, value ranges, errors, untouched pixels and determinism.

use dsr_augment::{
    perlin_noise, rotate_images_randomly, AugmentError, Image, ImageBatch, MaskGenerator,
    PerlinPadding, Recipe, SmudgeGenerator,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const RECIPES: [Recipe; 2] = [Recipe::Anomalib, Recipe::Original];

fn recipe() -> impl Strategy<Value = Recipe> {
    prop_oneof![Just(Recipe::Anomalib), Just(Recipe::Original)]
}

fn random_batch(n: usize, h: usize, w: usize, rng: &mut ChaCha8Rng) -> ImageBatch {
    let data = (0..n * 3 * h * w).map(|_| rng.random::<f32>()).collect();
    ImageBatch::new(n, 3, h, w, data).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn masks_are_binary_and_shaped(recipe in recipe(), hk in 1usize..=5, wk in 1usize..=5, seed: u64) {
        let (h, w) = (32 * hk, 32 * wk);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let generator = MaskGenerator::new(recipe).with_p_anomalous(1.0).unwrap();
        let mask = generator.generate(h, w, &mut rng).unwrap();
        prop_assert_eq!((mask.h, mask.w, mask.data.len()), (h, w, h * w));
        prop_assert!(mask.data.iter().all(|&v| v == 0.0 || v == 1.0));
        let batch = generator.generate_batch(3, h, w, &mut rng).unwrap();
        prop_assert_eq!(batch.data.len(), 3 * h * w);
        prop_assert!(batch.data.iter().all(|&v| v == 0.0 || v == 1.0));
    }

    #[test]
    fn bad_sizes_are_errors(recipe in recipe(), h in 0usize..200, w in 0usize..200) {
        prop_assume!(h == 0 || w == 0 || h % 32 != 0 || w % 32 != 0);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let generator = MaskGenerator::new(recipe);
        prop_assert_eq!(
            generator.generate(h, w, &mut rng),
            Err(AugmentError::InvalidSize { height: h, width: w })
        );
        prop_assert!(generator.generate_batch(2, h, w, &mut rng).is_err());
        let smudger = SmudgeGenerator::new(recipe, &mut rng);
        prop_assert!(smudger.apply(&Image::filled(3, h, w, 0.5), &mut rng).is_err());
    }

    #[test]
    fn smudges_stay_in_range_and_leave_the_outside_alone(recipe in recipe(), hk in 1usize..=3, wk in 1usize..=3, seed: u64) {
        let (h, w) = (32 * hk, 32 * wk);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let smudger = SmudgeGenerator::new(recipe, &mut rng).with_p_anomalous(1.0).unwrap();
        let images = random_batch(4, h, w, &mut rng);
        let (out, masks) = smudger.apply_batch(&images, &mut rng).unwrap();
        prop_assert!(out.data.iter().all(|v| (0.0..=1.0).contains(v)));
        prop_assert!(masks.data.iter().all(|&v| v == 0.0 || v == 1.0));
        let plane = h * w;
        for i in 0..4 {
            let (a, b, m) = (images.image_slice(i), out.image_slice(i), masks.mask(i));
            for (k, (x, y)) in a.iter().zip(b).enumerate() {
                if m[k % plane] == 0.0 {
                    prop_assert_eq!(x, y);
                }
            }
        }
    }

    #[test]
    fn same_seed_same_batch(recipe in recipe(), seed: u64) {
        let generator = MaskGenerator::new(recipe);
        let a = generator.generate_batch(4, 64, 32, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        let b = generator.generate_batch(4, 64, 32, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        prop_assert_eq!(a, b);
    }
}

#[test]
fn about_half_of_the_masks_are_anomalous() {
    // 1000 masks: the binomial SE of the fraction is 0.016, and a few percent of anomalous draws end up
    // empty (noise below the threshold or rotated out), so the non-empty fraction must lie within
    // 0.5 − 0.08 … 0.5 + 0.05 (5 SE on each side, plus the empty allowance below).
    for recipe in RECIPES {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let masks = MaskGenerator::new(recipe)
            .generate_batch(1000, 64, 64, &mut rng)
            .unwrap();
        let nonempty = masks.to_masks().iter().filter(|m| !m.is_empty()).count() as f64 / 1000.0;
        assert!(
            (0.42..=0.55).contains(&nonempty),
            "{recipe}: non-empty fraction {nonempty}"
        );
    }
}

#[test]
fn batches_do_not_depend_on_the_thread_count() {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut rng = ChaCha8Rng::seed_from_u64(2024);
            let mut results = Vec::new();
            for recipe in RECIPES {
                let masks = MaskGenerator::new(recipe)
                    .generate_batch(8, 64, 96, &mut rng)
                    .unwrap();
                let smudger = SmudgeGenerator::new(recipe, &mut rng);
                let mut images = random_batch(6, 64, 64, &mut rng);
                let (out, smudge_masks) = smudger.apply_batch(&images, &mut rng).unwrap();
                let rotated = rotate_images_randomly(&mut images, 0.5, &mut rng).unwrap();
                results.push((masks, out, smudge_masks, images, rotated));
            }
            results
        })
    };
    let one = run(1);
    let two = run(2);
    assert_eq!(one, two);
    // The batch must contain real content, or the comparison above would be vacuous.
    assert!(one
        .iter()
        .any(|r| r.0.data.contains(&1.0) && r.2.data.contains(&1.0)));
}

#[test]
fn padded_noise_is_a_crop_of_the_power_of_two_field() {
    let full = perlin_noise(
        128,
        128,
        4,
        8,
        PerlinPadding::Exact,
        &mut ChaCha8Rng::seed_from_u64(5),
    )
    .unwrap();
    let cropped = perlin_noise(
        96,
        128,
        4,
        8,
        PerlinPadding::NextPowerOfTwo,
        &mut ChaCha8Rng::seed_from_u64(5),
    )
    .unwrap();
    assert_eq!(&full[..96 * 128], &cropped[..]);
    assert!(full.iter().all(|v| v.abs() <= 1.5));
    assert!(full.iter().any(|&v| v > 0.3) && full.iter().any(|&v| v < -0.3));
}

#[test]
fn noise_vanishes_on_the_lattice_and_is_continuous() {
    let noise = perlin_noise(
        64,
        64,
        4,
        2,
        PerlinPadding::Exact,
        &mut ChaCha8Rng::seed_from_u64(9),
    )
    .unwrap();
    // Lattice points (multiples of the 16×32 cell) have zero offset, hence zero noise.
    for i in (0..64).step_by(16) {
        for j in (0..64).step_by(32) {
            assert!(noise[i * 64 + j].abs() < 1e-6);
        }
    }
    // Neighbouring values differ little: the field is smooth at this resolution.
    for i in 0..64 {
        for j in 1..64 {
            assert!((noise[i * 64 + j] - noise[i * 64 + j - 1]).abs() < 0.2);
        }
    }
}

#[test]
fn bad_resolutions_and_channels_are_errors() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert!(matches!(
        perlin_noise(96, 96, 64, 1, PerlinPadding::Exact, &mut rng),
        Err(AugmentError::InvalidResolution { .. })
    ));
    assert!(matches!(
        perlin_noise(0, 96, 1, 1, PerlinPadding::Exact, &mut rng),
        Err(AugmentError::InvalidSize { .. })
    ));
    let smudger = SmudgeGenerator::new(Recipe::Anomalib, &mut rng);
    assert_eq!(
        smudger.apply(&Image::filled(1, 32, 32, 0.5), &mut rng),
        Err(AugmentError::Channels(1))
    );
    assert_eq!(
        smudger.apply(
            &Image {
                c: 3,
                h: 32,
                w: 32,
                data: vec![0.0; 5]
            },
            &mut rng
        ),
        Err(AugmentError::ShapeMismatch {
            shape: vec![3, 32, 32],
            len: 5
        })
    );
    assert_eq!(
        MaskGenerator::new(Recipe::Original).with_p_anomalous(1.5),
        Err(AugmentError::Probability(1.5))
    );
}

#[test]
fn recipe_names_and_default() {
    assert_eq!(Recipe::default(), Recipe::Anomalib);
    assert_eq!(
        serde_json::to_string(&Recipe::Anomalib).unwrap(),
        "\"anomalib\""
    );
    assert_eq!(
        serde_json::from_str::<Recipe>("\"original\"").unwrap(),
        Recipe::Original
    );
    assert_eq!("Anomalib".parse::<Recipe>().unwrap(), Recipe::Anomalib);
    assert!("dtd".parse::<Recipe>().is_err());
}

#[test]
fn original_recipe_rotates_training_images() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut batch = random_batch(16, 32, 32, &mut rng);
    let before = batch.clone();
    let rotated = rotate_images_randomly(&mut batch, 1.0, &mut rng).unwrap();
    assert!(rotated.iter().all(|&r| r));
    assert_ne!(batch, before);
    assert!(batch.data.iter().all(|v| (0.0..=1.0).contains(v)));
    let mut unchanged = before.clone();
    let none = rotate_images_randomly(&mut unchanged, 0.0, &mut rng).unwrap();
    assert!(none.iter().all(|&r| !r));
    assert_eq!(unchanged, before);
}
