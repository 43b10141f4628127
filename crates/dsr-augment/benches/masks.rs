//! Cost of one training batch of synthetic anomalies: 8 phase-2 masks and 8 phase-3 smudges at 256×256.

use criterion::{criterion_group, criterion_main, Criterion};
use dsr_augment::{ImageBatch, MaskGenerator, Recipe, SmudgeGenerator};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

fn masks(c: &mut Criterion) {
    for recipe in [Recipe::Anomalib, Recipe::Original] {
        let generator = MaskGenerator::new(recipe);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        c.bench_function(&format!("phase2 masks 8x256x256 {recipe}"), |b| {
            b.iter(|| black_box(generator.generate_batch(8, 256, 256, &mut rng).unwrap()))
        });
    }
    let images = ImageBatch::new(8, 3, 256, 256, vec![0.5; 8 * 3 * 256 * 256]).unwrap();
    for recipe in [Recipe::Anomalib, Recipe::Original] {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let smudger = SmudgeGenerator::new(recipe, &mut rng)
            .with_p_anomalous(1.0)
            .unwrap();
        c.bench_function(
            &format!("phase3 smudges 8x3x256x256 {recipe} (all anomalous)"),
            |b| b.iter(|| black_box(smudger.apply_batch(&images, &mut rng).unwrap())),
        );
    }
}

criterion_group!(benches, masks);
criterion_main!(benches);
