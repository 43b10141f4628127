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

/// The arithmetic of the convolution products at inference.
///
/// Training (tracked tensors), the 1×1 convolutions, the transposed convolutions and layers with
/// few pixels for many channels (the NCHW patch-matrix product) always compute in f32; so do
/// the normalisations, transforms and every other operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 operands and sums: the reference arithmetic.
    #[default]
    F32,
    /// bf16 operands (8 significant bits) multiplied and summed in f32 by AVX512-BF16's
    /// `vdpbf16ps`: the products of Winograd's algorithm and of the channels-last patch
    /// matrices, with the weights (or transformed filters) rounded to bf16 once. Only on CPUs
    /// with AVX512-BF16 ([`Precision::supported`]). On a trained checkpoint the anomaly maps
    /// moved by 7e-3 on average (0.27 at most) and the metrics by less than 0.004; whether it
    /// is faster depends on the CPU's bf16 throughput (docs/performance.md, "BF16").
    Bf16,
}

impl Precision {
    /// Whether this machine can compute at this precision (bf16 needs AVX512-BF16).
    pub fn supported(self) -> bool {
        match self {
            Precision::F32 => true,
            Precision::Bf16 => crate::kernels::bf16::available(),
        }
    }

    /// Fails with a message a user can act on unless [`Precision::supported`].
    pub fn check_supported(self) -> crate::Result<()> {
        if self.supported() {
            return Ok(());
        }
        Err(crate::Error::Unsupported(
            "bf16 precision needs a CPU with AVX512-BF16 (avx512_bf16 in /proc/cpuinfo), which              this one lacks; use f32 precision (the default)"
                .into(),
        ))
    }
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
    /// The arithmetic of the convolution products at inference.
    pub precision: Precision,
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

    /// Whether untracked convolutions compute their products in bf16: asked for and possible
    /// on this CPU (elsewhere they compute in f32; models built for inference refuse bf16 there,
    /// see [`Precision::check_supported`]).
    pub(crate) fn bf16(&self) -> bool {
        self.exec.precision == Precision::Bf16 && crate::kernels::bf16::available()
    }
}

thread_local! {
    /// The policy of the call running on this thread (the default outside any).
    static CURRENT: Cell<Policy> = const {
        Cell::new(Policy {
            exec: Execution {
                conv: ConvAlgorithm::Winograd,
                recompute: false,
                precision: Precision::F32,
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
