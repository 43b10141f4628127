//! Layers that keep their weights' transformed copies (`runtime::set_weight_cache`) compute the
//! same bits as layers that make them at every call. (Its own test binary: the setting is
//! process-wide.)

use candle_core::{DType, Device, Module};
use candle_nn::VarBuilder;
use dsr_core::runtime::{set_weight_cache, set_winograd};
use dsr_core::unet::UnetModel;

mod common;
use common::{random, values};

#[test]
fn cached_filters_give_the_same_outputs() {
    // Plain tensors, as a loaded checkpoint gives them; base width 32 and 32×32 images so that
    // the 3×3 convolutions of the first two levels take Winograd's algorithm (at least 32 input
    // channels and 16×16 pixels).
    let varmap = candle_nn::VarMap::new();
    UnetModel::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        3,
        2,
        32,
    )
    .unwrap();
    let tensors = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach().copy().unwrap()))
        .collect();
    let unet = UnetModel::new(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        3,
        2,
        32,
    )
    .unwrap();
    let x = random(&[2, 3, 32, 32], 1, 1.0);
    set_winograd(true);
    set_weight_cache(false);
    let fresh = values(&unet.forward(&x).unwrap());
    set_weight_cache(true);
    let first = values(&unet.forward(&x).unwrap());
    let cached = values(&unet.forward(&x).unwrap());
    set_weight_cache(false);
    assert_eq!(fresh, first);
    assert_eq!(fresh, cached);
    // Winograd's algorithm was used: the direct convolutions round differently.
    set_winograd(false);
    let direct = values(&unet.forward(&x).unwrap());
    set_winograd(true);
    assert!(
        fresh != direct,
        "the direct convolutions gave the same bits"
    );
    let worst = fresh
        .iter()
        .zip(&direct)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "{worst}");
}
