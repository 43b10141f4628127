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
    let r = (k.len() / 2) as i64;
    let mut out = vec![0f32; maps.len()];
    let mut tmp = vec![0f32; h * w];
    for (src, dst) in maps.chunks(h * w).zip(out.chunks_mut(h * w)) {
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0;
                for (j, kv) in k.iter().enumerate() {
                    let xx = (x as i64 + j as i64 - r).clamp(0, w as i64 - 1) as usize;
                    acc += kv * src[y * w + xx];
                }
                tmp[y * w + x] = acc;
            }
        }
        for y in 0..h {
            for x in 0..w {
                let mut acc = 0.0;
                for (j, kv) in k.iter().enumerate() {
                    let yy = (y as i64 + j as i64 - r).clamp(0, h as i64 - 1) as usize;
                    acc += kv * tmp[yy * w + x];
                }
                dst[y * w + x] = acc;
            }
        }
    }
    out
}
