//! The phase-2/3 trainer: reproducibility, resume after a checkpoint, frozen modules, the
//! schedules, and the stop on a non-finite loss.

use std::collections::HashMap;

use candle_core::Device;
use dsr_augment::{ImageBatch, Recipe};
use dsr_core::init::InitScheme;
use dsr_core::DsrConfig;
use dsr_losses::FocalKind;
use dsr_train::optim::AdamConfig;
use dsr_train::train::{
    Phase, Plan, Schedule, TrainConfig, TrainError, Trainer, PHASE2_PREFIXES, PHASE3_PREFIX,
};
use rand::{Rng, SeedableRng};

mod common;
use common::discrete_checkpoint;

fn images(n: usize) -> ImageBatch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let data = (0..n * 3 * 64 * 64).map(|_| rng.random::<f32>()).collect();
    ImageBatch::new(n, 3, 64, 64, data).unwrap()
}

fn config(phase2: u64, phase3: u64) -> TrainConfig {
    TrainConfig {
        model: DsrConfig::tiny(),
        image_size: [64, 64],
        batch_size: 2,
        adam: AdamConfig::default(),
        schedule: Schedule::Original {
            phase2_steps: phase2,
            phase3_steps: phase3,
            lr_drop_fraction: 0.5,
        },
        focal: FocalKind::Original,
        recipe: Recipe::Anomalib,
        init: InitScheme::Pytorch,
        seed: 7,
    }
}

fn snapshot(t: &Trainer) -> HashMap<String, Vec<f32>> {
    t.model_tensors()
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dsr-train-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_seeded_run_is_reproducible_and_resumes_as_if_never_stopped() {
    let cfg = config(2, 2);
    let discrete = discrete_checkpoint(&cfg.model);
    let mut a = Trainer::new(cfg.clone(), &discrete, images(3), &Device::Cpu).unwrap();
    let mut reports_a = Vec::new();
    while !a.is_done() {
        reports_a.push(a.train_step().unwrap());
    }
    assert_eq!(
        reports_a.iter().map(|r| r.phase).collect::<Vec<_>>(),
        [Phase::Phase2, Phase::Phase2, Phase::Phase3, Phase::Phase3]
    );
    // The learning rate drops ×0.1 after half of phase 2 (lr_drop_fraction 0.5).
    assert_eq!(reports_a[0].lr, 2e-4);
    assert!((reports_a[1].lr - 2e-5).abs() < 1e-12);

    // The same seed again: identical losses and weights.
    let mut b = Trainer::new(cfg.clone(), &discrete, images(3), &Device::Cpu).unwrap();
    let reports_b: Vec<_> = (0..4).map(|_| b.train_step().unwrap()).collect();
    assert_eq!(reports_a, reports_b);
    assert_eq!(snapshot(&a), snapshot(&b));

    // Stopped after one step, checkpointed, resumed from the file: identical continuation.
    let dir = tempdir("resume");
    let path = dir.join("checkpoint.safetensors");
    let mut c = Trainer::new(cfg, &discrete, images(3), &Device::Cpu).unwrap();
    let first = c.train_step().unwrap();
    c.save(&path).unwrap();
    drop(c);
    let mut d = Trainer::resume(&path, images(3), &Device::Cpu).unwrap();
    assert_eq!(d.step(), 1);
    let mut reports_d = vec![first];
    while !d.is_done() {
        reports_d.push(d.train_step().unwrap());
    }
    assert_eq!(reports_a, reports_d);
    assert_eq!(snapshot(&a), snapshot(&d));
}

#[test]
fn a_replanned_run_equals_one_planned_with_the_new_lengths() {
    // Planned 4 + 0 steps (drop after 2), re-planned after one step to 6 + 1 (drop after 3):
    // the steps taken, the learning rates and the weights equal those of a run given 6 + 1
    // from the start.
    let discrete = discrete_checkpoint(&config(4, 0).model);
    let mut a = Trainer::new(config(4, 0), &discrete, images(3), &Device::Cpu).unwrap();
    let mut reports_a = vec![a.train_step().unwrap()];
    a.replan(6, 1).unwrap();
    assert_eq!(a.config(), &config(6, 1));
    assert_eq!(a.plan().lr_drop_step, Some(3));
    while !a.is_done() {
        reports_a.push(a.train_step().unwrap());
    }
    let mut b = Trainer::new(config(6, 1), &discrete, images(3), &Device::Cpu).unwrap();
    let mut reports_b = Vec::new();
    while !b.is_done() {
        reports_b.push(b.train_step().unwrap());
    }
    assert_eq!(reports_a.len(), 7);
    assert_eq!(reports_a, reports_b);
    assert_eq!(snapshot(&a), snapshot(&b));

    // Refused: phase 2 ending before the next step, a drop moved across a step taken, a
    // schedule counted in epochs.
    let mut c = Trainer::new(config(8, 0), &discrete, images(3), &Device::Cpu).unwrap();
    for _ in 0..3 {
        c.train_step().unwrap();
    }
    let err = c.replan(3, 0).unwrap_err().to_string();
    assert!(err.contains("cannot end at step 3"), "{err}");
    // Drop after 4 (of 8) is ahead of step 3; 4 steps would put it at 2, behind.
    let err = c.replan(4, 0).unwrap_err().to_string();
    assert!(err.contains("learning-rate drop"), "{err}");
    assert_eq!(c.plan().phase2_steps, 8);
    c.replan(6, 0).unwrap();
    assert_eq!(c.plan().lr_drop_step, Some(3));
    let mut d = Trainer::new(
        TrainConfig {
            schedule: Schedule::Anomalib {
                epochs: 4,
                upsampling_train_ratio: 0.7,
                never_stepped_scheduler: false,
            },
            ..config(1, 1)
        },
        &discrete,
        images(3),
        &Device::Cpu,
    )
    .unwrap();
    assert!(d.replan(10, 0).is_err());
}

#[test]
fn each_phase_changes_only_its_own_modules() {
    let cfg = config(1, 1);
    let discrete = discrete_checkpoint(&cfg.model);
    let mut t = Trainer::new(cfg, &discrete, images(2), &Device::Cpu).unwrap();
    let before = snapshot(&t);
    t.train_step().unwrap();
    let after2 = snapshot(&t);
    t.train_step().unwrap();
    let after3 = snapshot(&t);
    for (k, v) in &before {
        let in2 = PHASE2_PREFIXES.iter().any(|p| k.starts_with(p));
        let in3 = k.starts_with(PHASE3_PREFIX);
        if !in2 {
            assert_eq!(&after2[k], v, "{k} changed in phase 2");
        }
        if !in3 {
            assert_eq!(after3[k], after2[k], "{k} changed in phase 3");
        }
    }
    // The discrete model is bit-identical to the loaded weights.
    for (k, v) in &discrete.tensors {
        let loaded: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(after3[k], loaded, "{k}");
    }
    let changed2 = before
        .keys()
        .filter(|k| PHASE2_PREFIXES.iter().any(|p| k.starts_with(p)) && after2[*k] != before[*k])
        .count();
    let changed3 = before
        .keys()
        .filter(|k| k.starts_with(PHASE3_PREFIX) && after3[*k] != after2[*k])
        .count();
    assert!(changed2 > 0 && changed3 > 0);
}

#[test]
fn anomalib_schedule_splits_epochs_70_30() {
    let mut cfg = config(0, 0);
    cfg.batch_size = 8;
    cfg.schedule = Schedule::Anomalib {
        epochs: 10,
        upsampling_train_ratio: 0.7,
        never_stepped_scheduler: true,
    };
    let plan = Plan::new(&cfg, 37).unwrap();
    // 37 images at batch 8 = 5 steps per epoch; 7 epochs of phase 2, 3 of phase 3.
    assert_eq!(
        (plan.phase2_steps, plan.phase3_steps, plan.lr_drop_step),
        (35, 15, None)
    );
    cfg.schedule = Schedule::Anomalib {
        epochs: 10,
        upsampling_train_ratio: 0.7,
        never_stepped_scheduler: false,
    };
    assert_eq!(Plan::new(&cfg, 37).unwrap().lr_drop_step, Some(25));
    assert!(Plan::new(&cfg, 0).is_err());
}

#[test]
fn a_diverging_run_stops_with_a_clear_error() {
    let mut cfg = config(3, 0);
    // A finite learning rate beyond f32: the update is infinite (a NaN rate is refused by the
    // configuration's validation).
    cfg.adam.lr = 1e300;
    let discrete = discrete_checkpoint(&cfg.model);
    let mut t = Trainer::new(cfg, &discrete, images(2), &Device::Cpu).unwrap();
    // The loss of step 0 is finite, but its update (an infinite step) poisons the weights:
    // the step itself reports it.
    match t.train_step() {
        Err(TrainError::NonFiniteWeights { step, phase, name }) => {
            assert_eq!((step, phase), (0, Phase::Phase2));
            assert!(!name.is_empty());
        }
        other => panic!("expected a non-finite weight error, got {other:?}"),
    }
}

#[test]
fn wrong_image_size_and_missing_weights_are_reported() {
    let cfg = config(1, 1);
    let discrete = discrete_checkpoint(&cfg.model);
    let bad = ImageBatch::new(1, 3, 96, 96, vec![0.0; 3 * 96 * 96]).unwrap();
    let err = Trainer::new(cfg.clone(), &discrete, bad, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("96×96"), "{err}");
    let mut partial = discrete.clone();
    partial
        .tensors
        .remove("discrete_latent_model.upsample_t.bias");
    let err = Trainer::new(cfg, &partial, images(2), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("discrete.safetensors"), "{err}");
}
