//! Planning a training run to a wall-clock budget: a few timed steps of each phase at the start
//! of the run, then the phase lengths that fill the budget.
//!
//! The budget covers the whole run: the timing itself, phase 1 (when the discrete model is
//! pretrained), phases 2 and 3, and the evaluation passes at the end (every output map on the
//! validation set, the feature memory's pass over the training images, then the test set).
//! What is left after the timing and the estimated evaluation is shared between the phases by a
//! [`BudgetSplit`]; each phase gets as many whole steps as fit in its share at its measured step
//! time.
//!
//! ```
//! use dsr_train::budget::{plan_budget, BudgetSplit, StepTimes};
//!
//! let times = StepTimes { phase1: Some(1.0), phase2: 4.0, phase3: 2.0, evaluation: 30.0 };
//! let split = BudgetSplit { phase1: 0.25, phase3: 0.0 };
//! // 20 minutes, 20 s of which were spent measuring.
//! let plan = plan_budget(1200.0, 20.0, &times, &split)?;
//! assert_eq!(plan.pretrain_steps, 287); // (1200 − 20 − 30) · 0.25 / 1.0
//! assert_eq!(plan.phase2_steps, 215); // (1200 − 20 − 30) · 0.75 / 4.0
//! assert_eq!(plan.phase3_steps, 0);
//! assert!((plan.predicted_seconds - 1200.0).abs() < 5.0);
//! # Ok::<(), dsr_train::train::TrainError>(())
//! ```

use std::time::Instant;

use candle_core::Device;
use dsr_augment::ImageBatch;
use dsr_core::weights::Checkpoint;
use dsr_core::DsrModel;
use serde::{Deserialize, Serialize};

use crate::data::split_validation;
use crate::pretrain::{PretrainConfig, Pretrainer};
use crate::session::{parse_val_split, RunConfig};
use crate::train::{Result, Schedule, TrainConfig, TrainError, Trainer};

/// Seconds of one step of each phase, and of the evaluation at the end of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    /// A phase-1 step, when the run pretrains its discrete model.
    pub phase1: Option<f64>,
    /// A phase-2 step.
    pub phase2: f64,
    /// A phase-3 step.
    pub phase3: f64,
    /// Every evaluation pass at the end of the run, together.
    pub evaluation: f64,
}

/// How the training time (the budget less the timing and the evaluation) is shared.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BudgetSplit {
    /// Fraction for phase 1 (ignored when the discrete model is given).
    pub phase1: f64,
    /// Fraction for phase 3; phase 2 gets the rest.
    pub phase3: f64,
}

/// Phase 3 is planned only when phase 2 gets at least this many steps: below it, the detection
/// module's own map is the better output (docs/accuracy.md) and phase 3 would only take steps
/// from phase 2.
pub const MIN_PHASE2_STEPS_FOR_PHASE3: u64 = 2000;

/// Share of the phase-2/3 time given to phase 3 when phase 3 is planned (the paper's 50k of
/// 150k iterations).
pub const PHASE3_SHARE: f64 = 1.0 / 3.0;

impl BudgetSplit {
    /// The split used by `--time-budget`: a quarter of the training time for phase 1 when it
    /// runs; no phase 3 while phase 2 would get fewer than [`MIN_PHASE2_STEPS_FOR_PHASE3`]
    /// steps, else [`PHASE3_SHARE`] of the phase-2/3 time.
    pub fn for_budget(training_seconds: f64, times: &StepTimes) -> Self {
        let phase1 = if times.phase1.is_some() { 0.25 } else { 0.0 };
        let phase23 = training_seconds * (1.0 - phase1);
        let phase3 = if phase23 / times.phase2 >= MIN_PHASE2_STEPS_FOR_PHASE3 as f64 {
            PHASE3_SHARE * (1.0 - phase1)
        } else {
            0.0
        };
        Self { phase1, phase3 }
    }
}

/// The phase lengths that fill a budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BudgetPlan {
    /// The whole budget, seconds.
    pub budget_seconds: f64,
    /// Already spent before planning (the timing), seconds.
    pub spent_seconds: f64,
    /// The step times the plan is made from.
    pub times: StepTimes,
    /// The split of the training time.
    pub split: BudgetSplit,
    /// Phase-1 steps (0 when the discrete model is given).
    pub pretrain_steps: u64,
    /// Phase-2 steps.
    pub phase2_steps: u64,
    /// Phase-3 steps.
    pub phase3_steps: u64,
    /// The predicted wall time of the whole run, seconds.
    pub predicted_seconds: f64,
}

/// Plans phases 1–3 for `budget` seconds of which `spent` are gone, from measured step
/// times; `split` shares the time left after the evaluation. Fails when the budget leaves no
/// room for a single phase-2 step (the message says how much is needed).
pub fn plan_budget(
    budget: f64,
    spent: f64,
    times: &StepTimes,
    split: &BudgetSplit,
) -> Result<BudgetPlan> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !positive(budget) {
        return Err(TrainError::Config(format!(
            "the time budget must be a positive duration, got {budget} s"
        )));
    }
    let usable = positive(times.phase2)
        && positive(times.phase3)
        && times.phase1.is_none_or(positive)
        && times.evaluation.is_finite()
        && times.evaluation >= 0.0;
    if !usable {
        return Err(TrainError::Config(format!(
            "the measured step times are not usable: {times:?}"
        )));
    }
    let fraction_ok = |f: f64| (0.0..1.0).contains(&f);
    let phase1 = if times.phase1.is_some() {
        split.phase1
    } else {
        0.0
    };
    if !fraction_ok(phase1) || !fraction_ok(split.phase3) || phase1 + split.phase3 >= 1.0 {
        return Err(TrainError::Config(format!(
            "the budget split must leave phase 2 a share: phase 1 {phase1}, phase 3 {}",
            split.phase3
        )));
    }
    let training = budget - spent - times.evaluation;
    let steps = |share: f64, step: f64| (training.max(0.0) * share / step).floor() as u64;
    let phase2_steps = steps(1.0 - phase1 - split.phase3, times.phase2);
    let pretrain_steps = times.phase1.map_or(0, |t| steps(phase1, t));
    let phase3_steps = steps(split.phase3, times.phase3);
    if phase2_steps == 0 || (times.phase1.is_some() && pretrain_steps == 0) {
        return Err(TrainError::Config(format!(
            "a budget of {budget:.0} s is too short: the timing took {spent:.0} s, the evaluation \
             needs about {:.0} s and one step of each phase {:.1} s; give at least {:.0} s",
            times.evaluation,
            times.phase2 + times.phase1.unwrap_or(0.0),
            1.1 * (spent
                + times.evaluation
                + (times.phase2 / (1.0 - phase1 - split.phase3)).max(
                    times
                        .phase1
                        .map_or(0.0, |t| t / phase1.max(f64::MIN_POSITIVE))
                ))
        )));
    }
    let predicted_seconds = spent
        + times.evaluation
        + pretrain_steps as f64 * times.phase1.unwrap_or(0.0)
        + phase2_steps as f64 * times.phase2
        + phase3_steps as f64 * times.phase3;
    Ok(BudgetPlan {
        budget_seconds: budget,
        spent_seconds: spent,
        times: *times,
        split: BudgetSplit {
            phase1,
            phase3: split.phase3,
        },
        pretrain_steps,
        phase2_steps,
        phase3_steps,
        predicted_seconds,
    })
}

impl BudgetPlan {
    /// Writes the phase lengths into `cfg` (the original schedule, keeping its learning-rate
    /// drop fraction).
    pub fn apply(&self, cfg: &mut RunConfig) {
        if self.times.phase1.is_some() {
            cfg.pretrain.steps = self.pretrain_steps;
        }
        let lr_drop_fraction = match cfg.train.schedule {
            Schedule::Original {
                lr_drop_fraction, ..
            } => lr_drop_fraction,
            Schedule::Anomalib { .. } => 0.8,
        };
        cfg.train.schedule = Schedule::Original {
            phase2_steps: self.phase2_steps,
            phase3_steps: self.phase3_steps,
            lr_drop_fraction,
        };
    }
}

impl std::fmt::Display for BudgetPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = &self.times;
        let minutes = |s: f64| s / 60.0;
        writeln!(
            f,
            "time budget {:.1} min: timing took {:.0} s; evaluation about {:.0} s",
            minutes(self.budget_seconds),
            self.spent_seconds,
            t.evaluation
        )?;
        match t.phase1 {
            Some(step) => writeln!(
                f,
                "  phase 1: {:>6} steps × {step:.2} s = {:.1} min",
                self.pretrain_steps,
                minutes(self.pretrain_steps as f64 * step)
            )?,
            None => writeln!(f, "  phase 1: none (the discrete model is given)")?,
        }
        writeln!(
            f,
            "  phase 2: {:>6} steps × {:.2} s = {:.1} min",
            self.phase2_steps,
            t.phase2,
            minutes(self.phase2_steps as f64 * t.phase2)
        )?;
        if self.phase3_steps == 0 {
            writeln!(f, "  phase 3: none (too short a run for it to pay)")?;
        } else {
            writeln!(
                f,
                "  phase 3: {:>6} steps × {:.2} s = {:.1} min",
                self.phase3_steps,
                t.phase3,
                minutes(self.phase3_steps as f64 * t.phase3)
            )?;
        }
        write!(
            f,
            "  predicted total {:.1} min",
            minutes(self.predicted_seconds)
        )
    }
}

/// Seconds between two re-plannings of a budgeted run: long enough that the measured step time
/// averages over dozens of small steps, short enough to follow a host whose speed drifts.
pub const REPLAN_INTERVAL_SECONDS: f64 = 60.0;

/// The end of a budgeted run, kept while it trains so that the phase lengths follow the step
/// time actually measured rather than the few timed steps at the start (a host's speed drifts
/// by 10–30 % over minutes: other processes, turbo, thermal limits).
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    /// When the budget runs out.
    pub end: Instant,
    /// The plan made at the start: its step times and evaluation estimate.
    pub plan: BudgetPlan,
    /// Seconds of phase 2 between two re-plannings ([`REPLAN_INTERVAL_SECONDS`]).
    pub interval_seconds: f64,
}

impl Deadline {
    /// The deadline of `plan`, whose budget counts from `started`.
    pub fn new(started: Instant, plan: BudgetPlan) -> Self {
        Self {
            end: started + std::time::Duration::from_secs_f64(plan.budget_seconds),
            plan,
            interval_seconds: REPLAN_INTERVAL_SECONDS,
        }
    }

    /// Seconds left until the deadline (negative once it has passed).
    pub fn seconds_left(&self) -> f64 {
        let now = Instant::now();
        if now <= self.end {
            (self.end - now).as_secs_f64()
        } else {
            -(now - self.end).as_secs_f64()
        }
    }
}

/// New phase-2/3 lengths for a run `step` steps into phase 2 with `left` seconds of its budget
/// to go, whose phase-2 steps now take `observed` seconds each.
///
/// Every planned time (the phase-3 step, the evaluation at the end) is scaled by how much slower
/// or faster the phase-2 steps run than `times` said; the time left after the evaluation is
/// shared between the rest of phase 2 and phase 3 as the current lengths share it. Phase 2 keeps
/// at least one more step. The learning-rate drop at `lr_drop_fraction` of phase 2 must not
/// move across steps already taken: when it is still ahead, phase 2 is kept long enough that it
/// stays ahead; when it has been taken, `None` (the lengths can no longer change).
///
/// ```
/// use dsr_train::budget::{replan_steps, StepTimes};
///
/// let times = StepTimes { phase1: None, phase2: 1.0, phase3: 1.0, evaluation: 60.0 };
/// // 100 of 500 steps taken; the steps take 1.25 s, not 1.0 s; 500 s are left.
/// let (p2, p3) = replan_steps(500.0, 100, 500, 0, 1.25, &times, 0.8).unwrap();
/// assert_eq!((p2, p3), (100 + 340, 0)); // (500 − 60 · 1.25) / 1.25
/// ```
pub fn replan_steps(
    left: f64,
    step: u64,
    phase2_steps: u64,
    phase3_steps: u64,
    observed: f64,
    times: &StepTimes,
    lr_drop_fraction: f64,
) -> Option<(u64, u64)> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !positive(observed) || !positive(times.phase2) || !left.is_finite() || step >= phase2_steps {
        return None;
    }
    let drop = |n: u64| (n as f64 * lr_drop_fraction) as u64;
    // The drop was taken at an earlier step: moving it would change the steps already taken.
    if drop(phase2_steps) < step {
        return None;
    }
    let scale = observed / times.phase2;
    let phase3_step = times.phase3 * scale;
    let rest2 = (phase2_steps - step) as f64 * observed;
    let rest3 = phase3_steps as f64 * phase3_step;
    let available = (left - times.evaluation * scale).max(0.0);
    let share3 = rest3 / (rest2 + rest3);
    let mut new2 = step + ((available * (1.0 - share3) / observed).floor() as u64).max(1);
    // Keep the drop ahead of (or at) the next step.
    while drop(new2) < step {
        new2 += 1;
    }
    let new3 = if phase3_steps == 0 || !positive(phase3_step) {
        phase3_steps
    } else {
        (available * share3 / phase3_step).floor() as u64
    };
    Some((new2, new3))
}

/// Parses a duration: a number with the unit `s`, `m` or `h` (`90s`, `20m`, `1.5h`), or
/// several of them (`1h30m`). A bare number is minutes.
pub fn parse_duration(text: &str) -> Result<f64> {
    let bad = |why: &str| {
        TrainError::Config(format!(
            "'{text}' is not a duration ({why}): write e.g. 90s, 20m, 2h or 1h30m"
        ))
    };
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad("it is empty"));
    }
    // A year at most: a budget beyond it is a typing error, and would plan steps past any count.
    const MAX_SECONDS: f64 = 366.0 * 24.0 * 3600.0;
    let bounded = |seconds: f64| {
        if !(seconds.is_finite() && seconds > 0.0) {
            Err(bad("it must be positive"))
        } else if seconds > MAX_SECONDS {
            Err(bad("it must be at most a year, 8784h"))
        } else {
            Ok(seconds)
        }
    };
    if let Ok(minutes) = trimmed.parse::<f64>() {
        return bounded(minutes * 60.0);
    }
    let mut total = 0.0;
    let mut number = String::new();
    for c in trimmed.chars() {
        match c {
            '0'..='9' | '.' => number.push(c),
            's' | 'm' | 'h' => {
                let value: f64 = number
                    .parse()
                    .map_err(|_| bad("a unit must follow a number"))?;
                total += value
                    * match c {
                        's' => 1.0,
                        'm' => 60.0,
                        _ => 3600.0,
                    };
                number.clear();
            }
            _ => return Err(bad(&format!("unexpected '{c}'"))),
        }
    }
    if !number.is_empty() {
        return Err(bad("the last number has no unit"));
    }
    bounded(total)
}

/// Steps of each phase taken to measure its step time; the first one (warm-up) is not counted.
pub const TIMED_STEPS: u64 = 3;

/// Mean seconds of the steps after the first one of `step`, run `TIMED_STEPS` times.
fn time_steps(mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    step()?;
    let start = Instant::now();
    for _ in 1..TIMED_STEPS {
        step()?;
    }
    Ok(start.elapsed().as_secs_f64() / (TIMED_STEPS - 1) as f64)
}

/// A fixed pattern of `n` images of `side_h`×`side_w` in [0, 1]: step times do not depend on
/// the pixels, so the timing needs no data.
fn pattern(n: usize, h: usize, w: usize) -> Result<ImageBatch> {
    let data = (0..n * 3 * h * w)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    Ok(ImageBatch::new(n, 3, h, w, data)?)
}

/// A trainer of `cfg`'s model, size, batch and recipe on random weights and a fixed pattern,
/// for timing.
fn probe_trainer(cfg: &RunConfig, phase2_steps: u64, device: &Device) -> Result<Trainer> {
    let model = cfg.train.model;
    let [h, w] = cfg.train.image_size;
    let discrete = Checkpoint {
        path: "seeded random weights".into(),
        tensors: DsrModel::seeded_weights(&model, 0)?,
        config: Some(model),
        image_size: None,
        metadata: Default::default(),
    };
    let train_cfg = TrainConfig {
        schedule: Schedule::Original {
            phase2_steps,
            phase3_steps: TIMED_STEPS,
            lr_drop_fraction: 1.0,
        },
        ..cfg.train.clone()
    };
    Trainer::new(
        train_cfg,
        &discrete,
        pattern(cfg.train.batch_size, h, w)?,
        device,
    )
}

/// Measures the step times of `cfg`'s run on `device` with a few steps of phases 1 and 2 (on
/// a model of random weights and a fixed image pattern: the time of a step depends on the
/// shapes, not on the values), and estimates its evaluation: every map on the validation set
/// (with the feature memory's pass over the training images), plus the test set when `test` is set and it differs from the validation set. Phase 1 is
/// timed when the run pretrains its discrete model (`vq.pretrain` without `vq.weights`).
/// The phase-3 time is left at the phase-2 time ([`measure_phase3`] measures it).
pub fn measure_step_times(cfg: &RunConfig, device: &Device, test: bool) -> Result<StepTimes> {
    let [h, w] = cfg.train.image_size;
    let phase1 = if cfg.vq.weights.is_none() && cfg.vq.pretrain {
        let crop = cfg.pretrain.crop;
        let pre_cfg = PretrainConfig {
            model: cfg.train.model,
            steps: TIMED_STEPS,
            ..cfg.pretrain.clone()
        };
        let images = pattern(cfg.pretrain.batch_size.max(1), crop.max(h), crop.max(w))?;
        let mut pre = Pretrainer::new(pre_cfg, images, device)?;
        Some(time_steps(|| pre.train_step().map(|_| ()))?)
    } else {
        None
    };
    let mut trainer = probe_trainer(cfg, TIMED_STEPS, device)?;
    let phase2 = time_steps(|| trainer.train_step().map(|_| ()))?;

    let listing = cfg.data.listing(cfg.train.seed)?;
    let splits = split_validation(
        &listing,
        parse_val_split(&cfg.data.val_split, cfg.train.seed)?,
    )
    .map_err(|e| TrainError::Config(e.to_string()))?;
    let same = splits.val.len() == splits.test.len()
        && splits
            .val
            .iter()
            .zip(&splits.test)
            .all(|(a, b)| a.path == b.path);
    // Refined and detection maps on validation, the memory map too (and the training images
    // encoded for the memory) when the run keeps one.
    let memory_passes = if cfg.output.feature_memory {
        splits.val.len() + splits.train.len()
    } else {
        0
    };
    let forwards =
        2 * splits.val.len() + memory_passes + if test && !same { splits.test.len() } else { 0 };
    let eval_batch = cfg.data.eval_batch.max(1);
    let inference = trainer.inference_model()?;
    let images = pattern(eval_batch, h, w)?;
    let input = candle_core::Tensor::from_vec(images.data, (eval_batch, 3, h, w), device)?;
    let start = Instant::now();
    inference.infer(&input)?.pred_score.to_vec1::<f32>()?;
    let per_image = start.elapsed().as_secs_f64() / eval_batch as f64;
    // Decoding the images, the metrics and the report add about half the inference time.
    let evaluation = 1.5 * per_image * forwards as f64;
    Ok(StepTimes {
        phase1,
        phase2,
        phase3: phase2,
        evaluation,
    })
}

/// Measures the phase-3 step time of `cfg`'s run on `device` (as [`measure_step_times`]).
pub fn measure_phase3(cfg: &RunConfig, device: &Device) -> Result<f64> {
    let mut trainer = probe_trainer(cfg, 0, device)?;
    time_steps(|| trainer.train_step().map(|_| ()))
}

/// Plans `cfg`'s run to take `budget` seconds from `started` (the start of the command):
/// measures the step times, picks the split ([`BudgetSplit::for_budget`]; phase 3 is timed
/// only when it gets a share) and fits the steps ([`plan_budget`]).
pub fn plan_run(
    cfg: &RunConfig,
    budget: f64,
    started: Instant,
    device: &Device,
    test: bool,
) -> Result<BudgetPlan> {
    let mut times = measure_step_times(cfg, device, test)?;
    let left = budget - started.elapsed().as_secs_f64() - times.evaluation;
    let split = BudgetSplit::for_budget(left, &times);
    if split.phase3 > 0.0 {
        times.phase3 = measure_phase3(cfg, device)?;
    }
    plan_budget(budget, started.elapsed().as_secs_f64(), &times, &split)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times() -> StepTimes {
        StepTimes {
            phase1: Some(0.5),
            phase2: 3.0,
            phase3: 2.0,
            evaluation: 40.0,
        }
    }

    #[test]
    fn the_plan_fills_each_share_with_whole_steps() {
        let split = BudgetSplit {
            phase1: 0.2,
            phase3: 0.1,
        };
        let plan = plan_budget(900.0, 60.0, &times(), &split).unwrap();
        // 900 − 60 − 40 = 800 s of training.
        assert_eq!(plan.pretrain_steps, 320); // 160 s / 0.5
        assert_eq!(plan.phase2_steps, 186); // 560 s / 3 = 186.7
        assert_eq!(plan.phase3_steps, 40); // 80 s / 2
        let predicted = 60.0 + 40.0 + 320.0 * 0.5 + 186.0 * 3.0 + 40.0 * 2.0;
        assert!((plan.predicted_seconds - predicted).abs() < 1e-9);
        assert!(plan.predicted_seconds <= 900.0 && plan.predicted_seconds > 900.0 - 3.0 - 2.0);
        let mut cfg = RunConfig::default();
        plan.apply(&mut cfg);
        assert_eq!(cfg.pretrain.steps, 320);
        assert_eq!(
            cfg.train.schedule,
            Schedule::Original {
                phase2_steps: 186,
                phase3_steps: 40,
                lr_drop_fraction: 0.8
            }
        );
    }

    #[test]
    fn without_phase_1_its_share_goes_to_phase_2() {
        let t = StepTimes {
            phase1: None,
            ..times()
        };
        let split = BudgetSplit {
            phase1: 0.5,
            phase3: 0.0,
        };
        let plan = plan_budget(640.0, 0.0, &t, &split).unwrap();
        assert_eq!(plan.pretrain_steps, 0);
        assert_eq!(plan.phase2_steps, 200); // (640 − 40) / 3
        assert_eq!(plan.phase3_steps, 0);
        assert_eq!(plan.split.phase1, 0.0);
        let mut cfg = RunConfig::default();
        let steps_before = cfg.pretrain.steps;
        plan.apply(&mut cfg);
        assert_eq!(cfg.pretrain.steps, steps_before);
    }

    #[test]
    fn a_budget_without_room_for_a_step_is_refused_with_the_time_needed() {
        let split = BudgetSplit {
            phase1: 0.25,
            phase3: 0.0,
        };
        let err = plan_budget(50.0, 20.0, &times(), &split)
            .unwrap_err()
            .to_string();
        assert!(err.contains("too short"), "{err}");
        assert!(err.contains("give at least"), "{err}");
        for bad in [0.0, -5.0, f64::NAN] {
            assert!(plan_budget(bad, 0.0, &times(), &split).is_err());
        }
        let whole = BudgetSplit {
            phase1: 0.5,
            phase3: 0.5,
        };
        assert!(plan_budget(900.0, 0.0, &times(), &whole).is_err());
    }

    #[test]
    fn the_default_split_plans_phase_3_only_for_long_phase_2() {
        let t = times();
        let short = BudgetSplit::for_budget(900.0, &t);
        assert_eq!(short.phase3, 0.0);
        assert_eq!(short.phase1, 0.25);
        // 3 s steps: 2000 phase-2 steps need 6000 s of the 75 % left after phase 1.
        let long = BudgetSplit::for_budget(8000.0, &t);
        assert!((long.phase3 - 0.25).abs() < 1e-12, "{long:?}");
        let given = BudgetSplit::for_budget(900.0, &StepTimes { phase1: None, ..t });
        assert_eq!(given.phase1, 0.0);
    }

    #[test]
    fn replanning_follows_the_measured_step_time() {
        let t = StepTimes {
            phase1: None,
            phase2: 1.0,
            phase3: 0.5,
            evaluation: 100.0,
        };
        // As planned: 200 of 600 steps taken, 400 + 200 · 0.5 + 100 = 600 s of work left.
        assert_eq!(
            replan_steps(600.5, 200, 600, 200, 1.0, &t, 0.8),
            Some((600, 200))
        );
        // Steps 25 % slower: every time scales (evaluation 125 s, phase-3 steps 0.625 s) and
        // the 485 s left after the evaluation are shared 4:1 as before.
        let (p2, p3) = replan_steps(610.0, 200, 600, 200, 1.25, &t, 0.8).unwrap();
        assert_eq!((p2, p3), (200 + 310, 155)); // 388 / 1.25 = 310.4, 97 / 0.625 = 155.2
        let predicted = (p2 - 200) as f64 * 1.25 + p3 as f64 * 0.625 + 125.0;
        assert!(predicted <= 610.0 && predicted > 610.0 - 2.0, "{predicted}");
        // Faster steps lengthen the run: (600 − 50) / 0.5 steps.
        let (p2, _) = replan_steps(600.0, 200, 600, 0, 0.5, &t, 0.8).unwrap();
        assert_eq!(p2, 200 + 1100);
        // Out of time: phase 2 ends as soon as the learning-rate drop stays at or after the
        // steps taken (0.8 · 250 = 200); no phase 3.
        let (p2, p3) = replan_steps(-5.0, 200, 600, 200, 1.0, &t, 0.8).unwrap();
        assert_eq!((p2, p3), (250, 0));
        // Once the drop has been taken the lengths stay.
        assert_eq!(replan_steps(600.0, 500, 600, 0, 1.25, &t, 0.8), None);
        // Nothing to re-plan after phase 2, or from an unusable time.
        assert_eq!(replan_steps(600.0, 600, 600, 10, 1.0, &t, 0.8), None);
        assert_eq!(replan_steps(600.0, 10, 600, 0, f64::NAN, &t, 0.8), None);
        assert_eq!(replan_steps(600.0, 10, 600, 0, 0.0, &t, 0.8), None);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s").unwrap(), 90.0);
        assert_eq!(parse_duration("20m").unwrap(), 1200.0);
        assert_eq!(parse_duration("2h").unwrap(), 7200.0);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400.0);
        assert_eq!(parse_duration("1.5h").unwrap(), 5400.0);
        assert_eq!(parse_duration("15").unwrap(), 900.0);
        assert_eq!(parse_duration("8784h").unwrap(), 8784.0 * 3600.0);
        for bad in [
            "",
            "m",
            "20x",
            "20m5",
            "-3m",
            "0m",
            "abc",
            "99999999999999999999h",
            "8785h",
            "1e300",
        ] {
            let err = parse_duration(bad).unwrap_err().to_string();
            assert!(err.contains("not a duration"), "{bad}: {err}");
        }
    }
}
