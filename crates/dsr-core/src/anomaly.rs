//! Feature-space anomalies for phase 2 (`generate_fake_anomalies_joined`) and the
//! injectable source of the phase-2 random draws.

use std::collections::VecDeque;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::layers::max_pool;
use crate::quantizer::{flatten_positions, VectorQuantizer};
use crate::{Error, Result};

/// Fraction of nearest codes never used as replacements (λs = 0.05 of the paper): they include
/// the code a position is actually quantized to.
const NEAREST_EXCLUDED_FRACTION: f64 = 0.05;

/// Where the phase-2 forward takes its random numbers from.
///
/// The forward draws, in this order: `uniform(B)` (coarse strengths), `uniform(B)` (fine
/// strengths), then for the three feature-space anomaly calls one `below(h·w, c)` per sample,
/// with the coins `below(B, 2)` (use both levels) and `below(B, 2)` (use the coarse level)
/// between the second and the third call, exactly as the reference consumes its generator.
/// A seeded source makes training reproducible; a recorded tape replays the reference's draws.
pub trait Randomness {
    /// `n` draws from U[0, 1).
    fn uniform(&mut self, n: usize) -> Result<Vec<f32>>;
    /// `n` integers drawn uniformly from `[0, bound)`.
    fn below(&mut self, n: usize, bound: usize) -> Result<Vec<usize>>;
}

/// A seeded pseudo-random source (ChaCha8): the same seed gives the same draws everywhere.
#[derive(Debug, Clone)]
pub struct SeededRandomness {
    rng: rand_chacha::ChaCha8Rng,
}

impl SeededRandomness {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The generator state, e.g. to store in a checkpoint.
    pub fn rng(&self) -> &rand_chacha::ChaCha8Rng {
        &self.rng
    }

    /// Wraps an existing generator (e.g. one restored from a checkpoint).
    pub fn from_rng(rng: rand_chacha::ChaCha8Rng) -> Self {
        Self { rng }
    }
}

impl Randomness for SeededRandomness {
    fn uniform(&mut self, n: usize) -> Result<Vec<f32>> {
        Ok((0..n).map(|_| self.rng.random::<f32>()).collect())
    }

    fn below(&mut self, n: usize, bound: usize) -> Result<Vec<usize>> {
        if bound == 0 {
            return Err(Error::Randomness("cannot draw an integer below 0".into()));
        }
        Ok((0..n).map(|_| self.rng.random_range(0..bound)).collect())
    }
}

/// One recorded draw.
#[derive(Debug, Clone, PartialEq)]
pub enum Draw {
    /// Values of U[0, 1).
    Uniform(Vec<f32>),
    /// Integers, optionally with the bound they were drawn below (checked on replay).
    Int {
        /// The drawn values.
        values: Vec<i64>,
        /// The exclusive upper bound of the draw, when known.
        bound: Option<usize>,
    },
}

/// Replays a recorded sequence of draws (e.g. the `rng.NN` tensors of the parity fixture) and
/// fails clearly when the model asks for something else than what was recorded.
#[derive(Debug, Clone, Default)]
pub struct RecordedDraws {
    draws: VecDeque<Draw>,
    consumed: usize,
}

impl RecordedDraws {
    /// A tape holding `draws` in order.
    pub fn new(draws: impl IntoIterator<Item = Draw>) -> Self {
        Self {
            draws: draws.into_iter().collect(),
            consumed: 0,
        }
    }

    /// How many draws are left.
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }

    fn next(&mut self) -> Result<(usize, Draw)> {
        let index = self.consumed;
        let draw = self.draws.pop_front().ok_or_else(|| {
            Error::Randomness(format!("recorded draws exhausted at draw {index}"))
        })?;
        self.consumed += 1;
        Ok((index, draw))
    }
}

impl Randomness for RecordedDraws {
    fn uniform(&mut self, n: usize) -> Result<Vec<f32>> {
        match self.next()? {
            (_, Draw::Uniform(v)) if v.len() == n => Ok(v),
            (i, other) => Err(Error::Randomness(format!(
                "draw {i}: expected {n} uniform values, the tape holds {other:?}"
            ))),
        }
    }

    fn below(&mut self, n: usize, bound: usize) -> Result<Vec<usize>> {
        match self.next()? {
            (i, Draw::Int { values, bound: rec }) if values.len() == n => {
                if let Some(rec) = rec {
                    if rec != bound {
                        return Err(Error::Randomness(format!(
                            "draw {i}: the model draws below {bound}, the tape was drawn below {rec}"
                        )));
                    }
                }
                values
                    .into_iter()
                    .map(|v| {
                        if v < 0 || v as usize >= bound {
                            Err(Error::Randomness(format!(
                                "draw {i}: value {v} is outside [0, {bound})"
                            )))
                        } else {
                            Ok(v as usize)
                        }
                    })
                    .collect()
            }
            (i, other) => Err(Error::Randomness(format!(
                "draw {i}: expected {n} integers below {bound}, the tape holds {other:?}"
            ))),
        }
    }
}

/// Result of one feature-space anomaly call.
#[derive(Debug, Clone)]
pub struct FakeAnomalies {
    /// `mask·replacement + (1 − mask)·embeddings`, `B×D×h×w`.
    pub embeddings: Tensor,
    /// The code index picked at every position of every sample (row-major `h·w`), also where
    /// the mask is 0.
    pub picked_codes: Vec<Vec<u32>>,
}

/// For every row of `dist` (`k` distances per position), the code at rank `skip + draw` when
/// the codes are ordered by distance, ties by index.
fn rank_picks<T: Copy + Send + Sync>(
    dist: &[T],
    k: usize,
    skip: usize,
    draws: &[usize],
    cmp: fn(&T, &T) -> std::cmp::Ordering,
) -> Vec<u32> {
    dist.par_chunks(k)
        .zip(draws.par_iter())
        .map(|(row, &r)| {
            let mut order: Vec<u32> = (0..k as u32).collect();
            let (_, nth, _) = order.select_nth_unstable_by(skip + r, |&a, &b| {
                cmp(&row[a as usize], &row[b as usize]).then(a.cmp(&b))
            });
            *nth
        })
        .collect()
}

/// [`rank_picks`] of f32 distances, ordered by `f32::total_cmp` and then index as there, but
/// selected among integer keys (the distance's bits mapped to an unsigned integer of the same
/// order, the index below them): the same picks, without the indirect comparisons, which took
/// 5 % of a phase-2 step.
fn rank_picks_f32(dist: &[f32], k: usize, skip: usize, draws: &[usize]) -> Vec<u32> {
    /// An unsigned integer ordered as `f32::total_cmp` orders the floats.
    fn ordered_bits(v: f32) -> u32 {
        let bits = v.to_bits() as i32;
        // total_cmp's own mapping to a signed order, then the sign bit flipped.
        let signed = bits ^ ((((bits >> 31) as u32) >> 1) as i32);
        (signed as u32) ^ 0x8000_0000
    }
    dist.par_chunks(k)
        .zip(draws.par_iter())
        .map_init(
            || Vec::with_capacity(k),
            |keys: &mut Vec<u64>, (row, &r)| {
                keys.clear();
                keys.extend(
                    row.iter()
                        .enumerate()
                        .map(|(i, &v)| (u64::from(ordered_bits(v)) << 32) | i as u64),
                );
                let (_, nth, _) = keys.select_nth_unstable(skip + r);
                *nth as u32
            },
        )
        .collect()
}

/// Number of candidate codes for strength `s` and a codebook of `k` codes:
/// `topk = max(1, min(⌊s·K⌋ + 1, K − 1))` minus the `⌊0.05·K⌋` nearest ones (at least 1).
pub fn candidate_count(strength: f32, k: usize) -> (usize, usize) {
    // The reference multiplies the f32 strength by K in f32 and truncates.
    let topk = ((strength * k as f32) as usize + 1).min(k - 1).max(1);
    let skip = (k as f64 * NEAREST_EXCLUDED_FRACTION) as usize;
    let candidates = topk.saturating_sub(skip).max(1);
    (skip, candidates)
}

/// Replaces the quantized `embeddings` inside `mask` by codes that are similar but not too
/// similar to the continuous `features`.
///
/// For every sample k and position, the codes are ranked by squared distance to the feature
/// vector (ties by index); the first `⌊0.05·K⌋` are skipped and one of the next
/// `candidate_count` is drawn uniformly. `mask` (`B×1×H×W`, 0/1) is max-pooled to the feature
/// resolution. `features`, `embeddings`: `B×D×h×w`; `strength`: one value per sample.
pub fn fake_anomalies(
    features: &Tensor,
    embeddings: &Tensor,
    vq: &VectorQuantizer,
    mask: &Tensor,
    strength: &[f32],
    rng: &mut dyn Randomness,
) -> Result<FakeAnomalies> {
    let (b, d, h, w) = features.dims4()?;
    let (mb, _, mh, mw) = mask.dims4()?;
    if strength.len() != b || mb != b {
        return Err(Error::Input(format!(
            "fake anomalies: batch of {b} features, {mb} masks and {} strengths",
            strength.len()
        )));
    }
    if mh % h != 0 || mw % w != 0 || mh / h != mw / w {
        return Err(Error::Input(format!(
            "fake anomalies: mask {mh}×{mw} is not an integer multiple of the features {h}×{w}"
        )));
    }
    let codebook = vq.codebook().detach();
    let k = codebook.dim(0)?;
    let flat = flatten_positions(&features.detach())?;
    let hw = h * w;
    let mut picked_codes = Vec::with_capacity(b);
    for (sample, &s) in strength.iter().enumerate() {
        let rows = flat.narrow(0, sample * hw, hw)?;
        let dist = vq.squared_distances(&rows)?.flatten_all()?;
        let (skip, candidates) = candidate_count(s, k);
        let draws = rng.below(hw, candidates)?;
        let picks = match dist.dtype() {
            DType::F32 => rank_picks_f32(&dist.to_vec1::<f32>()?, k, skip, &draws),
            _ => rank_picks(
                &dist.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                k,
                skip,
                &draws,
                f64::total_cmp,
            ),
        };
        picked_codes.push(picks);
    }
    let all: Vec<u32> = picked_codes.iter().flatten().copied().collect();
    let idx = Tensor::from_vec(all, b * hw, features.device())?;
    let replacement = codebook
        .index_select(&idx, 0)?
        .reshape((b, h, w, d))?
        .permute((0, 3, 1, 2))?;
    let m = max_pool(&mask.detach().to_dtype(features.dtype())?, mh / h)?;
    let embeddings =
        (m.broadcast_mul(&replacement)? + (1.0 - &m)?.broadcast_mul(&embeddings.detach())?)?;
    Ok(FakeAnomalies {
        embeddings,
        picked_codes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_keys_pick_the_codes_total_cmp_picks() {
        // Rows with ties, both zeros, small negatives (squared distances by expansion can round
        // below zero), NaN and infinities; every rank of each row.
        let k = 24;
        let special = [
            0.0f32,
            -0.0,
            1e-7,
            -1e-7,
            f32::NAN,
            f32::INFINITY,
            f32::MIN_POSITIVE,
        ];
        let dist: Vec<f32> = (0..k * 40)
            .map(|i| match (i * 7919) % 13 {
                0..=6 => special[(i * 31) % special.len()],
                j => ((i * 104_729) % 5) as f32 * 0.5 - j as f32 * 0.125,
            })
            .collect();
        for skip in [0, 3] {
            for r in 0..k - skip {
                let draws = vec![r; 40];
                let expected = rank_picks(&dist, k, skip, &draws, f32::total_cmp);
                assert_eq!(
                    rank_picks_f32(&dist, k, skip, &draws),
                    expected,
                    "rank {skip} + {r}"
                );
            }
        }
    }
}
