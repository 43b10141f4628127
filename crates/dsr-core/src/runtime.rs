//! Process-wide settings for tensor work on the CPU.

use std::sync::atomic::{AtomicBool, Ordering};

/// See [`set_activation_recompute`].
static RECOMPUTE: AtomicBool = AtomicBool::new(false);

/// Trades time for memory in training: when on, every conv → instance norm → ReLU block (the
/// U-Nets, the subspace restriction modules, the reconstruction network) keeps only its input for
/// the backward and computes its convolution again there, instead of keeping the convolution's
/// output (one full-size activation per block). Outputs and gradients are the same bits either
/// way; a step costs one more convolution forward per block (phase 2 at 256×256, batch 8: 4.9
/// instead of 6.5 GB, 7 % slower). CPU f32 only; off by default; applies to graphs built after
/// the call.
pub fn set_activation_recompute(on: bool) {
    RECOMPUTE.store(on, Ordering::Relaxed);
}

/// Whether [`set_activation_recompute`] is on.
pub fn activation_recompute() -> bool {
    RECOMPUTE.load(Ordering::Relaxed)
}

/// See [`set_winograd`].
static WINOGRAD: AtomicBool = AtomicBool::new(true);

/// Chooses how 3×3 convolutions with stride 1, padding 1 and at least 32 input channels are
/// computed on CPU f32 inputs of at least 16×16 pixels whose sides are multiples of 4: by
/// Winograd's F(4×4, 3×3) (on, the default: 4× fewer multiplications, a larger rounding error
/// that stays within the reference tolerances) or directly (off: each output the same dot
/// product, summed in the same order, as PyTorch's CPU convolution). In training it covers the
/// forward, the input gradient and the weight gradient of such layers.
/// Applies to convolutions started after the call.
pub fn set_winograd(on: bool) {
    WINOGRAD.store(on, Ordering::Relaxed);
}

/// Whether [`set_winograd`] is on.
pub fn winograd() -> bool {
    WINOGRAD.load(Ordering::Relaxed)
}

/// See [`set_weight_cache`].
static WEIGHT_CACHE: AtomicBool = AtomicBool::new(false);

/// Lets convolution layers keep the copies of their weights that the kernels take (the
/// transformed filters of Winograd's algorithm: 4× the weight, 0.53 GB for the reference model)
/// instead of making them again at every call, which took about 13 % of an inference forward
/// at batch 1 (1.23 / 1.28 s cached against 1.40 / 1.47 s, alternating). Only for weights that
/// no longer change: a layer keeps the copy it made first, so a model whose weights are then
/// changed (a training step, `Var::set`, a model sharing storage with trained variables) would
/// go on computing with the old ones. Off by default; `dsr predict` and `dsr test`, which only run
/// models loaded from files, turn it on.
pub fn set_weight_cache(on: bool) {
    WEIGHT_CACHE.store(on, Ordering::Relaxed);
}

/// Whether [`set_weight_cache`] is on.
pub fn weight_cache() -> bool {
    WEIGHT_CACHE.load(Ordering::Relaxed)
}

/// How [`tune_allocator`] sets up glibc's allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapUse {
    /// Every freed buffer stays in the heap and serves the next ones of its size: no page
    /// faults once the first forward or step has run, at a higher peak (fragments of the heap
    /// stay mapped). `dsr predict` and `dsr test` use it, and `dsr train` from phase 3 on
    /// (256×256, batch 8: a phase-3 step 23.3 → 20.5 s, peak 5.60 → 5.78 GB). Phase 2 stays
    /// [`HeapUse::Lean`]: there it raised the peak from 6.5 to 7.25 GB, above PyTorch's 6.9.
    Reuse,
    /// Buffers up to 32 MB stay in the heap; larger ones are mapped on their own and returned
    /// when freed (each use faults its pages in again): the lower peak. `dsr train` (up to
    /// phase 3), `dsr pretrain` and `dsr demo` use it.
    Lean,
}

/// Tunes glibc's allocator for tensor work: first thing in `main`, and again between stages
/// of a run (from [`HeapUse::Lean`] to [`HeapUse::Reuse`] when training reaches phase 3), never
/// while tensor work runs on other threads. Tensor operations allocate and free large buffers
/// at a high rate; with glibc's defaults each buffer above 128 KB to 32 MB (the threshold
/// adapts) is a fresh mapping whose pages fault in on first touch and are unmapped on free,
/// which took about a fifth of a training step's wall time. Does nothing on other platforms.
pub fn tune_allocator(heap: HeapUse) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters, under the main arena's lock; callers
    // run it before other threads start or while they are idle.
    unsafe {
        match heap {
            HeapUse::Reuse => libc::mallopt(libc::M_MMAP_MAX, 0),
            HeapUse::Lean => libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20),
        };
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = heap;
}
