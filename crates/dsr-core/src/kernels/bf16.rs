//! Matrix products with bf16 operands and f32 sums, for inference at `Precision::Bf16`
//! ([`crate::exec::Precision`]).
//!
//! `C = A · B` with `A` `[m, k]` and `B` `[k, n]` rounded to bf16 (8 significant bits, f32's
//! exponent range) and every product summed in f32, by the AVX512-BF16 instruction `vdpbf16ps`:
//! for each of 16 f32 lanes it multiplies two neighbouring bf16 pairs and adds both products to
//! the lane. A bf16 × bf16 product is exact in f32 (8 + 8 significant bits), so the only
//! rounding besides the operands' is that of the f32 sums, as in an f32 product.
//!
//! Why hand-written: the `gemm` crate (0.19) computes f32, f64, f16 (converted to f32 while it
//! packs) and complex products; it has no bf16 type and never issues `vdpbf16ps`, and candle's
//! CPU convolutions do not run in bf16 at all. The kernel here is small:
//!
//! * `B` is packed once per weight ([`PackedB`]): columns in blocks of 16, and within a block, for
//!   each pair of rows `2p, 2p + 1`, the 16 columns' two values side by side (32 bf16, one
//!   register), rows padded to an even count and columns to a multiple of 16 with zeros;
//! * `A` is given as bf16 rows of an even length (the last value zero when `k` is odd), so that
//!   row `i`'s pair `p` is one 32-bit word, broadcast to all lanes;
//! * a register tile of [`MR`] rows by up to 4 × 16 columns keeps its sums in 24 registers while
//!   the pairs of `k` stream through; the operands are walked in blocks ([`MC`] rows, [`KC`]
//!   pairs) that stay in the L2 cache.
//!
//! Only on x86-64 CPUs with AVX512-BF16 ([`available`]); nothing here runs elsewhere.

// The AVX-512 intrinsics (and the `avx512f` / `avx512bf16` target features) are stable since
// Rust 1.89, above the workspace's declared `rust-version` of 1.85, which `kernels::simd`'s
// `avx512f` target feature already exceeds; raising it is a separate change (it turns on
// lints across the workspace).
#![allow(clippy::incompatible_msrv)]

use rayon::prelude::*;

/// Rows of the register tile.
const MR: usize = 6;

/// 16-column vectors of the widest register tile.
const NV: usize = 4;

/// Rows of `A` per cache block.
const MC: usize = 192;

/// Pairs of `k` per cache block.
const KC: usize = 256;

/// Whether this CPU can run the bf16 products: AVX-512F with AVX512-BF16 (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The bf16 bits of `x`, rounded to nearest, ties to even (as `vcvtneps2bf16`); NaN stays a
/// (quiet) NaN.
pub(crate) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let rounding = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// The f32 value of the bf16 bits `b` (exact).
#[cfg(test)]
fn to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Rounds `src` to bf16 into `dst` (the same length), as [`to_bf16`] does value by value.
pub(crate) fn convert(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "bf16 conversion: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512F and AVX512-BF16 (`available`), and both slices have the
        // same length, checked above.
        unsafe { convert_avx512(src, dst) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16(s);
    }
}

/// [`convert`] by `vcvtneps2bf16`, 16 values at a time.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16, and `dst` must be as long as `src`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let whole = src.len() / 16 * 16;
    for i in (0..whole).step_by(16) {
        let v = _mm512_loadu_ps(src.as_ptr().add(i));
        let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), b);
    }
    for i in whole..src.len() {
        dst[i] = to_bf16(src[i]);
    }
}

/// Pairs of a dimension of `k` values (rounded up).
pub(crate) fn pairs(k: usize) -> usize {
    k.div_ceil(2)
}

/// The right operand `B` (`[k, n]`) of [`matmul`], rounded to bf16 and packed for the kernel
/// (layout: the module's notes).
#[derive(Debug, Clone)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Vec<u16>,
}

impl PackedB {
    /// Packs the `[k, n]` matrix whose element `(i, j)` is `value(i, j)`.
    pub(crate) fn new(k: usize, n: usize, value: impl Fn(usize, usize) -> f32) -> Self {
        let kp = pairs(k);
        let blocks = n.div_ceil(16);
        let mut data = vec![0u16; blocks * kp * 32];
        for (block, dst) in data.chunks_exact_mut(kp * 32).enumerate() {
            for (p, pair) in dst.chunks_exact_mut(32).enumerate() {
                for lane in 0..16 {
                    let j = block * 16 + lane;
                    if j >= n {
                        break;
                    }
                    for half in 0..2 {
                        let i = 2 * p + half;
                        if i < k {
                            pair[2 * lane + half] = to_bf16(value(i, j));
                        }
                    }
                }
            }
        }
        Self { k, n, data }
    }

    /// Rows of the matrix.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Columns of the matrix.
    pub(crate) fn n(&self) -> usize {
        self.n
    }
}

/// `dst = a · b` for `a` `[m, k]` given as `m` bf16 rows of `2·pairs(k)` values (`a_stride`
/// apart, the last of each row zero when `k` is odd), written to the row-major `[m, b.n]`
/// matrix at the start of `dst` (rows `dst_stride` apart). `parallel` spreads the rows over
/// rayon's threads. Panics unless [`available`] and the operands fit their slices.
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_stride: usize,
    a: &[u16],
    a_stride: usize,
    m: usize,
    b: &PackedB,
    parallel: bool,
) {
    let (n, kp) = (b.n, pairs(b.k));
    assert!(available(), "bf16 products need AVX512-BF16");
    assert!(
        dst_stride >= n && a_stride >= 2 * kp,
        "bf16 matmul: strides"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.len() >= (m - 1) * a_stride + 2 * kp && dst.len() >= (m - 1) * dst_stride + n,
        "bf16 matmul: a {m}×{n} product runs past its buffers"
    );
    // Groups of whole register tiles per job, at least two jobs per thread when parallel.
    let threads = if parallel {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let per_job = m.div_ceil(2 * threads).div_ceil(MR).max(1) * MR;
    if threads == 1 || m <= MR {
        rows(dst, dst_stride, a, a_stride, m, b);
        return;
    }
    // Exactly the `m` rows of `dst` (the last one `n` long), so that chunk `j` holds rows
    // `j·per_job..` and `a`'s chunks line up with them.
    let dst = &mut dst[..(m - 1) * dst_stride + n];
    dst.par_chunks_mut(per_job * dst_stride)
        .zip(a.par_chunks(per_job * a_stride))
        .enumerate()
        .for_each(|(job, (d, a))| {
            let rows_here = per_job.min(m - job * per_job);
            rows(d, dst_stride, a, a_stride, rows_here, b);
        });
}

/// [`matmul`] of `m` rows on this thread.
fn rows(dst: &mut [f32], dst_stride: usize, a: &[u16], a_stride: usize, m: usize, b: &PackedB) {
    let (n, kp) = (b.n, pairs(b.k));
    let blocks = n.div_ceil(16);
    for i0 in (0..m).step_by(MC) {
        let mc = MC.min(m - i0);
        for p0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - p0);
            for j0 in (0..blocks).step_by(NV) {
                let vectors = NV.min(blocks - j0);
                let cols = (n - 16 * j0).min(16 * vectors);
                for r0 in (0..mc).step_by(MR) {
                    let rows = MR.min(mc - r0);
                    let i = i0 + r0;
                    let tile = Tile {
                        a: &a[i * a_stride..],
                        a_stride,
                        rows,
                        b: &b.data[j0 * kp * 32..],
                        b_block: kp * 32,
                        p0,
                        pairs: kc,
                        cols,
                        accumulate: p0 > 0,
                    };
                    let c = &mut dst[i * dst_stride + 16 * j0..];
                    tile.run(vectors, c, dst_stride);
                }
            }
        }
    }
}

/// One register tile's work: rows `..rows` of `a`, pairs `p0..p0 + pairs`, the first `cols`
/// columns of the packed blocks from the start of `b` (blocks `b_block` values apart).
struct Tile<'a> {
    a: &'a [u16],
    a_stride: usize,
    rows: usize,
    b: &'a [u16],
    b_block: usize,
    p0: usize,
    pairs: usize,
    cols: usize,
    accumulate: bool,
}

impl Tile<'_> {
    /// Adds the tile's products to (or writes them over, unless `accumulate`) `c`, rows
    /// `c_stride` apart, with `vectors` (1 to [`NV`]) 16-column vectors.
    fn run(&self, vectors: usize, c: &mut [f32], c_stride: usize) {
        // Every access of the kernel lies inside these ranges.
        assert!((1..=MR).contains(&self.rows) && (1..=NV).contains(&vectors));
        assert!(self.cols > 16 * (vectors - 1) && self.cols <= 16 * vectors);
        let last_pair = self.p0 + self.pairs;
        assert!(self.a.len() >= (self.rows - 1) * self.a_stride + 2 * last_pair);
        assert!(self.b.len() >= (vectors - 1) * self.b_block + 32 * last_pair);
        assert!(c.len() >= (self.rows - 1) * c_stride + self.cols);
        #[cfg(target_arch = "x86_64")]
        {
            assert!(available(), "bf16 products need AVX512-BF16");
            // SAFETY: AVX-512F and AVX512-BF16 are present (asserted), and the asserts above keep
            // every read of `a` and `b` and every write of `c` inside the slices.
            unsafe {
                match vectors {
                    1 => self.kernel::<1>(c, c_stride),
                    2 => self.kernel::<2>(c, c_stride),
                    3 => self.kernel::<3>(c, c_stride),
                    _ => self.kernel::<NV>(c, c_stride),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (c, c_stride);
            unreachable!("bf16 products need AVX512-BF16");
        }
    }

    /// The register tile with `V` vectors of 16 columns.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16, and the ranges that [`Tile::run`] asserts
    /// must hold.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const V: usize>(&self, c: &mut [f32], c_stride: usize) {
        use std::arch::x86_64::*;
        // Rows past `rows` read the last row again (their sums are never stored).
        let a_rows: [*const u16; MR] = std::array::from_fn(|r| {
            self.a
                .as_ptr()
                .add(r.min(self.rows - 1) * self.a_stride + 2 * self.p0)
        });
        let b = self.b.as_ptr().add(32 * self.p0);
        let masks: [__mmask16; V] = std::array::from_fn(|v| {
            let lanes = self.cols.saturating_sub(16 * v).min(16);
            ((1u32 << lanes) - 1) as __mmask16
        });
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        if self.accumulate {
            for (r, row) in acc.iter_mut().enumerate().take(self.rows) {
                for (v, sum) in row.iter_mut().enumerate() {
                    *sum = _mm512_maskz_loadu_ps(masks[v], c.as_ptr().add(r * c_stride + 16 * v));
                }
            }
        }
        for p in 0..self.pairs {
            let bv: [__m512bh; V] = std::array::from_fn(|v| {
                let w = _mm512_loadu_si512(b.add(v * self.b_block + 32 * p).cast());
                std::mem::transmute::<__m512i, __m512bh>(w)
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let pair = a_rows[r].add(2 * p).cast::<i32>().read_unaligned();
                let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                for (sum, &bv) in row.iter_mut().zip(&bv) {
                    *sum = _mm512_dpbf16_ps(*sum, av, bv);
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(self.rows) {
            for (v, &sum) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(c.as_mut_ptr().add(r * c_stride + 16 * v), masks[v], sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) with a spread of magnitudes.
    fn value(seed: usize, i: usize, j: usize) -> f32 {
        let x = (i * 7919 + j * 104_729 + seed * 15_485_863) % 2_147_483_647;
        let x = (x as u64 * 2_654_435_761 % 4_294_967_291) as f32 / 4_294_967_291.0;
        2.0 * x - 1.0
    }

    /// Throughput of the kernel against gemm's f32 product on a Winograd-sized product
    /// (`cargo test --release -p dsr-core --lib bf16_speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn bf16_speed() {
        use crate::kernels::conv::speed_f32;
        for (m, k, n) in [
            (512, 128, 128),
            (1024, 64, 64),
            (4096, 576, 64),
            (256, 512, 512),
        ] {
            let packed = PackedB::new(k, n, |i, j| value(2, i, j));
            let width = 2 * pairs(k);
            let a: Vec<u16> = (0..m * width).map(|i| to_bf16(value(1, i, 0))).collect();
            let mut c = vec![0f32; m * n];
            let reps = (2e9 / (m * n * k) as f64).max(1.0) as usize;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                matmul(&mut c, n, &a, width, m, &packed, false);
            }
            let bf16 = (2 * m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
            let f32 = speed_f32(m, k, n, reps);
            eprintln!(
                "{m}×{k}×{n}: bf16 {bf16:.0} GFLOP/s, f32 gemm {f32:.0} GFLOP/s (one thread)"
            );
        }
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties to the even 1.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶: up.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.5 / 256.0), 0x3f81);
        assert_eq!(to_bf16(-2.0), 0xc000);
        assert_eq!(to_f32(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert!(to_f32(to_bf16(f32::NAN)).is_nan());
        // The vector conversion agrees with the scalar one, tail included.
        let src: Vec<f32> = (0..37).map(|i| value(1, i, 3) * 1e3).collect();
        let mut fast = vec![0u16; src.len()];
        convert(&src, &mut fast);
        let slow: Vec<u16> = src.iter().map(|&x| to_bf16(x)).collect();
        assert_eq!(fast, slow);
    }

    /// The product on odd sizes, against two references: the f64 product of the bf16-rounded
    /// operands (only the f32 sums differ: at most `k`·2⁻²⁴ of the sum of the products'
    /// magnitudes, and in practice far less), and the f64 product of the f32 operands (the
    /// operands' rounding adds at most 2·2⁻⁸ + 2⁻¹⁶ of that sum: each factor is off by at most
    /// half a unit of bf16's 8 significant bits).
    #[test]
    fn bf16_products_match_f32_references_on_odd_sizes() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        // Remainders in every dimension: rows around MR and MC, columns around 16 and 64,
        // k odd and across the KC block.
        for (m, k, n) in [
            (1, 1, 1),
            (5, 3, 17),
            (7, 33, 65),
            (13, 2 * KC + 1, 70),
            (MC + 7, 27, 48),
            (37, 64, 129),
        ] {
            let a = |i, j| value(1, i, j);
            let bv = |i, j| value(2, i, j) * 0.1;
            let packed = PackedB::new(k, n, bv);
            let width = 2 * pairs(k) + 3; // rows padded past their pairs: strides are honoured
            let mut rows = vec![0u16; m * width];
            for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                for (j, v) in row[..k].iter_mut().enumerate() {
                    *v = to_bf16(a(i, j));
                }
            }
            for parallel in [false, true] {
                let dst_stride = n + 2;
                let mut c = vec![f32::NAN; m * dst_stride];
                matmul(&mut c, dst_stride, &rows, width, m, &packed, parallel);
                for i in 0..m {
                    for j in 0..n {
                        let (mut rounded, mut exact, mut magnitude) = (0f64, 0f64, 0f64);
                        for l in 0..k {
                            let (x, y) = (a(i, l), bv(l, j));
                            let (xr, yr) = (to_f32(to_bf16(x)), to_f32(to_bf16(y)));
                            rounded += f64::from(xr) * f64::from(yr);
                            exact += f64::from(x) * f64::from(y);
                            magnitude += f64::from(x.abs()) * f64::from(y.abs());
                        }
                        let ours = f64::from(c[i * dst_stride + j]);
                        let sums = k as f64 * 2f64.powi(-24) * magnitude * 1.01;
                        let operands = (2.0 * 2f64.powi(-8) + 2f64.powi(-16)) * magnitude;
                        assert!(
                            (ours - rounded).abs() <= sums,
                            "{m}×{k}×{n} ({i}, {j}): {ours} against {rounded} (rounded operands)"
                        );
                        assert!(
                            (ours - exact).abs() <= sums + operands,
                            "{m}×{k}×{n} ({i}, {j}): {ours} against {exact}"
                        );
                    }
                    // Nothing is written past the `n` columns of a row.
                    assert!(c[i * dst_stride + n].is_nan() && c[i * dst_stride + n + 1].is_nan());
                }
            }
        }
    }
}
