//! Adam with inspectable state, so that optimizer moments can be checkpointed and restored
//! (candle's `AdamW` keeps them private). With the same hyper-parameters it performs PyTorch's
//! `torch.optim.Adam` update (no weight decay).

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Adam hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl AdamConfig {
    /// Checks every value against its domain: `lr` > 0, `beta1` and `beta2` in [0, 1), `eps` > 0,
    /// all finite. `section` names the configuration section in the message (e.g. `train.adam`).
    pub fn validate(&self, section: &str) -> std::result::Result<(), String> {
        let finite = |name: &str, v: f64| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{section}.{name} is {v}, not a finite number"))
            }
        };
        finite("lr", self.lr)?;
        finite("beta1", self.beta1)?;
        finite("beta2", self.beta2)?;
        finite("eps", self.eps)?;
        if self.lr <= 0.0 {
            return Err(format!(
                "{section}.lr must be greater than 0 (the reference uses 2e-4), got {}",
                self.lr
            ));
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!(
                    "{section}.{name} must lie in [0, 1) (the reference uses 0.9 and 0.999), got {v}"
                ));
            }
        }
        if self.eps <= 0.0 {
            return Err(format!(
                "{section}.eps must be greater than 0 (the reference uses 1e-8), got {}",
                self.eps
            ));
        }
        Ok(())
    }
}

/// One parameter with its moments.
#[derive(Debug)]
struct Slot {
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// Adam over named parameters.
#[derive(Debug)]
pub struct Adam {
    cfg: AdamConfig,
    slots: BTreeMap<String, Slot>,
    steps: u64,
}

impl Adam {
    /// An optimizer over `params` (name → variable) with zero moments.
    pub fn new(
        params: impl IntoIterator<Item = (String, Var)>,
        cfg: AdamConfig,
    ) -> candle_core::Result<Self> {
        let mut slots = BTreeMap::new();
        for (name, var) in params {
            let m = var.as_tensor().zeros_like()?;
            let v = var.as_tensor().zeros_like()?;
            slots.insert(name, Slot { var, m, v });
        }
        Ok(Self {
            cfg,
            slots,
            steps: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    /// Changes the learning rate (schedules).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The names of the optimised parameters.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.slots.keys()
    }

    /// One update from the gradients in `grads`; parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = self.cfg.lr / bias1;
        for slot in self.slots.values_mut() {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            // Detached, so that the moments do not keep this step's graph alive (the
            // gradients are themselves results of tracked operations).
            slot.m = ((&slot.m * b1)? + (g * (1.0 - b1))?)?.detach();
            slot.v = ((&slot.v * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let denom = ((slot.v.sqrt()? / bias2_sqrt)? + self.cfg.eps)?;
            let update = ((&slot.m / denom)? * step_size)?;
            slot.var.set(&(slot.var.as_tensor().detach() - update)?)?;
        }
        Ok(())
    }

    /// The name of the first parameter (in name order) holding a NaN or an infinite value, if
    /// any: `0·x` is zero for every finite `x` and NaN otherwise, so one sum tells.
    pub fn first_non_finite(&self) -> candle_core::Result<Option<&str>> {
        for (name, slot) in &self.slots {
            let t = slot.var.as_tensor();
            let probe = t
                .affine(0.0, 0.0)?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            if probe != 0.0 {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Back-propagates `loss` and steps.
    pub fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The moments as named tensors (`<prefix>m.<name>`, `<prefix>v.<name>`) for a checkpoint.
    pub fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for (name, slot) in &self.slots {
            out.push((format!("{prefix}m.{name}"), slot.m.clone()));
            out.push((format!("{prefix}v.{name}"), slot.v.clone()));
        }
        out
    }

    /// Restores moments written by [`Adam::state_tensors`] and the step count.
    pub fn load_state(
        &mut self,
        prefix: &str,
        tensors: &std::collections::HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        for (name, slot) in self.slots.iter_mut() {
            for (kind, target) in [("m", &mut slot.m), ("v", &mut slot.v)] {
                let key = format!("{prefix}{kind}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| format!("missing optimizer state '{key}'"))?;
                if t.dims() != target.dims() {
                    return Err(format!(
                        "optimizer state '{key}' has shape {:?}, expected {:?}",
                        t.dims(),
                        target.dims()
                    ));
                }
                *target = t.to_device(target.device()).map_err(|e| e.to_string())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}
