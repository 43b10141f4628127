//! Phase 1: the discrete model learns to reconstruct, keeps its codebooks in use, is
//! reproducible, and its output loads like the official pretrained file.

use candle_core::{DType, Device};
use dsr_augment::ImageBatch;
use dsr_core::weights::load_checkpoint;
use dsr_core::{DiscreteLatentModel, DsrConfig};
use dsr_train::pretrain::{PretrainConfig, Pretrainer};

/// Smooth synthetic images (sums of a few sinusoids), so that there is structure to learn.
fn images(n: usize, size: usize) -> ImageBatch {
    let mut data = Vec::with_capacity(n * 3 * size * size);
    for i in 0..n {
        for c in 0..3 {
            for y in 0..size {
                for x in 0..size {
                    let (fy, fx) = (y as f32 / size as f32, x as f32 / size as f32);
                    let v = 0.5
                        + 0.25
                            * ((fx * (3 + i) as f32 + c as f32).sin()
                                * (fy * (2 + c) as f32 * 3.0).cos());
                    data.push(v);
                }
            }
        }
    }
    ImageBatch::new(n, 3, size, size, data).unwrap()
}

fn config(steps: u64) -> PretrainConfig {
    PretrainConfig {
        model: DsrConfig::tiny(),
        crop: 64,
        batch_size: 4,
        steps,
        adam: dsr_train::optim::AdamConfig {
            lr: 2e-3,
            ..Default::default()
        },
        reseed_every: 10,
        seed: 3,
        ..PretrainConfig::default()
    }
}

#[test]
fn phase1_learns_keeps_codes_alive_and_round_trips() {
    let mut t = Pretrainer::new(config(40), images(6, 96), &Device::Cpu).unwrap();
    let mut reports = Vec::new();
    while !t.is_done() {
        reports.push(t.train_step().unwrap());
    }
    let first: f64 = reports[..5].iter().map(|r| r.recon_mse).sum::<f64>() / 5.0;
    let last: f64 = reports[35..].iter().map(|r| r.recon_mse).sum::<f64>() / 5.0;
    assert!(last < 0.5 * first, "reconstruction MSE {first} → {last}");
    // Re-seeding keeps a good part of the (tiny, 32-code) codebooks in use.
    let r = reports.last().unwrap();
    assert!(r.codes_used_top >= 4 && r.codes_used_bot >= 4, "{r:?}");
    assert!(reports.iter().any(|r| r.reseeded > 0));

    // Reproducible.
    let mut u = Pretrainer::new(config(5), images(6, 96), &Device::Cpu).unwrap();
    let again: Vec<_> = (0..5).map(|_| u.train_step().unwrap()).collect();
    assert_eq!(&reports[..5], &again[..]);

    // Saved and reloaded like the official discrete weights.
    let dir = std::env::temp_dir().join(format!("dsr-pretrain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("discrete.safetensors");
    t.save(&path).unwrap();
    let ckpt = load_checkpoint(&path).unwrap();
    // Every tensor of the discrete model (40 with the default two residual layers).
    let expected = DsrConfig::tiny().discrete_state_dict_shapes().unwrap();
    assert_eq!(ckpt.tensors.len(), expected.len());
    assert_eq!(
        DsrConfig::default()
            .discrete_state_dict_shapes()
            .unwrap()
            .len(),
        40
    );
    let vb = candle_nn::VarBuilder::from_tensors(ckpt.tensors.clone(), DType::F32, &Device::Cpu);
    let model =
        DiscreteLatentModel::new(&DsrConfig::tiny(), vb.pp("discrete_latent_model")).unwrap();
    let x =
        candle_core::Tensor::from_vec(images(1, 64).data, (1, 3, 64, 64), &Device::Cpu).unwrap();
    let (recon, _) = model.reconstruct(&x).unwrap();
    assert_eq!(recon.dims(), &[1, 3, 64, 64]);
}

#[test]
fn images_smaller_than_the_crop_are_refused() {
    let err = Pretrainer::new(
        PretrainConfig {
            crop: 128,
            ..config(1)
        },
        images(2, 96),
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(err.to_string().contains("128×128"), "{err}");
}
