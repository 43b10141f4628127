//! `dsr train`, `dsr pretrain` and `dsr demo`: training runs with progress, checkpoints and the
//! results folder, then the test evaluation.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::ValueEnum;
use dsr_core::DsrConfig;
use dsr_train::budget::Deadline;
use dsr_train::codebook::{discrete_part, GeneralCodebook};
use dsr_train::data::{list_images, Entry};
use dsr_train::pipeline::{load_image_batch, small_model};
use dsr_train::pretrain::{PretrainConfig, Pretrainer};
use dsr_train::session::{RunConfig, RunOutcome, Session, SessionEvent};
use dsr_train::train::Schedule;

use crate::evaluate;
use crate::progress::{human, Progress};
use dsr_eval::{Detector, EvalOptions, Execution};

/// A named model configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// The paper's and anomalib's configuration (fits the official pretrained discrete model).
    Reference,
    /// Half the reference widths (embedding 64, 1024 codes, hidden 64, U-Net width 32);
    /// needs its own phase 1 (`--pretrain`).
    Mid,
    /// Narrow networks (embedding 32, 256 codes, U-Net width 16) for CPU demos and smoke runs;
    /// needs its own phase 1 (`--pretrain`).
    Small,
    /// The smallest widths (embedding 4, 32 codes, U-Net width 4): for tests and smoke runs only.
    Tiny,
}

impl Preset {
    /// The model configuration.
    pub fn config(self) -> DsrConfig {
        match self {
            Preset::Reference => DsrConfig::default(),
            Preset::Mid => DsrConfig {
                embedding_dim: 64,
                num_embeddings: 1024,
                num_hiddens: 64,
                num_residual_hiddens: 32,
                anomaly_detection_module_base_width: 32,
                upsampling_module_base_width: 32,
                ..DsrConfig::default()
            },
            Preset::Small => small_model(),
            Preset::Tiny => DsrConfig::tiny(),
        }
    }
}

/// The compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU (all cores).
    Cpu,
    /// The first CUDA GPU (a binary built with `--features cuda`).
    Cuda,
}

impl DeviceArg {
    /// The candle device.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda if !cfg!(feature = "cuda") => bail!(
                "this dsr binary was built without CUDA support: build it with `cargo build \
                 --release -p dsr-cli --features cuda` on a machine with a CUDA toolkit, or use \
                 --device cpu"
            ),
            DeviceArg::Cuda => Device::new_cuda(0).context(
                "cannot use CUDA GPU 0 (is an NVIDIA GPU with its driver present and visible?)",
            ),
        }
    }
}

/// The options of `dsr train` that change the run configuration (flattened into its
/// arguments).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrainOverrides {
    /// A TOML run configuration (sections data, vq, pretrain, train, output; see the README's
    /// `dsr train` section, or --print-config). Default: the reference settings.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data set folder (MVTec AD layout): a category folder, or the root of several
    /// with --category.
    #[arg(long, value_name = "DIR", required_unless_present_any = ["resume", "config", "normal_dir"])]
    pub data: Option<PathBuf>,
    /// The category sub-folder of --data.
    #[arg(long, value_name = "C")]
    pub category: Option<String>,
    /// The generic folder layout instead of --data: a folder of defect-free images
    /// (training, and 20 % of them for the test unless --normal-test-dir is given).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["data", "category"])]
    pub normal_dir: Option<PathBuf>,
    /// Folder layout: defective test images.
    #[arg(long, value_name = "DIR", requires = "normal_dir")]
    pub abnormal_dir: Option<PathBuf>,
    /// Folder layout: defect-free test images.
    #[arg(long, value_name = "DIR", requires = "normal_dir")]
    pub normal_test_dir: Option<PathBuf>,
    /// Folder layout: masks of the defective images, matched by file stem (<stem>_mask.png
    /// or <stem>.png).
    #[arg(long, value_name = "DIR", requires = "normal_dir")]
    pub mask_dir: Option<PathBuf>,
    /// Pretrained discrete-model weights (official .pckl, our safetensors, anomalib
    /// model.ckpt). Default: the cached official weights of `cargo xtask fetch-weights` when
    /// the model configuration fits them.
    #[arg(long, value_name = "FILE")]
    pub vq_weights: Option<PathBuf>,
    /// Train phase 1 (the discrete model) on the training images first, instead of loading
    /// weights.
    #[arg(long)]
    pub pretrain: bool,
    /// Plan phases 1-3 to finish within this wall time, e.g. 20m, 2h or 1h30m (a bare number
    /// is minutes): a few steps of each phase are timed first, then the budget is shared
    /// (a quarter for phase 1 when it runs; phase 3 only for long runs) and the plan printed;
    /// phase 2 is re-planned about every minute from its measured step time.
    #[arg(long, value_name = "DURATION", value_parser = parse_budget, conflicts_with_all = ["pretrain_steps", "phase2_steps", "phase3_steps"])]
    pub time_budget: Option<f64>,
    /// Phase-1 steps (implies --pretrain). Default 2000.
    #[arg(long, value_name = "N")]
    pub pretrain_steps: Option<u64>,
    /// The model configuration. Default: reference (the paper's widths).
    #[arg(long, value_enum, value_name = "PRESET")]
    pub preset: Option<Preset>,
    /// Training image size: H,W (multiples of 32, at least 64), or `auto:N` for about N×N
    /// pixels with the height and width matched to the training images' median shape (a
    /// 400×256 photo at auto:128 trains at 96×160; a square one at 128×128), or `auto` for
    /// the configured size's pixel count. Default 256,256.
    #[arg(long, value_name = "H,W|auto[:N]", value_parser = crate::parse_size_arg)]
    pub image_size: Option<SizeArg>,
    /// Images per step (1 to 4096). Default 8.
    #[arg(long, value_name = "N", value_parser = crate::parse_batch)]
    pub batch: Option<usize>,
    /// Phase-2 steps (original schedule). Default 100000.
    #[arg(long, value_name = "N")]
    pub phase2_steps: Option<u64>,
    /// Phase-3 steps (original schedule). Default 50000.
    #[arg(long, value_name = "N")]
    pub phase3_steps: Option<u64>,
    /// Synthetic-anomaly recipe: anomalib or original. Default anomalib.
    #[arg(long, value_name = "RECIPE")]
    pub recipe: Option<dsr_augment::Recipe>,
    /// Focal loss: original (on probabilities, the paper's) or anomalib (kornia's on
    /// softmax outputs). Default original.
    #[arg(long, value_name = "KIND", value_parser = crate::parse_focal)]
    pub focal: Option<dsr_losses::FocalKind>,
    /// Seed of every random draw. Default 0.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// The results root. Default results.
    #[arg(long, value_name = "DIR")]
    pub results: Option<PathBuf>,
    /// Write the resumable checkpoint every N steps. Default 100.
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// A training image that cannot be read: fail (stop with its name) or skip (report it
    /// and train on the others). Default fail.
    #[arg(long, value_name = "POLICY", value_parser = crate::parse_on_error)]
    pub on_error: Option<dsr_eval::OnError>,
    /// Refuse images with more pixels than this (read from the file header before
    /// decoding). Default 100000000.
    #[arg(long, value_name = "N")]
    pub max_pixels: Option<u64>,
    /// Any configuration value, as section.key=value (TOML value), e.g.
    /// --set train.adam.lr=1e-4 --set data.val_split=from_test:0.5. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// Resolves the run configuration: defaults, then `--config`, then the flags, then `--set`,
/// then the cached official discrete weights when nothing else provides them and they fit.
pub fn resolve_config(o: &TrainOverrides) -> Result<RunConfig> {
    let mut cfg = match &o.config {
        Some(path) => RunConfig::from_toml_file(path)?,
        None => RunConfig::default(),
    };
    if let Some(p) = o.preset {
        cfg.train.model = p.config();
    }
    if let Some(d) = &o.data {
        cfg.data.root = d.clone();
    }
    if o.category.is_some() {
        cfg.data.category = o.category.clone();
    }
    for (flag, field) in [
        (&o.normal_dir, &mut cfg.data.normal_dir),
        (&o.abnormal_dir, &mut cfg.data.abnormal_dir),
        (&o.normal_test_dir, &mut cfg.data.normal_test_dir),
        (&o.mask_dir, &mut cfg.data.mask_dir),
    ] {
        if flag.is_some() {
            *field = flag.clone();
        }
    }
    if let Some(w) = &o.vq_weights {
        cfg.vq.weights = Some(w.clone());
    }
    if o.pretrain || o.pretrain_steps.is_some() {
        cfg.vq.pretrain = true;
    }
    if let Some(s) = o.pretrain_steps {
        cfg.pretrain.steps = s;
    }
    if let Some(SizeArg::Exact(s)) = o.image_size {
        set_image_size(&mut cfg, s);
    }
    if let Some(b) = o.batch {
        cfg.train.batch_size = b;
    }
    if o.phase2_steps.is_some() || o.phase3_steps.is_some() {
        match &mut cfg.train.schedule {
            Schedule::Original {
                phase2_steps,
                phase3_steps,
                ..
            } => {
                *phase2_steps = o.phase2_steps.unwrap_or(*phase2_steps);
                *phase3_steps = o.phase3_steps.unwrap_or(*phase3_steps);
            }
            Schedule::Anomalib { .. } => bail!(
                "--phase2-steps and --phase3-steps apply to the original schedule; the configuration uses anomalib's (set train.schedule.epochs instead)"
            ),
        }
    }
    if let Some(r) = o.recipe {
        cfg.train.recipe = r;
    }
    if let Some(f) = o.focal {
        cfg.train.focal = f;
    }
    if let Some(s) = o.seed {
        cfg.train.seed = s;
        cfg.pretrain.seed = s;
    }
    if let Some(r) = &o.results {
        cfg.output.results = r.clone();
    }
    if let Some(n) = o.checkpoint_every {
        cfg.output.checkpoint_every = n;
    }
    if let Some(e) = o.on_error {
        cfg.data.on_error = e;
    }
    if let Some(p) = o.max_pixels {
        cfg.data.max_pixels = p;
    }
    let mut cfg = cfg.with_overrides(&o.set)?;
    if let Some(SizeArg::Shaped(side)) = o.image_size {
        let size = shaped_size(&cfg, side)?;
        set_image_size(&mut cfg, size);
    }
    // A bare `--set vq.pretrain=true` (or `vq.general`) also counts. Without a source: the
    // cached official weights when they fit, else the general codebook shipped for the widths.
    if cfg.vq.weights.is_none() && !cfg.vq.pretrain && !cfg.vq.general {
        let fits = discrete_part(&cfg.train.model) == discrete_part(&DsrConfig::default());
        match dsr_core::cache::cached_vq_weights() {
            Some(path) if fits => cfg.vq.weights = Some(path),
            _ if GeneralCodebook::for_config(&cfg.train.model).is_some() => cfg.vq.general = true,
            _ => bail!(
                "no discrete-model weights for these widths: pass --vq-weights FILE, or add --pretrain to train phase 1 on the training images (the small and reference presets come with a general codebook)"
            ),
        }
    }
    Ok(cfg)
}

/// `--image-size`: an exact size, or one shaped like the training images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeArg {
    /// `H,W`.
    Exact([usize; 2]),
    /// `auto:N` (about N×N pixels) or `auto` (the configured size's pixel count), with the
    /// training images' median width / height.
    Shaped(Option<usize>),
}

fn set_image_size(cfg: &mut RunConfig, s: [usize; 2]) {
    cfg.train.image_size = s;
    cfg.pretrain.crop = cfg.pretrain.crop.min(s[0]).min(s[1]);
}

/// The size of `--image-size auto[:N]`: `side`² pixels (else the configured size's count)
/// shaped like the median training image.
pub fn shaped_size(cfg: &RunConfig, side: Option<usize>) -> Result<[usize; 2]> {
    let listing = cfg.data.listing(cfg.train.seed)?;
    let paths: Vec<PathBuf> = listing.train.iter().map(|e| e.path.clone()).collect();
    let aspect = dsr_train::sizing::median_aspect(&paths)
        .context("cannot read the training images' sizes for --image-size auto")?;
    let [h, w] = cfg.train.image_size;
    let pixels = side.map_or(h * w, |s| s * s);
    let size = dsr_train::sizing::size_for_aspect(pixels, aspect, dsr_core::config::MAX_IMAGE_SIDE);
    Ok(size)
}

/// Parses `--time-budget` into seconds.
pub fn parse_budget(text: &str) -> std::result::Result<f64, String> {
    dsr_train::budget::parse_duration(text).map_err(|e| e.to_string())
}

/// Plans `cfg`'s phases to fill `budget` seconds counted from `started` (timing a few steps of
/// each phase first), prints the plan and writes it into `cfg`; the deadline it returns lets
/// the session re-plan from the step times it measures while it trains.
pub fn plan_to_budget(
    cfg: &mut RunConfig,
    budget: f64,
    started: Instant,
    device: &Device,
    test: bool,
) -> Result<Deadline> {
    println!(
        "timing {} steps of each phase for the time budget…",
        dsr_train::budget::TIMED_STEPS
    );
    let plan = dsr_train::budget::plan_run(cfg, budget, started, device, test)
        .context("cannot plan the run to the time budget")?;
    println!("{plan}");
    println!(
        "  (phase 2 is re-planned about every {:.0} s from the measured step time, until its learning-rate drop)",
        dsr_train::budget::REPLAN_INTERVAL_SECONDS
    );
    plan.apply(cfg);
    Ok(Deadline::new(started, plan))
}

/// Prints the command's wall time against its budget (which started `budget` before `end`).
fn report_budget(deadline: &Deadline) {
    let budget = deadline.plan.budget_seconds;
    let took = budget - deadline.seconds_left();
    println!(
        "wall time {} of a {} budget ({:+.1} %)",
        human(took),
        human(budget),
        100.0 * (took - budget) / budget
    );
}

/// `session`, re-planning to `deadline` when there is one.
fn with_deadline(session: Session, deadline: Option<Deadline>) -> Session {
    match deadline {
        Some(d) => session.with_deadline(d),
        None => session,
    }
}

/// Runs a session with progress, then the test evaluation into the run folder; a budgeted run
/// ends with its wall time against the budget.
pub fn run_session(session: &Session, device: &Device, test: bool) -> Result<RunOutcome> {
    let started = Instant::now();
    println!("run folder: {}", session.dir().path.display());
    println!("discrete model: {}", session.config().vq.source());
    let mut progress = Progress::new();
    let outcome = session.run(device, &mut |event| match event {
        SessionEvent::Data { train, val, test } => progress.message(&format!(
            "data: {train} training, {val} validation, {test} test images"
        )),
        SessionEvent::PhaseStart { phase, done, total } => {
            if *phase == 3 {
                // Phase 3 trains the upsampling module alone: reusing freed buffers makes its
                // steps faster, and its peak stays below phase 2's (see `HeapUse`).
                crate::heap::tune_allocator(crate::heap::HeapUse::Reuse);
            }
            progress.start_phase(*phase, *done, *total)
        }
        SessionEvent::Pretrain(r) => {
            let mut losses = std::collections::BTreeMap::new();
            losses.insert("loss".to_string(), r.loss);
            losses.insert("perplexity".to_string(), r.perplexity_bot);
            progress.step(&losses);
        }
        SessionEvent::Train(r) => progress.step(&r.losses),
        SessionEvent::Checkpoint { .. } => {}
        SessionEvent::Replanned {
            step,
            phase2_steps,
            phase3_steps,
            step_seconds,
        } => {
            progress.message(&format!(
                "after step {step}: steps take {step_seconds:.2} s, re-planned phase 2 to {phase2_steps} steps{}",
                if *phase3_steps > 0 {
                    format!(", phase 3 to {phase3_steps}")
                } else {
                    String::new()
                }
            ));
            progress.set_total(*phase2_steps);
        }
        SessionEvent::Skipped { message } => progress.message(&format!("skipped: {message}")),
        SessionEvent::Resumed { path, step } => progress.message(&format!(
            "resuming from {} after step {step}",
            path.display()
        )),
        SessionEvent::OutputMap { chosen, measured } => {
            progress.finish();
            for (name, m) in measured {
                println!(
                    "validation, {name} map: image AUROC {:.3}, pixel AUROC {:.3}, pixel AP {:.3}, AUPRO {:.3}",
                    m.image_auroc, m.pixel_auroc, m.pixel_ap, m.pixel_aupro
                );
            }
            println!("output map: {chosen}");
        }
        SessionEvent::Finished { model } => {
            progress.finish();
            println!("model: {}", model.display());
        }
    });
    progress.finish();
    let outcome = match outcome {
        Ok(o) => o,
        // The model was written; resuming would only repeat the validation.
        Err(e @ dsr_train::train::TrainError::Unvalidated { .. }) => return Err(e.into()),
        Err(e) => {
            let dir = session.dir().path.display();
            return Err(anyhow::Error::new(e).context(if session.can_resume() {
                format!("training in {dir} stopped (fix the problem, then resume with `dsr train --resume {dir}`)")
            } else {
                format!("training in {dir} stopped before its first checkpoint (fix the problem and start a new run)")
            }));
        }
    };
    println!("training took {}", human(started.elapsed().as_secs_f64()));
    if test && !outcome.test.is_empty() {
        test_after_training(session, &outcome, device).with_context(|| {
            format!(
                "the model is written to {}, but its test could not run",
                outcome.model.display()
            )
        })?;
    }
    if let Some(d) = session.deadline() {
        report_budget(&d);
    }
    Ok(outcome)
}

/// The test evaluation of a finished run, into its run folder.
fn test_after_training(session: &Session, outcome: &RunOutcome, device: &Device) -> Result<()> {
    {
        let cfg = session.config();
        let root = cfg.data.display_root();
        let samples = evaluate::samples_from_entries(&outcome.test, &root)?;
        let detector = Detector::load_on(&outcome.model, session.execution(), device)?;
        let mut out = evaluate::open_output(&session.dir().path, &samples, &detector)?;
        // With the validation set equal to the test set (anomalib's default) the validation
        // has already evaluated every test image with this model: its evaluation is the test's.
        let tested;
        let evaluation = if outcome.validation.samples == samples {
            &outcome.validation
        } else {
            let options = EvalOptions {
                batch: cfg.data.eval_batch,
                ..EvalOptions::default()
            };
            tested = evaluate::evaluate_set(&detector, &root, samples, &options)?;
            &tested
        };
        evaluate::write_results(&detector, &root, evaluation, &mut out)?;
    }
    Ok(())
}

/// Runs `dsr train`.
pub fn train(
    o: &TrainOverrides,
    resume: Option<&Path>,
    device: DeviceArg,
    test: bool,
    print_config: bool,
    exec: Execution,
) -> Result<()> {
    if print_config {
        let cfg = match resume {
            Some(dir) => Session::read_config(dir)?,
            None => resolve_config(o)?,
        };
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let started = Instant::now();
    let device = device.device()?;
    let session = match resume {
        Some(dir) => {
            let session = Session::resume(dir)?;
            dsr_train::session::preflight(session.config(), test)?;
            session
        }
        None => {
            let mut cfg = resolve_config(o)?;
            if let Some(SizeArg::Shaped(_)) = o.image_size {
                let [h, w] = cfg.train.image_size;
                println!("image size: {h}×{w} (shaped like the training images)");
            }
            // Everything that can be checked is checked before the run folder is made and
            // before any step is timed or taken.
            dsr_train::session::preflight(&cfg, test)?;
            let deadline = o
                .time_budget
                .map(|budget| plan_to_budget(&mut cfg, budget, started, &device, test))
                .transpose()?;
            with_deadline(Session::create(cfg)?, deadline)
        }
    }
    .with_execution(exec);
    run_session(&session, &device, test)?;
    Ok(())
}

/// The options of `dsr pretrain`.
#[derive(Debug, clap::Args)]
pub struct PretrainArgs {
    /// The image folder (searched recursively).
    #[arg(long, value_name = "DIR")]
    pub images: PathBuf,
    /// The output file.
    #[arg(long, value_name = "FILE", default_value = "vq.safetensors")]
    pub out: PathBuf,
    /// The model configuration (its discrete part is trained).
    #[arg(long, value_enum, default_value_t = Preset::Reference)]
    pub preset: Preset,
    /// Steps.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub steps: u64,
    /// Side of the random square crops.
    #[arg(long, value_name = "PX", default_value_t = 128)]
    pub crop: usize,
    /// Side the images are resized to before cropping.
    #[arg(long, value_name = "PX", default_value_t = 256)]
    pub load_size: usize,
    /// Crops per step (1 to 4096).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = crate::parse_batch)]
    pub batch: usize,
    /// Seed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// The compute device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

/// Every image under `dir`, recursively, sorted.
fn images_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = list_images(dir)?;
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for sub in subdirs {
        found.extend(images_below(&sub)?);
    }
    Ok(found)
}

/// Runs `dsr pretrain`.
pub fn pretrain(a: &PretrainArgs, exec: Execution) -> Result<()> {
    if a.load_size == 0 || a.crop > a.load_size {
        bail!(
            "--load-size {} must be at least the crop size {} (the crops are cut from the images at that size)",
            a.load_size,
            a.crop
        );
    }
    dsr_core::config::validate_image_size(a.load_size, a.load_size).context("--load-size")?;
    let cfg = PretrainConfig {
        model: a.preset.config(),
        crop: a.crop,
        batch_size: a.batch,
        steps: a.steps,
        seed: a.seed,
        ..PretrainConfig::default()
    };
    cfg.validate()?;
    cfg.check_memory()?;
    let device = a.device.device()?;
    if !a.images.is_dir() {
        bail!("the image folder {} does not exist", a.images.display());
    }
    let files = images_below(&a.images)?;
    if files.is_empty() {
        bail!("no image files under {}", a.images.display());
    }
    let inputs: Vec<PathBuf> = files.clone();
    let entries: Vec<Entry> = files
        .into_iter()
        .map(|path| Entry {
            path,
            mask_path: None,
            label: false,
            defect_type: "good".into(),
        })
        .collect();
    let load = a.load_size;
    println!(
        "phase 1 on {} images from {} ({load}×{load}, crops {})",
        entries.len(),
        a.images.display(),
        a.crop
    );
    crate::guard::check_output_file(&a.out, &inputs)?;
    let images = load_image_batch(&entries, [load, load])?;
    let mut pre = Pretrainer::with_execution(cfg, images, &device, exec)?;
    let mut progress = Progress::new();
    progress.start_phase(1, 0, a.steps);
    let mut last = None;
    while !pre.is_done() {
        let r = pre.train_step()?;
        let mut losses = std::collections::BTreeMap::new();
        losses.insert("mse".to_string(), r.recon_mse);
        losses.insert("perplexity".to_string(), r.perplexity_bot);
        progress.step(&losses);
        last = Some(r);
    }
    progress.finish();
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the folder {}", parent.display()))?;
    }
    pre.save(&a.out)?;
    if let Some(r) = last {
        println!(
            "reconstruction MSE {:.5}; codes used top {} / bottom {}; perplexity top {:.1} / bottom {:.1}",
            r.recon_mse, r.codes_used_top, r.codes_used_bot, r.perplexity_top, r.perplexity_bot
        );
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

/// The options of `dsr demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Another data set folder (MVTec layout) instead of the shipped one.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// The results root.
    #[arg(long, value_name = "DIR", default_value = "results")]
    pub results: PathBuf,
    /// A smoke run of a few steps at 64×64 (seconds; the model learns little).
    #[arg(long)]
    pub quick: bool,
    /// The wall time of the whole demo (training and test), planned as `dsr train
    /// --time-budget` plans it; e.g. 10m, 1h. Not used with --quick.
    #[arg(long, value_name = "DURATION", value_parser = parse_budget, default_value = DEMO_BUDGET)]
    pub time_budget: f64,
    /// Seed of every random draw.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// The compute device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
}

/// The demo's default wall-time budget (training and test).
pub const DEMO_BUDGET: &str = "13m";

/// The demo data shipped with the sources.
pub fn demo_data() -> Option<PathBuf> {
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/demo/battery_weld"),
        PathBuf::from("assets/demo/battery_weld"),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("train").is_dir())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

/// The demo's run configuration; without `quick` its phase lengths are placeholders that
/// [`plan_to_budget`] replaces. The validation set that places the thresholds and chooses the
/// output map is half of the test images (stratified), the test the other half.
pub fn demo_config(data: PathBuf, results: PathBuf, quick: bool, seed: u64) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.data.root = data;
    cfg.data.val_split = "from_test:0.5".into();
    cfg.output.results = results;
    // The shipped general codebook, not a phase 1 on the 37 training images: at the same
    // number of phase-2 steps it localises far better (docs/accuracy.md), and the budget
    // goes to phase 2. The quick smoke run keeps its own tiny phase 1.
    cfg.vq.pretrain = quick;
    cfg.vq.general = !quick;
    cfg.train.model = small_model();
    let (size, pre, p2, p3) = if quick {
        (64, 8, 6, 4)
    } else {
        (128, 150, 120, 0)
    };
    cfg.train.image_size = [size, size];
    cfg.train.batch_size = if quick { 2 } else { 8 };
    cfg.train.schedule = Schedule::Original {
        phase2_steps: p2,
        phase3_steps: p3,
        lr_drop_fraction: 0.8,
    };
    cfg.train.seed = seed;
    cfg.pretrain.seed = seed;
    cfg.pretrain.model = cfg.train.model;
    cfg.pretrain.crop = size;
    cfg.pretrain.steps = pre;
    cfg.pretrain.batch_size = if quick { 4 } else { 16 };
    cfg.output.checkpoint_every = if quick { 5 } else { 100 };
    cfg
}

/// Runs `dsr demo`.
pub fn demo(a: &DemoArgs, exec: Execution) -> Result<()> {
    let data = match &a.data {
        Some(d) => d.clone(),
        None => demo_data().context(
            "the demo data (assets/demo/battery_weld) are not here: run from the source tree, or pass --data DIR",
        )?,
    };
    println!(
        "dsr demo: DSR on {} — the shipped general codebook (or a short phase 1 with --quick), phase 2 (reconstruction, detection), phase 3 (upsampling) when the budget allows, then the test set.",
        data.display()
    );
    let started = Instant::now();
    let device = a.device.device()?;
    let mut cfg = demo_config(data, a.results.clone(), a.quick, a.seed);
    let deadline = (!a.quick)
        .then(|| plan_to_budget(&mut cfg, a.time_budget, started, &device, true))
        .transpose()?;
    let session = with_deadline(Session::create(cfg)?, deadline).with_execution(exec);
    run_session(&session, &device, true)?;
    println!(
        "report: {}",
        session.dir().path.join("report.html").display()
    );
    Ok(())
}
