//! Byte-level mutations of valid files (bit flips, overwrites with boundary values,
//! truncation, splicing, insertion, deletion) and the seeded proptest runner of the fuzz tests.
//!
//! `DSR_FUZZ_CASES` sets the number of cases per target (default 256), `DSR_FUZZ_SEED` the seed
//! (default 0): `DSR_FUZZ_CASES=100000 cargo test --release -p <crate> --test fuzz` is the long
//! run.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// One edit of a byte string.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flip one bit.
    Flip(Index, u8),
    /// Overwrite one byte.
    Set(Index, u8),
    /// Overwrite 4 or 8 bytes with a boundary value (little-endian).
    Boundary(Index, u64, bool),
    /// Keep only a prefix.
    Truncate(Index),
    /// Copy a range of the input over another place.
    Splice(Index, Index, usize),
    /// Insert bytes.
    Insert(Index, Vec<u8>),
    /// Delete up to this many bytes.
    Delete(Index, usize),
}

const BOUNDARIES: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// A random mutation.
pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        2 => (any::<Index>(), 0..BOUNDARIES.len(), any::<bool>())
            .prop_map(|(i, k, wide)| Mutation::Boundary(i, BOUNDARIES[k], wide)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), any::<Index>(), 1usize..64).prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Delete(i, n)),
    ]
}

/// One to eight mutations.
pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..8)
}

/// Applies `edits` to a copy of `input`; `focus` (a byte range) receives most position-based
/// edits when given (for example a file's header), the rest land anywhere.
pub fn apply(input: &[u8], edits: &[Mutation], focus: Option<std::ops::Range<usize>>) -> Vec<u8> {
    let mut out = input.to_vec();
    for (k, edit) in edits.iter().enumerate() {
        if out.is_empty() {
            break;
        }
        let at = |i: &Index, len: usize| match &focus {
            Some(r) if k % 2 == 0 && r.end.min(len) > r.start => {
                r.start + i.index(r.end.min(len) - r.start)
            }
            _ => i.index(len),
        };
        let len = out.len();
        match edit {
            Mutation::Flip(i, b) => {
                let p = at(i, len);
                out[p] ^= 1 << b;
            }
            Mutation::Set(i, v) => {
                let p = at(i, len);
                out[p] = *v;
            }
            Mutation::Boundary(i, v, wide) => {
                let p = at(i, len);
                let bytes = v.to_le_bytes();
                let n = if *wide { 8 } else { 4 };
                for (j, b) in bytes[..n].iter().enumerate() {
                    if let Some(x) = out.get_mut(p + j) {
                        *x = *b;
                    }
                }
            }
            Mutation::Truncate(i) => out.truncate(i.index(len)),
            Mutation::Splice(a, b, n) => {
                let (from, to) = (a.index(len), at(b, len));
                let n = (*n).min(len - from).min(len - to);
                let piece = out[from..from + n].to_vec();
                out[to..to + n].copy_from_slice(&piece);
            }
            Mutation::Insert(i, v) => {
                let p = at(i, len);
                out.splice(p..p, v.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let p = at(i, len);
                let end = (p + n).min(len);
                out.drain(p..end);
            }
        }
    }
    out
}

/// Cases per target: `DSR_FUZZ_CASES`, default 256.
pub fn cases() -> u32 {
    std::env::var("DSR_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Runs `body` on `cases()` values of `strategy` with a fixed seed (`DSR_FUZZ_SEED`, default 0),
/// catching panics (a panic is a failure with the value that caused it); prints the number of
/// executions, the time taken and how many cases returned an error (not a failure) and how many
/// were accepted.
pub fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    body: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) {
    fuzz_cases(name, cases(), strategy, body)
}

/// [`fuzz`] with a given number of cases (for targets much slower than the others).
pub fn fuzz_cases<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    body: impl Fn(S::Value) -> Result<bool, TestCaseError>,
) {
    let seed: u64 = std::env::var("DSR_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // `DSR_FUZZ_SECONDS`: rounds of `cases` cases with seeds seed, seed + 1, … until that many
    // seconds have passed (the timed long run).
    let seconds: Option<f64> = std::env::var("DSR_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok());
    let runs = AtomicU64::new(0);
    let accepted = AtomicU64::new(0);
    let start = Instant::now();
    let mut round = 0u64;
    let result = loop {
        let mut runner = TestRunner::new(Config {
            cases,
            rng_seed: RngSeed::Fixed(seed + round),
            failure_persistence: None,
            max_shrink_iters: 2000,
            ..Config::default()
        });
        let result = runner.run(&strategy, |value| {
            runs.fetch_add(1, Ordering::Relaxed);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(value)));
            match outcome {
                Ok(Ok(ok)) => {
                    if ok {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(TestCaseError::fail("the code under test panicked")),
            }
        });
        round += 1;
        match seconds {
            Some(limit) if result.is_ok() && start.elapsed().as_secs_f64() < limit => continue,
            _ => break result,
        }
    };
    println!(
        "fuzz {name}: {} executions (seeds {seed}..{}) in {:.1} s, {} accepted, the rest refused with an error",
        runs.load(Ordering::Relaxed),
        seed + round,
        start.elapsed().as_secs_f64(),
        accepted.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
}
