//! Per-module wall time of one inference forward of the reference model (random weights).
//!
//! ```text
//! cargo run --release -p dsr-rs --example profile -- [--size 256] [--batch 1] [--repeat 3] [--direct] [--no-cache]
//! ```
//! Prints each stage's time (the median of `--repeat` runs after one warm-up) and its share.
//! `--direct` turns Winograd's 3×3 convolutions off (`ConvAlgorithm::Direct`), `--no-cache`
//! the layers' copies of their transformed weights (a model built with `DsrModel::new` instead
//! of `Checkpoint::into_inference_model`).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dsr_core::{Checkpoint, ConvAlgorithm, DsrConfig, DsrModel, Execution};

// The `dsr` binary's allocator settings (process-wide, so they belong to programs, not to the
// libraries): measured as the binary runs.
#[allow(dead_code)]
#[path = "../crates/dsr-cli/src/heap.rs"]
mod heap;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (size, batch, repeat) = (arg("--size", 256), arg("--batch", 1), arg("--repeat", 3));
    // The `dsr` binary's allocator settings.
    heap::tune_allocator(heap::HeapUse::Reuse);
    let exec = Execution::with_conv(if std::env::args().any(|a| a == "--direct") {
        ConvAlgorithm::Direct
    } else {
        ConvAlgorithm::Winograd
    });
    let cfg = DsrConfig::default();
    // Plain tensors, as a loaded checkpoint gives them (no autograd tracking).
    let tensors = DsrModel::seeded_weights(&cfg, 0)?;
    let model = if std::env::args().any(|a| a == "--no-cache") {
        DsrModel::new(
            &cfg,
            VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        )?
        .with_execution(exec)
    } else {
        // As `dsr predict`: the layers keep their weights' transformed copies.
        let ckpt = Checkpoint {
            path: "seeded weights".into(),
            tensors,
            config: Some(cfg),
            image_size: None,
            metadata: Default::default(),
        };
        ckpt.into_inference_model(&cfg, &Device::Cpu, exec)?
    };
    let image = Tensor::rand(0f32, 1f32, (batch, 3, size, size), &Device::Cpu)?;
    model.profile_eval(&image)?;
    let mut runs = Vec::new();
    for _ in 0..repeat.max(1) {
        runs.push(model.profile_eval(&image)?);
    }
    let total: Vec<f64> = runs
        .iter()
        .map(|r| r.iter().map(|(_, t)| t).sum())
        .collect();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let whole = median(total);
    println!(
        "reference model, batch {batch}, {size}×{size}: {whole:.3} s per forward, {:.2} images/s",
        batch as f64 / whole
    );
    for (i, (name, _)) in runs[0].iter().enumerate() {
        let t = median(runs.iter().map(|r| r[i].1).collect());
        println!("  {name:<38} {t:>8.3} s {:>5.1} %", 100.0 * t / whole);
    }
    Ok(())
}
