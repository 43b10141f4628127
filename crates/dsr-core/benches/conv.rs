//! The fast CPU convolutions against candle's own operators at DSR's shapes: forward alone and
//! forward + backward (input, weight and bias gradients); and the inference forward (no graph) of
//! 3×3 layers with Winograd's algorithm on and off.
//!
//! `cargo bench -p dsr-core --bench conv -- --warm-up-time 1 --measurement-time 3`

use candle_core::{Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use dsr_core::kernels::conv::{conv2d, conv_transpose2d};
use dsr_core::{ConvAlgorithm, Execution};

// The tests' seeded random inputs (`random`).
#[path = "../tests/common/mod.rs"]
mod common;
use common::random;

/// Which implementation a benchmark runs.
#[derive(Debug, Clone, Copy)]
enum Imp {
    Fast,
    Candle,
}

/// One benchmarked layer: a convolution or a transposed convolution.
struct Layer {
    name: &'static str,
    transposed: bool,
    x: Var,
    w: Var,
    b: Var,
    stride: usize,
    padding: usize,
}

impl Layer {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &'static str,
        transposed: bool,
        (n, ci, h, w): (usize, usize, usize, usize),
        co: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        let w_shape = if transposed {
            [ci, co, k, k]
        } else {
            [co, ci, k, k]
        };
        Self {
            name,
            transposed,
            x: Var::from_tensor(&random(&[n, ci, h, w], 1, 1.0)).unwrap(),
            w: Var::from_tensor(&random(&w_shape, 2, 0.1)).unwrap(),
            b: Var::from_tensor(&random(&[co], 3, 0.1)).unwrap(),
            stride,
            padding,
        }
    }

    fn forward(&self, imp: Imp) -> Tensor {
        let (x, w, b) = (self.x.as_tensor(), self.w.as_tensor(), self.b.as_tensor());
        match (imp, self.transposed) {
            (Imp::Fast, false) => conv2d(x, w, Some(b), self.stride, self.padding).unwrap(),
            (Imp::Fast, true) => {
                conv_transpose2d(x, w, Some(b), self.stride, self.padding).unwrap()
            }
            (Imp::Candle, false) => x
                .conv2d(w, self.padding, self.stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).unwrap())
                .unwrap(),
            (Imp::Candle, true) => x
                .conv_transpose2d(w, self.padding, 0, self.stride, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).unwrap())
                .unwrap(),
        }
    }
}

fn bench_layers(c: &mut Criterion) {
    let layers = [
        Layer::new(
            "conv 128->128 k3 8x64x64",
            false,
            (8, 128, 64, 64),
            128,
            3,
            1,
            1,
        ),
        Layer::new(
            "conv 64->64 k3 2x256x256",
            false,
            (2, 64, 256, 256),
            64,
            3,
            1,
            1,
        ),
        Layer::new(
            "conv 3->64 k4 s2 8x256x256",
            false,
            (8, 3, 256, 256),
            64,
            4,
            2,
            1,
        ),
        Layer::new(
            "conv 128->64 k1 8x64x64",
            false,
            (8, 128, 64, 64),
            64,
            1,
            1,
            0,
        ),
        Layer::new(
            "convT 128->64 k4 s2 8x64x64",
            true,
            (8, 128, 64, 64),
            64,
            4,
            2,
            1,
        ),
    ];
    for layer in &layers {
        let mut group = c.benchmark_group(layer.name);
        group.sample_size(10);
        for (label, imp) in [("fast", Imp::Fast), ("candle", Imp::Candle)] {
            group.bench_function(format!("{label} fwd"), |bench| {
                bench.iter(|| layer.forward(imp))
            });
            group.bench_function(format!("{label} fwd+bwd"), |bench| {
                bench.iter(|| layer.forward(imp).sum_all().unwrap().backward().unwrap())
            });
        }
        group.finish();
    }
}

/// The inference forward (plain tensors, no graph) of 3×3 layers, batch 1, by Winograd's
/// algorithm and directly: the shapes of the U-Nets' levels, and the narrow layers below the
/// Winograd threshold (32 input channels) where it is not used.
fn bench_winograd(c: &mut Criterion) {
    let mut group = c.benchmark_group("inference 3x3");
    group.sample_size(10);
    for (ci, co, side) in [
        (64, 64, 256),
        (128, 64, 256),
        (128, 128, 128),
        (256, 256, 64),
        (512, 512, 32),
        (32, 64, 256),
        (16, 64, 256),
    ] {
        let x = random(&[1, ci, side, side], 1, 1.0);
        let w = random(&[co, ci, 3, 3], 2, 0.1);
        let b = random(&[co], 3, 0.1);
        // The filters kept between calls (as `dsr predict` runs) and transformed per call (as a
        // training step does, once per weight).
        let cache = dsr_core::kernels::conv::WeightCache::default();
        group.bench_function(
            format!("{ci}->{co} {side}x{side} winograd cached"),
            |bench| {
                bench.iter(|| {
                    dsr_core::kernels::conv::conv2d_cached(&x, &w, Some(&b), 1, 1, &cache).unwrap()
                })
            },
        );
        for (label, conv) in [
            ("winograd", ConvAlgorithm::Winograd),
            ("direct", ConvAlgorithm::Direct),
        ] {
            let exec = Execution::with_conv(conv);
            group.bench_function(format!("{ci}->{co} {side}x{side} {label}"), |bench| {
                bench.iter(|| {
                    exec.run(|| dsr_core::kernels::conv::conv2d(&x, &w, Some(&b), 1, 1).unwrap())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_layers, bench_winograd);
criterion_main!(benches);
