//! A diverging run stops within a step, and the last checkpoint written before stays intact,
//! loads and holds only finite values: with an absurd learning rate, and with a NaN pixel in the
//! training images.

use std::path::{Path, PathBuf};

use candle_core::Device;
use dsr_augment::{ImageBatch, Recipe};
use dsr_core::init::InitScheme;
use dsr_core::weights::load_checkpoint;
use dsr_core::DsrConfig;
use dsr_losses::FocalKind;
use dsr_train::optim::AdamConfig;
use dsr_train::train::{Schedule, TrainConfig, TrainError, Trainer};
use rand::{Rng, SeedableRng};

mod common;
use common::discrete_checkpoint;

fn images(n: usize, poison: bool) -> ImageBatch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut data: Vec<f32> = (0..n * 3 * 64 * 64).map(|_| rng.random::<f32>()).collect();
    if poison {
        // One NaN pixel in every image, so that every batch carries it.
        for i in 0..n {
            data[i * 3 * 64 * 64 + 100] = f32::NAN;
        }
    }
    ImageBatch::new(n, 3, 64, 64, data).unwrap()
}

fn config(lr: f64) -> TrainConfig {
    TrainConfig {
        model: DsrConfig::tiny(),
        image_size: [64, 64],
        batch_size: 2,
        adam: AdamConfig {
            lr,
            ..AdamConfig::default()
        },
        schedule: Schedule::Original {
            phase2_steps: 6,
            phase3_steps: 6,
            lr_drop_fraction: 1.0,
        },
        focal: FocalKind::Original,
        recipe: Recipe::Anomalib,
        init: InitScheme::Pytorch,
        seed: 3,
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsr-nonfinite-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The checkpoint loads, every tensor is finite, and training can resume from it.
fn assert_usable_checkpoint(path: &Path, step: u64) {
    let ckpt = load_checkpoint(path).unwrap();
    for (name, t) in &ckpt.tensors {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name} is not finite");
    }
    let resumed = Trainer::resume(path, images(3, false), &Device::Cpu).unwrap();
    assert_eq!(resumed.step(), step);
}

/// Trains with a checkpoint after every step until the run stops; returns the error, the step
/// it stopped at and the step of the last checkpoint.
fn train_until_it_stops(mut t: Trainer, path: &Path) -> (TrainError, u64, Option<u64>) {
    let mut saved = None;
    loop {
        let step = t.step();
        match t.train_step() {
            Ok(_) => {
                t.save(path).unwrap();
                saved = Some(t.step());
            }
            Err(e) => return (e, step, saved),
        }
        assert!(!t.is_done(), "the run did not diverge");
    }
}

#[test]
fn an_absurd_learning_rate_stops_within_a_step_and_keeps_the_last_checkpoint() {
    let dir = scratch("lr");
    let path = dir.join("last.safetensors");
    let cfg = config(1e6);
    let discrete = discrete_checkpoint(&cfg.model);
    // One good step at a normal rate first, so that a checkpoint exists.
    let mut good = Trainer::new(config(2e-4), &discrete, images(3, false), &Device::Cpu).unwrap();
    good.train_step().unwrap();
    good.save(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    let t = Trainer::new(cfg, &discrete, images(3, false), &Device::Cpu).unwrap();
    let (err, step, saved) = train_until_it_stops(t, &dir.join("diverging.safetensors"));
    println!("learning rate 1e6: stopped at step {step} ({saved:?} saved): {err}");
    assert!(
        matches!(
            err,
            TrainError::NonFinite { .. } | TrainError::NonFiniteWeights { .. }
        ),
        "{err:?}"
    );
    assert!(step <= 1, "detected at step {step}");
    assert!(
        err.to_string().contains("the last checkpoint is intact"),
        "{err}"
    );
    // The run's own last checkpoint (if it wrote one) and the earlier one are usable.
    if let Some(s) = saved {
        assert_usable_checkpoint(&dir.join("diverging.safetensors"), s);
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_usable_checkpoint(&path, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_nan_pixel_stops_the_next_step_and_the_checkpoint_stays_intact() {
    let dir = scratch("nan");
    let path = dir.join("last.safetensors");
    let cfg = config(2e-4);
    let discrete = discrete_checkpoint(&cfg.model);
    let mut t = Trainer::new(cfg, &discrete, images(3, false), &Device::Cpu).unwrap();
    t.train_step().unwrap();
    t.train_step().unwrap();
    t.save(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    // The same run continued on images with a NaN pixel.
    let poisoned = Trainer::resume(&path, images(3, true), &Device::Cpu).unwrap();
    let (err, step, saved) = train_until_it_stops(poisoned, &path);
    println!("NaN pixel: stopped at step {step}: {err}");
    assert_eq!(step, 2, "the first step on the poisoned images stops");
    assert_eq!(saved, None);
    assert!(
        matches!(err, TrainError::NonFinite { step: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("became NaN at step 2"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_usable_checkpoint(&path, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}
