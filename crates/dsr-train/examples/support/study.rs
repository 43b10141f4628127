//! Helpers shared by the map studies (`feature_study`, `map_variants`): images loaded at a
//! size, the four figures of a set of maps, and the normal images' statistics that standardise
//! a map before blending.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{Device, Tensor};
use dsr_eval::Evaluation;

/// `paths` loaded as a `B×3×size×size` batch (RGB in [0, 1]).
pub fn load(paths: &[PathBuf], size: usize) -> Result<Tensor> {
    let mut data = Vec::new();
    for p in paths {
        let img = dsr_eval::image::load_image(p, [size, size], u64::MAX)?;
        data.extend_from_slice(&img.chw);
    }
    Ok(Tensor::from_vec(
        data,
        (paths.len(), 3, size, size),
        &Device::Cpu,
    )?)
}

/// Image AUROC / pixel AUROC / pixel AP / AUPRO of `ev` with its maps replaced by `maps` and
/// its scores by `scores` (the maximum of each map when `None`).
pub fn figures(ev: &Evaluation, maps: Vec<f32>, scores: Option<Vec<f32>>) -> Result<[f64; 4]> {
    let mut e = ev.clone();
    let px = ev.size[0] * ev.size[1];
    e.scores = match scores {
        Some(s) => s,
        None => maps
            .chunks(px)
            .map(|m| m.iter().cloned().fold(f32::MIN, f32::max))
            .collect(),
    };
    e.maps = maps;
    let post = e.fit_postprocessor()?;
    let m = e.metrics(&post)?;
    Ok([m.image_auroc, m.pixel_auroc, m.pixel_ap, m.pixel_aupro])
}

/// Mean and standard deviation of the maps of the normal images of `ev`.
pub fn normal_stats(ev: &Evaluation, maps: &[f32]) -> (f32, f32) {
    let px = ev.size[0] * ev.size[1];
    let (mut n, mut s, mut s2) = (0f64, 0f64, 0f64);
    for (m, &l) in maps.chunks(px).zip(&ev.labels) {
        if !l {
            for &v in m {
                n += 1.0;
                s += f64::from(v);
                s2 += f64::from(v) * f64::from(v);
            }
        }
    }
    let mean = s / n;
    (mean as f32, (s2 / n - mean * mean).max(1e-12).sqrt() as f32)
}
