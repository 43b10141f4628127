//! Element-wise loops compiled for the CPU at hand.

/// Runs `body` compiled for AVX-512 when the CPU has it, otherwise as built (the crate targets
/// the baseline x86-64, whose vectors are 4 floats wide). For loops over slices that the compiler
/// vectorizes by itself: the same operations on each element, so the same results either way.
pub(crate) fn wide<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        // SAFETY: the CPU supports AVX-512F, checked just above.
        return unsafe { avx512(body) };
    }
    body()
}
