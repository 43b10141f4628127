//! Which anomaly map a trained run should output: both maps of a run's model (the upsampling
//! module's refined mask and the detection module's mask), each smoothed by a Gaussian of a few
//! widths, measured on the run's validation split and on its test split.
//!
//! ```sh
//! cargo run --release -p dsr-train --example map_study -- RUN_DIR [SIGMA ...]
//! ```
//!
//! `RUN_DIR` is a finished `dsr train` run folder (its `config.toml` and
//! `weights/model.safetensors`); the splits are drawn again from its configuration and seed.
//! Prints one line per map and width: image AUROC / pixel AUROC / pixel AP / AUPRO on validation,
//! then on test. Image scores are the model's (the smoothing changes only the map).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use dsr_core::weights::load_checkpoint;
use dsr_core::{Execution, OutputMap};
use dsr_eval::{evaluate, Detector, EvalOptions, Evaluation};
use dsr_train::data::split_validation;
use dsr_train::pipeline::samples_of;
use dsr_train::session::{parse_val_split, RunConfig};

#[path = "support/blur.rs"]
mod blur;
use blur::blur;

/// The four figures of `ev` with its maps smoothed by `sigma`.
fn figures(ev: &Evaluation, sigma: f32) -> Result<[f64; 4]> {
    let mut e = ev.clone();
    e.maps = blur(&ev.maps, ev.size[0], ev.size[1], sigma);
    let post = e.fit_postprocessor()?;
    let m = e.metrics(&post)?;
    Ok([m.image_auroc, m.pixel_auroc, m.pixel_ap, m.pixel_aupro])
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let run = PathBuf::from(
        args.next()
            .context("usage: map_study RUN_DIR [SIGMA ...]")?,
    );
    let mut sigmas: Vec<f32> = args.map(|s| s.parse()).collect::<Result<_, _>>()?;
    if sigmas.is_empty() {
        sigmas = vec![0.0, 1.0, 2.0, 4.0, 8.0];
    }
    let text = std::fs::read_to_string(run.join("config.toml"))
        .with_context(|| format!("{}: cannot read", run.join("config.toml").display()))?;
    let cfg: RunConfig = toml::from_str(&text).context("config.toml")?;
    let listing = cfg.data.listing(cfg.train.seed)?;
    let splits = split_validation(
        &listing,
        parse_val_split(&cfg.data.val_split, cfg.train.seed)?,
    )?;
    let ckpt = load_checkpoint(&run.join("weights/model.safetensors"))?;
    let model_cfg = ckpt.config.context("no configuration in the model")?;
    let size = ckpt.image_size.context("no image size in the model")?;
    let model = ckpt.build_model(&model_cfg, &Device::Cpu)?;
    let model = model.with_execution(Execution::default());
    let options = EvalOptions::default();
    println!("map        sigma | validation: image AUROC / pixel AUROC / pixel AP / AUPRO | test");
    for map in [OutputMap::Detection, OutputMap::Refined] {
        let det = Detector::new(model.clone().with_output_map(map), size, None, &Device::Cpu)?;
        let val = evaluate(&det, samples_of(&splits.val), &options)?;
        let test = evaluate(&det, samples_of(&splits.test), &options)?;
        for &s in &sigmas {
            let v = figures(&val, s)?;
            let t = figures(&test, s)?;
            println!(
                "{:<10} {:>5.1} | {:.3} / {:.3} / {:.3} / {:.3} | {:.3} / {:.3} / {:.3} / {:.3}",
                map.to_string(),
                s,
                v[0],
                v[1],
                v[2],
                v[3],
                t[0],
                t[1],
                t[2],
                t[3]
            );
        }
    }
    Ok(())
}
