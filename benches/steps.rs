//! Phase-2 and phase-3 training steps (forward, loss, backward, Adam) of the small
//! configuration at 128×128, batch 2: the whole training step in a criterion bench small enough
//! for 2 cores. The default model's steps at 256×256, batch 8, are measured by `cargo xtask bench`
//! (one process per figure, with its peak RSS).
//!
//! `cargo bench -p dsr-rs --bench steps`

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use dsr_train::pipeline::{small_model, synthetic_trainer};
use dsr_train::train::Trainer;

// The `dsr` binary's allocator settings (process-wide, so they belong to programs, not to the
// libraries): measured as the binary runs.
#[allow(dead_code)]
#[path = "../crates/dsr-cli/src/heap.rs"]
mod heap;

const SIZE: usize = 128;
const BATCH: usize = 2;

fn trainer(phase2_steps: u64, phase3_steps: u64) -> Trainer {
    synthetic_trainer(
        small_model(),
        SIZE,
        BATCH,
        phase2_steps,
        phase3_steps,
        &Device::Cpu,
    )
    .unwrap()
}

fn bench_steps(c: &mut Criterion) {
    heap::tune_allocator(heap::HeapUse::Lean);
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
