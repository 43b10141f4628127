//! A nearest-neighbour map in the discrete model's feature space, beside the detection map of a
//! trained run: features of every training image kept in a memory, each test pixel scored by the
//! distance to its nearest kept feature, and the two maps combined.
//!
//! ```sh
//! cargo run --release -p dsr-train --example feature_study -- RUN_DIR [small|reference] [SIZE]
//! ```
//!
//! `RUN_DIR` is a finished `dsr train` run folder; the splits are drawn again from its
//! configuration and seed. The features come from the run's own discrete model (`small`, the
//! default) or the shipped reference-width codebook (`reference`), at `SIZE`² (the run's size by
//! default). Prints image AUROC / pixel AUROC / pixel AP / AUPRO on validation and test.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use dsr_core::discrete::DiscreteLatentModel;
use dsr_core::feature_memory::{pixel_rows, FeatureMemory};
use dsr_core::OutputMap;
use dsr_eval::Evaluation;
use dsr_train::codebook::GeneralCodebook;

#[path = "support/blur.rs"]
mod blur;
use blur::blur;
#[path = "support/study.rs"]
mod study;
use study::{figures, load, normal_stats, StudyRun};

/// Per-pixel features `B×C×h×w` of `images` (`B×3×S×S`).
fn features(dlm: &DiscreteLatentModel, images: &Tensor, kind: &str) -> Result<Tensor> {
    let enc = dlm.encode(images)?;
    let (_, _, h, w) = enc.z_b.dims4()?;
    let f = match kind {
        "zb" => enc.z_b.clone(),
        "zbt" => Tensor::cat(&[&enc.z_b, &enc.z_t.upsample_nearest2d(h, w)?], 1)?,
        "enc" => Tensor::cat(&[&enc.enc_b, &enc.enc_t.upsample_nearest2d(h, w)?], 1)?,
        "all" => Tensor::cat(
            &[
                &enc.enc_b,
                &enc.z_b,
                &enc.enc_t.upsample_nearest2d(h, w)?,
                &enc.z_t.upsample_nearest2d(h, w)?,
            ],
            1,
        )?,
        other => anyhow::bail!("unknown feature kind {other}"),
    };
    // 3×3 neighbourhood average (edges replicated).
    let f = f.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
    Ok(f.avg_pool2d_with_stride(3, 1)?)
}

/// The memory map of every sample of `ev`, at the evaluation's size.
fn memory_maps(
    dlm: &DiscreteLatentModel,
    mem: &FeatureMemory,
    ev: &Evaluation,
    size: usize,
    kind: &str,
) -> Result<Vec<f32>> {
    let [eh, ew] = ev.size;
    let mut out = Vec::with_capacity(ev.maps.len());
    for chunk in ev.samples.chunks(2) {
        let paths: Vec<PathBuf> = chunk.iter().map(|s| s.path.clone()).collect();
        let f = features(dlm, &load(&paths, size)?, kind)?;
        let (b, _, h, w) = f.dims4()?;
        let d = mem.nearest_distances(&pixel_rows(&f)?)?;
        let t = Tensor::from_vec(d, (b, 1, h, w), &Device::Cpu)?;
        let t = t.upsample_nearest2d(eh, ew)?;
        out.extend(t.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

fn line(name: &str, v: [f64; 4], t: [f64; 4]) {
    println!(
        "{name:<28} | {:.3} / {:.3} / {:.3} / {:.3} | {:.3} / {:.3} / {:.3} / {:.3}",
        v[0], v[1], v[2], v[3], t[0], t[1], t[2], t[3]
    );
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let run = PathBuf::from(args.next().context("usage: feature_study RUN_DIR")?);
    let which = args.next().unwrap_or_else(|| "small".into());
    let fsize: Option<usize> = args.next().map(|s| s.parse()).transpose()?;
    let kinds: Vec<String> = {
        let k: Vec<String> = args.collect();
        if k.is_empty() {
            vec!["zbt".into(), "enc".into(), "all".into()]
        } else {
            k
        }
    };
    let study_run = StudyRun::open(&run)?;
    let StudyRun {
        splits,
        model,
        size,
    } = &study_run;
    let size = *size;
    let t0 = std::time::Instant::now();
    let (val, test) = study_run.evaluate(OutputMap::Detection)?;
    eprintln!("detection maps: {:.1} s", t0.elapsed().as_secs_f64());
    line(
        "detection",
        figures(&val, val.maps.clone(), Some(val.scores.clone()))?,
        figures(&test, test.maps.clone(), Some(test.scores.clone()))?,
    );

    let dlm = match which.as_str() {
        "small" => model.discrete().clone(),
        "reference" => {
            let c = GeneralCodebook::GeneralReference.checkpoint()?;
            let rc = c.config.context("config")?;
            let vb = VarBuilder::from_tensors(c.tensors.clone(), DType::F32, &Device::Cpu);
            DiscreteLatentModel::new(&rc, vb.pp("discrete_latent_model"))?
        }
        other => anyhow::bail!("unknown codebook {other}"),
    };
    let fsize = fsize.unwrap_or(size[0]);
    let train: Vec<PathBuf> = splits.train.iter().map(|e| e.path.clone()).collect();
    for kind in &kinds {
        let t0 = std::time::Instant::now();
        let mut batches = Vec::new();
        for chunk in train.chunks(8) {
            batches.push(features(&dlm, &load(chunk, fsize)?, kind)?);
        }
        // MEM_CAP rows at an even stride (the product's subsample), else every training pixel.
        let cap = std::env::var("MEM_CAP")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let mem = FeatureMemory::from_features(&batches, cap)?;
        let mv = memory_maps(&dlm, &mem, &val, fsize, kind)?;
        let mt = memory_maps(&dlm, &mem, &test, fsize, kind)?;
        eprintln!(
            "{kind}: memory {:?}, {:.1} s",
            mem.rows().dims(),
            t0.elapsed().as_secs_f64()
        );
        let [h, w] = val.size;
        for sigma in [0.0f32, 2.0, 4.0] {
            let bv = blur(&mv, h, w, sigma);
            let bt = blur(&mt, h, w, sigma);
            line(
                &format!("{which}-{fsize} {kind} s{sigma}"),
                figures(&val, bv.clone(), None)?,
                figures(&test, bt.clone(), None)?,
            );
            // Combined with the detection map, each standardised on the validation normals.
            let (mk, sk) = normal_stats(&val, &bv);
            let (md, sd) = normal_stats(&val, &val.maps);
            for wk in [0.5f32, 1.0, 2.0] {
                let comb = |mm: &[f32], dm: &[f32]| -> Vec<f32> {
                    mm.iter()
                        .zip(dm)
                        .map(|(&a, &b)| wk * (a - mk) / sk + (b - md) / sd)
                        .collect()
                };
                line(
                    &format!("  + detection, weight {wk}"),
                    figures(&val, comb(&bv, &val.maps), None)?,
                    figures(&test, comb(&bt, &test.maps), None)?,
                );
            }
        }
    }
    Ok(())
}
