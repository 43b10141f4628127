//! Per-module wall time of one inference forward of the reference model (random weights).
//!
//! ```text
//! cargo run --release -p dsr-core --example profile -- [--size 256] [--batch 1] [--repeat 3] [--direct] [--no-cache]
//! ```
//! Prints each stage's time (the median of `--repeat` runs after one warm-up) and its share.
//! `--direct` turns Winograd's 3×3 convolutions off (`dsr_core::runtime::set_winograd`),
//! `--no-cache` the layers' copies of their transformed weights (`set_weight_cache`).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dsr_core::{DsrConfig, DsrModel};

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
    dsr_core::runtime::tune_allocator(dsr_core::runtime::HeapUse::Reuse);
    dsr_core::runtime::set_winograd(!std::env::args().any(|a| a == "--direct"));
    // As `dsr predict`: the layers keep their weights' transformed copies.
    dsr_core::runtime::set_weight_cache(!std::env::args().any(|a| a == "--no-cache"));
    let cfg = DsrConfig::default();
    // Plain tensors, as a loaded checkpoint gives them (no autograd tracking).
    let tensors = DsrModel::seeded_weights(&cfg, 0)?;
    let model = DsrModel::new(
        &cfg,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )?;
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
