//! Gaussian smoothing of anomaly maps, shared by the map studies (`map_study`,
//! `feature_study`).

/// A normalised 1-D Gaussian of standard deviation `sigma`, truncated at 3 sigma.
pub fn gaussian(sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil() as i64;
    let k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f32 = k.iter().sum();
    k.into_iter().map(|v| v / s).collect()
}

/// Blurs every `h`×`w` map of `maps` with a separable Gaussian (edges replicated).
pub fn blur(maps: &[f32], h: usize, w: usize, sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return maps.to_vec();
    }
    let k = gaussian(sigma);
    let mut out = vec![0f32; maps.len()];
    let mut tmp = vec![0f32; h * w];
    for (src, dst) in maps.chunks(h * w).zip(out.chunks_mut(h * w)) {
        // Rows (w pixels one apart, h of them w apart), then columns.
        smooth_lines(src, &mut tmp, &k, w, 1, h, w);
        smooth_lines(&tmp, dst, &k, h, w, w, 1);
    }
    out
}

/// Convolves `lines` lines of `len` samples (`step` apart; line `i` starts at `i * stride`)
/// with the odd kernel `k`, repeating the edge samples.
fn smooth_lines(
    src: &[f32],
    dst: &mut [f32],
    k: &[f32],
    len: usize,
    step: usize,
    lines: usize,
    stride: usize,
) {
    let r = (k.len() / 2) as i64;
    for line in 0..lines {
        let at = |i: usize| line * stride + i * step;
        for i in 0..len {
            let mut acc = 0.0;
            for (j, kv) in k.iter().enumerate() {
                let ii = (i as i64 + j as i64 - r).clamp(0, len as i64 - 1) as usize;
                acc += kv * src[at(ii)];
            }
            dst[at(i)] = acc;
        }
    }
}
