//! The allocator tuning of the `dsr` binary: process-wide, so it belongs to the program, not to
//! the libraries.

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
