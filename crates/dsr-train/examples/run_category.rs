//! Trains DSR on one category of an MVTec-layout data set and evaluates it; prints losses,
//! metrics and wall times.
//!
//! ```text
//! cargo run --release -p dsr-train --example run_category -- DATA_DIR [--category C]
//!     [--size 128] [--pretrain-steps 300] [--phase2-steps 300] [--phase3-steps 150]
//!     [--batch 8] [--recipe original|anomalib] [--focal original|anomalib] [--seed 0]
//!     [--vq FILE] [--out FILE.safetensors]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use dsr_train::pipeline::{run, small_model, Event, RunOptions};
use dsr_train::pretrain::PretrainConfig;
use dsr_train::train::{Schedule, TrainConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data = PathBuf::from(
        args.first()
            .ok_or("usage: run_category DATA_DIR [options]")?,
    );
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |name: &str, default: u64| {
        get(name)
            .map(|v| v.parse::<u64>())
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let size = num("--size", 128)? as usize;
    let batch = num("--batch", 8)? as usize;
    let seed = num("--seed", 0)?;
    let model = small_model();
    let train = TrainConfig {
        model,
        image_size: [size, size],
        batch_size: batch,
        schedule: Schedule::Original {
            phase2_steps: num("--phase2-steps", 300)?,
            phase3_steps: num("--phase3-steps", 150)?,
            lr_drop_fraction: 0.8,
        },
        focal: get("--focal")
            .map(|f| serde_json::from_str(&format!("\"{f}\"")))
            .transpose()?
            .unwrap_or_default(),
        recipe: get("--recipe")
            .map(|r| r.parse())
            .transpose()?
            .unwrap_or_default(),
        seed,
        ..TrainConfig::default()
    };
    let opts = RunOptions {
        data,
        category: get("--category"),
        vq_weights: get("--vq").map(PathBuf::from),
        pretrain: PretrainConfig {
            model,
            crop: size,
            batch_size: 16,
            steps: num("--pretrain-steps", 300)?,
            seed,
            ..PretrainConfig::default()
        },
        train,
        eval_batch: 8,
    };
    let start = Instant::now();
    let mut last = Instant::now();
    let (trainer, eval) = run(&opts, &Device::Cpu, &mut |e| match e {
        Event::Data { train, test } => println!("data: {train} training, {test} test images"),
        Event::Pretrain(r) if r.step % 25 == 0 || last.elapsed().as_secs() > 30 => {
            last = Instant::now();
            println!(
                "[{:>6.0}s] phase 1 step {:>5}: loss {:.5} mse {:.5} perplexity {:.1}/{:.1} codes {}/{} reseeded {}",
                start.elapsed().as_secs_f64(), r.step, r.loss, r.recon_mse, r.perplexity_top, r.perplexity_bot, r.codes_used_top, r.codes_used_bot, r.reseeded
            );
        }
        Event::Train(r) if r.step % 25 == 0 || last.elapsed().as_secs() > 30 => {
            last = Instant::now();
            println!(
                "[{:>6.0}s] {} step {:>5}: {:?}",
                start.elapsed().as_secs_f64(),
                r.phase,
                r.step,
                r.losses
            );
        }
        Event::Evaluated(ev) => println!(
            "evaluation: {}",
            serde_json::to_string_pretty(&ev.metrics).unwrap_or_default()
        ),
        _ => {}
    })?;
    println!(
        "wall time {:.0} s (inference {:.1} s)",
        start.elapsed().as_secs_f64(),
        eval.inference_seconds
    );
    if let Some(out) = get("--out") {
        trainer.save(std::path::Path::new(&out))?;
        println!("checkpoint written to {out}");
    }
    Ok(())
}
