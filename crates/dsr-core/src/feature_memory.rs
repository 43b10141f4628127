//! A memory of the discrete model's features on the training images, and the anomaly maps it
//! gives: the distance from each pixel's features to the nearest remembered feature, alone or
//! combined with the detection module's mask.
//!
//! DSR's own maps need the long training schedule of the paper to localise small defects; on a
//! CPU budget of minutes the detection module's mask lights up whole seams and misses small
//! spots. The discrete model's encoder features are already computed by every forward, and a
//! pixel whose features lie far from every feature of the defect-free training images is
//! unusual whatever the detection module learnt; standardising both maps on the validation
//! set's defect-free images and adding them localises better than either (docs/accuracy.md,
//! "The feature memory"). The memory is an addition of this project: anomalib and the original
//! code have none, and a model without one behaves exactly as theirs.
//!
//! The features of a pixel at H/4 are the fine encoder output and the coarse encoder output
//! (nearest-upsampled from H/8), concatenated and averaged over 3×3 neighbourhoods (edges
//! replicated). Stored in a checkpoint under [`MEMORY_ROWS_KEY`] (`N×C`), with the blend under
//! the metadata key [`META_FEATURE_MEMORY`].
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use dsr_core::feature_memory::FeatureMemory;
//!
//! # fn main() -> dsr_core::Result<()> {
//! // Two remembered features in two dimensions.
//! let rows = Tensor::new(&[[0f32, 0.], [3., 4.]], &Device::Cpu)?;
//! let memory = FeatureMemory::new(rows)?;
//! let query = Tensor::new(&[[0f32, 1.], [3., 4.]], &Device::Cpu)?;
//! assert_eq!(memory.nearest_distances(&query)?, vec![1.0, 0.0]);
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::discrete::Encoded;
use crate::{Error, Result};

/// The checkpoint key of the remembered features, `N×C` (not a PyTorch key: anomalib and the
/// original code have no such tensor; `dsr convert` keeps it as it is).
pub const MEMORY_ROWS_KEY: &str = "dsr.feature_memory.rows";
/// The metadata key of the [`Blend`] (JSON).
pub const META_FEATURE_MEMORY: &str = "dsr.feature_memory";
/// The most values (rows × channels) a memory keeps by default: 2^20, i.e. 16 384 rows of the
/// small preset's 64 channels (4 MiB) and 4 096 of the reference widths' 256. The distance
/// product costs `2 · rows · (channels + 1)` operations per feature pixel, so the bound keeps
/// inference cost the same whatever the widths ([`default_capacity`]).
pub const DEFAULT_CAPACITY_VALUES: usize = 1 << 20;

/// The default number of rows of a memory of `channels`-channel features (at least 1).
pub fn default_capacity(channels: usize) -> usize {
    (DEFAULT_CAPACITY_VALUES / channels.max(1)).max(1)
}
/// Query rows per distance product (bounds the `queries × rows` matrix to 64 MiB with 16 384
/// rows).
const QUERY_CHUNK: usize = 1024;

/// How the combined map is made: `weight · (d − μ_d)/σ_d + (m − μ_m)/σ_m`, where `d` is the
/// memory's distance map and `m` the detection module's mask, both standardised with the mean
/// and standard deviation of their values on the defect-free validation images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Blend {
    /// The weight of the standardised distance map.
    pub weight: f32,
    /// Mean of the detection mask on defect-free validation images.
    pub detection_mean: f32,
    /// Its standard deviation (positive).
    pub detection_std: f32,
    /// Mean of the distance map on defect-free validation images.
    pub memory_mean: f32,
    /// Its standard deviation (positive).
    pub memory_std: f32,
}

impl Blend {
    /// Checks that every value is finite and both deviations positive; `what` names the source
    /// in the message.
    pub fn validate(&self, what: &str) -> Result<()> {
        let values = [
            self.weight,
            self.detection_mean,
            self.detection_std,
            self.memory_mean,
            self.memory_std,
        ];
        if values.iter().any(|v| !v.is_finite()) {
            return Err(Error::Config(format!(
                "{what}: the feature-memory blend holds a non-finite value ({self:?})"
            )));
        }
        if self.detection_std <= 0.0 || self.memory_std <= 0.0 || self.weight < 0.0 {
            return Err(Error::Config(format!(
                "{what}: the feature-memory blend needs positive deviations and a weight of at least 0 ({self:?})"
            )));
        }
        Ok(())
    }
}

/// Remembered features of defect-free images, and the maps they give.
#[derive(Debug, Clone)]
pub struct FeatureMemory {
    rows: Tensor,
    /// `[−2·rows, ‖rows‖²]ᵀ`, `(C+1)×N`: one product with `[q, 1]` gives `‖r‖² − 2 q·r` for
    /// every row at once, so the nearest row is found with one pass over the product.
    augmented_t: Tensor,
    blend: Option<Blend>,
}

impl FeatureMemory {
    /// A memory of the rows `N×C` (f32; `N ≥ 1`).
    pub fn new(rows: Tensor) -> Result<Self> {
        let dims = rows.dims();
        if dims.len() != 2 || dims[0] == 0 || dims[1] == 0 {
            return Err(Error::Input(format!(
                "a feature memory needs N×C rows with N, C ≥ 1, got shape {dims:?}"
            )));
        }
        let rows = rows.to_dtype(DType::F32)?.contiguous()?;
        let norms = rows.sqr()?.sum_keepdim(1)?;
        let augmented_t = Tensor::cat(&[&rows.affine(-2.0, 0.0)?, &norms], 1)?
            .t()?
            .contiguous()?;
        Ok(Self {
            rows,
            augmented_t,
            blend: None,
        })
    }

    /// A memory of the pixel features `B×C×h×w` of several batches ([`FeatureMemory::features`]),
    /// keeping at most `capacity` rows: every row when they fit, else rows at an even stride
    /// through all of them (deterministic, and spread over every image).
    pub fn from_features(batches: &[Tensor], capacity: usize) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::Config(
                "the feature memory's capacity must be at least 1".into(),
            ));
        }
        let rows = batches.iter().map(pixel_rows).collect::<Result<Vec<_>>>()?;
        let rows = Tensor::cat(&rows, 0)?;
        let n = rows.dim(0)?;
        let rows = if n > capacity {
            let idx: Vec<u32> = (0..capacity).map(|i| (i * n / capacity) as u32).collect();
            let idx = Tensor::new(idx, rows.device())?;
            rows.index_select(&idx, 0)?
        } else {
            rows
        };
        Self::new(rows)
    }

    /// The per-pixel features `B×C×H/4×W/4` of an encoder pass: `cat(enc_b,
    /// nearest_up(enc_t))`, averaged over 3×3 neighbourhoods with replicated edges.
    pub fn features(encoded: &Encoded) -> Result<Tensor> {
        let (_, _, h, w) = encoded.enc_b.dims4()?;
        let f = Tensor::cat(
            &[&encoded.enc_b, &encoded.enc_t.upsample_nearest2d(h, w)?],
            1,
        )?;
        let f = f.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
        Ok(f.avg_pool2d_with_stride(3, 1)?)
    }

    /// The remembered rows, `N×C`.
    pub fn rows(&self) -> &Tensor {
        &self.rows
    }

    /// The number of channels of a row.
    pub fn channels(&self) -> usize {
        self.rows.dims()[1]
    }

    /// The blend of the combined map, once fitted.
    pub fn blend(&self) -> Option<Blend> {
        self.blend
    }

    /// The same memory with `blend` for the combined map.
    pub fn with_blend(mut self, blend: Blend) -> Self {
        self.blend = Some(blend);
        self
    }

    /// The memory on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            rows: self.rows.to_device(device)?,
            augmented_t: self.augmented_t.to_device(device)?,
            blend: self.blend,
        })
    }

    /// The Euclidean distance of each query row (`M×C`) to its nearest remembered row.
    pub fn nearest_distances(&self, queries: &Tensor) -> Result<Vec<f32>> {
        let (m, c) = queries.dims2()?;
        if c != self.channels() {
            return Err(Error::Input(format!(
                "queries of {c} channels for a feature memory of {}",
                self.channels()
            )));
        }
        let mut out = Vec::with_capacity(m);
        let mut start = 0;
        while start < m {
            let len = QUERY_CHUNK.min(m - start);
            let q = queries.narrow(0, start, len)?.contiguous()?;
            let qn = q.sqr()?.sum(1)?.to_vec1::<f32>()?;
            let ones = Tensor::ones((len, 1), DType::F32, q.device())?;
            // |q - r|² = |q|² + min_r (|r|² - 2 q·r), clamped at 0 against rounding.
            let nearest = Tensor::cat(&[&q, &ones], 1)?
                .matmul(&self.augmented_t)?
                .min(D::Minus1)?
                .to_vec1::<f32>()?;
            out.extend(
                nearest
                    .into_iter()
                    .zip(qn)
                    .map(|(v, n)| (v + n).max(0.0).sqrt()),
            );
            start += len;
        }
        Ok(out)
    }

    /// The distance map `B×H×W` of an encoder pass of images of `H×W`: each pixel's distance to
    /// the nearest remembered feature, computed at H/4 and repeated over each 4×4 block.
    pub fn distance_map(&self, encoded: &Encoded, height: usize, width: usize) -> Result<Tensor> {
        let f = Self::features(encoded)?;
        let (b, _, h, w) = f.dims4()?;
        let d = self.nearest_distances(&pixel_rows(&f)?)?;
        let map = Tensor::from_vec(d, (b, 1, h, w), f.device())?;
        Ok(map.upsample_nearest2d(height, width)?.squeeze(1)?)
    }

    /// The combined map `B×H×W` from the detection mask `B×H×W` and the distance map `B×H×W`
    /// (see [`Blend`]); an error when no blend has been fitted.
    pub fn combine(&self, detection: &Tensor, distance: &Tensor) -> Result<Tensor> {
        let b = self.blend.ok_or_else(|| {
            Error::Config(
                "the feature memory has no fitted blend, so it cannot give the combined map".into(),
            )
        })?;
        let m = detection.affine(
            1.0 / f64::from(b.detection_std),
            -f64::from(b.detection_mean) / f64::from(b.detection_std),
        )?;
        let w = f64::from(b.weight) / f64::from(b.memory_std);
        let d = distance.affine(w, -f64::from(b.memory_mean) * w)?;
        Ok((m + d)?)
    }
}

/// `B×C×h×w` → `(B·h·w)×C`, pixels in row-major order image by image (the rows a memory
/// keeps, and the queries of [`FeatureMemory::nearest_distances`]).
pub fn pixel_rows(f: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = f.dims4()?;
    Ok(f.permute((0, 2, 3, 1))?
        .reshape((b * h * w, c))?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_distances_match_brute_force() {
        let dev = Device::Cpu;
        // Deterministic pseudo-random rows.
        let val = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0) - 0.5;
        let (n, m, c) = (37, 1500, 5);
        let rows: Vec<f32> = (0..n * c).map(val).collect();
        let queries: Vec<f32> = (0..m * c).map(|i| val(i + 4242)).collect();
        let memory =
            FeatureMemory::new(Tensor::from_vec(rows.clone(), (n, c), &dev).unwrap()).unwrap();
        let got = memory
            .nearest_distances(&Tensor::from_vec(queries.clone(), (m, c), &dev).unwrap())
            .unwrap();
        assert_eq!(got.len(), m);
        for (qi, g) in got.iter().enumerate() {
            let q = &queries[qi * c..(qi + 1) * c];
            let best = rows
                .chunks(c)
                .map(|r| r.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>())
                .fold(f32::INFINITY, f32::min)
                .sqrt();
            assert!((g - best).abs() < 1e-3, "query {qi}: {g} vs {best}");
        }
    }

    #[test]
    fn capacity_keeps_an_even_stride() {
        let dev = Device::Cpu;
        // One batch of 2 images, 1 channel, 2×2 pixels: values 0..8 in row order.
        let f = Tensor::arange(0f32, 8.0, &dev)
            .unwrap()
            .reshape((2, 1, 2, 2))
            .unwrap();
        let all = FeatureMemory::from_features(std::slice::from_ref(&f), 100).unwrap();
        assert_eq!(
            all.rows().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..8).map(|v| v as f32).collect::<Vec<_>>()
        );
        let some = FeatureMemory::from_features(&[f], 4).unwrap();
        assert_eq!(
            some.rows().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 2.0, 4.0, 6.0]
        );
        assert!(FeatureMemory::from_features(&[], 0).is_err());
    }

    #[test]
    fn combine_standardises_both_maps() {
        let dev = Device::Cpu;
        let memory = FeatureMemory::new(Tensor::ones((1, 2), DType::F32, &dev).unwrap()).unwrap();
        let det = Tensor::new(&[[0.5f32, 0.9]], &dev).unwrap();
        let dist = Tensor::new(&[[2f32, 6.0]], &dev).unwrap();
        assert!(memory.combine(&det, &dist).is_err());
        let blend = Blend {
            weight: 2.0,
            detection_mean: 0.5,
            detection_std: 0.2,
            memory_mean: 2.0,
            memory_std: 4.0,
        };
        blend.validate("test").unwrap();
        let memory = memory.with_blend(blend);
        let got = memory
            .combine(&det, &dist)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want = [0.0f32, (0.9 - 0.5) / 0.2 + 2.0 * (6.0 - 2.0) / 4.0];
        for (g, w) in got[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        let bad = Blend {
            memory_std: 0.0,
            ..blend
        };
        assert!(bad.validate("test").is_err());
    }
}
