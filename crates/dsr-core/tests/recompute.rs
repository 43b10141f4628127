//! Recomputing the convolutions of the conv → instance norm → ReLU blocks in the backward
//! (`Execution::recompute`) changes what training keeps in memory, not a single bit of the
//! outputs or gradients; the backward, which runs outside the forward's call, keeps its choice.

use candle_core::{DType, Device, Module, Var};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::unet::UnetModel;
use dsr_core::Execution;

mod common;
use common::{random, values};

#[test]
fn recomputed_blocks_give_the_same_outputs_and_gradients() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    // Base width 8. At 32×32 the full-resolution layers take the channels-last convolution, the
    // 2×2 ones the NCHW product; at 64×64 the 32-channel layer of the third level (16×16) also
    // computes its forward (and so its recomputed forward) by Winograd's algorithm.
    let unet = UnetModel::new(3, 2, 8, vb).unwrap();
    for side in [32, 64] {
        check_recompute(&unet, &varmap, side);
    }
}

fn check_recompute(unet: &UnetModel, varmap: &VarMap, side: usize) {
    let x = Var::from_tensor(&random(&[2, 3, side, side], 1, 1.0)).unwrap();
    let r = random(&[2, 2, side, side], 2, 1.0);
    let run = |recompute: bool| {
        let exec = Execution {
            recompute,
            ..Execution::default()
        };
        let y = exec.run(|| unet.forward(x.as_tensor())).unwrap();
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
    assert!(n > 20, "only {n} parameters");
    assert_eq!(y_kept, y_recomputed);
    assert_eq!(g_kept.len(), g_recomputed.len());
    for (i, (a, b)) in g_kept.iter().zip(&g_recomputed).enumerate() {
        assert_eq!(a, b, "gradient {i} differs at {side}×{side}");
        assert!(a.iter().any(|v| *v != 0.0), "gradient {i} is zero");
    }
}
