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
use dsr_core::OutputMap;
use dsr_eval::Evaluation;

#[path = "support/blur.rs"]
mod blur;
use blur::blur;
#[path = "support/study.rs"]
#[allow(dead_code)] // the shared study helpers; this study needs only the run and the figures
mod study;
use study::{figures, StudyRun};

/// The four figures of `ev` with its maps smoothed by `sigma` (its image scores kept).
fn smoothed_figures(ev: &Evaluation, sigma: f32) -> Result<[f64; 4]> {
    let maps = blur(&ev.maps, ev.size[0], ev.size[1], sigma);
    figures(ev, maps, Some(ev.scores.clone()))
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
    let study_run = StudyRun::open(&run)?;
    println!("map        sigma | validation: image AUROC / pixel AUROC / pixel AP / AUPRO | test");
    for map in [OutputMap::Detection, OutputMap::Refined] {
        let (val, test) = study_run.evaluate(map)?;
        for &s in &sigmas {
            let v = smoothed_figures(&val, s)?;
            let t = smoothed_figures(&test, s)?;
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
