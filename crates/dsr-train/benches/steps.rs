//! Phase-2 and phase-3 training steps (forward, loss, backward, Adam) of the small
//! configuration at 128×128, batch 2: the whole training step in a criterion bench small enough
//! for 2 cores. The default model's steps at 256×256, batch 8, are measured by `cargo xtask bench`
//! (one process per figure, with its peak RSS).
//!
//! `cargo bench -p dsr-train --bench steps`

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use dsr_augment::ImageBatch;
use dsr_core::init::{init_seeded, InitScheme};
use dsr_core::weights::Checkpoint;
use dsr_core::DsrModel;
use dsr_train::pipeline::small_model;
use dsr_train::train::{Schedule, TrainConfig, Trainer};

const SIZE: usize = 128;
const BATCH: usize = 2;

fn trainer(phase2_steps: u64, phase3_steps: u64) -> Trainer {
    let cfg = small_model();
    let varmap = VarMap::new();
    DsrModel::new(
        &cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    init_seeded(&varmap, 1, InitScheme::Pytorch, &[]).unwrap();
    let tensors = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("discrete_latent_model."))
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let discrete = Checkpoint {
        path: "seeded".into(),
        tensors,
        config: Some(cfg),
        image_size: None,
        metadata: BTreeMap::new(),
    };
    let n = 4;
    let data = (0..n * 3 * SIZE * SIZE)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let images = ImageBatch {
        n,
        c: 3,
        h: SIZE,
        w: SIZE,
        data,
    };
    let train_cfg = TrainConfig {
        model: cfg,
        image_size: [SIZE, SIZE],
        batch_size: BATCH,
        schedule: Schedule::Original {
            phase2_steps,
            phase3_steps,
            lr_drop_fraction: 0.8,
        },
        ..TrainConfig::default()
    };
    Trainer::new(train_cfg, &discrete, images, &Device::Cpu).unwrap()
}

fn bench_steps(c: &mut Criterion) {
    dsr_core::runtime::tune_allocator();
    let mut group = c.benchmark_group(format!("small model {SIZE}x{SIZE} batch {BATCH}"));
    group.sample_size(10);
    // Plenty of steps in each phase: criterion decides how many it takes.
    let mut phase2 = trainer(1_000_000, 0);
    group.bench_function("phase-2 step", |b| b.iter(|| phase2.train_step().unwrap()));
    let mut phase3 = trainer(0, 1_000_000);
    group.bench_function("phase-3 step", |b| b.iter(|| phase3.train_step().unwrap()));
    group.finish();
}

criterion_group!(benches, bench_steps);
criterion_main!(benches);
