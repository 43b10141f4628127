//! Channels-last activations for inference.
//!
//! The CPU convolutions compute in channels-last layout (`conv::channels_last`, `conv::winograd`):
//! each NCHW input is transposed into a padded channels-last copy and each output transposed back
//! onto NCHW planes. Between the layers of a U-Net those two moves cancel out, and at inference
//! they were the largest share of a forward after the products and the Winograd transforms
//! (`transpose_blocks_avx` about a tenth of the samples in `perf record` of `examples/profile`).
//! [`Nhwc`] keeps an untracked batch channels last from the U-Net's input to its logits: the
//! convolutions read and write it directly, and instance norm + ReLU, 2×2 max-pooling, bilinear
//! ×2 upsampling and the channel concatenation have channels-last versions here.
//!
//! Every operation computes what its NCHW counterpart in [`super::resample`] and
//! [`super::norm`] computes, value by value, in the same order (the instance-norm statistics are
//! f64 sums, whose order does not show after rounding to f32 in practice), so the U-Net's outputs
//! are those of the NCHW path (`unet` tests compare both).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::norm::INSTANCE_NORM_EPS;
use super::resample::Taps;
use crate::kernels::conv::{is_plain_f32_cpu, with_f32_data};

/// A batch of `n` images of `h`×`w` pixels with `c` channels, channels last: the value of
/// channel `ch` at pixel `(y, x)` of image `i` is `data[((i·h + y)·w + x)·c + ch]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Nhwc {
    /// The values, `[n, h, w, c]`.
    pub(crate) data: Vec<f32>,
    /// Images.
    pub(crate) n: usize,
    /// Rows per image.
    pub(crate) h: usize,
    /// Columns per image.
    pub(crate) w: usize,
    /// Channels per pixel.
    pub(crate) c: usize,
}

impl Nhwc {
    /// Whether `xs` can be moved channels last: an f32 `[n, c, h, w]` CPU tensor outside any
    /// autograd graph.
    pub(crate) fn takes(xs: &Tensor) -> bool {
        is_plain_f32_cpu(xs) && xs.rank() == 4
    }

    /// The NCHW tensor `xs` (f32, CPU), channels last.
    pub(crate) fn from_tensor(xs: &Tensor) -> candle_core::Result<Self> {
        let (n, c, h, w) = xs.dims4()?;
        let mut data = vec![0f32; n * c * h * w];
        let image_len = c * h * w;
        if image_len > 0 {
            with_f32_data(xs, |src| {
                for (image, dst) in src
                    .chunks_exact(image_len)
                    .zip(data.chunks_exact_mut(image_len))
                {
                    crate::kernels::conv::image_to_pixels(image, (c, h, w), dst);
                }
                Ok(())
            })?;
        }
        Ok(Self { data, n, h, w, c })
    }

    /// The batch as an NCHW tensor `[n, c, h, w]`.
    pub(crate) fn to_tensor(&self) -> candle_core::Result<Tensor> {
        let (data, n, h, w, c) = (&self.data, self.n, self.h, self.w, self.c);
        let plane = h * w;
        let mut planes = vec![0f32; data.len()];
        if plane * c > 0 {
            // Blocks of up to 16 planes of one image per job.
            const BLOCK: usize = 16;
            planes
                .par_chunks_mut(c * plane)
                .zip(data.par_chunks(c * plane))
                .for_each(|(dst, image)| {
                    dst.par_chunks_mut(BLOCK * plane)
                        .enumerate()
                        .for_each(|(block, dst)| {
                            let channels = dst.len() / plane;
                            let src = (block * BLOCK, c);
                            crate::kernels::conv::transpose_into(
                                image,
                                src,
                                dst,
                                (0, plane),
                                plane,
                                channels,
                                None,
                            );
                        })
                });
        }
        Tensor::from_vec(planes, (n, c, h, w), &Device::Cpu)
    }

    /// A batch of `oh`×`ow` images with `self.c` channels, pixel row by pixel row:
    /// `fill(lines, y, dst)` writes output row `y` of an image into `dst` (`ow·c` values), where
    /// `lines.row(r)` is input row `r` of the same image (`w·c` values).
    fn map_rows(
        &self,
        (oh, ow): (usize, usize),
        fill: impl Fn(&Lines, usize, &mut [f32]) + Sync,
    ) -> Self {
        let (n, h, w, c) = (self.n, self.h, self.w, self.c);
        let mut data = vec![0f32; n * oh * ow * c];
        if !data.is_empty() {
            data.par_chunks_exact_mut(ow * c)
                .enumerate()
                .for_each(|(row, dst)| {
                    let image = &self.data[row / oh * h * w * c..][..h * w * c];
                    let lines = Lines { image, len: w * c };
                    crate::kernels::simd::wide(|| fill(&lines, row % oh, dst))
                });
        }
        Self {
            data,
            n,
            h: oh,
            w: ow,
            c,
        }
    }

    /// 2×2 max-pooling with stride 2, odd trailing rows and columns dropped
    /// ([`super::resample::max_pool2x2`]).
    pub(crate) fn max_pool2x2(&self) -> Self {
        let c = self.c;
        self.map_rows((self.h / 2, self.w / 2), |lines, oy, dst| {
            let (r0, r1) = (lines.row(2 * oy), lines.row(2 * oy + 1));
            for (ox, out) in dst.chunks_exact_mut(c).enumerate() {
                let (a, b) = (&r0[2 * ox * c..][..2 * c], &r1[2 * ox * c..][..2 * c]);
                for (ch, o) in out.iter_mut().enumerate() {
                    // Over the columns of each window row, then over its rows.
                    *o = a[ch].max(a[c + ch]).max(b[ch].max(b[c + ch]));
                }
            }
        })
    }

    /// Bilinear ×2 upsampling with align_corners = true
    /// ([`super::resample::upsample_bilinear2x`]).
    pub(crate) fn upsample_bilinear2x(&self) -> Self {
        let (h, w, c) = (self.h, self.w, self.c);
        let (th, tw) = (Taps::new(h, 2 * h), Taps::new(w, 2 * w));
        self.map_rows((2 * h, 2 * w), |lines, y, dst| {
            let (r0, r1) = (lines.row(th.i0[y]), lines.row(th.i1[y]));
            let (a0, a1) = (th.l0[y], th.l1[y]);
            for (x, out) in dst.chunks_exact_mut(c).enumerate() {
                let (j0, j1) = (tw.i0[x] * c, tw.i1[x] * c);
                let (b0, b1) = (tw.l0[x], tw.l1[x]);
                let (p00, p01) = (&r0[j0..j0 + c], &r0[j1..j1 + c]);
                let (p10, p11) = (&r1[j0..j0 + c], &r1[j1..j1 + c]);
                for (ch, o) in out.iter_mut().enumerate() {
                    // The NCHW operator's expression, term by term.
                    *o = a0 * (b0 * p00[ch] + b1 * p01[ch]) + a1 * (b0 * p10[ch] + b1 * p11[ch]);
                }
            }
        })
    }

    /// The channels of `self` followed by those of `other` (`Tensor::cat(&[self, other], 1)`).
    pub(crate) fn cat(&self, other: &Self) -> candle_core::Result<Self> {
        let (n, h, w) = (self.n, self.h, self.w);
        if (other.n, other.h, other.w) != (n, h, w) {
            candle_core::bail!(
                "channel concatenation: {n}×{h}×{w} and {}×{}×{} images",
                other.n,
                other.h,
                other.w
            );
        }
        let (ca, cb) = (self.c, other.c);
        if ca == 0 || cb == 0 {
            return Ok(if ca == 0 { other.clone() } else { self.clone() });
        }
        let c = ca + cb;
        let mut data = vec![0f32; n * h * w * c];
        if !data.is_empty() {
            data.par_chunks_exact_mut(w * c)
                .zip(self.data.par_chunks_exact(w * ca))
                .zip(other.data.par_chunks_exact(w * cb))
                .for_each(|((dst, a), b)| {
                    for (x, out) in dst.chunks_exact_mut(c).enumerate() {
                        out[..ca].copy_from_slice(&a[x * ca..(x + 1) * ca]);
                        out[ca..].copy_from_slice(&b[x * cb..(x + 1) * cb]);
                    }
                });
        }
        Ok(Self { data, n, h, w, c })
    }

    /// `relu(instance_norm(x))` in place ([`super::norm::instance_norm_relu`]): every channel
    /// of every image normalised with its own statistics, in the NCHW operator's arithmetic.
    pub(crate) fn instance_norm_relu(&mut self) {
        let (pixels, c) = (self.h * self.w, self.c);
        if pixels * c == 0 {
            return;
        }
        // Pixels per job: about sixteen jobs per image.
        let chunk = pixels.div_ceil(16).max(64) * c;
        for image in self.data.chunks_exact_mut(pixels * c) {
            // Σ x per channel, in f64.
            let sums = channel_sums(image, c, chunk, None);
            let mean: Vec<f32> = sums.iter().map(|s| (s / pixels as f64) as f32).collect();
            // Σ (x − mean)² per channel: each square rounded to f32, summed in f64.
            let var_sums = channel_sums(image, c, chunk, Some(&mean));
            let (invstd, beta): (Vec<f64>, Vec<f64>) = var_sums
                .iter()
                .zip(&mean)
                .map(|(&var_sum, &mean)| {
                    let var = (var_sum as f32) / pixels as f32;
                    let invstd = (1.0 / (var as f64 + INSTANCE_NORM_EPS).sqrt()) as f32;
                    let beta = -(mean * invstd);
                    (invstd as f64, beta as f64)
                })
                .unzip();
            image.par_chunks_mut(chunk).for_each(|part| {
                crate::kernels::simd::wide(|| {
                    for pixel in part.chunks_exact_mut(c) {
                        for ((v, &k), &b) in pixel.iter_mut().zip(&invstd).zip(&beta) {
                            *v = ((*v as f64 * k + b) as f32).max(0.0);
                        }
                    }
                })
            });
        }
    }
}

/// The pixel rows of one channels-last image (`len` values each), for [`Nhwc::map_rows`].
struct Lines<'a> {
    image: &'a [f32],
    len: usize,
}

impl Lines<'_> {
    /// Row `r`.
    fn row(&self, r: usize) -> &[f32] {
        &self.image[r * self.len..(r + 1) * self.len]
    }
}

/// Per channel, the f64 sum over the pixels of the channels-last `image` (`c` channels per
/// pixel) of each value, or, when `mean` is given, of its squared distance to the channel's mean
/// (rounded to f32 before it is summed, as the NCHW statistics do). Jobs of `chunk` values; their
/// partial sums are added in order.
fn channel_sums(image: &[f32], c: usize, chunk: usize, mean: Option<&[f32]>) -> Vec<f64> {
    let partial: Vec<Vec<f64>> = image
        .par_chunks(chunk)
        .map(|part| {
            crate::kernels::simd::wide(|| {
                let mut sums = vec![0f64; c];
                let mut c0 = 0;
                // Blocks of LANES channels, whose sums stay in registers over the pixels.
                while c0 + LANES <= c {
                    let block = &mut sums[c0..c0 + LANES];
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("avx") {
                        let mean = mean.map(|m| &m[c0..c0 + LANES]);
                        // SAFETY: AVX is present (checked just above).
                        block.copy_from_slice(&unsafe { lane_sums_avx(part, c, c0, mean) });
                        c0 += LANES;
                        continue;
                    }
                    let block_sums = match mean {
                        None => lane_sums(part, c, c0, |v, _| v as f64),
                        Some(mean) => {
                            let m: &[f32; LANES] = mean[c0..c0 + LANES].try_into().expect("lanes");
                            lane_sums(part, c, c0, |v, j| {
                                let d = v - m[j];
                                (d * d) as f64
                            })
                        }
                    };
                    block.copy_from_slice(&block_sums);
                    c0 += LANES;
                }
                // The channels past the last whole block.
                for pixel in part.chunks_exact(c) {
                    for ch in c0..c {
                        let v = pixel[ch];
                        sums[ch] += match mean {
                            None => v as f64,
                            Some(mean) => {
                                let d = v - mean[ch];
                                (d * d) as f64
                            }
                        };
                    }
                }
                sums
            })
        })
        .collect();
    let mut sums = vec![0f64; c];
    for part in &partial {
        for (s, p) in sums.iter_mut().zip(part) {
            *s += p;
        }
    }
    sums
}

/// [`lane_sums`] of the values (`mean` None) or of their squared distances to `mean` (the
/// block's LANES means), in AVX registers: the same f32 differences and squares, the same f64
/// partial sums in the same order, so the same bits.
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn lane_sums_avx(part: &[f32], c: usize, c0: usize, mean: Option<&[f32]>) -> [f64; LANES] {
    use std::arch::x86_64::*;
    assert!(c0 + LANES <= c, "lane sums: channels {c0}.. of {c}");
    assert!(
        mean.is_none_or(|m| m.len() == LANES),
        "lane sums: {LANES} means"
    );
    let m = match mean {
        // SAFETY: `m` holds LANES = 8 values (asserted above).
        Some(m) => unsafe { _mm256_loadu_ps(m.as_ptr()) },
        None => _mm256_setzero_ps(),
    };
    let squares = mean.is_some();
    // The block's eight channels of a pixel as f64 terms, channels 0–3 and 4–7.
    let terms = |pixel: &[f32]| {
        let v = &pixel[c0..c0 + LANES];
        // SAFETY: `v` holds LANES = 8 values; AVX is present (the caller's contract).
        unsafe {
            let mut x = _mm256_loadu_ps(v.as_ptr());
            if squares {
                let d = _mm256_sub_ps(x, m);
                x = _mm256_mul_ps(d, d);
            }
            (
                _mm256_cvtps_pd(_mm256_castps256_ps128(x)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)),
            )
        }
    };
    let mut acc = [_mm256_setzero_pd(); 8];
    let mut quads = part.chunks_exact(4 * c);
    for quad in &mut quads {
        for k in 0..4 {
            let (lo, hi) = terms(&quad[k * c..(k + 1) * c]);
            acc[2 * k] = _mm256_add_pd(acc[2 * k], lo);
            acc[2 * k + 1] = _mm256_add_pd(acc[2 * k + 1], hi);
        }
    }
    for pixel in quads.remainder().chunks_exact(c) {
        let (lo, hi) = terms(pixel);
        acc[0] = _mm256_add_pd(acc[0], lo);
        acc[1] = _mm256_add_pd(acc[1], hi);
    }
    // (pixel 0 + pixel 1) + (pixel 2 + pixel 3) per channel, as `lane_sums` adds them.
    let sum = |h: usize| {
        let a = _mm256_add_pd(acc[h], acc[2 + h]);
        let b = _mm256_add_pd(acc[4 + h], acc[6 + h]);
        _mm256_add_pd(a, b)
    };
    let mut out = [0f64; LANES];
    // SAFETY: `out` holds 8 f64, two vectors of 4.
    unsafe {
        _mm256_storeu_pd(out.as_mut_ptr(), sum(0));
        _mm256_storeu_pd(out.as_mut_ptr().add(4), sum(1));
    }
    out
}

/// Channels per block of [`channel_sums`].
const LANES: usize = 8;

/// The f64 sums of `term(value, j)` for the channels `c0 + j` (`j < LANES`) over the pixels of
/// `part`, in four interleaved partial sums per channel (one running sum is a chain of dependent
/// additions).
#[inline(always)]
fn lane_sums(part: &[f32], c: usize, c0: usize, term: impl Fn(f32, usize) -> f64) -> [f64; LANES] {
    let mut acc = [[0f64; LANES]; 4];
    let mut quads = part.chunks_exact(4 * c);
    for quad in &mut quads {
        for (k, acc) in acc.iter_mut().enumerate() {
            let pixel: &[f32; LANES] = quad[k * c + c0..][..LANES].try_into().expect("lanes");
            for (j, (a, &v)) in acc.iter_mut().zip(pixel).enumerate() {
                *a += term(v, j);
            }
        }
    }
    for pixel in quads.remainder().chunks_exact(c) {
        for (j, (a, &v)) in acc[0].iter_mut().zip(&pixel[c0..c0 + LANES]).enumerate() {
            *a += term(v, j);
        }
    }
    std::array::from_fn(|j| (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]))
}

/// Helpers for the tests of the networks that run channels last.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    /// The network `build` makes, with seeded PyTorch-style weights: as plain tensors (loaded
    /// weights) when `plain`, as training variables otherwise.
    pub(crate) fn seeded<T>(
        plain: bool,
        build: impl Fn(VarBuilder) -> candle_core::Result<T>,
    ) -> T {
        let varmap = VarMap::new();
        let trained = build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        crate::init::init_seeded(&varmap, 3, crate::init::InitScheme::Pytorch, &[]).unwrap();
        if !plain {
            return trained;
        }
        let tensors = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        build(VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap()
    }

    /// Deterministic `[n, c, side, side]` inputs in [0, 1).
    pub(crate) fn input(n: usize, c: usize, side: usize) -> Tensor {
        let values: Vec<f32> = (0..n * c * side * side)
            .map(|i| ((i * 7919 + 13) % 1009) as f32 / 1009.0)
            .collect();
        Tensor::from_vec(values, (n, c, side, side), &Device::Cpu).unwrap()
    }

    /// Asserts that the channels-last forward's output `pixels` has the values of the NCHW
    /// forward's `planes`: the same kernels on the same values, where only the order of the
    /// instance norms' f64 sums differs, which practically never shows after rounding to f32.
    pub(crate) fn assert_same_values(planes: &Tensor, pixels: &Tensor) {
        assert_eq!(planes.dims(), pixels.dims());
        let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let (a, b) = (values(planes), values(pixels));
        let largest = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        eprintln!(
            "{differing} of {} outputs differ, by up to {worst:e} (largest {largest:e})",
            a.len()
        );
        assert!(largest > 0.1, "the outputs are not all near zero");
        assert!(worst <= 1e-6 * largest.max(1.0), "{worst:e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{norm, resample};

    /// A deterministic `[n, c, h, w]` tensor with values in about [-1, 1].
    fn planes(n: usize, c: usize, h: usize, w: usize, seed: usize) -> Tensor {
        let values: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect();
        Tensor::from_vec(values, (n, c, h, w), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn layouts_convert_both_ways() {
        let xs = planes(2, 19, 5, 7, 1);
        let nhwc = Nhwc::from_tensor(&xs).unwrap();
        assert_eq!((nhwc.n, nhwc.h, nhwc.w, nhwc.c), (2, 5, 7, 19));
        // Channel 4 of pixel (3, 2) of the second image.
        let at = |t: &Tensor| values(&t.get(1).unwrap().get(4).unwrap().get(3).unwrap())[2];
        assert_eq!(nhwc.data[((5 + 3) * 7 + 2) * 19 + 4], at(&xs));
        assert_eq!(values(&nhwc.to_tensor().unwrap()), values(&xs));
    }

    #[test]
    fn pooling_upsampling_and_concatenation_match_the_nchw_operators() {
        // Odd sides: pooling drops the last row and column, as the NCHW operator does.
        let xs = planes(2, 21, 9, 7, 2);
        let nhwc = Nhwc::from_tensor(&xs).unwrap();
        let pooled = nhwc.max_pool2x2().to_tensor().unwrap();
        assert_eq!(
            values(&pooled),
            values(&resample::max_pool2x2(&xs).unwrap())
        );
        let up = nhwc.upsample_bilinear2x().to_tensor().unwrap();
        assert_eq!(
            values(&up),
            values(&resample::upsample_bilinear2x(&xs).unwrap())
        );
        let other = planes(2, 5, 9, 7, 3);
        let cat = nhwc
            .cat(&Nhwc::from_tensor(&other).unwrap())
            .unwrap()
            .to_tensor()
            .unwrap();
        assert_eq!(
            values(&cat),
            values(&Tensor::cat(&[&xs, &other], 1).unwrap())
        );
        let err = nhwc.cat(&nhwc.max_pool2x2()).unwrap_err();
        assert!(err.to_string().contains("concatenation"), "{err}");
    }

    #[test]
    fn instance_norm_relu_matches_the_nchw_operator() {
        // 37 channels: four blocks of 8 and five left over; 23×29 pixels: chunks of whole
        // pixels with a remainder of fewer than four. Offsets and scales per channel, as after a
        // convolution.
        let (n, c, h, w) = (2, 37, 23, 29);
        let scale: Vec<f32> = (0..c).map(|ch| 0.5 + ch as f32 * 0.25).collect();
        let xs = planes(n, c, h, w, 4)
            .broadcast_mul(&Tensor::from_vec(scale, (1, c, 1, 1), &Device::Cpu).unwrap())
            .unwrap()
            .affine(1.0, 0.75)
            .unwrap();
        let mut nhwc = Nhwc::from_tensor(&xs).unwrap();
        nhwc.instance_norm_relu();
        let ours = values(&nhwc.to_tensor().unwrap());
        let reference = values(&norm::instance_norm_relu(&xs).unwrap());
        assert!(ours.contains(&0.0) && ours.iter().any(|&v| v > 1.0));
        // f64 sums in another order: equal after rounding to f32 but in rare ties.
        let worst = ours
            .iter()
            .zip(&reference)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-6, "{worst:e}");
    }

    #[test]
    fn vector_and_scalar_channel_sums_agree_bit_for_bit() {
        let (c, pixels) = (48, 103);
        let image: Vec<f32> = (0..c * pixels)
            .map(|i| ((i * 7919) % 2003) as f32 / 1001.0 - 1.0)
            .collect();
        let mean: Vec<f32> = (0..LANES).map(|j| j as f32 * 0.01).collect();
        let m: &[f32; LANES] = mean.as_slice().try_into().unwrap();
        for c0 in [0, 8, 40] {
            let plain = lane_sums(&image, c, c0, |v, _| v as f64);
            let squares = lane_sums(&image, c, c0, |v, j| {
                let d = v - m[j];
                (d * d) as f64
            });
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx") {
                // SAFETY: AVX is present.
                let (vector_plain, vector_squares) = unsafe {
                    (
                        lane_sums_avx(&image, c, c0, None),
                        lane_sums_avx(&image, c, c0, Some(&mean)),
                    )
                };
                assert_eq!(vector_plain, plain);
                assert_eq!(vector_squares, squares);
            }
            // Against a plain running sum (another order: equal to f64 rounding).
            for j in 0..LANES {
                let direct: f64 = image.chunks_exact(c).map(|p| p[c0 + j] as f64).sum();
                assert!((direct - plain[j]).abs() <= 1e-9, "channel {}", c0 + j);
            }
        }
    }
}
