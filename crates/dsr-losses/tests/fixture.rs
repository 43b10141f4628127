//! Checks the losses against `losses.safetensors` of the small reference fixture, which was
//! produced by anomalib 2.7.0 (`DsrSecondStageLoss`, `DsrThirdStageLoss`) and kornia 0.9.0
//! (`FocalLoss(alpha=1, gamma=2)`); tolerances come from the fixture's `manifest.json`.
//!
//! The fixture folder is `$DSR_FIXTURE_DIR` when set, else the shared fixture in dsr-core's
//! `tests/fixtures/small/`.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use dsr_losses::{
    focal_loss, kornia_focal_loss, kornia_focal_loss_none, second_stage_loss, third_stage_loss,
    FocalKind, SecondStageInputs,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The fixture folder.
fn fixture_dir() -> PathBuf {
    match std::env::var_os("DSR_FIXTURE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dsr-core/tests/fixtures/small"),
    }
}

/// The tensors of `losses.safetensors`, by key.
fn tensors() -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    let path = fixture_dir().join("losses.safetensors");
    Ok(candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| format!("reading {}: {e}", path.display()))?)
}

/// The manifest's entry for one key of `losses.safetensors`.
fn manifest_key(key: &str) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let path = fixture_dir().join("manifest.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let manifest: serde_json::Value = serde_json::from_str(&text)?;
    let entry = &manifest["files"]["losses.safetensors"]["keys"][key];
    if entry.is_null() {
        return Err(format!("{key} is not described in {}", path.display()).into());
    }
    Ok(entry.clone())
}

/// The `(rtol, atol)` the manifest states for a key.
fn tolerance(key: &str) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let tol = &manifest_key(key)?["tolerance"];
    match (tol["rtol"].as_f64(), tol["atol"].as_f64()) {
        (Some(rtol), Some(atol)) => Ok((rtol, atol)),
        _ => Err(format!("{key}: no rtol/atol tolerance in the manifest: {tol}").into()),
    }
}

/// A fixture tensor by key.
fn get<'a>(t: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor, String> {
    t.get(key)
        .ok_or_else(|| format!("fixture has no tensor {key}"))
}

/// Compares `got` with `want` element-wise under `|got − want| ≤ atol + rtol·|want|` and
/// returns the maximum absolute and relative differences. Scalars and one-element tensors
/// compare equal in shape.
fn compare(
    key: &str,
    got: &Tensor,
    want: &Tensor,
) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let (rtol, atol) = tolerance(key)?;
    let got = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let want = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(got.len(), want.len(), "{key}: element counts differ");
    let (mut max_abs, mut max_rel) = (0.0f64, 0.0f64);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let abs = (g - w).abs();
        assert!(
            abs <= atol + rtol * w.abs(),
            "{key}[{i}]: got {g}, want {w} (rtol {rtol}, atol {atol})"
        );
        max_abs = max_abs.max(abs);
        if *w != 0.0 {
            max_rel = max_rel.max(abs / w.abs());
        }
    }
    println!("{key}: max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e}");
    Ok((max_abs, max_rel))
}

#[test]
fn second_stage_loss_and_terms_match_anomalib() -> TestResult {
    let t = tensors()?;
    let inputs = SecondStageInputs {
        recon_feat_hi: get(&t, "s2.in.recon_nq_hi")?,
        quantized_hi: get(&t, "s2.in.qu_hi")?,
        recon_feat_lo: get(&t, "s2.in.recon_nq_lo")?,
        quantized_lo: get(&t, "s2.in.qu_lo")?,
        image: get(&t, "s2.in.input_image")?,
        object_specific_image: get(&t, "s2.in.gen_img")?,
        anomaly_map: get(&t, "s2.in.seg")?,
        true_anomaly_map: get(&t, "s2.in.anomaly_mask")?,
    };
    let loss = second_stage_loss(&inputs, FocalKind::Anomalib)?;
    compare("s2.l2_hi", &loss.l2_hi, get(&t, "s2.l2_hi")?)?;
    compare("s2.l2_lo", &loss.l2_lo, get(&t, "s2.l2_lo")?)?;
    compare("s2.l2_img_x10", &loss.l2_img_x10, get(&t, "s2.l2_img_x10")?)?;
    compare("s2.focal", &loss.focal, get(&t, "s2.focal")?)?;
    compare("s2.loss", &loss.total, get(&t, "s2.loss")?)?;
    assert_eq!(loss.total.rank(), 0, "the total is a scalar tensor");
    Ok(())
}

#[test]
fn third_stage_loss_matches_anomalib() -> TestResult {
    let t = tensors()?;
    let loss = third_stage_loss(
        get(&t, "s3.in.pred_mask")?,
        get(&t, "s3.in.true_mask")?,
        FocalKind::Anomalib,
    )?;
    compare("s3.loss", &loss, get(&t, "s3.loss")?)?;
    Ok(())
}

#[test]
fn kornia_focal_mean_and_none_match() -> TestResult {
    let t = tensors()?;
    let logits = get(&t, "focal.in.logits")?;
    let target = get(&t, "focal.in.target")?;
    assert_eq!(
        target.dtype(),
        DType::I64,
        "the fixture stores int64 labels"
    );
    let mean = kornia_focal_loss(logits, target, 1.0, 2.0)?;
    compare("focal.mean", &mean, get(&t, "focal.mean")?)?;
    let none = kornia_focal_loss_none(logits, target, 1.0, 2.0)?;
    assert_eq!(none.dims(), logits.dims());
    compare("focal.none", &none, get(&t, "focal.none")?)?;
    Ok(())
}

#[test]
fn kornia_focal_gradient_matches() -> TestResult {
    let t = tensors()?;
    let logits = Var::from_tensor(get(&t, "focal.in.logits")?)?;
    let target = get(&t, "focal.in.target")?;
    let loss = kornia_focal_loss(logits.as_tensor(), target, 1.0, 2.0)?;
    let grads = loss.backward()?;
    let grad = grads
        .get(logits.as_tensor())
        .ok_or("no gradient reached the logits")?;
    let want = get(&t, "focal.grad_logits")?;
    let rel = manifest_key("focal.grad_logits")?["tolerance"]["atol_relative_to_max_abs"]
        .as_f64()
        .ok_or("focal.grad_logits: no atol_relative_to_max_abs in the manifest")?;
    let scale = want
        .abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let max_abs = (grad - want)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    println!(
        "focal.grad_logits: max abs diff {max_abs:.3e}, relative to max |grad| {:.3e}",
        max_abs / scale
    );
    assert!(
        max_abs <= rel * scale,
        "focal.grad_logits: max abs diff {max_abs} exceeds {rel}·{scale}"
    );
    Ok(())
}

/// The fixture also stores the value of the pre-0.7 kornia formula (α on every class, mean
/// over pixels); the reference, and therefore this crate, must not produce it.
#[test]
fn legacy_kornia_formula_is_not_what_we_compute() -> TestResult {
    let t = tensors()?;
    let logits = get(&t, "focal.in.logits")?;
    let target = get(&t, "focal.in.target")?;
    let legacy = get(&t, "focal.mean_legacy_alpha_all_classes_NOT_REFERENCE")?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?[0];
    let (rtol, atol) = tolerance("focal.mean")?;
    let ours = kornia_focal_loss(logits, target, 1.0, 2.0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    println!("focal.mean_legacy_alpha_all_classes_NOT_REFERENCE: {legacy}, ours {ours}");
    assert!(
        (ours - legacy).abs() > atol + rtol * legacy.abs(),
        "the kornia loss reproduces the legacy formula ({ours} vs {legacy})"
    );
    // The same holds for the loss DSR trains with: with class labels the Anomalib focal loss
    // is kornia's, so it must not match the legacy value either.
    let probs_as_logits = logits;
    let mask = target.to_dtype(DType::F32)?;
    let anomalib = focal_loss(probs_as_logits, &mask, FocalKind::Anomalib)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    assert!((anomalib - ours).abs() <= atol + rtol * ours.abs());
    assert!((anomalib - legacy).abs() > atol + rtol * legacy.abs());
    Ok(())
}

/// The Anomalib focal loss on the stage inputs equals kornia's loss applied to the
/// probabilities as if they were logits (the double softmax).
#[test]
fn anomalib_focal_is_kornia_on_probabilities() -> TestResult {
    let t = tensors()?;
    let seg = get(&t, "s2.in.seg")?;
    let mask = get(&t, "s2.in.anomaly_mask")?;
    let via_kind = focal_loss(seg, mask, FocalKind::Anomalib)?;
    let labels = mask.squeeze(1)?.to_dtype(DType::I64)?;
    let via_kornia = kornia_focal_loss(seg, &labels, 1.0, 2.0)?;
    compare("s2.focal", &via_kind, &via_kornia)?;
    compare("s2.focal", &via_kornia, get(&t, "s2.focal")?)?;
    Ok(())
}
