//! Project automation, run as `cargo xtask <task>` (the alias lives in `.cargo/config.toml`;
//! see the cargo-xtask convention). `cargo xtask` alone lists the tasks.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

mod bench;
mod fetch;
mod onnx_check;
mod report_check;

const TASKS: &str = "tasks:
  bench          images/s, seconds per training step and peak RSS of the default model
                 (optionally beside anomalib's PyTorch model): see `cargo xtask bench --help`
  ci             run what CI runs: cargo fmt --check, clippy -D warnings, cargo test --workspace
  fetch-weights  download (checksummed, resumable) and convert the pretrained discrete model
  onnx-check     export models with `dsr export`, run them in ONNX Runtime and compare with
                 `dsr predict` (batch 1 and 4): see `cargo xtask onnx-check --help`
  report-check   open a `dsr test` report.html in headless Chromium: REPORT [--screenshot OUT.png]
";

const FETCH_USAGE: &str = "usage: cargo xtask fetch-weights [--from FILE] [--force]

Downloads anomalib's dsr_vq_model_pretrained.zip, checks its SHA-256, unpacks
vq_model_pretrained_128_4096.pckl and converts it to
vq_model_pretrained_128_4096.safetensors in the cache folder: $DSR_HOME if set,
else the platform cache folder + dsr (~/.cache/dsr on Linux). An interrupted
download resumes on the next run.

  --from FILE  use a local copy instead of downloading: the zip archive (its
               SHA-256 is checked) or the .pckl itself (not checkable)
  --force      convert again even if the converted file exists
";

fn main() -> ExitCode {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        Some("bench") => run_bench(std::env::args().skip(2).collect()),
        Some("ci") => run_ci(),
        Some("fetch-weights") => run_fetch_weights(std::env::args().skip(2).collect()),
        Some("onnx-check") => run_onnx_check(std::env::args().skip(2).collect()),
        Some("report-check") => run_report_check(std::env::args().skip(2).collect()),
        None => {
            print!("{TASKS}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("unknown task '{other}'\n{TASKS}");
            ExitCode::from(2)
        }
    }
}

fn run_bench(args: Vec<String>) -> ExitCode {
    let opts = match bench::parse_args(&args) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{}", bench::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{}", bench::USAGE);
            return ExitCode::from(2);
        }
    };
    match bench::run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run_onnx_check(args: Vec<String>) -> ExitCode {
    let opts = match onnx_check::parse_args(&args) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{}", onnx_check::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{}", onnx_check::USAGE);
            return ExitCode::from(2);
        }
    };
    match onnx_check::run_check(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run_ci() -> ExitCode {
    let steps: [&[&str]; 3] = [
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &["test", "--workspace"],
    ];
    for args in steps {
        let status = Command::new(env!("CARGO")).args(args).status();
        match status {
            Ok(s) if s.success() => {}
            Ok(_) => return ExitCode::from(1),
            Err(e) => {
                eprintln!("cannot run cargo: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}

/// The options of `fetch-weights`, or `None` after `--help`.
fn parse_fetch_args(args: &[String]) -> Result<Option<(Option<PathBuf>, bool)>, String> {
    let mut from = None;
    let mut force = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--force" => force = true,
            "--from" => match it.next() {
                Some(v) if !v.is_empty() => from = Some(PathBuf::from(v)),
                _ => return Err("--from needs a file".to_string()),
            },
            other => match other.strip_prefix("--from=") {
                Some(v) if !v.is_empty() => from = Some(PathBuf::from(v)),
                _ => return Err(format!("unexpected argument '{other}'")),
            },
        }
    }
    Ok(Some((from, force)))
}

fn run_fetch_weights(args: Vec<String>) -> ExitCode {
    let (from, force) = match parse_fetch_args(&args) {
        Ok(Some(parsed)) => parsed,
        Ok(None) => {
            print!("{FETCH_USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{FETCH_USAGE}");
            return ExitCode::from(2);
        }
    };
    let Some(cache_dir) = dsr_core::cache::dsr_home() else {
        eprintln!(
            "error: no cache folder is known on this machine: set DSR_HOME to the folder for the weights"
        );
        return ExitCode::from(1);
    };
    let mut request = fetch::Request::new(cache_dir);
    request.from = from;
    request.force = force;
    match fetch::fetch_weights(&request) {
        Ok(report) => {
            match report.action {
                fetch::Action::AlreadyPresent => println!(
                    "the pretrained discrete model is already at {} (--force converts it again)",
                    report.weights.display()
                ),
                fetch::Action::Converted { .. } => println!(
                    "the pretrained discrete model is at {}",
                    report.weights.display()
                ),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run_report_check(args: Vec<String>) -> ExitCode {
    let usage = "usage: cargo xtask report-check REPORT.html [--screenshot OUT.png]";
    let (report, shot) = match args.as_slice() {
        [r] => (PathBuf::from(r), PathBuf::from("report.png")),
        [r, flag, s] if flag == "--screenshot" => (PathBuf::from(r), PathBuf::from(s)),
        _ => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    match report_check::check(&report, &shot) {
        Ok(r) => {
            println!(
                "{}: rendered without console messages; {} <svg> curves, {} inline PNG images; screenshot {} ({} bytes)",
                report.display(),
                r.svgs,
                r.images,
                r.screenshot.display(),
                r.screenshot_bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
