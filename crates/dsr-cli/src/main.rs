//! The `dsr` command.
//!
//! Exit codes: 0 success, 1 failure (the message names the file and the problem), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::weights::load_checkpoint;
use dsr_core::{DsrConfig, DsrModel};

const USAGE: &str = "usage: dsr <command>

commands:
  info FILE   describe a weight file (ours, an official .pckl or an anomalib .ckpt)
  demo        the built-in demo (training arrives with the training issue; for now it runs the
              inference pipeline of a small untrained model)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("info") if args.len() == 2 => info(PathBuf::from(&args[1])),
        Some("demo") if args.len() == 1 => demo(),
        Some("-h") | Some("--help") | Some("help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn info(path: PathBuf) -> Result<()> {
    let ckpt = load_checkpoint(&path).with_context(|| format!("reading {}", path.display()))?;
    println!("file: {}", path.display());
    println!("tensors: {}", ckpt.tensors.len());
    let elements: usize = ckpt.tensors.values().map(|t| t.elem_count()).sum();
    println!("elements: {elements}");
    match &ckpt.config {
        Some(cfg) => println!("config: {}", serde_json::to_string(cfg)?),
        None => println!("config: not recorded"),
    }
    match ckpt.image_size {
        Some([h, w]) => println!("image size: {h}×{w}"),
        None => println!("image size: not recorded"),
    }
    for (k, v) in &ckpt.metadata {
        if k != dsr_core::weights::META_CONFIG && k != dsr_core::weights::META_IMAGE_SIZE {
            println!("metadata {k}: {v}");
        }
    }
    Ok(())
}

fn demo() -> Result<()> {
    println!("dsr demo: training (phases 1-3 on the vendored battery_weld images) lands with the training and CLI issues.");
    println!("For now: the inference pipeline of a small untrained model on a 128×128 batch.");
    let cfg = DsrConfig::tiny();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = DsrModel::new(&cfg, vb)?;
    let image = Tensor::rand(0f32, 1f32, (2, 3, 128, 128), &Device::Cpu)?;
    let out = model.infer(&image)?;
    println!(
        "anomaly map {:?}, scores {:?}",
        out.anomaly_map.dims(),
        out.pred_score.to_vec1::<f32>()?
    );
    Ok(())
}
