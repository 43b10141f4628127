//! How much memory the machine can give this process, and estimates of what the network needs,
//! so that a size or count the machine cannot hold is refused with a message saying what is
//! needed, instead of ending in an allocation failure (an abort).
//!
//! The available memory is the smallest of: the kernel's `MemAvailable` (`/proc/meminfo`), the
//! room left under a cgroup (v2) memory limit, and the room left under the address-space limit
//! (`ulimit -v`). Where none can be read, nothing is refused.

use crate::DsrConfig;

/// Bytes the machine can still give this process, when it can be told.
pub fn available_bytes() -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut take = |v: u64| best = Some(best.map_or(v, |b| b.min(v)));
    if let Some(v) = meminfo_available() {
        take(v);
    }
    if let Some(v) = cgroup_room() {
        take(v);
    }
    if let Some(v) = address_space_room() {
        take(v);
    }
    best
}

fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn cgroup_room() -> Option<u64> {
    let max = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    let max: u64 = max.trim().parse().ok()?; // "max" (no limit) does not parse
    let current: u64 = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(max.saturating_sub(current))
}

fn address_space_room() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0
            || limit.rlim_cur == libc::RLIM_INFINITY
        {
            return None;
        }
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmSize:"))?;
        let used: u64 = line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
        // rlim_t is u64 here but not on every platform.
        #[allow(clippy::unnecessary_cast)]
        let cur = limit.rlim_cur as u64;
        Some(cur.saturating_sub(used))
    }
    #[cfg(not(unix))]
    None
}

/// `bytes` as GB with one decimal (or MB below 1 GB), for messages.
pub fn human_bytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", (bytes as f64 / (1u64 << 20) as f64).ceil())
    }
}

/// Checks that `needed` bytes fit in the memory available; the error message says what needs
/// how much, how much there is, and `advice` (what to change).
pub fn ensure_fits(needed: u64, what: &str, advice: &str) -> Result<(), String> {
    match available_bytes() {
        Some(available) if needed > available => Err(format!(
            "{what} needs about {}, more than the {} of memory available: {advice}",
            human_bytes(needed),
            human_bytes(available)
        )),
        _ => Ok(()),
    }
}

/// Measured peak memory of the reference model (docs/performance.md): about 170 MB per
/// 256×256 image at inference (1.0 GB at batch 1, 2.1 GB at batch 8), about 0.8 GB per 256×256
/// image in a phase-2 step (6.5 GB at batch 8). Per pixel, rounded up, for the reference widths.
const INFERENCE_BYTES_PER_PIXEL: u64 = 2_700;
const TRAINING_BYTES_PER_PIXEL: u64 = 13_000;

/// How the activations of `cfg` compare with the reference model's (the widest layers set the
/// peak): at least 1/16 of it.
fn width_scale(cfg: &DsrConfig) -> f64 {
    let reference = DsrConfig::default();
    let ratio = |a: usize, b: usize| a as f64 / b as f64;
    ratio(cfg.num_hiddens, reference.num_hiddens)
        .max(ratio(cfg.embedding_dim, reference.embedding_dim))
        .max(ratio(
            cfg.anomaly_detection_module_base_width,
            reference.anomaly_detection_module_base_width,
        ))
        .max(ratio(
            cfg.upsampling_module_base_width,
            reference.upsampling_module_base_width,
        ))
        .max(1.0 / 16.0)
}

fn estimate(cfg: &DsrConfig, images: usize, size: [usize; 2], per_pixel: u64) -> u64 {
    let pixels = size[0] as f64 * size[1] as f64 * images as f64;
    let bytes = pixels * per_pixel as f64 * width_scale(cfg);
    if bytes >= u64::MAX as f64 {
        u64::MAX
    } else {
        bytes as u64
    }
}

/// An estimate of the peak memory of inference on `images` images of `size` (`[H, W]`).
pub fn inference_bytes(cfg: &DsrConfig, images: usize, size: [usize; 2]) -> u64 {
    estimate(cfg, images, size, INFERENCE_BYTES_PER_PIXEL)
}

/// An estimate of the peak memory of a training step on `images` images of `size`.
pub fn training_bytes(cfg: &DsrConfig, images: usize, size: [usize; 2]) -> u64 {
    estimate(cfg, images, size, TRAINING_BYTES_PER_PIXEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_the_measured_figures_and_saturate() {
        let reference = DsrConfig::default();
        let one = inference_bytes(&reference, 1, [256, 256]);
        assert!((150 << 20..200 << 20).contains(&one), "{one}");
        let step = training_bytes(&reference, 8, [256, 256]);
        assert!((6 << 30..7 << 30).contains(&step), "{step}");
        assert!(inference_bytes(&DsrConfig::tiny(), 1, [256, 256]) < one);
        assert_eq!(
            training_bytes(&reference, usize::MAX, [usize::MAX, usize::MAX]),
            u64::MAX
        );
        assert!(available_bytes().is_some_and(|b| b > 0));
        let e = ensure_fits(u64::MAX, "a test", "do less").unwrap_err();
        assert!(
            e.contains("a test needs about") && e.contains("do less"),
            "{e}"
        );
    }
}
