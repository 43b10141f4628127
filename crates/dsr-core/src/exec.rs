//! How a model computes: the execution policy, a value fixed when the model is built.
//!
//! An [`Execution`] says which algorithm computes the 3×3 convolutions and whether training
//! recomputes activations in the backward; a model built for inference from loaded weights
//! ([`crate::Checkpoint::into_inference_model`]) also keeps its layers' transformed filters
//! between calls. Each model carries its own: two models in one process may differ, and nothing
//! here is process-wide. A model applies its policy to the work of each of its calls (on the
//! calling thread); [`Execution::run`] does the same for work outside a model (a single network
//! or convolution).

use std::cell::Cell;

/// How the 3×3 convolutions with stride 1, padding 1 and at least 32 input channels are computed
/// on CPU f32 inputs of at least 16×16 pixels whose sides are multiples of 4 (in training: their
/// forward, input gradient and weight gradient).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvAlgorithm {
    /// Winograd's F(4×4, 3×3): 4× fewer multiplications, a larger rounding error that stays
    /// within the reference tolerances (docs/exactness.md).
    #[default]
    Winograd,
    /// Directly: each output the same dot product, summed in the same order, as PyTorch's CPU
    /// convolution.
    Direct,
}

/// The execution policy of a model: fixed when it is built (or replaced as a whole with
/// `with_execution`), never read from process-wide settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Execution {
    /// The algorithm of the 3×3 convolutions.
    pub conv: ConvAlgorithm,
    /// Trades time for memory in training: every conv → instance norm → ReLU block (the U-Nets,
    /// the subspace restriction modules, the reconstruction network) keeps only its input for
    /// the backward and computes its convolution again there, instead of keeping the
    /// convolution's output. Outputs and gradients are the same bits either way (CPU f32 only).
    pub recompute: bool,
}

impl Execution {
    /// The default policy with `conv` as the convolution algorithm.
    pub fn with_conv(conv: ConvAlgorithm) -> Self {
        Self {
            conv,
            ..Self::default()
        }
    }

    /// Runs `f` on this thread under this policy (for work outside a model: a single network,
    /// a convolution); what `f` builds keeps the policy in its backward. Weights' transformed
    /// copies are never kept here.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        within(
            Policy {
                exec: *self,
                keep_filters: false,
            },
            f,
        )
    }
}

/// The policy in force for the work of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Policy {
    /// The model's execution policy.
    pub(crate) exec: Execution,
    /// Layers keep the copies of their weights that the kernels take (the transformed filters
    /// of Winograd's algorithm) between calls: only for models built from loaded weights that
    /// nothing changes.
    pub(crate) keep_filters: bool,
}

impl Policy {
    /// Whether 3×3 convolutions that suit it run by Winograd's algorithm.
    pub(crate) fn winograd(&self) -> bool {
        self.exec.conv == ConvAlgorithm::Winograd
    }
}

thread_local! {
    /// The policy of the call running on this thread (the default outside any).
    static CURRENT: Cell<Policy> = const {
        Cell::new(Policy {
            exec: Execution {
                conv: ConvAlgorithm::Winograd,
                recompute: false,
            },
            keep_filters: false,
        })
    };
}

/// The policy of the call running on this thread.
pub(crate) fn current() -> Policy {
    CURRENT.with(Cell::get)
}

/// Puts `policy` in force on this thread until the returned guard is dropped, which restores
/// the previous one (also when the work in between panics).
pub(crate) fn enter(policy: Policy) -> Entered {
    Entered(CURRENT.with(|c| c.replace(policy)))
}

/// Restores the policy that was in force before [`enter`] when dropped.
#[must_use = "the policy is in force only while the guard lives"]
pub(crate) struct Entered(Policy);

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.0));
    }
}

/// Runs `f` under `policy` on this thread, then restores the previous one.
pub(crate) fn within<R>(policy: Policy, f: impl FnOnce() -> R) -> R {
    let _entered = enter(policy);
    f()
}
