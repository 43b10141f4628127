//! The training path of Winograd's algorithm: a tracked 3×3 convolution computes its forward,
//! its input gradient and its weight gradient by Winograd's algorithm, with the same forward
//! bits as inference and gradients within rounding of the direct convolution's. The backward
//! runs outside the call that chose the algorithm and keeps its choice.

use candle_core::Var;
use dsr_core::kernels::conv::conv2d;
use dsr_core::{ConvAlgorithm, Execution};

mod common;
use common::{random, values};

/// The largest difference between `a` and `b`, relative to the largest magnitude of `b`.
fn relative_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

#[test]
fn tracked_winograd_convolutions_match_inference_and_the_direct_gradients() {
    // 32 → 32 channels at 32×32: a Winograd layer (at least 32 input channels and 16×16
    // pixels, sides multiples of 4) with a channels-last backward (at least 16 output pixels
    // per output channel), whose input gradient is such a convolution too.
    let x = random(&[2, 32, 32, 32], 1, 1.0);
    let w = random(&[32, 32, 3, 3], 2, 0.06);
    let b = random(&[32], 3, 0.1);
    let r = random(&[2, 32, 32, 32], 4, 1.0);
    let (xv, wv, bv) = (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&w).unwrap(),
        Var::from_tensor(&b).unwrap(),
    );
    // Forward, input, weight and bias gradients of sum(conv(x) · r).
    let run = |winograd: bool| {
        let exec = Execution::with_conv(if winograd {
            ConvAlgorithm::Winograd
        } else {
            ConvAlgorithm::Direct
        });
        let plain = values(&exec.run(|| conv2d(&x, &w, Some(&b), 1, 1)).unwrap());
        let y = exec
            .run(|| conv2d(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), 1, 1))
            .unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gradient = |v: &Var| values(grads.get(v.as_tensor()).unwrap());
        (
            plain,
            values(&y),
            [gradient(&xv), gradient(&wv), gradient(&bv)],
        )
    };
    let (plain, tracked, fast) = run(true);
    let (plain_direct, tracked_direct, direct) = run(false);
    // Inference and training compute the layer the same way, bit for bit.
    assert_eq!(plain, tracked);
    assert_eq!(plain_direct, tracked_direct);
    // Winograd's rounding differs from the direct sum's, within f32 rounding of the sums.
    assert_ne!(
        tracked, tracked_direct,
        "the forward did not take Winograd's algorithm"
    );
    assert!(relative_difference(&tracked, &tracked_direct) < 1e-5);
    let [gx, gw, gb] = &fast;
    let [gx_direct, gw_direct, gb_direct] = &direct;
    assert_ne!(
        gx, gx_direct,
        "the input gradient did not take Winograd's algorithm"
    );
    assert!(relative_difference(gx, gx_direct) < 1e-5);
    assert_ne!(
        gw, gw_direct,
        "the weight gradient did not take Winograd's algorithm"
    );
    let weight = relative_difference(gw, gw_direct);
    eprintln!("weight gradient: {weight:e} of the largest");
    assert!(weight < 1e-5);
    // The bias gradient is the output gradient's channel sums either way.
    assert_eq!(gb, gb_direct);
}
