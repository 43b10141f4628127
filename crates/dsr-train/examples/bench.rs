//! One timed measurement of the default model in its own process, so that its peak RSS is its
//! own: inference images/s, or seconds per phase-2 / phase-3 training step. `cargo xtask bench`
//! runs it once per measurement and prints the table; it can be run by hand too:
//!
//! ```text
//! cargo run --release -p dsr-train --example bench -- infer  --batch 1 --size 256 --repeat 5
//! cargo run --release -p dsr-train --example bench -- phase2 --batch 8 --size 256 --repeat 2
//! cargo run --release -p dsr-train --example bench -- phase3 --batch 8 --size 256 --repeat 2
//! ```
//!
//! Random weights and images (the work does not depend on their values); one untimed warm-up
//! call, then `--repeat` timed calls. The last line on stdout is one JSON object:
//! `{"mode", "batch", "size", "preset", "seconds": [...], "median_s", "images_per_s", "peak_rss_bytes"}`.
//! `--preset small` uses the small configuration (quick checks; not comparable to the reference).

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dsr_augment::ImageBatch;
use dsr_core::init::{init_seeded, InitScheme};
use dsr_core::weights::Checkpoint;
use dsr_core::{DsrConfig, DsrModel};
use dsr_train::train::{Schedule, TrainConfig, Trainer};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// Seeded weights of the whole model, as plain (untracked) tensors.
fn seeded_tensors(cfg: &DsrConfig) -> BoxResult<std::collections::HashMap<String, Tensor>> {
    let varmap = VarMap::new();
    DsrModel::new(
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    init_seeded(&varmap, 0, InitScheme::Pytorch, &[])?;
    let data = varmap.data().lock().expect("varmap lock");
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect())
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

fn random_images(n: usize, size: usize) -> ImageBatch {
    // A cheap deterministic pattern in [0, 1]: the work does not depend on the values.
    let mut state = 0x9e37_79b9_u32;
    let data = (0..n * 3 * size * size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1u32 << 24) as f32
        })
        .collect();
    ImageBatch {
        n,
        c: 3,
        h: size,
        w: size,
        data,
    }
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
    // The `dsr` binary's allocator settings.
    dsr_core::runtime::tune_allocator();
    let device = Device::Cpu;

    let seconds = match mode.as_str() {
        "infer" => {
            let model = DsrModel::new(
                &cfg,
                VarBuilder::from_tensors(seeded_tensors(&cfg)?, DType::F32, &device),
            )?;
            let images = random_images(batch, size);
            let image = Tensor::from_vec(images.data, (batch, 3, size, size), &device)?;
            time_calls(repeat, || {
                let out = model.infer(&image)?;
                std::hint::black_box(out);
                Ok(())
            })?
        }
        "phase2" | "phase3" => {
            let tensors = seeded_tensors(&cfg)?
                .into_iter()
                .filter(|(k, _)| k.starts_with("discrete_latent_model."))
                .collect();
            let discrete = Checkpoint {
                path: "seeded".into(),
                tensors,
                config: Some(cfg),
                image_size: None,
                metadata: BTreeMap::new(),
            };
            let steps = repeat.max(1) as u64 + 1;
            let (phase2_steps, phase3_steps) = if mode == "phase2" {
                (steps, 0)
            } else {
                (0, steps)
            };
            let train_cfg = TrainConfig {
                model: cfg,
                image_size: [size, size],
                batch_size: batch,
                schedule: Schedule::Original {
                    phase2_steps,
                    phase3_steps,
                    lr_drop_fraction: 0.8,
                },
                ..TrainConfig::default()
            };
            let mut trainer =
                Trainer::new(train_cfg, &discrete, random_images(batch, size), &device)?;
            time_calls(repeat, || {
                trainer.train_step()?;
                Ok(())
            })?
        }
        other => return Err(format!("unknown mode '{other}' (infer, phase2 or phase3)").into()),
    };
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let line = serde_json::json!({
        "mode": mode,
        "batch": batch,
        "size": size,
        "preset": preset,
        "seconds": seconds,
        "median_s": median,
        "images_per_s": batch as f64 / median,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{line}");
    Ok(())
}
