//! The operations where candle 0.11 needs a work-around, each with the check that would have
//! caught the problem, plus the vector quantizer's EMA update.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::anomaly::{Randomness, SeededRandomness};
use dsr_core::layers::{
    instance_norm, instance_norm_relu, max_pool2x2, upsample_bilinear, upsample_bilinear2x,
    upsample_bilinear_matmul, upsample_nearest,
};
use dsr_core::quantizer::EmaConfig;
use dsr_core::VectorQuantizer;

mod common;
use common::random;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn bilinear_operator_and_its_gradient_match_the_matrix_form() {
    for (h, w, oh, ow) in [(4, 4, 8, 8), (3, 5, 6, 10), (8, 8, 16, 16), (5, 4, 7, 9)] {
        let x = Var::from_tensor(&random(&[2, 3, h, w], 1, 1.0)).unwrap();
        let r = random(&[2, 3, oh, ow], 2, 1.0);
        let fast = upsample_bilinear(x.as_tensor(), oh, ow).unwrap();
        let slow = upsample_bilinear_matmul(x.as_tensor(), oh, ow).unwrap();
        assert!(max_diff(&fast, &slow) < 1e-6);
        let g_fast = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_slow = (slow * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            g_fast.get(x.as_tensor()).unwrap(),
            g_slow.get(x.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(a, b) < 1e-5,
            "{h}x{w}->{oh}x{ow}: {}",
            max_diff(a, b)
        );
    }
}

#[test]
fn bilinear_align_corners_keeps_the_corners_and_interpolates_linearly() {
    // A linear ramp stays a linear ramp with align_corners = true: the ends map onto the ends.
    let x = Tensor::from_vec(vec![0f32, 1., 2., 3.], (1, 1, 1, 4), &Device::Cpu).unwrap();
    let x = x.broadcast_as((1, 1, 2, 4)).unwrap().contiguous().unwrap();
    let y: Vec<f32> = upsample_bilinear2x(&x)
        .unwrap()
        .narrow(2, 0, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (i, v) in y.iter().enumerate() {
        let expected = i as f32 * 3.0 / 7.0;
        assert!((v - expected).abs() < 1e-6, "{i}: {v} vs {expected}");
    }
}

#[test]
fn max_pool_gradient_is_not_scaled() {
    // candle 0.11's max_pool2d backward multiplies by 1/4; the reshape form must give exactly 1
    // at each window's maximum and 0 elsewhere.
    let x = Var::from_tensor(&random(&[2, 3, 8, 8], 3, 1.0)).unwrap();
    let y = max_pool2x2(x.as_tensor()).unwrap();
    let reference = x.as_tensor().max_pool2d(2).unwrap();
    assert_eq!(max_diff(&y, &reference), 0.0);
    let grads = y.sum_all().unwrap().backward().unwrap();
    let g: Vec<f32> = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(g.iter().filter(|&&v| v == 1.0).count(), 2 * 3 * 16);
    assert!(g.iter().all(|&v| v == 0.0 || v == 1.0));
}

#[test]
fn nearest_upsample_gradient_accumulates() {
    // candle 0.11's upsample_nearest2d backward overwrites the gradient already accumulated for
    // its input; ours must add: d/dx [sum(up4(x)) + sum(x)] = 16 + 1.
    let x = Var::from_tensor(&random(&[1, 2, 4, 4], 4, 1.0)).unwrap();
    let loss = (upsample_nearest(x.as_tensor(), 4)
        .unwrap()
        .sum_all()
        .unwrap()
        + x.as_tensor().sum_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let g: Vec<f32> = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(g.iter().all(|&v| v == 17.0), "{g:?}");
}

#[test]
fn instance_norm_matches_a_direct_computation() {
    let x = random(&[2, 3, 5, 7], 5, 1.0);
    let y: Vec<f32> = instance_norm(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    for plane in 0..6 {
        let p = &v[plane * 35..(plane + 1) * 35];
        let mean = p.iter().map(|&a| a as f64).sum::<f64>() / 35.0;
        let var = p.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / 35.0;
        for i in 0..35 {
            let expected = (p[i] as f64 - mean) / (var + 1e-5).sqrt();
            assert!((y[plane * 35 + i] as f64 - expected).abs() < 1e-5);
        }
    }
}

#[test]
fn seeded_randomness_is_reproducible() {
    // candle's CPU generator cannot be seeded; every phase-2 draw comes from this source instead.
    let mut a = SeededRandomness::new(7);
    let mut b = SeededRandomness::new(7);
    let mut c = SeededRandomness::new(8);
    let (ua, ub, uc) = (
        a.uniform(16).unwrap(),
        b.uniform(16).unwrap(),
        c.uniform(16).unwrap(),
    );
    assert_eq!(ua, ub);
    assert_ne!(ua, uc);
    assert_eq!(a.below(32, 5).unwrap(), b.below(32, 5).unwrap());
    assert!(a.below(1, 0).is_err());
}

#[test]
fn ema_update_follows_the_original_recipe() {
    let (k, d) = (4usize, 2usize);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let vq = VectorQuantizer::new(k, d, vb.clone()).unwrap();
    let codebook = vec![0f32, 0., 1., 0., 0., 1., 5., 5.];
    let ema_w = codebook.clone();
    let size = vec![1f32, 1., 1., 1.];
    {
        let data = varmap.data().lock().unwrap();
        data["_embedding.weight"]
            .set(&Tensor::from_vec(codebook.clone(), (k, d), &Device::Cpu).unwrap())
            .unwrap();
        data["_ema_w"]
            .set(&Tensor::from_vec(ema_w.clone(), (k, d), &Device::Cpu).unwrap())
            .unwrap();
        data["_ema_cluster_size"]
            .set(&Tensor::from_vec(size.clone(), k, &Device::Cpu).unwrap())
            .unwrap();
    }
    // Four positions (B=1, 2×2): three near code 1, one near code 0.
    let xs = [(0.9f32, 0.1f32), (1.1, -0.1), (0.1, 0.05), (1.0, 0.2)];
    let input: Vec<f32> = xs
        .iter()
        .map(|p| p.0)
        .chain(xs.iter().map(|p| p.1))
        .collect();
    let x = Tensor::from_vec(input, (1, d, 2, 2), &Device::Cpu).unwrap();
    let cfg = EmaConfig::default();
    let out = vq.forward_ema(&x, &cfg).unwrap();
    let idx: Vec<u32> = out.output.indices.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(idx, vec![1, 1, 0, 1]);
    assert_eq!(out.codes_used, 2);
    let expected_perplexity = (-(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln())).exp();
    assert!((out.perplexity - expected_perplexity).abs() < 1e-4);

    // The update, computed by hand in f64.
    let counts = [1.0, 3.0, 0.0, 0.0];
    let mut n: Vec<f64> = (0..k)
        .map(|i| 0.99 * size[i] as f64 + 0.01 * counts[i])
        .collect();
    let total: f64 = n.iter().sum();
    for v in n.iter_mut() {
        *v = (*v + 1e-5) / (total + k as f64 * 1e-5) * total;
    }
    let mut dw = vec![0f64; k * d];
    for (p, &c) in xs.iter().zip(&idx) {
        dw[c as usize * d] += p.0 as f64;
        dw[c as usize * d + 1] += p.1 as f64;
    }
    let data = varmap.data().lock().unwrap();
    let new_size: Vec<f32> = data["_ema_cluster_size"].as_tensor().to_vec1().unwrap();
    let new_w: Vec<f32> = data["_ema_w"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let new_e: Vec<f32> = data["_embedding.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for i in 0..k {
        assert!((new_size[i] as f64 - n[i]).abs() < 1e-5);
        for j in 0..d {
            let w = 0.99 * ema_w[i * d + j] as f64 + 0.01 * dw[i * d + j];
            assert!((new_w[i * d + j] as f64 - w).abs() < 1e-5);
            assert!((new_e[i * d + j] as f64 - w / n[i]).abs() < 1e-4);
        }
    }
    // The quantizer itself sees the new codebook (shared storage).
    assert!(
        (vq.codebook()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[2]
            - new_e[2])
            .abs()
            < 1e-7
    );
    // Commitment loss = 0.25 · MSE(q, x) with the pre-update codebook.
    let q = [(1.0f64, 0.0f64), (1.0, 0.0), (0.0, 0.0), (1.0, 0.0)];
    let mse: f64 = xs
        .iter()
        .zip(&q)
        .map(|(p, q)| (p.0 as f64 - q.0).powi(2) + (p.1 as f64 - q.1).powi(2))
        .sum::<f64>()
        / 8.0;
    let loss: f32 = out.commitment_loss.to_scalar().unwrap();
    assert!((loss as f64 - 0.25 * mse).abs() < 1e-6);
}

#[test]
fn ema_update_refuses_a_constant_codebook() {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let vq = VectorQuantizer::new(4, 2, vb).unwrap();
    let x = random(&[1, 2, 2, 2], 9, 1.0);
    assert!(vq.forward_ema(&x, &EmaConfig::default()).is_err());
}

#[test]
fn instance_norm_gradient_matches_the_composite_form() {
    // The CPU operator's closed-form backward against autograd through the composite formula
    // (which the f64 path uses).
    let x = random(&[2, 3, 6, 5], 11, 1.0);
    let r = random(&[2, 3, 6, 5], 12, 1.0);
    let x32 = Var::from_tensor(&x).unwrap();
    let y32 = instance_norm(x32.as_tensor()).unwrap();
    let g32 = (y32 * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let x64 = Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let y64 = instance_norm(x64.as_tensor()).unwrap();
    let g64 = (y64 * r.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let a = g32
        .get(x32.as_tensor())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let b = g64.get(x64.as_tensor()).unwrap();
    let d: f64 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d < 1e-5, "{d}");
}

#[test]
fn fused_instance_norm_relu_equals_the_two_operators() {
    // Same output bits, and the same input gradient as instance norm followed by a ReLU whose
    // gradient passes where the output is positive (PyTorch's rule).
    let x = random(&[2, 3, 7, 5], 21, 1.0);
    let r = random(&[2, 3, 7, 5], 22, 1.0);
    let xa = Var::from_tensor(&x).unwrap();
    let fused = instance_norm_relu(xa.as_tensor()).unwrap();
    let xb = Var::from_tensor(&x).unwrap();
    let normed = instance_norm(xb.as_tensor()).unwrap();
    let composite = normed.relu().unwrap();
    assert_eq!(max_diff(&fused, &composite), 0.0);
    let ga = (&fused * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gb = (&composite * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let a = ga.get(xa.as_tensor()).unwrap();
    let b = gb.get(xb.as_tensor()).unwrap();
    assert!(max_diff(a, b) <= 1e-6, "{}", max_diff(a, b));
    // Some outputs are clipped, so the mask matters.
    let zeros: f32 = fused
        .eq(0f32)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(zeros > 10.0);
}
