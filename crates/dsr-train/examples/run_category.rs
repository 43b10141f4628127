//! Trains DSR on one category of an MVTec-layout data set through [`Session`] (phase 1 on the
//! training images, phases 2 and 3, validation) and prints losses, metrics and wall times; the
//! library-level twin of `dsr train --preset small`.
//!
//! ```text
//! cargo run --release -p dsr-train --example run_category -- DATA_DIR [--category C]
//!     [--size 128] [--pretrain-steps 300] [--phase2-steps 300] [--phase3-steps 150]
//!     [--batch 8] [--recipe original|anomalib] [--focal original|anomalib] [--seed 0]
//!     [--vq FILE] [--results DIR]
//! ```
//! The run folder (weights, `metrics.jsonl`, `validation.json`) goes under `--results`
//! (default `results`).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use dsr_train::pipeline::small_model;
use dsr_train::session::{RunConfig, Session, SessionEvent};
use dsr_train::train::Schedule;

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
    let seed = num("--seed", 0)?;
    let mut cfg = RunConfig::default();
    cfg.data.root = data;
    cfg.data.category = get("--category");
    cfg.output.results = get("--results").unwrap_or_else(|| "results".into()).into();
    cfg.train.model = small_model();
    cfg.train.image_size = [size, size];
    cfg.train.batch_size = num("--batch", 8)? as usize;
    cfg.train.schedule = Schedule::Original {
        phase2_steps: num("--phase2-steps", 300)?,
        phase3_steps: num("--phase3-steps", 150)?,
        lr_drop_fraction: 0.8,
    };
    if let Some(f) = get("--focal") {
        cfg.train.focal = serde_json::from_str(&format!("\"{f}\""))?;
    }
    if let Some(r) = get("--recipe") {
        cfg.train.recipe = r.parse()?;
    }
    cfg.train.seed = seed;
    cfg.pretrain.model = cfg.train.model;
    cfg.pretrain.crop = size;
    cfg.pretrain.steps = num("--pretrain-steps", 300)?;
    cfg.pretrain.seed = seed;
    cfg.vq.weights = get("--vq").map(PathBuf::from);
    cfg.vq.pretrain = cfg.vq.weights.is_none();
    let session = Session::create(cfg)?;
    println!("run folder: {}", session.dir().path.display());
    let start = Instant::now();
    let mut last = Instant::now();
    let outcome = session.run(&Device::Cpu, &mut |e| match e {
        SessionEvent::Data { train, val, test } => {
            println!("data: {train} training, {val} validation, {test} test images")
        }
        SessionEvent::Pretrain(r) if r.step % 25 == 0 || last.elapsed().as_secs() > 30 => {
            last = Instant::now();
            println!(
                "[{:>6.0}s] phase 1 step {:>5}: loss {:.5} mse {:.5} perplexity {:.1}/{:.1} codes {}/{} reseeded {}",
                start.elapsed().as_secs_f64(), r.step, r.loss, r.recon_mse, r.perplexity_top, r.perplexity_bot, r.codes_used_top, r.codes_used_bot, r.reseeded
            );
        }
        SessionEvent::Train(r) if r.step % 25 == 0 || last.elapsed().as_secs() > 30 => {
            last = Instant::now();
            println!(
                "[{:>6.0}s] {} step {:>5}: {:?}",
                start.elapsed().as_secs_f64(),
                r.phase,
                r.step,
                r.losses
            );
        }
        SessionEvent::Skipped { message } => println!("skipped: {message}"),
        _ => {}
    })?;
    println!(
        "evaluation: {}",
        serde_json::to_string_pretty(&outcome.metrics)?
    );
    println!(
        "wall time {:.0} s (inference {:.1} s); model: {}",
        start.elapsed().as_secs_f64(),
        outcome.validation.seconds,
        outcome.model.display()
    );
    Ok(())
}
