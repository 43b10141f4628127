//! Fuzzing with proptest of the image decoder path ([`decode_checked`], then the conversion to
//! RGB and to a binary mask), the post-processor JSON (`dsr.postprocess`) and the training state
//! (`dsr.train_state`, read by [`Trainer::resume`]): arbitrary and mutated inputs must give an
//! error or a valid result, never a panic or an allocation above 256 MiB.
//!
//! `DSR_FUZZ_CASES=100000 cargo test -p dsr-train --test fuzz -- --nocapture` is the long run
//! (see docs/reliability.md); by default 256 cases per target.

mod common;
#[path = "../../dsr-core/tests/mutate/mod.rs"]
mod mutate;
#[path = "../../dsr-core/tests/peak_alloc/mod.rs"]
mod peak_alloc;

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::discrete_checkpoint;
use dsr_augment::{ImageBatch, Recipe};
use dsr_core::init::InitScheme;
use dsr_core::memory::training_bytes;
use dsr_core::weights::{load_safetensors, save_checkpoint};
use dsr_core::DsrConfig;
use dsr_eval::image::{decode_checked, image_to_chw, mask_to_binary};
use dsr_eval::postprocess::PostProcessor;
use dsr_losses::FocalKind;
use dsr_train::optim::AdamConfig;
use dsr_train::session::RunConfig;
use dsr_train::train::{Schedule, TrainConfig, Trainer, META_TRAIN_STATE};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, Rgba};
use mutate::{apply, cases, fuzz, fuzz_cases, mutations};
use peak_alloc::{largest_allocation, reset_largest, PeakAlloc};
use proptest::prelude::*;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

const ALLOCATION_LIMIT: usize = 256 << 20;
/// The pixel limit of the fuzzed decoder (4 megapixels keeps every legitimate decode small).
const MAX_PIXELS: u64 = 4 << 20;

fn no_large_allocation() -> Result<(), TestCaseError> {
    let largest = largest_allocation();
    prop_assert!(
        largest <= ALLOCATION_LIMIT,
        "an allocation of {largest} bytes"
    );
    Ok(())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsr-train-fuzz-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn encoded(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// Decodes `bytes` written to `path`; a decoded image must convert to RGB in [0, 1] and to a
/// binary mask.
fn check_image(path: &Path, bytes: &[u8]) -> Result<bool, TestCaseError> {
    std::fs::write(path, bytes).unwrap();
    let ok = match decode_checked(path, MAX_PIXELS) {
        Ok(img) => {
            prop_assert!(img.width() as u64 * img.height() as u64 <= MAX_PIXELS);
            let rgb = image_to_chw(&img, 8, 8);
            prop_assert!(rgb.iter().all(|v| (0.0..=1.0).contains(v)));
            let mask = mask_to_binary(&img, 8, 8);
            prop_assert!(mask.iter().all(|&v| v == 0.0 || v == 1.0));
            true
        }
        Err(e) => {
            let line = e.to_string();
            prop_assert!(line.contains(&path.display().to_string()), "{line}");
            prop_assert!(!line.contains('\n'), "{line}");
            false
        }
    };
    no_large_allocation()?;
    Ok(ok)
}

#[test]
fn image_decoder() {
    let dir = scratch("images");
    let rgb = DynamicImage::ImageRgb8(ImageBuffer::from_fn(16, 12, |x, y| {
        Rgb([(x * 13) as u8, (y * 21) as u8, 99])
    }));
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("png", encoded(&rgb, ImageFormat::Png)),
        (
            "png16",
            encoded(
                &DynamicImage::ImageLuma16(ImageBuffer::from_fn(9, 7, |x, _| {
                    Luma([x as u16 * 999])
                })),
                ImageFormat::Png,
            ),
        ),
        (
            "rgba",
            encoded(
                &DynamicImage::ImageRgba8(ImageBuffer::from_pixel(5, 5, Rgba([1u8, 2, 3, 4]))),
                ImageFormat::Png,
            ),
        ),
        ("jpg", encoded(&rgb, ImageFormat::Jpeg)),
        ("bmp", encoded(&rgb, ImageFormat::Bmp)),
        ("tif", encoded(&rgb, ImageFormat::Tiff)),
    ];
    for (ext, seed) in &seeds {
        let path = dir.join(format!("seed.{ext}"));
        assert!(check_image(&path, seed).unwrap(), "the {ext} seed decodes");
        // Headers hold the sizes: half the edits go to the first 64 bytes.
        fuzz(&format!("image/mutated-{ext}"), mutations(), |edits| {
            check_image(&path, &apply(seed, &edits, Some(0..64)))
        });
    }
    let path = dir.join("arbitrary.png");
    fuzz(
        "image/arbitrary-bytes",
        prop::collection::vec(any::<u8>(), 0..256),
        |bytes| check_image(&path, &bytes),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn postprocess_json() {
    let valid = PostProcessor {
        image_threshold: 0.5,
        pixel_threshold: 0.25,
        image_min: 0.0,
        image_max: 1.0,
        pixel_min: -0.5,
        pixel_max: 2.0,
    }
    .to_json()
    .unwrap();
    let strategy = prop_oneof![
        prop::collection::vec(mutate::mutation(), 1..4).prop_map(move |edits| {
            String::from_utf8_lossy(&apply(valid.as_bytes(), &edits, None)).into_owned()
        }),
        ".{0,80}",
    ];
    fuzz("metadata/dsr.postprocess", strategy, |json| {
        let ok = match PostProcessor::from_json(&json) {
            Ok(p) => {
                for v in [-1e30f32, -1.0, 0.0, 0.5, 1.0, 1e30, f32::INFINITY] {
                    let n = p.normalize_score(v);
                    prop_assert!((0.0..=1.0).contains(&n), "{n}");
                }
                prop_assert!(p
                    .normalize_map(&[0.0, 1.0])
                    .iter()
                    .all(|v| (0.0..=1.0).contains(v)));
                true
            }
            Err(_) => false,
        };
        no_large_allocation()?;
        Ok(ok)
    });
}

fn train_config() -> TrainConfig {
    TrainConfig {
        model: DsrConfig::tiny(),
        image_size: [64, 64],
        batch_size: 2,
        adam: AdamConfig::default(),
        schedule: Schedule::Original {
            phase2_steps: 2,
            phase3_steps: 2,
            lr_drop_fraction: 0.5,
        },
        focal: FocalKind::Original,
        recipe: Recipe::Anomalib,
        init: InitScheme::Pytorch,
        seed: 1,
    }
}

fn images() -> ImageBatch {
    ImageBatch::new(2, 3, 64, 64, vec![0.5; 2 * 3 * 64 * 64]).unwrap()
}

/// The paths (object keys, array indices) of every number in `v`.
fn number_paths(v: &serde_json::Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        serde_json::Value::Number(_) => out.push(at.clone()),
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                at.push(k.clone());
                number_paths(x, at, out);
                at.pop();
            }
        }
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push(i.to_string());
                number_paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

#[test]
fn train_state_metadata() {
    let cfg = train_config();
    let discrete = discrete_checkpoint(&cfg.model);
    let dir = scratch("state");
    let seed_path = dir.join("seed.safetensors");
    let mut t = Trainer::new(cfg.clone(), &discrete, images(), &Device::Cpu).unwrap();
    t.train_step().unwrap();
    t.save(&seed_path).unwrap();
    let seed = load_safetensors(&seed_path).unwrap();
    let state = seed.metadata[META_TRAIN_STATE].clone();
    let tensors: HashMap<String, Tensor> = seed.tensors.clone();
    let path = dir.join("fuzz.safetensors");
    // Numbers of the state replaced by small, boundary or huge values (the structure stays
    // valid, so these cases reach the checks behind the parser), byte mutations, arbitrary text.
    let parsed: serde_json::Value = serde_json::from_str(&state).unwrap();
    let parsed_state = parsed.clone();
    let mut leaves = Vec::new();
    number_paths(&parsed, &mut Vec::new(), &mut leaves);
    let number = prop_oneof![
        (0u64..10).prop_map(serde_json::Value::from),
        (0u64..100_000).prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        (-5i64..0).prop_map(serde_json::Value::from),
        (-1e3f64..1e3).prop_map(serde_json::Value::from),
        Just(serde_json::Value::from(1e300)),
    ];
    let structured = prop::collection::vec((any::<prop::sample::Index>(), number), 1..4).prop_map(
        move |edits| {
            let mut v = parsed.clone();
            for (i, value) in edits {
                let path = &leaves[i.index(leaves.len())];
                let mut node = &mut v;
                for key in path {
                    node = match node {
                        serde_json::Value::Object(m) => m.get_mut(key).unwrap(),
                        serde_json::Value::Array(a) => &mut a[key.parse::<usize>().unwrap()],
                        _ => unreachable!(),
                    };
                }
                *node = value;
            }
            v.to_string()
        },
    );
    let strategy = prop_oneof![
        4 => structured,
        2 => prop::collection::vec(mutate::mutation(), 1..4).prop_map(move |edits| {
            String::from_utf8_lossy(&apply(state.as_bytes(), &edits, None)).into_owned()
        }),
        1 => ".{0,80}",
    ];
    let write = |json: String| {
        let mut extra = BTreeMap::new();
        extra.insert(META_TRAIN_STATE.to_string(), json);
        save_checkpoint(&path, &tensors, &cfg.model, Some([64, 64]), &extra).unwrap();
    };
    write(seed.metadata[META_TRAIN_STATE].clone());
    assert_eq!(
        Trainer::resume(&path, images(), &Device::Cpu)
            .unwrap()
            .step(),
        1
    );
    // Each case writes a checkpoint and builds a trainer: a quarter of the cases of the others.
    let n = (cases() / 4).max(16);
    // A state that loads can train on. Reading the state must stay small whatever it says; a
    // training step may legitimately need more (a batch of up to MAX_BATCH_SIZE images, checked
    // against the machine's memory by `TrainConfig::validate`), but never more than the
    // estimate that check uses.
    let step_within_estimate = |t: &mut Trainer| -> Result<(), TestCaseError> {
        let cfg = t.config();
        let estimate = training_bytes(&cfg.model, cfg.batch_size, cfg.image_size);
        reset_largest();
        if !t.is_done() {
            let _ = t.train_step();
        }
        let largest = largest_allocation();
        if largest > ALLOCATION_LIMIT && std::env::var("DSR_FUZZ_DEBUG").is_ok() {
            println!(
                "a step of batch {} allocated {largest} bytes at once (estimate {estimate})",
                t.config().batch_size
            );
        }
        prop_assert!(
            largest as u64 <= estimate.max(ALLOCATION_LIMIT as u64),
            "a step of batch {} allocated {largest} bytes at once, above the estimate of {estimate}",
            t.config().batch_size
        );
        Ok(())
    };
    // A batch far above the seed's, checked once on purpose (the fuzzer reaches up to
    // MAX_BATCH_SIZE, whose steps take minutes here).
    let mut big = parsed_state.clone();
    big["config"]["batch_size"] = serde_json::Value::from(128);
    write(big.to_string());
    let mut t = Trainer::resume(&path, images(), &Device::Cpu).unwrap();
    step_within_estimate(&mut t).unwrap();
    fuzz_cases("metadata/dsr.train_state", n, strategy, |json| {
        write(json);
        reset_largest();
        let ok = match Trainer::resume(&path, images(), &Device::Cpu) {
            Ok(mut t) => {
                no_large_allocation()?;
                step_within_estimate(&mut t)?;
                true
            }
            Err(e) => {
                let line = e.to_string();
                if std::env::var("DSR_FUZZ_DEBUG").is_ok() {
                    println!("{line}");
                }
                prop_assert!(!line.is_empty());
                no_large_allocation()?;
                false
            }
        };
        Ok(ok)
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// The dotted key of every leaf value of a TOML table.
fn toml_leaves(v: &toml::Value, at: &mut Vec<String>, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                at.push(k.clone());
                toml_leaves(x, at, out);
                at.pop();
            }
        }
        _ => out.push(at.join(".")),
    }
}

/// Checks a run configuration that parsed and validated: every value in its domain, and the
/// TOML it writes reads back to the same configuration.
fn check_valid_config(cfg: &RunConfig) -> Result<(), TestCaseError> {
    let t = &cfg.train;
    prop_assert!((1..=dsr_train::train::MAX_BATCH_SIZE).contains(&t.batch_size));
    prop_assert!(t.adam.lr.is_finite() && t.adam.lr > 0.0);
    prop_assert!((0.0..1.0).contains(&t.adam.beta1) && (0.0..1.0).contains(&t.adam.beta2));
    prop_assert!(t.adam.eps.is_finite() && t.adam.eps > 0.0);
    match t.schedule {
        Schedule::Original {
            lr_drop_fraction, ..
        } => prop_assert!((0.0..=1.0).contains(&lr_drop_fraction)),
        Schedule::Anomalib {
            upsampling_train_ratio,
            ..
        } => prop_assert!((0.0..=1.0).contains(&upsampling_train_ratio)),
    }
    prop_assert!(dsr_core::config::validate_image_size(t.image_size[0], t.image_size[1]).is_ok());
    prop_assert!((0.0..1.0).contains(&cfg.data.normal_split_ratio));
    prop_assert!(cfg.data.max_pixels >= 1 && cfg.data.eval_batch >= 1);
    prop_assert!(cfg.output.checkpoint_every >= 1);
    if let Some(c) = &cfg.data.category {
        prop_assert!(
            !c.contains('/') && c != ".." && c != "." && !c.is_empty(),
            "{c}"
        );
    }
    // The pretrain section is checked whether phase 1 runs or not.
    let p = &cfg.pretrain;
    prop_assert!((1..=dsr_train::train::MAX_BATCH_SIZE).contains(&p.batch_size));
    prop_assert!((0.0..1.0).contains(&p.ema_decay));
    prop_assert!(p.adam.lr.is_finite() && p.adam.lr > 0.0);
    prop_assert!((0.0..1.0).contains(&p.adam.beta1) && (0.0..1.0).contains(&p.adam.beta2));
    prop_assert!(p.commitment_cost.is_finite() && p.commitment_cost >= 0.0);
    if cfg.vq.pretrain && cfg.vq.weights.is_none() {
        prop_assert!(p.crop <= t.image_size[0].min(t.image_size[1]));
    }
    let text = cfg
        .to_toml()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back = RunConfig::from_toml_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, cfg);
    Ok(())
}

/// A configuration (TOML text, then `--set` overrides) through parsing, the overrides and the
/// validation that runs before anything is trained: an error of one line, or a configuration
/// whose every value lies in its domain.
fn check_config(text: &str, sets: &[String]) -> Result<bool, TestCaseError> {
    let result = RunConfig::from_toml_str(text)
        .and_then(|cfg| cfg.with_overrides(sets))
        .and_then(|cfg| cfg.validate().map(|()| cfg));
    let ok = match result {
        Ok(cfg) => {
            check_valid_config(&cfg)?;
            true
        }
        Err(e) => {
            let line = e.to_string();
            prop_assert!(!line.contains('\n'), "{line}");
            prop_assert!(!line.is_empty());
            false
        }
    };
    no_large_allocation()?;
    Ok(ok)
}

/// Values for `--set`: boundary numbers, non-finite ones, strings, arrays and tables.
fn override_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1".to_string()),
        Just("2".to_string()),
        Just("0.5".to_string()),
        Just("1.5".to_string()),
        Just("-0.0".to_string()),
        Just("1e-300".to_string()),
        Just("1e308".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("9223372036854775807".to_string()),
        Just("18446744073709551615".to_string()),
        Just("8192".to_string()),
        Just("[8192, 8192]".to_string()),
        Just("[64, 64]".to_string()),
        Just("[0, 0]".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("true".to_string()),
        Just("\"../x\"".to_string()),
        Just("\"/abs\"".to_string()),
        Just("\"from_test:2\"".to_string()),
        Just("\"\"".to_string()),
        "[a-z0-9_.:/\\-]{0,12}",
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| format!("{v:e}")),
    ]
}

#[test]
fn run_configuration() {
    let mut base = RunConfig::default();
    base.data.root = "data".into();
    base.data.category = Some("bottle".into());
    base.vq.pretrain = true;
    base.train.model = DsrConfig::tiny();
    base.train.image_size = [64, 64];
    base.pretrain.crop = 64;
    let base = base.with_overrides(&[]).unwrap();
    base.validate().unwrap();
    let text = base.to_toml().unwrap();
    assert!(
        check_config(&text, &[]).unwrap(),
        "the seed configuration is valid"
    );
    let mut keys = Vec::new();
    toml_leaves(
        &toml::Value::Table(toml::from_str(&text).unwrap()),
        &mut Vec::new(),
        &mut keys,
    );
    keys.extend(
        [
            "train.nonexistent",
            "train",
            "train.adam",
            "data.category.x",
            "",
            "..",
            "train..lr",
        ]
        .map(String::from),
    );
    let sets = |keys: Vec<String>| {
        prop::collection::vec(
            (prop::sample::select(keys), override_value()).prop_map(|(k, v)| format!("{k}={v}")),
            0..4,
        )
    };
    fuzz("config/set-overrides", sets(keys.clone()), |sets| {
        check_config(&text, &sets)
    });
    fuzz(
        "config/mutated-toml",
        (mutations(), sets(keys)),
        |(edits, sets)| {
            let bytes = apply(text.as_bytes(), &edits, None);
            let Ok(mutated) = String::from_utf8(bytes) else {
                return Ok(false);
            };
            check_config(&mutated, &sets)
        },
    );
    fuzz(
        "config/arbitrary-toml",
        "[\\[\\]a-z_.=\" 0-9\\n-]{0,200}",
        |text| check_config(&text, &[]),
    );
}
