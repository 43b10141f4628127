//! `cargo xtask bench`: the performance table (images/s, seconds per training step, seconds per
//! image of `dsr predict`, peak RSS), each figure measured in its own process: by the `bench`
//! example of the root package (`benches/pipeline.rs`), by the release `dsr` binary (`predict`,
//! `first-map`), optionally beside anomalib's PyTorch model timed the same way by
//! `xtask/bench/torch_reference.py` and ONNX Runtime (`xtask/bench/onnx_runtime.py`) on the
//! model `dsr export` writes and on anomalib's own export (`xtask/bench/anomalib_onnx.py`), and
//! optionally the criterion benches first. Each row is printed as soon as it is measured, the
//! tables at the end.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub const USAGE: &str =
    "usage: cargo xtask bench [--quick] [--only NAME[,NAME…]]… [--torch PYTHON] [--onnx PYTHON]
                          [--infer-only] [--criterion] [--repeat N] [--json OUT]

Builds the `bench` example (benches/pipeline.rs) and the `dsr` binary in release mode
and runs one process per measurement; prints each row as it is measured, then the
tables. Measurements (NAME: what; reference model at 256x256 unless said):

  infer-b1         inference, batch 1: images/s
  infer-b8         inference, batch 8: images/s
  bf16-b1          inference with `--precision bf16` (AVX512-BF16 products), batch 1;
                   skipped, with the reason, on a CPU without the instruction
  bf16-b8          the same, batch 8
  phase2-b8        phase-2 training step, batch 8: seconds per step
  phase3-b8        phase-3 training step, batch 8: seconds per step
  small-phase2     phase-2 step of the small model (--preset small), 128x128, batch 8
  small-phase3     phase-3 step of the small model, 128x128, batch 8
  predict          `dsr predict --batch 8` on 9 demo images against 1, each in its own
                   process: seconds per image without startup, (t9 - t1) / 8
  first-map        `dsr predict` on one image: wall seconds, model load included
  onnx-b1          ONNX Runtime (2 threads) on `dsr export`'s model, batch 1 (--onnx)
  onnx-b8          the same, batch 8 (--onnx)
  ort-anomalib-b1  ONNX Runtime (2 threads) on anomalib's own ONNX export, batch 1
                   (--onnx; that Python also needs torch, anomalib 2.7.0, onnxscript)
  ort-anomalib-b8  the same, batch 8

Peak RSS is the VmHWM (ru_maxrss) of the measuring process. The ONNX rows print our
inference at the same batch beside them (measured once, shared with infer-bN).

  --quick        every measurement on the small model at 128x128, batch 2 for
                 batch 8, 3 images for predict, one timed repeat (a smoke run;
                 its figures are not the targets' measures)
  --only NAMES   only these measurements (comma-separated or repeated; default:
                 all, the onnx and ort-anomalib ones only with --onnx)
  --torch PY     also time anomalib's PyTorch model with this Python (needs
                 `pip install torch anomalib==2.7.0`; DSR_BENCH_PYTHON works
                 too) and print the ratios; `predict` is set against PyTorch's
                 forward per image at batch 8
  --onnx PY      also time ONNX Runtime with this Python (needs `pip install
                 onnxruntime numpy`; DSR_BENCH_ONNX_PYTHON works too)
  --infer-only   no training steps (phase2-b8, phase3-b8, small-phase2/3)
  --criterion    run the criterion benches first: network parts and whole
                 forward and training steps (benches/), convolutions (dsr-core)
  --repeat N     timed calls (processes, for predict and first-map) per
                 measurement after one warm-up (default 3; the median is reported)
  --json OUT     also write every measurement as JSON to OUT (rewritten after
                 each measurement)
";

/// The criterion benches `--criterion` runs: the network parts and whole forward, the
/// convolutions, the training steps.
const CRITERION: [&[&str]; 2] = [
    &[
        "bench", "-p", "dsr-rs", "--bench", "network", "--bench", "steps",
    ],
    &["bench", "-p", "dsr-core", "--bench", "conv"],
];

/// The names `--only` takes, in the order the measurements run.
pub const NAMES: [&str; 14] = [
    "infer-b1",
    "infer-b8",
    "bf16-b1",
    "bf16-b8",
    "phase2-b8",
    "phase3-b8",
    "small-phase2",
    "small-phase3",
    "predict",
    "first-map",
    "onnx-b1",
    "onnx-b8",
    "ort-anomalib-b1",
    "ort-anomalib-b8",
];

/// Images `dsr predict` runs on in the `predict` measurement (9, as the issue measured; 3 with
/// `--quick`). The per-image figure is `(t(N) − t(1)) / (N − 1)`.
pub fn predict_images(quick: bool) -> usize {
    if quick {
        3
    } else {
        9
    }
}

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Every measurement on the small model at 128×128, one timed repeat.
    pub quick: bool,
    /// The Python that times anomalib's PyTorch model.
    pub torch: Option<PathBuf>,
    /// The Python that runs ONNX Runtime (and anomalib's export).
    pub onnx: Option<PathBuf>,
    /// No training steps.
    pub infer_only: bool,
    /// Run the criterion benches first.
    pub criterion: bool,
    /// Timed calls per measurement.
    pub repeat: usize,
    /// Where to write every measurement as JSON.
    pub json: Option<PathBuf>,
    /// The measurements `--only` selected (valid names, in the order given); empty: the default
    /// set.
    pub only: Vec<String>,
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
        only: Vec::new(),
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
            "--only" => match it.next() {
                Some(v) if !v.trim().is_empty() && !v.starts_with("--") => {
                    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                        if !NAMES.contains(&name) {
                            return Err(format!(
                                "unknown measurement '{name}' for --only: the names are {}",
                                NAMES.join(", ")
                            ));
                        }
                        if !opts.only.iter().any(|n| n == name) {
                            opts.only.push(name.to_string());
                        }
                    }
                }
                _ => {
                    return Err(format!(
                        "--only needs measurement names ({})",
                        NAMES.join(", ")
                    ))
                }
            },
            other => return Err(format!("unexpected argument '{other}'")),
        }
    }
    if opts.onnx.is_none() {
        if let Some(name) = opts.only.iter().find(|n| needs_onnx(n)) {
            return Err(format!(
                "{name} runs ONNX Runtime: pass --onnx PYTHON (or set DSR_BENCH_ONNX_PYTHON)"
            ));
        }
    }
    Ok(Some(opts))
}

/// Whether the measurement `name` runs ONNX Runtime (and so needs `--onnx`).
fn needs_onnx(name: &str) -> bool {
    name.starts_with("onnx-") || name.starts_with("ort-")
}

/// What a measurement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The bench example's `infer`: images/s of the inference forward.
    Infer,
    /// The bench example's `infer --precision bf16`: the same with bf16 products.
    InferBf16,
    /// The bench example's `phase2`: seconds per phase-2 training step.
    Phase2,
    /// The bench example's `phase3`: seconds per phase-3 training step.
    Phase3,
    /// `dsr predict` on N images and on 1, each in its own process: seconds per image.
    Predict,
    /// `dsr predict` on one image: wall seconds of the process.
    FirstMap,
    /// ONNX Runtime on the model `dsr export` writes (same seeded weights, dynamic batch).
    OnnxOurs,
    /// ONNX Runtime on anomalib's own ONNX export of its model at the same widths.
    OnnxAnomalib,
}

impl Kind {
    /// The bench example's mode for this kind (inference for the ONNX kinds: our figure beside
    /// theirs).
    fn mode(self) -> &'static str {
        match self {
            Kind::Phase2 => "phase2",
            Kind::Phase3 => "phase3",
            _ => "infer",
        }
    }

    /// Whether this is a training step.
    fn is_training(self) -> bool {
        matches!(self, Kind::Phase2 | Kind::Phase3)
    }

    /// Whether the row belongs to the ONNX Runtime table.
    fn is_onnx(self) -> bool {
        matches!(self, Kind::OnnxOurs | Kind::OnnxAnomalib)
    }
}

/// One measurement: its name, what it runs and at which configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// The stable name `--only` selects.
    pub name: &'static str,
    /// What it runs.
    pub kind: Kind,
    /// Images per forward or step.
    pub batch: usize,
    /// Image side in pixels.
    pub size: usize,
    /// The model configuration: "reference" or "small" (`dsr_train::pipeline::small_model`).
    pub preset: &'static str,
}

impl Case {
    /// A readable label: what, batch, configuration and size.
    pub fn label(&self) -> String {
        let what = match self.kind {
            Kind::Infer => "inference".to_string(),
            Kind::InferBf16 => "inference, bf16 products".to_string(),
            Kind::Phase2 => "phase-2 step".to_string(),
            Kind::Phase3 => "phase-3 step".to_string(),
            Kind::Predict => "`dsr predict`, per image".to_string(),
            Kind::FirstMap => "`dsr predict`, time to first map".to_string(),
            Kind::OnnxOurs => "inference, `dsr export`".to_string(),
            Kind::OnnxAnomalib => "inference, anomalib's export".to_string(),
        };
        let batch = match self.kind {
            Kind::FirstMap => "1 image".to_string(),
            _ => format!("batch {}", self.batch),
        };
        format!(
            "{what}, {batch} ({}, {}×{})",
            self.preset, self.size, self.size
        )
    }
}

/// Every measurement, in [`NAMES`]' order (or the quick smoke set: the same names on the small
/// model at 128×128, batch 2 for 8).
pub fn cases(quick: bool) -> Vec<Case> {
    let (size, preset, batch8) = if quick {
        (128, "small", 2)
    } else {
        (256, "reference", 8)
    };
    let case = |name, kind, batch| Case {
        name,
        kind,
        batch,
        size,
        preset,
    };
    let small = |name, kind| Case {
        name,
        kind,
        batch: batch8,
        size: 128,
        preset: "small",
    };
    vec![
        case("infer-b1", Kind::Infer, 1),
        case("infer-b8", Kind::Infer, batch8),
        case("bf16-b1", Kind::InferBf16, 1),
        case("bf16-b8", Kind::InferBf16, batch8),
        case("phase2-b8", Kind::Phase2, batch8),
        case("phase3-b8", Kind::Phase3, batch8),
        small("small-phase2", Kind::Phase2),
        small("small-phase3", Kind::Phase3),
        case("predict", Kind::Predict, batch8),
        case("first-map", Kind::FirstMap, batch8),
        case("onnx-b1", Kind::OnnxOurs, 1),
        case("onnx-b8", Kind::OnnxOurs, batch8),
        case("ort-anomalib-b1", Kind::OnnxAnomalib, 1),
        case("ort-anomalib-b8", Kind::OnnxAnomalib, batch8),
    ]
}

/// The measurements a run makes: `--only`'s (in [`NAMES`]' order) or the default set (all, the
/// ONNX ones only with `--onnx`), less the training steps with `--infer-only`.
pub fn selected(opts: &Options) -> Vec<Case> {
    cases(opts.quick)
        .into_iter()
        .filter(|c| {
            if opts.only.is_empty() {
                opts.onnx.is_some() || !needs_onnx(c.name)
            } else {
                opts.only.iter().any(|n| n == c.name)
            }
        })
        .filter(|c| !(opts.infer_only && c.kind.is_training()))
        .collect()
}

/// The result line of one measuring process.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// Median seconds of a timed call (per image for `predict`).
    pub median_s: f64,
    /// Images per second of the median call.
    pub images_per_s: f64,
    /// Peak RSS of the measuring process.
    pub peak_rss_bytes: u64,
    /// Everything the process reported.
    pub raw: Value,
}

/// Reads the last JSON object line of a measuring process's stdout.
pub fn parse_measurement(stdout: &str) -> Result<Measurement> {
    let raw = last_json_line(stdout)?;
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

/// The last line of `stdout` that starts with `{`, parsed.
fn last_json_line(stdout: &str) -> Result<Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("the process printed no JSON result line")?;
    serde_json::from_str(line).context("its result line is not JSON")
}

/// The median as the bench example takes it (the upper one of an even count).
pub fn median(seconds: &[f64]) -> f64 {
    let mut sorted = seconds.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Seconds per image without the process's fixed costs: `(t(n) − t(1)) / (n − 1)`.
pub fn per_image_seconds(t_n: f64, t_1: f64, n: usize) -> f64 {
    (t_n - t_1) / (n.max(2) - 1) as f64
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A command line as text, for messages.
fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to its end and returns its stdout; fails with the tail of its stderr.
fn run_output(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_child(cmd: &mut Command) -> Result<Measurement> {
    let what = describe(cmd);
    let stdout = run_output(cmd)?;
    parse_measurement(&stdout).with_context(|| format!("reading {what}'s result"))
}

/// Runs `cmd` with its output to `log`; returns its wall seconds (start to exit) and its peak
/// RSS (`ru_maxrss` of that child alone; 0 off Unix).
fn run_timed(cmd: &mut Command, log: &Path) -> Result<(f64, u64)> {
    let what = describe(cmd);
    let file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = file
        .try_clone()
        .with_context(|| format!("cannot reopen {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(err);
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let (ok, status, rss) = wait_with_rss(child).with_context(|| format!("waiting for {what}"))?;
    let seconds = start.elapsed().as_secs_f64();
    if !ok {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(8).collect();
        bail!(
            "{what} failed ({status}; its output is in {}):\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok((seconds, rss))
}

/// Waits for `child`: whether it succeeded, its status in words, its peak RSS in bytes.
#[cfg(unix)]
fn wait_with_rss(child: std::process::Child) -> Result<(bool, String, u64)> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our own unreaped child (`Child` never waits on drop), and `status`
        // and `usage` are valid for writes.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).context("wait4");
        }
    }
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let words = if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else {
        format!("signal {}", libc::WTERMSIG(status))
    };
    // ru_maxrss is in KiB on Linux.
    Ok((ok, words, usage.ru_maxrss.max(0) as u64 * 1024))
}

/// Waits for `child`: whether it succeeded, its status in words, 0 (no peak RSS off Unix).
#[cfg(not(unix))]
fn wait_with_rss(mut child: std::process::Child) -> Result<(bool, String, u64)> {
    let status = child.wait()?;
    Ok((status.success(), status.to_string(), 0))
}

fn gb(bytes: u64) -> String {
    if bytes == 0 {
        "–".into()
    } else {
        format!("{:.2} GB", bytes as f64 / 1e9)
    }
}

/// The figure of a measurement as the tables show it.
fn figure(kind: Kind, m: &Measurement) -> String {
    match kind {
        Kind::Phase2 | Kind::Phase3 => format!("{:.2} s/step", m.median_s),
        Kind::Predict => format!("{:.3} s/image", m.median_s),
        Kind::FirstMap => format!("{:.2} s", m.median_s),
        _ => format!("{:.3} img/s ({:.2} s)", m.images_per_s, m.median_s),
    }
}

/// The header of the main table (ours beside PyTorch).
const MAIN_HEADER: &str = "| name | measure | dsr-rs | peak RSS | PyTorch | peak RSS | speed ratio (ours / PyTorch) |\n|---|---|---|---|---|---|---|";
/// The header of the ONNX Runtime table.
const ONNX_HEADER: &str = "| name | measure | dsr-rs | ONNX Runtime, 2 threads | peak RSS | speed ratio (ours / ONNX Runtime) |\n|---|---|---|---|---|---|";

/// One measured row: ours, and PyTorch's or ONNX Runtime's beside it.
#[derive(Debug, Clone)]
struct Row {
    case: Case,
    ours: Measurement,
    other: Option<Measurement>,
}

impl Row {
    /// The row as a markdown table line.
    fn line(&self) -> String {
        let c = &self.case;
        let ours = &self.ours;
        let ratio = |o: &Measurement| format!("{:.2}×", ours.images_per_s / o.images_per_s);
        if c.kind.is_onnx() {
            let o = self
                .other
                .as_ref()
                .expect("ONNX rows have their ONNX Runtime figure");
            format!(
                "| {} | {} | {} | {} | {} | {} |",
                c.name,
                c.label(),
                figure(Kind::Infer, ours),
                figure(Kind::Infer, o),
                gb(o.peak_rss_bytes),
                ratio(o)
            )
        } else {
            let (theirs, rss, r) = match &self.other {
                Some(o) if c.kind == Kind::Predict => (
                    format!("{:.3} s/image (forward, batch {})", o.median_s, c.batch),
                    gb(o.peak_rss_bytes),
                    ratio(o),
                ),
                Some(o) => (figure(c.kind, o), gb(o.peak_rss_bytes), ratio(o)),
                None => ("–".into(), "–".into(), "–".into()),
            };
            format!(
                "| {} | {} | {} | {} | {theirs} | {rss} | {r} |",
                c.name,
                c.label(),
                figure(c.kind, ours),
                gb(ours.peak_rss_bytes)
            )
        }
    }

    fn record(&self) -> Value {
        let (torch, onnx) = if self.case.kind.is_onnx() {
            (None, self.other.as_ref())
        } else {
            (self.other.as_ref(), None)
        };
        json!({
            "name": self.case.name,
            "label": self.case.label(),
            "ours": self.ours.raw,
            "torch": torch.map(|t| t.raw.clone()),
            "onnxruntime": onnx.map(|o| o.raw.clone()),
        })
    }
}

/// Everything a run needs and what it has measured so far (processes are not run twice for the
/// same figure: the ONNX rows reuse `infer-bN`, `first-map` reuses `predict`'s one-image runs).
struct Runner<'a> {
    opts: &'a Options,
    root: PathBuf,
    target: PathBuf,
    bench: PathBuf,
    repeat: usize,
    /// Measurements by command line.
    memo: HashMap<String, Measurement>,
    /// The seeded checkpoints written, by (preset, size).
    checkpoints: HashMap<(String, usize), PathBuf>,
    /// The `.onnx` files exported, by (exporter, preset, size).
    exports: HashMap<(&'static str, String, usize), PathBuf>,
    /// Wall seconds and peak RSS of each timed one-image `dsr predict`, by (preset, size).
    predict_one: HashMap<(String, usize), Vec<(f64, u64)>>,
}

impl Runner<'_> {
    /// Runs `cmd` (a process printing a result line) unless the same command line ran already.
    fn measure(&mut self, mut cmd: Command) -> Result<Measurement> {
        let key = describe(&cmd);
        if let Some(m) = self.memo.get(&key) {
            return Ok(m.clone());
        }
        let m = run_child(&mut cmd)?;
        self.memo.insert(key, m.clone());
        Ok(m)
    }

    /// The arguments both the bench example and the PyTorch script take.
    fn bench_args(&self, mode: &str, batch: usize, size: usize) -> Vec<String> {
        vec![
            mode.to_string(),
            "--batch".into(),
            batch.to_string(),
            "--size".into(),
            size.to_string(),
            "--repeat".into(),
            self.repeat.to_string(),
        ]
    }

    /// Ours, by the bench example.
    fn ours(&mut self, mode: &str, batch: usize, size: usize, preset: &str) -> Result<Measurement> {
        self.ours_with(mode, batch, size, preset, &[])
    }

    /// Ours, by the bench example, with extra arguments (e.g. `--precision bf16`).
    fn ours_with(
        &mut self,
        mode: &str,
        batch: usize,
        size: usize,
        preset: &str,
        extra: &[&str],
    ) -> Result<Measurement> {
        let mut cmd = Command::new(&self.bench);
        cmd.args(self.bench_args(mode, batch, size))
            .args(["--preset", preset])
            .args(extra);
        self.measure(cmd)
    }

    /// anomalib's PyTorch model, by `torch_reference.py`; `None` without `--torch`.
    fn torch(
        &mut self,
        mode: &str,
        batch: usize,
        size: usize,
        preset: &str,
    ) -> Result<Option<Measurement>> {
        let Some(python) = self.opts.torch.clone() else {
            return Ok(None);
        };
        let mut cmd = Command::new(python);
        cmd.arg(self.root.join("xtask/bench/torch_reference.py"))
            .args(self.bench_args(mode, batch, size))
            .args(["--preset", preset]);
        self.measure(cmd).map(Some)
    }

    /// The seeded checkpoint of `preset` at `size` (written once by the bench example).
    fn checkpoint(&mut self, preset: &str, size: usize) -> Result<PathBuf> {
        let key = (preset.to_string(), size);
        if let Some(p) = self.checkpoints.get(&key) {
            return Ok(p.clone());
        }
        let dir = self.target.join("bench-models");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("seeded-{preset}-{size}.safetensors"));
        run_output(
            Command::new(&self.bench)
                .args(["checkpoint", "--out"])
                .arg(&path)
                .args(["--preset", preset, "--size", &size.to_string()]),
        )?;
        self.checkpoints.insert(key, path.clone());
        Ok(path)
    }

    /// The `.onnx` model of the ONNX kind `kind`: `dsr export` of the seeded checkpoint (dynamic
    /// batch) or anomalib's export of its model at the same widths (seed 0).
    fn onnx_model(&mut self, kind: Kind, preset: &str, size: usize) -> Result<PathBuf> {
        let exporter = if kind == Kind::OnnxOurs {
            "dsr"
        } else {
            "anomalib"
        };
        let key = (exporter, preset.to_string(), size);
        if let Some(p) = self.exports.get(&key) {
            return Ok(p.clone());
        }
        let path = if kind == Kind::OnnxOurs {
            let ckpt = self.checkpoint(preset, size)?;
            let model = dsr_export::export_file(
                &ckpt,
                &dsr_export::ExportOptions {
                    dynamic_batch: true,
                    ..Default::default()
                },
            )
            .with_context(|| format!("exporting {}", ckpt.display()))?;
            let out = ckpt.with_extension("onnx");
            dsr_export::write_model(&model, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            out
        } else {
            let python = self.opts.onnx.clone().context("ONNX rows need --onnx")?;
            let dir = self
                .target
                .join(format!("bench-models/anomalib-{preset}-{size}"));
            eprintln!("exporting anomalib's model ({preset}, {size}×{size}) to ONNX…");
            let mut cmd = Command::new(python);
            cmd.arg(self.root.join("xtask/bench/anomalib_onnx.py"))
                .arg(&dir)
                .args(["--size", &size.to_string(), "--preset", preset]);
            let what = describe(&cmd);
            let line = last_json_line(&run_output(&mut cmd)?)
                .with_context(|| format!("reading {what}'s result"))?;
            let path = line
                .get("onnx")
                .and_then(Value::as_str)
                .with_context(|| format!("{what} named no .onnx file"))?;
            PathBuf::from(path)
        };
        self.exports.insert(key, path.clone());
        Ok(path)
    }

    /// ONNX Runtime (2 threads) on `model`, by `onnx_runtime.py`.
    fn onnx_runtime(&mut self, model: &Path, batch: usize, size: usize) -> Result<Measurement> {
        let python = self.opts.onnx.clone().context("ONNX rows need --onnx")?;
        let mut cmd = Command::new(python);
        cmd.arg(self.root.join("xtask/bench/onnx_runtime.py"))
            .arg(model)
            .args(["--threads", "2"])
            .args(&self.bench_args("infer", batch, size)[1..]);
        self.measure(cmd)
    }

    /// The first `n` demo test images (sorted paths), copied into a folder of their own.
    fn predict_inputs(&self, n: usize) -> Result<PathBuf> {
        let test = self.root.join("assets/demo/battery_weld/test");
        let mut files = Vec::new();
        for class in ["good", "defective"] {
            let dir = test.join(class);
            for entry in
                std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
            {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "png") {
                    files.push(path);
                }
            }
        }
        files.sort();
        if files.len() < n {
            bail!(
                "{} holds {} images, fewer than {n}",
                test.display(),
                files.len()
            );
        }
        let dir = self.target.join(format!("bench-predict/images-{n}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot empty {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        for f in &files[..n] {
            let to = dir.join(f.file_name().expect("a listed file has a name"));
            std::fs::copy(f, &to)
                .with_context(|| format!("cannot copy {} to {}", f.display(), to.display()))?;
        }
        Ok(dir)
    }

    /// One `dsr predict` process on the images of `inputs`: wall seconds and peak RSS.
    fn predict_once(&self, ckpt: &Path, inputs: &Path, batch: usize) -> Result<(f64, u64)> {
        let base = self.target.join("bench-predict");
        let name = inputs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let out = base.join(format!("out-{name}"));
        if out.exists() {
            std::fs::remove_dir_all(&out)
                .with_context(|| format!("cannot empty {}", out.display()))?;
        }
        run_timed(
            Command::new(self.target.join("release/dsr"))
                .arg("predict")
                .arg("--model")
                .arg(ckpt)
                .arg("--out")
                .arg(&out)
                .args(["--batch", &batch.to_string()])
                .arg(inputs),
            &base.join(format!("log-{name}.txt")),
        )
    }

    /// The timed one-image runs of `dsr predict` (after one untimed warm-up), made once.
    fn predict_one(&mut self, case: &Case) -> Result<Vec<(f64, u64)>> {
        let key = (case.preset.to_string(), case.size);
        if let Some(runs) = self.predict_one.get(&key) {
            return Ok(runs.clone());
        }
        let ckpt = self.checkpoint(case.preset, case.size)?;
        let one = self.predict_inputs(1)?;
        self.predict_once(&ckpt, &one, case.batch)?; // warm-up (page cache, binary)
        let runs = (0..self.repeat)
            .map(|_| self.predict_once(&ckpt, &one, case.batch))
            .collect::<Result<Vec<_>>>()?;
        self.predict_one.insert(key, runs.clone());
        Ok(runs)
    }

    /// Measures one case: ours, and PyTorch's or ONNX Runtime's beside it.
    fn run_case(&mut self, case: &Case) -> Result<Row> {
        let (mode, b, s, p) = (case.kind.mode(), case.batch, case.size, case.preset);
        let (ours, other) = match case.kind {
            Kind::Infer | Kind::Phase2 | Kind::Phase3 => {
                (self.ours(mode, b, s, p)?, self.torch(mode, b, s, p)?)
            }
            Kind::InferBf16 => (
                self.ours_with(mode, b, s, p, &["--precision", "bf16"])?,
                self.torch(mode, b, s, p)?,
            ),
            Kind::OnnxOurs | Kind::OnnxAnomalib => {
                let model = self.onnx_model(case.kind, p, s)?;
                let ort = self.onnx_runtime(&model, b, s)?;
                (self.ours("infer", b, s, p)?, Some(ort))
            }
            Kind::FirstMap => {
                let runs = self.predict_one(case)?;
                let seconds: Vec<f64> = runs.iter().map(|r| r.0).collect();
                let t = median(&seconds);
                let raw = json!({
                    "mode": "first-map",
                    "images": 1,
                    "batch": b,
                    "size": s,
                    "preset": p,
                    "seconds": seconds,
                    "median_s": t,
                    "images_per_s": 1.0 / t,
                    "peak_rss_bytes": runs.iter().map(|r| r.1).max().unwrap_or(0),
                });
                (parse_measurement(&raw.to_string())?, None)
            }
            Kind::Predict => {
                let n = predict_images(self.opts.quick);
                let one = self.predict_one(case)?;
                let ckpt = self.checkpoint(p, s)?;
                let inputs = self.predict_inputs(n)?;
                let many = (0..self.repeat)
                    .map(|_| self.predict_once(&ckpt, &inputs, b))
                    .collect::<Result<Vec<_>>>()?;
                let t1: Vec<f64> = one.iter().map(|r| r.0).collect();
                let tn: Vec<f64> = many.iter().map(|r| r.0).collect();
                let per_image = per_image_seconds(median(&tn), median(&t1), n);
                let raw = json!({
                    "mode": "predict",
                    "images": n,
                    "batch": b,
                    "size": s,
                    "preset": p,
                    "seconds_n_images": tn,
                    "seconds_1_image": t1,
                    "median_s": per_image,
                    "images_per_s": 1.0 / per_image,
                    "peak_rss_bytes": many.iter().map(|r| r.1).max().unwrap_or(0),
                });
                let ours = parse_measurement(&raw.to_string())?;
                // PyTorch's forward per image at the same batch.
                let torch = self.torch("infer", b, s, p)?.map(|t| {
                    let per = t.median_s / b as f64;
                    Measurement {
                        median_s: per,
                        images_per_s: 1.0 / per,
                        ..t
                    }
                });
                (ours, torch)
            }
        };
        Ok(Row {
            case: case.clone(),
            ours,
            other,
        })
    }
}

/// Runs the whole task.
pub fn run(opts: &Options) -> Result<()> {
    let root = workspace_root();
    let cargo = env!("CARGO");
    let chosen = selected(opts);
    if chosen.is_empty() {
        bail!("nothing to measure: --only and --infer-only leave no measurement");
    }
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
    if chosen
        .iter()
        .any(|c| matches!(c.kind, Kind::Predict | Kind::FirstMap))
    {
        println!("building the dsr binary (release)…");
        let status = Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--release", "-p", "dsr-cli", "--bin", "dsr"])
            .status()
            .context("cannot run cargo build")?;
        if !status.success() {
            bail!("building the dsr binary failed");
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut runner = Runner {
        opts,
        bench: target.join("release/examples/bench"),
        root,
        target,
        repeat: if opts.quick { 1 } else { opts.repeat },
        memo: HashMap::new(),
        checkpoints: HashMap::new(),
        exports: HashMap::new(),
        predict_one: HashMap::new(),
    };

    let mut rows: Vec<Row> = Vec::new();
    for case in &chosen {
        eprintln!("measuring {}: {}…", case.name, case.label());
        let row = match runner.run_case(case) {
            Ok(row) => row,
            // bf16 needs AVX512-BF16: on a CPU without it the row is skipped, not the bench.
            Err(e) if case.kind == Kind::InferBf16 => {
                let reason = format!("{e:#}");
                let last = reason.lines().last().unwrap_or("").trim();
                println!("| {} | {} | skipped: {last} |", case.name, case.label());
                continue;
            }
            Err(e) => return Err(e.context(format!("measuring {}", case.name))),
        };
        println!("{}", row.line());
        std::io::stdout().flush().ok();
        rows.push(row);
        if let Some(path) = &opts.json {
            let records: Vec<Value> = rows.iter().map(Row::record).collect();
            let text = serde_json::to_string_pretty(&Value::Array(records))?;
            std::fs::write(path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }

    let (onnx_rows, main_rows): (Vec<&Row>, Vec<&Row>) =
        rows.iter().partition(|r| r.case.kind.is_onnx());
    if !main_rows.is_empty() {
        println!("\n{MAIN_HEADER}");
        for row in &main_rows {
            println!("{}", row.line());
        }
    }
    if !onnx_rows.is_empty() {
        println!("\n{ONNX_HEADER}");
        for row in &onnx_rows {
            println!("{}", row.line());
        }
    }
    if opts.torch.is_none() && !main_rows.is_empty() {
        println!(
            "\n(PyTorch not timed: pass --torch PYTHON, a Python with torch and anomalib 2.7.0)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Options as parsed, without the environment's Pythons.
    fn parse(list: &[&str]) -> Result<Option<Options>, String> {
        parse_args(&args(list)).map(|o| {
            o.map(|mut o| {
                if !list.contains(&"--torch") {
                    o.torch = None;
                }
                if !list.contains(&"--onnx") {
                    o.onnx = None;
                }
                o
            })
        })
    }

    #[test]
    fn options_parse() {
        let opts = parse(&["--quick", "--repeat", "5", "--torch", "py"])
            .unwrap()
            .unwrap();
        assert!(opts.quick);
        assert_eq!(opts.repeat, 5);
        assert_eq!(opts.torch, Some(PathBuf::from("py")));
        assert!(opts.only.is_empty());
        assert_eq!(parse(&["--help"]).unwrap(), None);
        assert!(parse(&["--repeat", "0"]).is_err());
        assert!(parse(&["--torch"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }

    #[test]
    fn only_takes_lists_and_repeats() {
        let opts = parse(&["--only", "predict,infer-b1", "--only", "small-phase3"])
            .unwrap()
            .unwrap();
        assert_eq!(opts.only, ["predict", "infer-b1", "small-phase3"]);
        // Duplicates and spaces are harmless.
        let opts = parse(&["--only", "infer-b1, infer-b1,", "--only", "infer-b1"])
            .unwrap()
            .unwrap();
        assert_eq!(opts.only, ["infer-b1"]);
        // The run order is the table's, not the command line's.
        let names: Vec<&str> = selected(
            &parse(&["--only", "predict,infer-b1", "--only", "small-phase3"])
                .unwrap()
                .unwrap(),
        )
        .iter()
        .map(|c| c.name)
        .collect();
        assert_eq!(names, ["infer-b1", "small-phase3", "predict"]);
    }

    #[test]
    fn only_rejects_unknown_names_listing_the_valid_ones() {
        let err = parse(&["--only", "infer-b1,infer-b2"]).unwrap_err();
        assert!(err.contains("'infer-b2'"), "{err}");
        for name in NAMES {
            assert!(err.contains(name), "{err} lacks {name}");
        }
        assert!(parse(&["--only"]).is_err());
        assert!(parse(&["--only", ""]).is_err());
        assert!(parse(&["--only", "--quick"]).is_err());
    }

    #[test]
    fn onnx_rows_need_a_python() {
        let err = parse(&["--only", "ort-anomalib-b1"]).unwrap_err();
        assert!(err.contains("--onnx"), "{err}");
        assert!(parse(&["--only", "onnx-b8"]).is_err());
        let opts = parse(&["--only", "ort-anomalib-b1", "--onnx", "py"])
            .unwrap()
            .unwrap();
        let chosen = selected(&opts);
        assert_eq!(chosen.len(), 1);
        assert_eq!(chosen[0].kind, Kind::OnnxAnomalib);
        assert_eq!((chosen[0].batch, chosen[0].size), (1, 256));
    }

    #[test]
    fn the_default_set_and_infer_only() {
        let names = |o: &Options| selected(o).iter().map(|c| c.name).collect::<Vec<_>>();
        let plain = parse(&[]).unwrap().unwrap();
        assert_eq!(names(&plain), &NAMES[..10]);
        let with_onnx = parse(&["--onnx", "py"]).unwrap().unwrap();
        assert_eq!(names(&with_onnx), NAMES);
        let infer = parse(&["--infer-only", "--onnx", "py"]).unwrap().unwrap();
        assert_eq!(
            names(&infer),
            [
                "infer-b1",
                "infer-b8",
                "bf16-b1",
                "bf16-b8",
                "predict",
                "first-map",
                "onnx-b1",
                "onnx-b8",
                "ort-anomalib-b1",
                "ort-anomalib-b8"
            ]
        );
        let nothing = parse(&["--infer-only", "--only", "phase2-b8"])
            .unwrap()
            .unwrap();
        assert!(selected(&nothing).is_empty());
    }

    #[test]
    fn the_table_measures_the_targets() {
        let full = cases(false);
        let names: Vec<&str> = full.iter().map(|c| c.name).collect();
        assert_eq!(names, NAMES);
        let shape = |name: &str| {
            let c = full.iter().find(|c| c.name == name).unwrap();
            (c.kind, c.batch, c.size, c.preset)
        };
        assert_eq!(shape("infer-b1"), (Kind::Infer, 1, 256, "reference"));
        assert_eq!(shape("infer-b8"), (Kind::Infer, 8, 256, "reference"));
        assert_eq!(shape("bf16-b8"), (Kind::InferBf16, 8, 256, "reference"));
        assert_eq!(shape("phase2-b8"), (Kind::Phase2, 8, 256, "reference"));
        assert_eq!(shape("phase3-b8"), (Kind::Phase3, 8, 256, "reference"));
        assert_eq!(shape("small-phase2"), (Kind::Phase2, 8, 128, "small"));
        assert_eq!(shape("small-phase3"), (Kind::Phase3, 8, 128, "small"));
        assert_eq!(shape("predict"), (Kind::Predict, 8, 256, "reference"));
        assert_eq!(shape("onnx-b8"), (Kind::OnnxOurs, 8, 256, "reference"));
        assert_eq!(
            shape("ort-anomalib-b1"),
            (Kind::OnnxAnomalib, 1, 256, "reference")
        );
        let quick = cases(true);
        assert_eq!(quick.iter().map(|c| c.name).collect::<Vec<_>>(), NAMES);
        assert!(quick
            .iter()
            .all(|c| c.preset == "small" && c.size == 128 && c.batch <= 2));
        // USAGE lists every name.
        for name in NAMES {
            assert!(USAGE.contains(&format!("  {name} ")), "USAGE lacks {name}");
        }
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

    #[test]
    fn predict_per_image_leaves_the_startup_out() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0]), 4.0);
        // 9 images in 10.5 s, 1 image in 2.5 s: 1 s per image.
        assert_eq!(per_image_seconds(10.5, 2.5, 9), 1.0);
        assert_eq!(per_image_seconds(5.0, 2.0, 3), 1.5);
        assert_eq!(predict_images(false), 9);
    }

    #[test]
    fn rows_print_their_figures() {
        let m = |s: f64, ips: f64| Measurement {
            median_s: s,
            images_per_s: ips,
            peak_rss_bytes: 2_000_000_000,
            raw: Value::Null,
        };
        let all = cases(false);
        let case = |name: &str| all.iter().find(|c| c.name == name).unwrap().clone();
        let predict = Row {
            case: case("predict"),
            ours: m(1.0, 1.0),
            other: Some(m(2.0, 0.5)),
        };
        let line = predict.line();
        assert!(line.starts_with("| predict |"), "{line}");
        assert!(line.contains("1.000 s/image"), "{line}");
        assert!(line.contains("2.000 s/image (forward, batch 8)"), "{line}");
        assert!(line.contains("2.00×"), "{line}");
        let ort = Row {
            case: case("ort-anomalib-b1"),
            ours: m(0.5, 2.0),
            other: Some(m(1.0, 1.0)),
        };
        let line = ort.line();
        assert!(line.contains("anomalib's export"), "{line}");
        assert!(line.ends_with("| 2.00× |"), "{line}");
        assert_eq!(ort.record()["name"], "ort-anomalib-b1");
        let first = Row {
            case: case("first-map"),
            ours: m(3.0, 1.0 / 3.0),
            other: None,
        };
        assert!(first.line().contains("| 3.00 s |"), "{}", first.line());
    }
}
