//! The `dsr` command.
//!
//! Exit codes: 0 success, 1 failure (the message names the file and the problem), 2 usage error.

mod augment;
mod convert;
mod evaluate;
mod export;
mod guard;
mod heap;
mod io;
mod predict;
mod progress;
mod render;
mod report;
mod shard;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dsr_core::weights::{load_checkpoint, META_CONFIG, META_IMAGE_SIZE, META_OUTPUT_MAP};
use dsr_eval::postprocess::{PostProcessor, METADATA_KEY};
use dsr_eval::{ConvAlgorithm, Execution, OnError, Precision};

const EXIT_CODES: &str = "Exit codes:
  0  success
  1  failure (the message names the file and the problem)
  2  usage error (unknown verb or flag, missing or malformed argument)";

/// DSR surface-anomaly detection: inspect and convert weights, predict, evaluate.
#[derive(Parser)]
#[command(name = "dsr", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Compute the 3×3 convolutions directly instead of by Winograd's algorithm (inference, and
    /// the forward and both gradients in training): each output then is the dot product
    /// PyTorch's CPU convolution computes, summed in the same order (about 2× slower
    /// inference; see docs/performance.md).
    #[arg(long, global = true)]
    direct_conv: bool,
    /// The arithmetic of the convolution products at inference (predict, test, and the
    /// evaluations of train and demo; training steps always compute in f32). bf16 multiplies
    /// bf16-rounded values with AVX512-BF16 and sums in f32: less memory, anomaly maps 7e-3 from
    /// f32's on average, faster only on CPUs whose bf16 dot products outrun their f32
    /// multiply-adds (docs/performance.md, "BF16"); it fails on CPUs without AVX512-BF16.
    #[arg(long, global = true, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
}

/// `--precision`: the arithmetic of the convolution products at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PrecisionArg {
    /// f32 operands and sums (the default).
    F32,
    /// bf16 operands, f32 sums (needs AVX512-BF16).
    Bf16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

// Parsed once per process: the size of the largest variant (train's many options) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Describe a weight file: configuration, image size, thresholds, tensor and element counts,
    /// other metadata.
    #[command(after_help = EXIT_CODES)]
    Info {
        /// The weight file: our safetensors checkpoint, an anomalib `model.ckpt` or an official
        /// `.pckl`.
        file: PathBuf,
    },
    /// Convert an anomalib `model.ckpt`, an official discrete-model `.pckl` or a safetensors
    /// file into our safetensors checkpoint, after checking every tensor against the
    /// configuration.
    #[command(after_help = EXIT_CODES)]
    Convert {
        /// The file to read.
        input: PathBuf,
        /// The checkpoint to write (replaced atomically if it exists and is a checkpoint dsr
        /// wrote; never the input).
        output: PathBuf,
        /// A JSON file with the model configuration (a configuration object, or an object with
        /// a "config" field), for inputs that do not record one. Default: the input's own
        /// configuration, else the reference configuration if the tensors fit it.
        #[arg(long, value_name = "JSON_FILE")]
        config: Option<PathBuf>,
        /// The training image size as H,W (for example 256,256), for inputs that do not record
        /// one. Default: the input's own, else none is recorded (users of the checkpoint then
        /// assume 256,256).
        #[arg(long, value_name = "H,W", value_parser = parse_size)]
        image_size: Option<[usize; 2]>,
    },
    /// Anomaly maps, scores, labels and overlays for images.
    ///
    /// Writes per image <OUT>/<stem>.png (jet overlay, predicted-mask contours in red, score and
    /// label) and <OUT>/<stem>.npy (float32 H×W map at the model's input size), and for the run
    /// <OUT>/predictions.csv and <OUT>/predictions.json. Every file is written atomically. When two
    /// inputs share a stem, the later ones get `_2`, `_3`, … appended; stems keep bytes that are
    /// not UTF-8, control characters and `%` as `%XX`. An existing file in <OUT> is replaced only
    /// if dsr wrote it (<OUT>/.dsr-outputs) and it is none of the inputs; <OUT> may not be a
    /// folder of the inputs.
    #[command(after_help = EXIT_CODES)]
    Predict(predict::PredictArgs),
    /// Evaluate on the test split of an MVTec-style folder (<data>/train/good/, <data>/test/<defect>/,
    /// <data>/ground_truth/<defect>/<stem>_mask.png): image AUROC and AP, pixel AUROC and AP,
    /// AUPRO (FPR ≤ 0.3), F1-max and F1 at the stored threshold, overall and per defect type.
    ///
    /// Prints a table and writes <OUT>/metrics.json and <OUT>/report.html (ROC and PR curves, best
    /// and worst examples). Without a post-processor in the checkpoint, F1 is computed at the
    /// F1-max threshold of the test set, and the outputs say so.
    #[command(after_help = EXIT_CODES)]
    Test(evaluate::TestArgs),
    /// Train DSR (phases 2 and 3, after phase 1 or with pretrained discrete weights) on an
    /// MVTec-style folder, then test it.
    ///
    /// The run goes to <RESULTS>/dsr/<dataset>/<category>/vN/: config.toml (the resolved
    /// configuration), metrics.jsonl (one line per step), weights/last.safetensors (resumable
    /// checkpoint), weights/model.safetensors (the final model with its thresholds, for
    /// `predict`), metrics.json and report.html (the test). Settings come from the defaults,
    /// then --config, then the flags, then --set.
    #[command(after_help = EXIT_CODES)]
    Train {
        #[command(flatten)]
        settings: train::TrainOverrides,
        /// Continue the run in this folder (its config.toml and weights/last.safetensors); the
        /// other settings flags are not allowed with it.
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "data", "category", "on_error", "max_pixels", "normal_dir", "abnormal_dir", "normal_test_dir", "mask_dir", "vq_weights", "pretrain", "pretrain_steps", "preset", "image_size", "batch", "phase2_steps", "phase3_steps", "recipe", "focal", "seed", "results", "checkpoint_every", "set", "time_budget"])]
        resume: Option<PathBuf>,
        /// Skip the test evaluation at the end.
        #[arg(long)]
        no_test: bool,
        /// Print the resolved run configuration (TOML) and exit without training.
        #[arg(long)]
        print_config: bool,
        /// Use less memory in phases 2 and 3: each conv → instance norm → ReLU block computes
        /// its convolution again in the backward instead of keeping its output. Same results to
        /// the bit, slower steps (see docs/performance.md). Allowed with --resume.
        #[arg(long)]
        recompute: bool,
        /// The compute device.
        #[arg(long, value_enum, default_value_t = train::DeviceArg::Cpu)]
        device: train::DeviceArg,
    },
    /// Phase 1: pretrain the discrete latent model (encoders, EMA codebooks, general decoder)
    /// on a folder of images; the result loads like the official .pckl (`--vq-weights`).
    #[command(after_help = EXIT_CODES)]
    Pretrain(train::PretrainArgs),
    /// Preview the synthetic anomalies: PNG grids of phase-2 masks and of phase-3 smudged
    /// images (contours of their masks) with their masks.
    #[command(after_help = EXIT_CODES)]
    Augment(augment::AugmentArgs),
    /// The built-in demo: trains a small DSR on the battery_weld images shipped in
    /// assets/demo (phases 1-3, about 6 minutes on 2 cores), tests it and writes the report.
    #[command(after_help = EXIT_CODES)]
    Demo(train::DemoArgs),
    /// Export a checkpoint's evaluation forward as an ONNX model (image N×3×H×W RGB in [0, 1]
    /// → anomaly map and score, and with stored thresholds their normalised values and
    /// labels) for ONNX Runtime, Triton or KServe; see docs/deploy.md.
    #[command(after_help = EXIT_CODES)]
    Export(export::ExportArgs),
}

/// Parses an error policy: fail or skip.
fn parse_on_error(s: &str) -> std::result::Result<OnError, String> {
    s.parse()
}

/// Parses a focal-loss kind.
fn parse_focal(s: &str) -> std::result::Result<dsr_losses::FocalKind, String> {
    match s.to_ascii_lowercase().as_str() {
        "original" => Ok(dsr_losses::FocalKind::Original),
        "anomalib" => Ok(dsr_losses::FocalKind::Anomalib),
        _ => Err(format!("'{s}' is not a focal loss: original or anomalib")),
    }
}

/// Parses a batch size: a whole number from 1 to 4096 (what the memory needs is checked once
/// the model is known).
fn parse_batch(s: &str) -> std::result::Result<usize, String> {
    let max = dsr_train::train::MAX_BATCH_SIZE;
    match s.trim().parse::<u128>() {
        Ok(n) if (1..=max as u128).contains(&n) => Ok(n as usize),
        Ok(n) => Err(format!("{n} is out of range: give a count from 1 to {max}")),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

/// Parses `H,W` (or `HxW`) into `[H, W]`.
fn parse_size(s: &str) -> std::result::Result<[usize; 2], String> {
    let parts: Vec<&str> = s.split([',', 'x', '×']).map(str::trim).collect();
    match parts.as_slice() {
        [h, w] => {
            let h: usize = h
                .parse()
                .map_err(|_| format!("'{h}' is not a whole number"))?;
            let w: usize = w
                .parse()
                .map_err(|_| format!("'{w}' is not a whole number"))?;
            dsr_core::config::validate_image_size(h, w).map_err(|e| e.to_string())?;
            Ok([h, w])
        }
        _ => Err(format!("expected H,W (for example 256,256), got '{s}'")),
    }
}

/// Parses `--image-size`: `H,W`, `auto` or `auto:N` (N a side of at least 64).
fn parse_size_arg(s: &str) -> std::result::Result<train::SizeArg, String> {
    let t = s.trim();
    match t.strip_prefix("auto") {
        Some("") => Ok(train::SizeArg::Shaped(None)),
        Some(rest) => {
            let n = rest.strip_prefix(':').ok_or_else(|| {
                format!("expected H,W, auto or auto:N (for example auto:128), got '{s}'")
            })?;
            let n: usize = n
                .trim()
                .parse()
                .map_err(|_| format!("'{n}' is not a whole number (auto:N takes a side in pixels, for example auto:128)"))?;
            if !(64..=dsr_core::config::MAX_IMAGE_SIDE).contains(&n) {
                return Err(format!(
                    "auto:{n}: the side must lie between 64 and {}",
                    dsr_core::config::MAX_IMAGE_SIDE
                ));
            }
            Ok(train::SizeArg::Shaped(Some(n)))
        }
        None => parse_size(t).map(train::SizeArg::Exact),
    }
}

fn main() -> ExitCode {
    // clap prints help and version with exit code 0 and usage errors with exit code 2.
    let cli = Cli::parse();
    // Before any work starts threads. Training starts with a lean heap: reusing every freed
    // buffer would make phase-2 steps faster but raise their peak above PyTorch's (phase 3
    // switches to reuse, see `train::run_session`).
    heap::tune_allocator(match cli.command {
        Command::Train { .. } | Command::Pretrain(_) | Command::Demo(_) => heap::HeapUse::Lean,
        _ => heap::HeapUse::Reuse,
    });
    let exec = Execution {
        precision: cli.precision.into(),
        ..Execution::with_conv(if cli.direct_conv {
            ConvAlgorithm::Direct
        } else {
            ConvAlgorithm::Winograd
        })
    };
    // Before any work: bf16 on a CPU without AVX512-BF16 is refused, not silently replaced by
    // f32 (a user who asks for it wants its speed, and its numbers are not f32's).
    if let Err(e) = exec.precision.check_supported() {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Info { file } => info(file),
        Command::Convert {
            input,
            output,
            config,
            image_size,
        } => convert::run(&input, &output, config.as_deref(), image_size),
        Command::Predict(args) => predict::run(&args, exec),
        Command::Test(args) => evaluate::run(&args, exec),
        Command::Train {
            settings,
            resume,
            no_test,
            print_config,
            recompute,
            device,
        } => train::train(
            &settings,
            resume.as_deref(),
            device,
            !no_test,
            print_config,
            Execution { recompute, ..exec },
        ),
        Command::Pretrain(args) => train::pretrain(&args, exec),
        Command::Augment(args) => augment::run(&args).map(|_| ()),
        Command::Demo(args) => train::demo(&args, exec),
        Command::Export(args) => export::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::from(1)
        }
    }
}

/// An error and its causes on one line: each cause's message once (a cause whose text the line
/// already holds, as errors that print their source do, is left out), line breaks joined.
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn info(path: PathBuf) -> Result<()> {
    if !path.exists() {
        anyhow::bail!("the file {} does not exist", path.display());
    }
    let ckpt = load_checkpoint(&path).with_context(|| format!("reading {}", path.display()))?;
    println!("file: {}", path.display());
    match &ckpt.config {
        Some(cfg) => println!("config: {}", serde_json::to_string(cfg)?),
        None => println!("config: not recorded"),
    }
    match ckpt.image_size {
        Some([h, w]) => println!("image size: {h}×{w}"),
        None => println!("image size: not recorded (256×256 is assumed)"),
    }
    match ckpt.metadata.get(METADATA_KEY) {
        Some(json) => match PostProcessor::from_json(json) {
            Ok(p) => println!(
                "thresholds: image {} (scores {}..{}), pixel {} (maps {}..{})",
                p.image_threshold,
                p.image_min,
                p.image_max,
                p.pixel_threshold,
                p.pixel_min,
                p.pixel_max
            ),
            Err(e) => println!("thresholds: '{METADATA_KEY}' is not valid: {e}"),
        },
        None => println!("thresholds: none (no post-processor stored)"),
    }
    match ckpt.output_map() {
        Ok(map) => println!(
            "output map: {map} ({})",
            match map {
                dsr_core::OutputMap::Refined => "the upsampling module's refined mask",
                dsr_core::OutputMap::Detection => "the anomaly detection module's mask",
                dsr_core::OutputMap::Memory =>
                    "the distance to the feature memory of the training images",
                dsr_core::OutputMap::Combined =>
                    "the detection module's mask combined with the feature memory's distance",
            }
        ),
        Err(e) => println!("output map: not valid: {e}"),
    }
    match ckpt.feature_memory(&candle_core::Device::Cpu) {
        Ok(Some(memory)) => println!(
            "feature memory: {} features of {} channels{}",
            memory.rows().dims()[0],
            memory.channels(),
            match memory.blend() {
                Some(b) => format!(
                    ", combined with distance weight {} (detection mean {:.4}, sd {:.4}; distance mean {:.4}, sd {:.4})",
                    b.weight, b.detection_mean, b.detection_std, b.memory_mean, b.memory_std
                ),
                None => String::new(),
            }
        ),
        Ok(None) => println!("feature memory: none"),
        Err(e) => println!("feature memory: not valid: {e}"),
    }
    println!("tensors: {}", ckpt.tensors.len());
    let elements: usize = ckpt.tensors.values().map(|t| t.elem_count()).sum();
    println!("elements: {elements}");
    for (k, v) in &ckpt.metadata {
        if ![META_CONFIG, META_IMAGE_SIZE, METADATA_KEY, META_OUTPUT_MAP].contains(&k.as_str()) {
            println!("metadata {k}: {v}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_validate() {
        assert_eq!(parse_size("256,256"), Ok([256, 256]));
        assert_eq!(parse_size("64x128"), Ok([64, 128]));
        assert!(parse_size("65,64").is_err());
        assert!(parse_size("64").is_err());
        assert!(parse_size("a,64").is_err());
        use train::SizeArg;
        assert_eq!(parse_size_arg("96,160"), Ok(SizeArg::Exact([96, 160])));
        assert_eq!(parse_size_arg("auto"), Ok(SizeArg::Shaped(None)));
        assert_eq!(parse_size_arg("auto:128"), Ok(SizeArg::Shaped(Some(128))));
        for bad in ["auto:12", "auto:x", "auto128", "automatic", "65,64"] {
            assert!(parse_size_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_are_one_line_with_each_cause_once() {
        let io = std::io::Error::other("not a regular file but a FIFO (named pipe)");
        let e = anyhow::Error::new(io)
            .context("m.safetensors: not a regular file but a FIFO (named pipe)");
        let e = e.context("reading m.safetensors");
        assert_eq!(
            error_line(&e),
            "reading m.safetensors: m.safetensors: not a regular file but a FIFO (named pipe)"
        );
        let e = anyhow::anyhow!("line one\n  line two\n").context("outer");
        assert_eq!(error_line(&e), "outer: line one; line two");
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
