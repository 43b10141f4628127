//! Recomputing the convolutions of the conv → instance norm → ReLU blocks in the backward
//! (`runtime::set_activation_recompute`) changes what training keeps in memory, not a single bit
//! of the outputs or gradients. (Its own test binary: the setting is process-wide.)

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::runtime::set_activation_recompute;
use dsr_core::unet::UnetModel;
use rand::{Rng, SeedableRng};

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn recomputed_blocks_give_the_same_outputs_and_gradients() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    // 32×32 with base width 8: the full-resolution layers take the channels-last convolution,
    // the 4×4 ones the NCHW product.
    let unet = UnetModel::new(vb, 3, 2, 8).unwrap();
    let x = Var::from_tensor(&random(&[2, 3, 32, 32], 1)).unwrap();
    let r = random(&[2, 2, 32, 32], 2);
    let run = |recompute: bool| {
        set_activation_recompute(recompute);
        let y = unet.forward(x.as_tensor()).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let mut all = vec![values(grads.get(x.as_tensor()).unwrap())];
        let vars = varmap.data().lock().unwrap();
        let mut names: Vec<_> = vars.keys().cloned().collect();
        names.sort();
        for name in &names {
            let g = grads
                .get(vars[name].as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            all.push(values(g));
        }
        (values(&y), all, names.len())
    };
    let (y_kept, g_kept, n) = run(false);
    let (y_recomputed, g_recomputed, _) = run(true);
    set_activation_recompute(false);
    assert!(n > 20, "only {n} parameters");
    assert_eq!(y_kept, y_recomputed);
    assert_eq!(g_kept.len(), g_recomputed.len());
    for (i, (a, b)) in g_kept.iter().zip(&g_recomputed).enumerate() {
        assert_eq!(a, b, "gradient {i} differs");
        assert!(a.iter().any(|v| *v != 0.0), "gradient {i} is zero");
    }
}
