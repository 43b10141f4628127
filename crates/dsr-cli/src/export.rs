//! `dsr export`: a checkpoint as a model file for other runtimes (see docs/deploy.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use dsr_export::{export_file, write_model, ExportOptions, DEFAULT_OPSET};

/// The formats `dsr export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An ONNX model (ONNX Runtime, Triton, KServe, OpenVINO).
    Onnx,
}

/// The options of `dsr export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The checkpoint to export (its configuration, image size, output map and thresholds go
    /// into the model's metadata).
    #[arg(long, value_name = "FILE")]
    pub model: PathBuf,
    /// The format of the exported model.
    #[arg(long, value_enum, default_value_t = Format::Onnx)]
    pub format: Format,
    /// The model file to write (written atomically; an existing file is replaced only when it
    /// is a model `dsr export` wrote).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The ONNX opset (13 to 21).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_OPSET)]
    pub opset: i64,
    /// A free batch dimension ("batch") instead of a batch of one.
    #[arg(long)]
    pub dynamic_batch: bool,
}

/// Runs `dsr export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let Format::Onnx = args.format;
    let opts = ExportOptions {
        opset: args.opset,
        dynamic_batch: args.dynamic_batch,
    };
    let model = export_file(&args.model, &opts)
        .with_context(|| format!("exporting {}", args.model.display()))?;
    write_model(&model, &args.out)?;
    let graph = model
        .graph
        .as_ref()
        .context("the exported model has no graph")?;
    let outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    println!(
        "wrote {} (ONNX opset {}, {} nodes, {} initializers; input {}, outputs {}; batch {})",
        args.out.display(),
        args.opset,
        graph.node.len(),
        graph.initializer.len(),
        dsr_export::INPUT,
        outputs.join(", "),
        if args.dynamic_batch { "dynamic" } else { "1" }
    );
    Ok(())
}
