//! Project automation, run as `cargo xtask <task>` (the alias lives in `.cargo/config.toml`;
//! see the cargo-xtask convention). `cargo xtask` alone lists the tasks.

use std::process::{Command, ExitCode};

const TASKS: &str = "tasks:
  ci      run what CI runs: cargo fmt --check, clippy -D warnings, cargo test --workspace
";

fn main() -> ExitCode {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        Some("ci") => run_ci(),
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
