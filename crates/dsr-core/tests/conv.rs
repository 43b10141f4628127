//! The fast CPU convolutions against candle's own `conv2d` / `conv_transpose2d`: outputs and the
//! gradients of input, weight and bias, for every kernel/stride/padding combination DSR uses,
//! on even and odd image sizes.

use candle_core::{DType, Tensor, Var};
use dsr_core::kernels::conv::{conv2d, conv_transpose2d};

mod common;
use common::random;

/// Uniform values in [−scale, scale) from a seeded generator.
fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Asserts that `ours` matches `reference` to 1e-5 of the reference's largest magnitude.
fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shapes differ");
    let diff = max_abs(&(ours - reference).unwrap());
    let scale = max_abs(reference).max(1e-6);
    assert!(
        diff <= 1e-5 * scale,
        "{what}: max |diff| {diff:.3e} exceeds 1e-5 × {scale:.3e}"
    );
}

/// One convolution case: input `[n, ci, h, w]`, `co` outputs, kernel `k`, `stride`, `padding`.
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
}

/// Compares output and gradients of `fast` and `reference`, where both take (x, weight, bias).
#[allow(clippy::too_many_arguments)]
fn compare(
    label: &str,
    x_shape: &[usize],
    w_shape: &[usize],
    co: usize,
    bias: bool,
    seed: u64,
    fast: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
    reference: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Tensor,
) {
    let x = Var::from_tensor(&random(x_shape, seed, 1.0)).unwrap();
    let w = Var::from_tensor(&random(w_shape, seed + 1, 0.5)).unwrap();
    let b = Var::from_tensor(&random(&[co], seed + 2, 0.5)).unwrap();
    let b_opt = bias.then(|| b.as_tensor());
    let ours = fast(x.as_tensor(), w.as_tensor(), b_opt);
    let theirs = reference(x.as_tensor(), w.as_tensor(), b_opt);
    assert_close(&format!("{label} forward"), &ours, &theirs);

    // A random linear functional of the output makes every output element's gradient distinct.
    let r = random(theirs.dims(), seed + 3, 1.0);
    let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_theirs = (theirs * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut vars = vec![("input", &x), ("weight", &w)];
    if bias {
        vars.push(("bias", &b));
    }
    for (name, v) in vars {
        let a = g_ours
            .get(v)
            .unwrap_or_else(|| panic!("{label}: no {name} gradient"));
        let e = g_theirs.get(v).unwrap();
        assert_close(&format!("{label} {name} gradient"), a, e);
    }
    if !bias {
        assert!(
            g_ours.get(&b).is_none(),
            "{label}: unused bias got a gradient"
        );
    }
}

fn check_conv2d(c: Case, seed: u64) {
    let label = format!("conv2d {c:?}");
    compare(
        &label,
        &[c.n, c.ci, c.h, c.w],
        &[c.co, c.ci, c.k, c.k],
        c.co,
        c.bias,
        seed,
        |x, w, b| conv2d(x, w, b, c.stride, c.padding).unwrap(),
        |x, w, b| {
            let y = x.conv2d(w, c.padding, c.stride, 1, 1).unwrap();
            match b {
                Some(b) => y
                    .broadcast_add(&b.reshape((1, c.co, 1, 1)).unwrap())
                    .unwrap(),
                None => y,
            }
        },
    );
}

fn check_conv_transpose2d(c: Case, seed: u64) {
    let label = format!("conv_transpose2d {c:?}");
    compare(
        &label,
        &[c.n, c.ci, c.h, c.w],
        &[c.ci, c.co, c.k, c.k],
        c.co,
        c.bias,
        seed,
        |x, w, b| conv_transpose2d(x, w, b, c.stride, c.padding).unwrap(),
        |x, w, b| {
            let y = x.conv_transpose2d(w, c.padding, 0, c.stride, 1).unwrap();
            match b {
                Some(b) => y
                    .broadcast_add(&b.reshape((1, c.co, 1, 1)).unwrap())
                    .unwrap(),
                None => y,
            }
        },
    );
}

#[allow(clippy::too_many_arguments)]
fn case(
    n: usize,
    ci: usize,
    co: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
) -> Case {
    Case {
        n,
        ci,
        co,
        h,
        w,
        k,
        stride,
        padding,
        bias,
    }
}

#[test]
fn strided_k4_convolution_matches_candle() {
    // The encoders' down-sampling convolutions: kernel 4, stride 2, padding 1.
    check_conv2d(case(2, 3, 8, 16, 16, 4, 2, 1, true), 10);
    check_conv2d(case(2, 5, 6, 17, 15, 4, 2, 1, true), 20);
    // candle's own conv2d backward uses one output padding for both axes, so the reference
    // gradient exists only when height and width need the same one (here both odd).
    check_conv2d(case(1, 4, 4, 9, 9, 4, 2, 1, false), 30);
}

#[test]
fn k3_convolution_matches_candle() {
    // The U-Nets' and residual blocks' 3×3 convolutions: stride 1, padding 1.
    check_conv2d(case(2, 6, 7, 12, 12, 3, 1, 1, true), 40);
    check_conv2d(case(3, 5, 4, 9, 11, 3, 1, 1, true), 50);
    check_conv2d(case(2, 8, 8, 7, 5, 3, 1, 1, false), 60);
}

#[test]
fn pointwise_convolution_matches_candle() {
    // The 1×1 projections in front of the quantizers and in the residual blocks.
    check_conv2d(case(2, 6, 4, 8, 8, 1, 1, 0, true), 70);
    check_conv2d(case(3, 5, 3, 7, 5, 1, 1, 0, false), 80);
}

#[test]
fn other_geometries_match_candle() {
    // Not used by DSR, but the operator claims them: strided 3×3, unpadded, strided 1×1.
    check_conv2d(case(2, 3, 5, 10, 10, 3, 2, 1, true), 90);
    check_conv2d(case(2, 3, 5, 9, 8, 3, 1, 0, true), 100);
    check_conv2d(case(2, 3, 4, 9, 7, 1, 2, 0, true), 110);
}

#[test]
fn transposed_k4_convolution_matches_candle() {
    // The decoders' up-sampling: kernel 4, stride 2, padding 1, exactly doubling the size.
    check_conv_transpose2d(case(2, 6, 5, 8, 8, 4, 2, 1, true), 120);
    check_conv_transpose2d(case(2, 4, 3, 7, 9, 4, 2, 1, true), 130);
    check_conv_transpose2d(case(3, 8, 8, 5, 5, 4, 2, 1, false), 140);
}

#[test]
fn other_transposed_geometries_match_candle() {
    check_conv_transpose2d(case(2, 3, 4, 6, 5, 3, 1, 1, true), 150);
    check_conv_transpose2d(case(2, 3, 4, 5, 6, 3, 2, 0, true), 160);
}

#[test]
fn non_contiguous_inputs_are_accepted() {
    // A transposed view must give the same result as its contiguous copy.
    let x = random(&[2, 3, 9, 8], 170, 1.0);
    let w = random(&[4, 3, 3, 3], 171, 0.5);
    let xt = x.transpose(2, 3).unwrap();
    assert!(!xt.is_contiguous());
    let a = conv2d(&xt, &w, None, 1, 1).unwrap();
    let b = conv2d(&xt.contiguous().unwrap(), &w, None, 1, 1).unwrap();
    assert_eq!(max_abs(&(a - b).unwrap()), 0.0);
}

#[test]
fn other_dtypes_fall_back_to_candle() {
    // f64 does not take the fast path; the result must still be the convolution.
    let x = random(&[2, 3, 8, 8], 180, 1.0);
    let w = random(&[4, 3, 4, 4], 181, 0.5);
    let b = random(&[4], 182, 0.5);
    let fast = conv2d(&x, &w, Some(&b), 2, 1).unwrap();
    let (x64, w64, b64) = (
        x.to_dtype(DType::F64).unwrap(),
        w.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    let slow = conv2d(&x64, &w64, Some(&b64), 2, 1).unwrap();
    assert_eq!(slow.dtype(), DType::F64);
    assert_close("f64 conv2d", &slow.to_dtype(DType::F32).unwrap(), &fast);
    let wt = random(&[3, 4, 4, 4], 183, 0.5);
    let fast = conv_transpose2d(&x, &wt, Some(&b), 2, 1).unwrap();
    let slow = conv_transpose2d(&x64, &wt.to_dtype(DType::F64).unwrap(), Some(&b64), 2, 1).unwrap();
    assert_eq!(slow.dtype(), DType::F64);
    assert_close(
        "f64 conv_transpose2d",
        &slow.to_dtype(DType::F32).unwrap(),
        &fast,
    );
}

#[test]
fn mismatched_channels_are_an_error() {
    let x = random(&[1, 3, 8, 8], 190, 1.0);
    let w = random(&[4, 2, 3, 3], 191, 0.5);
    assert!(conv2d(&x, &w, None, 1, 1).is_err());
    assert!(conv_transpose2d(&x, &w, None, 2, 1).is_err());
}
