//! Compares the generators' statistics with the reference fixture at every size and recipe it holds.
//!
//! `cargo run --release -p dsr-augment --example augment_stats -- [--n 2000] [--seed 1] [--only TEXT]`
//!
//! `--only` keeps the generators whose label (for example `phase2/original`) contains TEXT.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{compare, reference, reference_sizes, run, Generator};
use dsr_augment::stats::Summary;

fn main() {
    let mut n = 2000usize;
    let mut seed = 1u64;
    let mut only = String::new();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1);
        match (args[i].as_str(), value) {
            ("--n", Some(v)) => n = v.parse().expect("--n takes a number"),
            ("--seed", Some(v)) => seed = v.parse().expect("--seed takes a number"),
            ("--only", Some(v)) => only = v.clone(),
            (other, _) => {
                eprintln!("unknown or incomplete argument {other}; usage: augment_stats [--n N] [--seed S] [--only TEXT]");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    println!(
        "n = {n} samples per generator, seed {seed}, tolerance = {} * sqrt(se_ref^2 + se_ours^2)",
        common::K
    );
    println!(
        "{:<9} {:<24} {:<26} {:>12} {:>12} {:>12} {:>12}  result",
        "size", "generator", "statistic", "ours", "reference", "|diff|", "tolerance"
    );
    let mut failures = 0;
    let mut total = 0;
    for (h, w) in reference_sizes() {
        for (g, generator) in Generator::ALL.into_iter().enumerate() {
            if !generator.label().contains(&only) {
                continue;
            }
            let Some(reference) = reference(h, w, generator) else {
                continue;
            };
            let start = std::time::Instant::now();
            let samples = run(
                generator,
                h,
                w,
                n,
                seed.wrapping_mul(1000).wrapping_add(g as u64),
            );
            let summary = Summary::from_samples(&samples, 300);
            for row in compare(&summary, &reference) {
                total += 1;
                if !row.pass {
                    failures += 1;
                }
                println!(
                    "{:<9} {:<24} {:<26} {:>12.6} {:>12.6} {:>12.6} {:>12.6}  {}",
                    format!("{h}x{w}"),
                    generator.label(),
                    row.statistic,
                    row.ours,
                    row.reference,
                    (row.ours - row.reference).abs(),
                    row.tolerance,
                    if row.pass { "pass" } else { "FAIL" }
                );
            }
            eprintln!(
                "{h}x{w} {} took {:.1} s",
                generator.label(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "{} of {total} statistics within tolerance",
        total - failures
    );
    if failures > 0 {
        std::process::exit(1);
    }
}
