//! One timed measurement of the default model in its own process, so that its peak RSS is its
//! own: inference images/s, or seconds per phase-2 / phase-3 training step. `cargo xtask bench`
//! runs it once per measurement and prints the table; it can be run by hand too:
//!
//! ```text
//! cargo run --release -p dsr-rs --example bench -- infer  --batch 1 --size 256 --repeat 5
//! cargo run --release -p dsr-rs --example bench -- phase2 --batch 8 --size 256 --repeat 2
//! cargo run --release -p dsr-rs --example bench -- phase3 --batch 8 --size 256 --repeat 2
//! ```
//!
//! Random weights and images (the work does not depend on their values); one untimed warm-up
//! call, then `--repeat` timed calls. The last line on stdout is one JSON object:
//! `{"mode", "batch", "size", "preset", "seconds": [...], "median_s", "images_per_s", "peak_rss_bytes"}`.
//! `--preset small` uses the small configuration (quick checks; not comparable to the reference).
//! `--recompute` sets `Execution::recompute` of the trainer (training memory
//! against time; `dsr train --recompute`). Inference runs as `dsr predict` does (Winograd's 3×3
//! convolutions, layers keeping their transformed filters); `--direct-conv` turns Winograd off
//! (`dsr --direct-conv`), `--precision bf16` computes the convolution products in bf16 with
//! AVX512-BF16 (`dsr --precision bf16`; an error on CPUs without it). `--device cuda` runs on the first CUDA GPU (built with
//! `--features dsr-train/cuda`, docs/gpu.md); each timed call then ends with the device
//! synchronised, and the JSON adds `"device": "cuda"`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use dsr_core::{Checkpoint, ConvAlgorithm, DsrConfig, DsrModel, Execution, Precision};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// Peak resident set size of this process (`VmHWM`), in bytes; 0 where /proc is missing.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn time_calls(repeat: usize, mut call: impl FnMut() -> BoxResult<()>) -> BoxResult<Vec<f64>> {
    call()?; // warm-up
    let mut seconds = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let start = Instant::now();
        call()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    Ok(seconds)
}

// The `dsr` binary's allocator settings (process-wide, so they belong to programs, not to the
// libraries): measured as the binary runs.
#[allow(dead_code)]
#[path = "../crates/dsr-cli/src/heap.rs"]
mod heap;

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_else(|| "infer".into());
    let batch: usize = arg(&args, "--batch", "1").parse()?;
    let size: usize = arg(&args, "--size", "256").parse()?;
    let repeat: usize = arg(&args, "--repeat", "3").parse()?;
    let preset = arg(&args, "--preset", "reference");
    let cfg = match preset.as_str() {
        "reference" => DsrConfig::default(),
        "small" => dsr_train::pipeline::small_model(),
        other => return Err(format!("unknown preset '{other}' (reference or small)").into()),
    };
    let recompute = args.iter().any(|a| a == "--recompute");
    // The `dsr` binary's allocator settings: lean for phase 2 (and phase 1), reuse for phase 3
    // and inference.
    heap::tune_allocator(if mode == "phase2" {
        heap::HeapUse::Lean
    } else {
        heap::HeapUse::Reuse
    });
    let exec = Execution {
        recompute,
        ..Execution::default()
    };
    if mode == "checkpoint" {
        let out = arg(&args, "--out", "");
        if out.is_empty() {
            return Err("checkpoint needs --out FILE".into());
        }
        let weights = DsrModel::seeded_weights(&cfg, 0)?;
        dsr_core::weights::save_checkpoint(
            std::path::Path::new(&out),
            &weights,
            &cfg,
            Some([size, size]),
            &Default::default(),
        )
        .map_err(|e| format!("cannot write {out}: {e}"))?;
        println!(
            "{}",
            serde_json::json!({ "checkpoint": out, "preset": preset, "size": size })
        );
        return Ok(());
    }
    let device = match arg(&args, "--device", "cpu").as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => return Err(format!("unknown device '{other}' (cpu or cuda)").into()),
    };

    let seconds = match mode.as_str() {
        "infer" => {
            // As `dsr predict`: a model built for inference keeps its transformed filters.
            let conv = if args.iter().any(|a| a == "--direct-conv") {
                ConvAlgorithm::Direct
            } else {
                ConvAlgorithm::Winograd
            };
            let weights = Checkpoint {
                path: "seeded weights".into(),
                tensors: DsrModel::seeded_weights(&cfg, 0)?,
                config: Some(cfg),
                image_size: None,
                metadata: Default::default(),
            };
            let precision = match arg(&args, "--precision", "f32").as_str() {
                "f32" => Precision::F32,
                "bf16" => Precision::Bf16,
                other => return Err(format!("unknown precision '{other}' (f32 or bf16)").into()),
            };
            let exec = Execution {
                precision,
                ..Execution::with_conv(conv)
            };
            let model = weights.into_inference_model(&cfg, &device, exec)?;
            let image = Tensor::rand(0f32, 1f32, (batch, 3, size, size), &device)?;
            time_calls(repeat, || {
                let out = model.infer(&image)?;
                device.synchronize()?;
                std::hint::black_box(out);
                Ok(())
            })?
        }
        "phase2" | "phase3" => {
            let steps = repeat.max(1) as u64 + 1;
            let (phase2_steps, phase3_steps) = if mode == "phase2" {
                (steps, 0)
            } else {
                (0, steps)
            };
            let mut trainer = dsr_train::pipeline::synthetic_trainer(
                cfg,
                size,
                batch,
                phase2_steps,
                phase3_steps,
                &device,
            )?
            .with_execution(exec);
            time_calls(repeat, || {
                trainer.train_step()?;
                device.synchronize()?;
                Ok(())
            })?
        }
        other => {
            return Err(
                format!("unknown mode '{other}' (infer, phase2, phase3 or checkpoint)").into(),
            )
        }
    };
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let line = serde_json::json!({
        "mode": mode,
        "batch": batch,
        "size": size,
        "preset": preset,
        "device": if device.is_cuda() { "cuda" } else { "cpu" },
        "recompute": recompute,
        "precision": arg(&args, "--precision", "f32"),
        "seconds": seconds,
        "median_s": median,
        "images_per_s": batch as f64 / median,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{line}");
    Ok(())
}
