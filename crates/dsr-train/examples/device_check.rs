//! The same computations on the CPU and on a second device (the first CUDA GPU), compared value
//! by value: the evaluation forward of the reference fixture's checkpoint (against the fixture's
//! recorded outputs too), the phase-2 loss and gradients, and the phase-3 loss and gradients,
//! each from the same weights, inputs and random draws. Needs a build with `--features cuda`:
//!
//! ```text
//! cargo run --release -p dsr-train --features cuda --example device_check -- \
//!     --fixture crates/dsr-core/tests/fixtures/small
//! cargo run --release -p dsr-train --features cuda --example device_check -- --tiny
//! ```
//!
//! `--tiny` runs one forward of a few-kilobyte model (seconds; a first check that the device,
//! its libraries and the kernels work). Otherwise every comparison prints one line
//! `name max_abs=… max_ref=… rel=… tol=… ok|FAIL`, where `rel` is the largest difference
//! divided by the largest magnitude of the CPU value, and the last stdout line is a JSON object
//! with every figure. The exit code is 1 when a comparison exceeds its tolerance.
//!
//! Tolerances: the CUDA kernels sum in other orders than the CPU kernels (cuBLAS products,
//! im2col convolutions, tree reductions), so values agree to float32 rounding of sums over
//! thousands of terms, not to the bit. The forward uses the fixture's own tolerances against
//! PyTorch (features 1e-4, probabilities and scores 1e-5), which a second float32
//! implementation must meet as ours does on the CPU; losses 1e-5 relative; gradients 1e-4 of
//! their largest magnitude (the fixture's gradient tolerance), or of 1e-3 of the phase's largest
//! gradient for gradients that vanish in exact arithmetic ([`grad_floor`]). Image scores and maps compare
//! indices of argmins (vector quantisation) too: a code flip between devices at a near tie
//! would show as a large map difference and fail the check.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::{DsrConfig, DsrModel, SeededRandomness};
use dsr_losses::{second_stage_loss, third_stage_loss, FocalKind, SecondStageInputs};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// One comparison's figures.
#[derive(serde::Serialize)]
struct Row {
    name: String,
    max_abs: f64,
    max_ref: f64,
    rel: f64,
    tol: f64,
    relative: bool,
    ok: bool,
}

struct Report {
    rows: Vec<Row>,
}

impl Report {
    /// Compares `got` with `want`; `tol` bounds the absolute difference, or (`relative`) the
    /// difference divided by the largest magnitude of `want`.
    fn compare(
        &mut self,
        name: &str,
        got: &Tensor,
        want: &Tensor,
        tol: f64,
        relative: bool,
    ) -> BoxResult<()> {
        self.compare_scaled(name, got, want, tol, relative, 0.0)
    }

    /// [`Report::compare`] where a relative difference is taken against at least `floor` (the
    /// scale of a group of values whose members may vanish in exact arithmetic).
    fn compare_scaled(
        &mut self,
        name: &str,
        got: &Tensor,
        want: &Tensor,
        tol: f64,
        relative: bool,
        floor: f64,
    ) -> BoxResult<()> {
        // A loss may be a scalar on one side and a one-element vector on the other.
        let flat = |t: &Tensor| -> BoxResult<Tensor> {
            let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
            Ok(if t.elem_count() == 1 {
                t.flatten_all()?
            } else {
                t
            })
        };
        let (got, want) = (flat(got)?, flat(want)?);
        if got.dims() != want.dims() {
            return Err(format!("{name}: shapes {:?} and {:?}", got.dims(), want.dims()).into());
        }
        let max_abs = (&got - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        let max_ref = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let rel = max_abs / max_ref.max(floor).max(f64::MIN_POSITIVE);
        let ok = if relative { rel <= tol } else { max_abs <= tol } && max_abs.is_finite();
        println!(
            "{name:<58} max_abs={max_abs:.3e} max_ref={max_ref:.3e} rel={rel:.3e} tol={tol:.0e}{} {}",
            if relative { " (rel)" } else { "" },
            if ok { "ok" } else { "FAIL" }
        );
        self.rows.push(Row {
            name: name.to_string(),
            max_abs,
            max_ref,
            rel,
            tol,
            relative,
            ok,
        });
        Ok(())
    }
}

impl Report {
    /// Compares every gradient of `cpu` with its CUDA counterpart (relative 1e-4, against at
    /// least [`grad_floor`]) and prints the largest relative difference of the `phase`.
    fn compare_gradients(
        &mut self,
        phase: &str,
        cpu: &BTreeMap<String, Tensor>,
        cuda: &BTreeMap<String, Tensor>,
    ) -> BoxResult<()> {
        let floor = grad_floor(cpu)?;
        let mut worst = (String::new(), 0.0f64);
        for (key, want) in cpu {
            let got = cuda
                .get(key)
                .ok_or_else(|| format!("no CUDA gradient for {key}"))?;
            self.compare_scaled(
                &format!("{phase} grad: {key}"),
                got,
                want,
                1e-4,
                true,
                floor,
            )?;
            let rel = self.rows.last().map_or(0.0, |r| r.rel);
            if rel > worst.1 {
                worst = (key.clone(), rel);
            }
        }
        println!(
            "{phase}: {} gradients compared, largest relative difference {:.3e} ({})",
            cpu.len(),
            worst.1,
            worst.0
        );
        Ok(())
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The fixture's model configuration, image size and batch (`config.json`).
fn fixture_config(dir: &std::path::Path) -> BoxResult<(DsrConfig, usize, usize)> {
    let path = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let cfg: DsrConfig = serde_json::from_value(v["config"].clone())?;
    let size = v["image_size"].as_u64().ok_or("config.json: image_size")? as usize;
    let batch = v["batch"].as_u64().ok_or("config.json: batch")? as usize;
    Ok((cfg, size, batch))
}

fn load(dir: &std::path::Path, name: &str) -> BoxResult<HashMap<String, Tensor>> {
    let path = dir.join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| format!("{}: {e}", path.display()).into())
}

fn get(map: &HashMap<String, Tensor>, key: &str) -> BoxResult<Tensor> {
    map.get(key)
        .cloned()
        .ok_or_else(|| format!("fixture key {key} missing").into())
}

/// A trainable model on `device` holding `weights` (every key of the state_dict).
fn trainable(
    cfg: &DsrConfig,
    weights: &HashMap<String, Tensor>,
    device: &Device,
) -> BoxResult<(VarMap, DsrModel)> {
    let varmap = VarMap::new();
    let model = DsrModel::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    for (key, var) in varmap.data().lock().expect("varmap lock").iter() {
        var.set(&get(weights, key)?.to_device(device)?)?;
    }
    Ok((varmap, model))
}

/// The gradients of `loss` for the variables whose names start with one of `prefixes`.
fn gradients(
    varmap: &VarMap,
    loss: &Tensor,
    prefixes: &[&str],
) -> BoxResult<BTreeMap<String, Tensor>> {
    let grads = loss.backward()?;
    let data = varmap.data().lock().expect("varmap lock");
    let mut out = BTreeMap::new();
    for (key, var) in data.iter() {
        if !prefixes.iter().any(|p| key.starts_with(p)) {
            continue;
        }
        let var: &Var = var;
        if let Some(g) = grads.get(var.as_tensor()) {
            out.insert(key.clone(), g.clone());
        }
    }
    Ok(out)
}

/// Phase-2 loss (total and terms) and gradients on `device`.
fn phase2(
    cfg: &DsrConfig,
    weights: &HashMap<String, Tensor>,
    image: &Tensor,
    mask: &Tensor,
    device: &Device,
) -> BoxResult<(BTreeMap<String, Tensor>, BTreeMap<String, Tensor>)> {
    let (varmap, model) = trainable(cfg, weights, device)?;
    let image = image.to_device(device)?;
    let mask = mask.to_device(device)?;
    let mut rng = SeededRandomness::new(7);
    let out = model.forward_phase2(&image, &mask, &mut rng)?;
    let loss = second_stage_loss(
        &SecondStageInputs {
            recon_feat_hi: &out.recon_feat_hi,
            quantized_hi: &out.embedding_bot,
            recon_feat_lo: &out.recon_feat_lo,
            quantized_lo: &out.embedding_top,
            image: &image,
            object_specific_image: &out.obj_spec_image,
            anomaly_map: &out.anomaly_map,
            true_anomaly_map: &out.true_anomaly_map,
        },
        FocalKind::Anomalib,
    )?;
    let mut values = BTreeMap::new();
    for (name, t) in [
        ("loss", &loss.total),
        ("l2_hi", &loss.l2_hi),
        ("l2_lo", &loss.l2_lo),
        ("l2_img_x10", &loss.l2_img_x10),
        ("focal", &loss.focal),
    ] {
        values.insert(name.to_string(), t.clone());
    }
    values.insert("anomaly_map".into(), out.anomaly_map.clone());
    let grads = gradients(
        &varmap,
        &loss.total,
        &[
            "subspace_restriction_module_hi.",
            "subspace_restriction_module_lo.",
            "image_reconstruction_network.",
            "anomaly_detection_module.",
        ],
    )?;
    Ok((values, grads))
}

/// Phase-3 loss and gradients on `device`.
fn phase3(
    cfg: &DsrConfig,
    weights: &HashMap<String, Tensor>,
    image: &Tensor,
    mask: &Tensor,
    device: &Device,
) -> BoxResult<(Tensor, BTreeMap<String, Tensor>)> {
    let (varmap, model) = trainable(cfg, weights, device)?;
    let probs = model.forward_phase3(&image.to_device(device)?)?;
    let loss = third_stage_loss(&probs, &mask.to_device(device)?, FocalKind::Anomalib)?;
    let grads = gradients(&varmap, &loss, &["upsampling_module."])?;
    Ok((loss, grads))
}

/// The scale below which a gradient counts as vanishing: 1e-3 of the largest gradient magnitude
/// of the phase. The biases of convolutions followed by instance normalisation have a gradient of
/// exactly zero in exact arithmetic (the normalisation removes any constant), so both devices
/// hold rounding noise there (about 1e-9); that noise is judged against this scale, not its own.
fn grad_floor(grads: &BTreeMap<String, Tensor>) -> BoxResult<f64> {
    let mut largest = 0f64;
    for g in grads.values() {
        let m = g.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?;
        largest = largest.max(m.to_device(&Device::Cpu)?.to_scalar::<f64>()?);
    }
    Ok(largest * 1e-3)
}

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let device = Device::new_cuda(0)?;
    if args.iter().any(|a| a == "--tiny") {
        let cfg = DsrConfig {
            embedding_dim: 4,
            num_embeddings: 16,
            num_hiddens: 8,
            num_residual_layers: 1,
            num_residual_hiddens: 4,
            anomaly_detection_module_base_width: 4,
            upsampling_module_base_width: 4,
            ..DsrConfig::default()
        };
        let weights = DsrModel::seeded_weights(&cfg, 0)?;
        let image = Tensor::rand(0f32, 1f32, (1, 3, 64, 64), &Device::Cpu)?;
        let mut report = Report { rows: Vec::new() };
        let mut outs = Vec::new();
        for dev in [Device::Cpu, device.clone()] {
            let model = DsrModel::new(
                &cfg,
                VarBuilder::from_tensors(weights.clone(), DType::F32, &dev),
            )?;
            outs.push(model.infer(&image.to_device(&dev)?)?);
        }
        report.compare(
            "tiny: anomaly map, cuda vs cpu",
            &outs[1].anomaly_map,
            &outs[0].anomaly_map,
            1e-4,
            false,
        )?;
        println!("tiny check done");
        return Ok(());
    }

    let dir = arg(&args, "--fixture")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("crates/dsr-core/tests/fixtures/small"));
    let (cfg, size, batch) = fixture_config(&dir)?;
    println!(
        "fixture {} ({size}×{size}, batch {batch}), devices cpu and {:?}",
        dir.display(),
        device.location()
    );
    let weights = load(&dir, "weights.safetensors")?;
    let fwd = load(&dir, "forward_eval.safetensors")?;
    let mut report = Report { rows: Vec::new() };

    // 1. The evaluation forward, against the fixture and between the devices.
    let image = get(&fwd, "input.image")?;
    let mut outs = Vec::new();
    for dev in [Device::Cpu, device.clone()] {
        let model = DsrModel::new(
            &cfg,
            VarBuilder::from_tensors(weights.clone(), DType::F32, &dev),
        )?;
        outs.push(model.forward_eval(&image.to_device(&dev)?)?);
    }
    let (cpu, cuda) = (&outs[0], &outs[1]);
    let ref_map = get(&fwd, "out.anomaly_map")?;
    let ref_score = get(&fwd, "out.pred_score")?;
    report.compare(
        "eval: anomaly map, cuda vs fixture",
        &cuda.inference.anomaly_map,
        &ref_map,
        1e-5,
        false,
    )?;
    report.compare(
        "eval: anomaly map, cpu vs fixture",
        &cpu.inference.anomaly_map,
        &ref_map,
        1e-5,
        false,
    )?;
    report.compare(
        "eval: anomaly map, cuda vs cpu",
        &cuda.inference.anomaly_map,
        &cpu.inference.anomaly_map,
        1e-5,
        false,
    )?;
    report.compare(
        "eval: image score, cuda vs fixture",
        &cuda.inference.pred_score,
        &ref_score,
        1e-5,
        false,
    )?;
    report.compare(
        "eval: image score, cuda vs cpu",
        &cuda.inference.pred_score,
        &cpu.inference.pred_score,
        1e-5,
        false,
    )?;

    // 2. Phase 2: the fixture's image and anomaly mask, the same seeded draws on both devices.
    let p2 = load(&dir, "phase2.safetensors")?;
    let (image2, mask2) = (get(&p2, "input.image")?, get(&p2, "input.anomaly_mask")?);
    let (v_cpu, g_cpu) = phase2(&cfg, &weights, &image2, &mask2, &Device::Cpu)?;
    let (v_cuda, g_cuda) = phase2(&cfg, &weights, &image2, &mask2, &device)?;
    for (name, want) in &v_cpu {
        // Probabilities within the absolute tolerance, losses relative.
        let relative = name != "anomaly_map";
        report.compare(
            &format!("phase 2: {name}, cuda vs cpu"),
            &v_cuda[name],
            want,
            1e-5,
            relative,
        )?;
    }
    report.compare_gradients("phase 2", &g_cpu, &g_cuda)?;

    // 3. Phase 3: the fixture's (smudged) image and mask.
    let p3 = load(&dir, "phase3.safetensors")?;
    let (image3, mask3) = (get(&p3, "input.image")?, get(&p3, "input.mask")?);
    let (l_cpu, g3_cpu) = phase3(&cfg, &weights, &image3, &mask3, &Device::Cpu)?;
    let (l_cuda, g3_cuda) = phase3(&cfg, &weights, &image3, &mask3, &device)?;
    report.compare("phase 3: loss, cuda vs cpu", &l_cuda, &l_cpu, 1e-5, true)?;
    if let Ok(want) = get(&p3, "loss.third_stage") {
        report.compare("phase 3: loss, cuda vs fixture", &l_cuda, &want, 1e-5, true)?;
    }
    for (key, want) in p3.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let got = g3_cuda
            .get(name)
            .ok_or_else(|| format!("no CUDA gradient for {name}"))?;
        report.compare(
            &format!("phase 3 grad vs fixture: {name}"),
            got,
            want,
            1e-4,
            true,
        )?;
    }
    report.compare_gradients("phase 3", &g3_cpu, &g3_cuda)?;

    let failed = report.rows.iter().filter(|r| !r.ok).count();
    println!(
        "{}",
        serde_json::json!({ "compared": report.rows.len(), "failed": failed, "rows": report.rows })
    );
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
