//! Timing of the pixel-level metrics on a DSR-sized evaluation set: 100 images of 256x256 pixels
//! (6.5 M pixels) with continuous map values, so nearly every pixel is its own threshold (the worst
//! case for exact curves).
//!
//! This is a plain timing harness (`harness = false`) built on `std::time::Instant`, so it needs no
//! extra dependency. Run it with `cargo bench -p dsr-eval --bench metrics`; it prints the median of
//! a few runs of each step.

use std::hint::black_box;
use std::time::{Duration, Instant};

use dsr_eval::metrics::{aupro, BinaryCurve, EvalCurves, EvalSet, Metrics, DEFAULT_FPR_LIMIT};
use dsr_eval::postprocess::PostProcessor;

const IMAGES: usize = 100;
const SIDE: usize = 256;
const RUNS: usize = 5;

/// A small deterministic generator (SplitMix64), enough for synthetic benchmark data.
struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Builds maps with a disc-shaped defect in every other image, the defect pixels scoring higher on
/// average than the background.
fn synthetic_set() -> (Vec<f32>, Vec<bool>, Vec<f32>, Vec<bool>) {
    let mut rng = SplitMix(7);
    let pixels = SIDE * SIDE;
    let mut maps = Vec::with_capacity(IMAGES * pixels);
    let mut masks = Vec::with_capacity(IMAGES * pixels);
    let mut scores = Vec::with_capacity(IMAGES);
    let mut labels = Vec::with_capacity(IMAGES);
    for image in 0..IMAGES {
        let defective = image % 2 == 1;
        let (cy, cx, r) = (
            (rng.next_f32() * SIDE as f32) as i64,
            (rng.next_f32() * SIDE as f32) as i64,
            4 + (rng.next_f32() * 40.0) as i64,
        );
        let mut max = 0.0f32;
        for y in 0..SIDE as i64 {
            for x in 0..SIDE as i64 {
                let inside = defective && (y - cy).pow(2) + (x - cx).pow(2) <= r * r;
                let v = if inside {
                    0.3 + 0.7 * rng.next_f32()
                } else {
                    0.6 * rng.next_f32()
                };
                max = max.max(v);
                maps.push(v);
                masks.push(inside);
            }
        }
        scores.push(0.7 * max + 0.3 * rng.next_f32());
        labels.push(defective);
    }
    (scores, labels, maps, masks)
}

/// Runs `f` a few times and returns the median duration.
fn median_time(mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort_unstable();
    times[RUNS / 2]
}

fn main() {
    let (scores, labels, maps, masks) = synthetic_set();
    let set = EvalSet::new(&scores, &labels, &maps, &masks, SIDE, SIDE).expect("valid set");
    println!(
        "{IMAGES} images of {SIDE}x{SIDE} = {} pixels, {} threads",
        maps.len(),
        rayon::current_num_threads()
    );

    let t = median_time(|| {
        let curve = BinaryCurve::new(black_box(&maps), &masks).expect("curve");
        black_box((
            curve.auroc().expect("auroc"),
            curve.average_precision().expect("ap"),
            curve.f1_max().expect("f1max"),
        ));
    });
    println!("pixel curve + AUROC + AP + F1Max:  {t:?}");

    let t = median_time(|| {
        black_box(aupro(black_box(&maps), &masks, SIDE, SIDE, DEFAULT_FPR_LIMIT).expect("aupro"));
    });
    println!("pixel AUPRO:                       {t:?}");

    let t = median_time(|| {
        let curves = EvalCurves::new(black_box(&set)).expect("curves");
        let post = PostProcessor::from_curves(&curves.image, &curves.pixel);
        black_box(Metrics::from_curves(&curves, &post).expect("metrics"));
    });
    println!("all metrics + post-processor fit:  {t:?}");
}
