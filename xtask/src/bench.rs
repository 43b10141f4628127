//! `cargo xtask bench`: the performance table of the default model (images/s, seconds per
//! training step, peak RSS), each figure measured in its own process by the `bench` example of
//! the root package (`benches/pipeline.rs`), optionally beside anomalib's PyTorch model timed the same way by
//! `xtask/bench/torch_reference.py`, and optionally the criterion benches first.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const USAGE: &str =
    "usage: cargo xtask bench [--quick] [--torch PYTHON] [--onnx PYTHON] [--infer-only] [--criterion] [--repeat N] [--json OUT]

Builds the `bench` example (benches/pipeline.rs) in release mode and runs one process per
measurement of the default model at 256x256: inference at batch 1 and 8, a
phase-2 and a phase-3 training step at batch 8. Prints images/s, seconds per
step and peak RSS (VmHWM of the measuring process).

  --quick        the small configuration at 128x128, one timed repeat (a smoke
                 run; its figures are not the targets' measures)
  --torch PY     also time anomalib's PyTorch model with this Python (needs
                 `pip install torch anomalib==2.7.0`; DSR_BENCH_PYTHON works
                 too) and print the ratios
  --onnx PY      also time the model exported by `dsr export` (same seeded
                 weights, dynamic batch) in ONNX Runtime with 2 threads, with
                 this Python (needs `pip install onnxruntime numpy`;
                 DSR_BENCH_ONNX_PYTHON works too): inference rows only
  --infer-only   the inference rows only (no training steps)
  --criterion    run the criterion benches first: network parts and whole
                 forward and training steps (benches/), convolutions (dsr-core)
  --repeat N     timed calls per measurement after one warm-up (default 3;
                 the median is reported)
  --json OUT     also write every measurement as JSON to OUT
";

/// The criterion benches `--criterion` runs: the network parts and whole forward, the
/// convolutions, the training steps.
const CRITERION: [&[&str]; 2] = [
    &[
        "bench", "-p", "dsr-rs", "--bench", "network", "--bench", "steps",
    ],
    &["bench", "-p", "dsr-core", "--bench", "conv"],
];

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub quick: bool,
    pub torch: Option<PathBuf>,
    pub onnx: Option<PathBuf>,
    pub infer_only: bool,
    pub criterion: bool,
    pub repeat: usize,
    pub json: Option<PathBuf>,
}

/// Parses the options; `None` after `--help`.
pub fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    let mut opts = Options {
        quick: false,
        torch: std::env::var_os("DSR_BENCH_PYTHON").map(PathBuf::from),
        onnx: std::env::var_os("DSR_BENCH_ONNX_PYTHON").map(PathBuf::from),
        infer_only: false,
        criterion: false,
        repeat: 3,
        json: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--quick" => opts.quick = true,
            "--criterion" => opts.criterion = true,
            "--infer-only" => opts.infer_only = true,
            "--torch" => match it.next() {
                Some(v) if !v.is_empty() => opts.torch = Some(PathBuf::from(v)),
                _ => return Err("--torch needs a Python interpreter".into()),
            },
            "--onnx" => match it.next() {
                Some(v) if !v.is_empty() => opts.onnx = Some(PathBuf::from(v)),
                _ => return Err("--onnx needs a Python interpreter".into()),
            },
            "--json" => match it.next() {
                Some(v) if !v.is_empty() => opts.json = Some(PathBuf::from(v)),
                _ => return Err("--json needs a file".into()),
            },
            "--repeat" => match it.next().map(|v| v.parse::<usize>()) {
                Some(Ok(n)) if n > 0 => opts.repeat = n,
                _ => return Err("--repeat needs a positive whole number".into()),
            },
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    Ok(Some(opts))
}

/// One measurement: what to run and how it is labelled.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub label: &'static str,
    pub mode: &'static str,
    pub batch: usize,
    pub size: usize,
    pub preset: &'static str,
}

/// The measurements of the performance table (or the quick smoke set).
pub fn cases(quick: bool) -> Vec<Case> {
    let (size, preset, train_batch) = if quick {
        (128, "small", 2)
    } else {
        (256, "reference", 8)
    };
    let case = |label, mode, batch| Case {
        label,
        mode,
        batch,
        size,
        preset,
    };
    vec![
        case("inference, batch 1", "infer", 1),
        case("inference, batch 8", "infer", if quick { 2 } else { 8 }),
        case("phase-2 step", "phase2", train_batch),
        case("phase-3 step", "phase3", train_batch),
    ]
}

/// The result line of one measuring process.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub median_s: f64,
    pub images_per_s: f64,
    pub peak_rss_bytes: u64,
    pub raw: Value,
}

/// Reads the last JSON object line of a measuring process's stdout.
pub fn parse_measurement(stdout: &str) -> Result<Measurement> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("the measuring process printed no JSON result line")?;
    let raw: Value = serde_json::from_str(line).context("its result line is not JSON")?;
    let num = |key: &str| {
        raw.get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("its result has no number '{key}'"))
    };
    Ok(Measurement {
        median_s: num("median_s")?,
        images_per_s: num("images_per_s")?,
        peak_rss_bytes: num("peak_rss_bytes")? as u64,
        raw,
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run_child(cmd: &mut Command, what: &str) -> Result<Measurement> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    parse_measurement(&stdout).with_context(|| format!("reading {what}'s result"))
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn figure(case: &Case, m: &Measurement) -> String {
    if case.mode == "infer" {
        format!("{:.3} img/s ({:.2} s)", m.images_per_s, m.median_s)
    } else {
        format!("{:.2} s/step", m.median_s)
    }
}

/// Runs the whole task.
pub fn run(opts: &Options) -> Result<()> {
    let root = workspace_root();
    let cargo = env!("CARGO");
    if opts.criterion {
        for args in CRITERION {
            let status = Command::new(cargo)
                .current_dir(&root)
                .args(args)
                .status()
                .context("cannot run cargo bench")?;
            if !status.success() {
                bail!("cargo {} failed", args.join(" "));
            }
        }
    }
    println!("building the bench example (release)…");
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--release", "-p", "dsr-rs", "--example", "bench"])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("building the bench example failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bench = target.join("release/examples/bench");
    let script = root.join("xtask/bench/torch_reference.py");
    let repeat = if opts.quick { 1 } else { opts.repeat };

    // ONNX Runtime measures the reference model only (the quick run's small configuration
    // belongs to the training crate).
    let onnx_model = match &opts.onnx {
        Some(_) if !opts.quick => Some(export_seeded(&target)?),
        Some(_) => {
            eprintln!("--onnx is ignored with --quick: ONNX Runtime times the reference model");
            None
        }
        None => None,
    };
    let onnx_script = root.join("xtask/bench/onnx_runtime.py");

    let mut rows = Vec::new();
    let mut records = Vec::new();
    let mut onnx_rows = Vec::new();
    for case in cases(opts.quick) {
        if opts.infer_only && case.mode != "infer" {
            continue;
        }
        let args = [
            case.mode.to_string(),
            "--batch".into(),
            case.batch.to_string(),
            "--size".into(),
            case.size.to_string(),
            "--repeat".into(),
            repeat.to_string(),
        ];
        eprintln!("measuring {} ({}×{})…", case.label, case.size, case.size);
        let ours = run_child(
            Command::new(&bench)
                .args(&args)
                .args(["--preset", case.preset]),
            &format!("{} {}", bench.display(), args.join(" ")),
        )?;
        let torch = match (&opts.torch, case.preset) {
            (Some(python), "reference") => Some(run_child(
                Command::new(python).arg(&script).args(&args),
                &format!(
                    "{} {} {}",
                    python.display(),
                    script.display(),
                    args.join(" ")
                ),
            )?),
            _ => None,
        };
        let onnx = match (&opts.onnx, &onnx_model, case.mode) {
            (Some(python), Some(model), "infer") => Some(run_child(
                Command::new(python)
                    .arg(&onnx_script)
                    .arg(model)
                    .args(["--threads", "2"])
                    .args(&args[1..]),
                &format!(
                    "{} {} {}",
                    python.display(),
                    onnx_script.display(),
                    model.display()
                ),
            )?),
            _ => None,
        };
        if let Some(o) = &onnx {
            onnx_rows.push((case.clone(), ours.clone(), o.clone()));
        }
        records.push(serde_json::json!({
            "label": case.label,
            "ours": ours.raw,
            "torch": torch.as_ref().map(|t| t.raw.clone()),
            "onnxruntime": onnx.as_ref().map(|o| o.raw.clone()),
        }));
        rows.push((case, ours, torch));
    }

    println!();
    println!(
        "| measure ({}) | dsr-rs | peak RSS | PyTorch | peak RSS | speed ratio (ours / PyTorch) |",
        if opts.quick {
            "small config, 128×128"
        } else {
            "default config, 256×256"
        }
    );
    println!("|---|---|---|---|---|---|");
    for (case, ours, torch) in &rows {
        let label = format!(
            "{}, batch {}",
            case.label.split(',').next().unwrap_or(case.label),
            case.batch
        );
        match torch {
            Some(t) => println!(
                "| {label} | {} | {} | {} | {} | {:.2}× |",
                figure(case, ours),
                gb(ours.peak_rss_bytes),
                figure(case, t),
                gb(t.peak_rss_bytes),
                ours.images_per_s / t.images_per_s
            ),
            None => println!(
                "| {label} | {} | {} | – | – | – |",
                figure(case, ours),
                gb(ours.peak_rss_bytes)
            ),
        }
    }
    if !onnx_rows.is_empty() {
        println!();
        println!("| measure | dsr-rs | ONNX Runtime, 2 threads (`dsr export`) | peak RSS | speed ratio (ours / ONNX Runtime) |");
        println!("|---|---|---|---|---|");
        for (case, ours, o) in &onnx_rows {
            println!(
                "| inference, batch {} | {} | {} | {} | {:.2}× |",
                case.batch,
                figure(case, ours),
                figure(case, o),
                gb(o.peak_rss_bytes),
                ours.images_per_s / o.images_per_s
            );
        }
    }
    if opts.torch.is_none() {
        println!(
            "\n(PyTorch not timed: pass --torch PYTHON, a Python with torch and anomalib 2.7.0)"
        );
    }
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&Value::Array(records))?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Writes the bench's model (seeded weights of the reference configuration, as the bench example
/// draws them) as a checkpoint and exports it with a free batch dimension; returns the `.onnx`.
fn export_seeded(target: &Path) -> Result<PathBuf> {
    let (cfg, size) = (dsr_core::DsrConfig::default(), 256);
    let dir = target.join("bench-onnx");
    std::fs::create_dir_all(&dir)?;
    let ckpt = dir.join(format!("seeded-{size}.safetensors"));
    let weights = dsr_core::DsrModel::seeded_weights(&cfg, 0)?;
    dsr_core::weights::save_checkpoint(
        &ckpt,
        &weights,
        &cfg,
        Some([size, size]),
        &Default::default(),
    )?;
    let model = dsr_export::export_file(
        &ckpt,
        &dsr_export::ExportOptions {
            dynamic_batch: true,
            ..Default::default()
        },
    )?;
    let out = dir.join(format!("seeded-{size}.onnx"));
    dsr_export::write_model(&model, &out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse() {
        let opts = parse_args(&args(&["--quick", "--repeat", "5", "--torch", "py"]))
            .unwrap()
            .unwrap();
        assert!(opts.quick);
        assert_eq!(opts.repeat, 5);
        assert_eq!(opts.torch, Some(PathBuf::from("py")));
        assert_eq!(parse_args(&args(&["--help"])).unwrap(), None);
        assert!(parse_args(&args(&["--repeat", "0"])).is_err());
        assert!(parse_args(&args(&["--torch"])).is_err());
        assert!(parse_args(&args(&["--bogus"])).is_err());
    }

    #[test]
    fn the_table_measures_the_targets() {
        let full = cases(false);
        let modes: Vec<(&str, usize, usize)> =
            full.iter().map(|c| (c.mode, c.batch, c.size)).collect();
        assert_eq!(
            modes,
            [
                ("infer", 1, 256),
                ("infer", 8, 256),
                ("phase2", 8, 256),
                ("phase3", 8, 256)
            ]
        );
        assert!(full.iter().all(|c| c.preset == "reference"));
        assert!(cases(true).iter().all(|c| c.preset == "small"));
    }

    #[test]
    fn result_lines_parse() {
        let out = "noise\n{\"mode\":\"infer\",\"median_s\":2.0,\"images_per_s\":0.5,\"peak_rss_bytes\":1000}\n";
        let m = parse_measurement(out).unwrap();
        assert_eq!(m.median_s, 2.0);
        assert_eq!(m.images_per_s, 0.5);
        assert_eq!(m.peak_rss_bytes, 1000);
        assert!(parse_measurement("no json here").is_err());
        assert!(parse_measurement("{\"median_s\":1}").is_err());
    }
}
