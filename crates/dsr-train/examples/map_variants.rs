//! Variants of the output map of a trained run, measured on its validation and test splits: the
//! detection map averaged over a horizontal flip, the feature-memory distance upsampled nearest or
//! bilinear, computed from the image at the model size or at twice it, and their blends.
//!
//! ```sh
//! cargo run --release -p dsr-train --example map_variants -- RUN_DIR
//! ```
//!
//! `RUN_DIR` is a finished `dsr train` run folder; the splits are drawn again from its
//! configuration and seed. Prints image AUROC / pixel AUROC / pixel AP / AUPRO on validation and
//! test for every variant (the image score is the map's maximum unless the line says detection).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use dsr_core::feature_memory::{default_capacity, pixel_rows, FeatureMemory};
use dsr_core::{DsrModel, OutputMap};
use dsr_eval::Evaluation;

#[path = "support/study.rs"]
mod study;
use study::{figures, load, normal_stats, StudyRun};

/// Per-pixel memory features of `images`, as the product computes them.
fn features(model: &DsrModel, images: &Tensor) -> Result<Tensor> {
    Ok(FeatureMemory::features(&model.discrete().encode(images)?)?)
}

/// Maps of one set: detection, detection of the flipped image flipped back, and memory distance
/// maps (nearest / bilinear) at each feature size.
struct SetMaps {
    det: Vec<f32>,
    det_flip: Vec<f32>,
    mem: Vec<(String, Vec<f32>)>,
}

fn set_maps(
    model: &DsrModel,
    mems: &[(usize, FeatureMemory)],
    ev: &Evaluation,
    size: usize,
) -> Result<SetMaps> {
    let [eh, ew] = ev.size;
    let mut det = Vec::new();
    let mut det_flip = Vec::new();
    let mut mem: Vec<(String, Vec<f32>)> = Vec::new();
    for (fs, _) in mems {
        for up in ["nearest", "bilinear"] {
            mem.push((format!("memory {fs} {up}"), Vec::new()));
        }
    }
    let det_model = model.clone().with_output_map(OutputMap::Detection);
    for chunk in ev.samples.chunks(4) {
        let paths: Vec<PathBuf> = chunk.iter().map(|s| s.path.clone()).collect();
        let x = load(&paths, size)?;
        det.extend(
            det_model
                .infer(&x)?
                .anomaly_map
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
        let xf = x.flip(&[3])?.contiguous()?;
        let mf = det_model.infer(&xf)?.anomaly_map.contiguous()?.flip(&[2])?;
        det_flip.extend(mf.flatten_all()?.to_vec1::<f32>()?);
        for (i, (fs, m)) in mems.iter().enumerate() {
            let xs = if *fs == size {
                x.clone()
            } else {
                load(&paths, *fs)?
            };
            let f = features(model, &xs)?;
            let (b, _, h, w) = f.dims4()?;
            let d = m.nearest_distances(&pixel_rows(&f)?)?;
            let t = Tensor::from_vec(d, (b, 1, h, w), &Device::Cpu)?;
            mem[2 * i].1.extend(
                t.upsample_nearest2d(eh, ew)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
            mem[2 * i + 1].1.extend(
                t.upsample_bilinear2d(eh, ew, false)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
    }
    Ok(SetMaps { det, det_flip, mem })
}

fn line(name: &str, v: [f64; 4], t: [f64; 4]) {
    println!(
        "{name:<40} | {:.3} / {:.3} / {:.3} / {:.3} | {:.3} / {:.3} / {:.3} / {:.3}",
        v[0], v[1], v[2], v[3], t[0], t[1], t[2], t[3]
    );
}

fn average(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| 0.5 * (x + y)).collect()
}

fn main() -> Result<()> {
    let run = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: map_variants RUN_DIR")?,
    );
    let study_run = StudyRun::open(&run)?;
    let StudyRun {
        splits,
        model,
        size,
    } = &study_run;
    let size = *size;
    let (val, test) = study_run.evaluate(OutputMap::Detection)?;

    let train: Vec<PathBuf> = splits.train.iter().map(|e| e.path.clone()).collect();
    let cap = default_capacity(features(model, &load(&train[..1], size[0])?)?.dims4()?.1);
    let mut mems = Vec::new();
    for fs in [size[0], 2 * size[0]] {
        let mut batches = Vec::new();
        for chunk in train.chunks(8) {
            batches.push(features(model, &load(chunk, fs)?)?);
        }
        mems.push((fs, FeatureMemory::from_features(&batches, cap)?));
    }
    let t0 = std::time::Instant::now();
    let v = set_maps(model, &mems, &val, size[0])?;
    let t = set_maps(model, &mems, &test, size[0])?;
    eprintln!("maps: {:.1} s", t0.elapsed().as_secs_f64());

    line(
        "detection (detection score)",
        figures(&val, v.det.clone(), Some(val.scores.clone()))?,
        figures(&test, t.det.clone(), Some(test.scores.clone()))?,
    );
    let vdf = average(&v.det, &v.det_flip);
    let tdf = average(&t.det, &t.det_flip);
    line(
        "detection + flip (detection score)",
        figures(&val, vdf.clone(), Some(val.scores.clone()))?,
        figures(&test, tdf.clone(), Some(test.scores.clone()))?,
    );
    let mut mem_v = v.mem.clone();
    let mut mem_t = t.mem.clone();
    // The two feature sizes' bilinear maps averaged after standardising each.
    let (a, b) = (&v.mem[1].1, &v.mem[3].1);
    let (ma, sa) = normal_stats(&val, a);
    let (mb, sb) = normal_stats(&val, b);
    let st = |x: &[f32], y: &[f32]| -> Vec<f32> {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - ma) / sa + (q - mb) / sb)
            .collect()
    };
    mem_v.push(("memory both sizes bilinear".into(), st(a, b)));
    mem_t.push((
        "memory both sizes bilinear".into(),
        st(&t.mem[1].1, &t.mem[3].1),
    ));
    for ((name, mv), (_, mt)) in mem_v.iter().zip(&mem_t) {
        line(
            name,
            figures(&val, mv.clone(), None)?,
            figures(&test, mt.clone(), None)?,
        );
        for (dname, dv, dt) in [("det", &v.det, &t.det), ("det+flip", &vdf, &tdf)] {
            let (mk, sk) = normal_stats(&val, mv);
            let (md, sd) = normal_stats(&val, dv);
            for wk in [0.5f32, 1.0, 2.0] {
                let comb = |mm: &[f32], dm: &[f32]| -> Vec<f32> {
                    mm.iter()
                        .zip(dm)
                        .map(|(&a, &b)| wk * (a - mk) / sk + (b - md) / sd)
                        .collect()
                };
                line(
                    &format!("  + {dname}, weight {wk}"),
                    figures(&val, comb(mv, dv), Some(val.scores.clone()))?,
                    figures(&test, comb(mt, dt), Some(test.scores.clone()))?,
                );
            }
        }
    }
    Ok(())
}
