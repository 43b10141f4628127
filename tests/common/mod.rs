//! Helpers shared by the `dsr` command's tests: the end-to-end tests of the root package and
//! dsr-cli's own (which includes this file).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::init::{init_seeded, InitScheme};
use dsr_core::weights::save_checkpoint;
use dsr_core::{DsrConfig, DsrModel};
use dsr_eval::postprocess::{PostProcessor, METADATA_KEY};
use image::{Rgb, RgbImage};

/// The `dsr` binary: cargo's own path for dsr-cli's tests; for the root package's, the one
/// `cargo test --workspace` builds beside the test executables (`target/<profile>/dsr`).
pub fn dsr_exe() -> PathBuf {
    if let Some(exe) = option_env!("CARGO_BIN_EXE_dsr") {
        return PathBuf::from(exe);
    }
    let mut dir = std::env::current_exe().expect("the test executable's path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let exe = dir.join(format!("dsr{}", std::env::consts::EXE_SUFFIX));
    assert!(
        exe.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, or `cargo build -p dsr-cli` first",
        exe.display()
    );
    exe
}

pub fn dsr(args: &[&str]) -> Output {
    Command::new(dsr_exe())
        .args(args)
        .output()
        .expect("the dsr binary runs")
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// Writes a tiny seeded model at 64×64, with a post-processor when `post` is set.
pub fn make_model(path: &Path, post: bool) {
    let cfg = DsrConfig::tiny();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    DsrModel::new(&cfg, vb).unwrap();
    init_seeded(&varmap, 11, InitScheme::Pytorch, &[]).unwrap();
    let tensors = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let mut extra = BTreeMap::new();
    if post {
        let p = PostProcessor {
            image_threshold: 0.3,
            pixel_threshold: 0.4,
            image_min: 0.0,
            image_max: 1.0,
            pixel_min: 0.0,
            pixel_max: 1.0,
        };
        extra.insert(METADATA_KEY.to_string(), p.to_json().unwrap());
    }
    save_checkpoint(path, &tensors, &cfg, Some([64, 64]), &extra).unwrap();
}

/// A textured image with an optional bright square defect; returns the defect mask.
pub fn make_image(path: &Path, w: u32, h: u32, defect: bool, seed: u32) -> RgbImage {
    let mut img = RgbImage::new(w, h);
    let mut mask = RgbImage::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let v = ((x * 7 + y * 13 + seed * 31) % 64 + 96) as u8;
            img.put_pixel(x, y, Rgb([v, v / 2 + 40, 255 - v]));
            if defect && (w / 3..w / 2).contains(&x) && (h / 3..h / 2).contains(&y) {
                img.put_pixel(x, y, Rgb([255, 255, 255]));
                mask.put_pixel(x, y, Rgb([255, 255, 255]));
            }
        }
    }
    img.save(path).unwrap();
    mask
}
