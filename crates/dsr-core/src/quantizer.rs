//! The vector quantizer: nearest codebook vector, straight-through gradient, and the EMA
//! codebook update used by phase-1 pretraining.

use candle_core::{DType, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

use crate::kernels::conv::with_f32_data;
use crate::{Error, Result};
use rayon::prelude::*;

/// Rows of the flattened input processed at once when searching the nearest code, so that the
/// distance matrix stays small (4096 rows × 4096 codes = 64 MiB).
const DISTANCE_CHUNK_ROWS: usize = 4096;

/// Parameters of the exponential-moving-average codebook update (the original recipe's
/// `VectorQuantizerEMA`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmaConfig {
    /// Decay of the moving averages.
    pub decay: f64,
    /// Laplace smoothing of the cluster sizes.
    pub epsilon: f64,
    /// Weight of the commitment loss `MSE(sg[q], x)`.
    pub commitment_cost: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.99,
            epsilon: 1e-5,
            commitment_cost: 0.25,
        }
    }
}

/// The result of quantizing a feature map.
#[derive(Debug, Clone)]
pub struct Quantized {
    /// Straight-through output `x + (q − x)` with the gradient of the identity, `B×D×h×w`.
    pub quantized: Tensor,
    /// Index of the chosen code per position, `B×h×w`, `u32`.
    pub indices: Tensor,
}

/// What a phase-1 (EMA) quantization step returns.
#[derive(Debug, Clone)]
pub struct EmaQuantized {
    /// Straight-through output and indices, as [`VectorQuantizer::forward`] gives them.
    pub output: Quantized,
    /// Commitment loss `commitment_cost · MSE(sg[q], x)` (a scalar).
    pub commitment_loss: Tensor,
    /// Codebook perplexity `exp(−Σ p log p)` of this batch's code usage.
    pub perplexity: f64,
    /// How many codes this batch used at least once.
    pub codes_used: usize,
}

/// A codebook of `K` vectors of width `D` (PyTorch keys `_embedding.weight`, `_ema_w`,
/// `_ema_cluster_size`).
///
/// Inference and phases 2–3 only read `_embedding.weight`; the EMA tensors are loaded so that
/// checkpoints round-trip and are updated by [`VectorQuantizer::forward_ema`] in phase 1.
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    embedding: Tensor,
    ema_w: Tensor,
    ema_cluster_size: Tensor,
}

impl VectorQuantizer {
    /// Reads the codebook of `num_embeddings` vectors of width `embedding_dim` under `vb`.
    pub fn new(
        num_embeddings: usize,
        embedding_dim: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let normal = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let embedding = vb.pp("_embedding").get_with_hints(
            (num_embeddings, embedding_dim),
            "weight",
            normal,
        )?;
        let ema_w = vb.get_with_hints((num_embeddings, embedding_dim), "_ema_w", normal)?;
        let ema_cluster_size =
            vb.get_with_hints(num_embeddings, "_ema_cluster_size", Init::Const(0.0))?;
        Ok(Self {
            embedding,
            ema_w,
            ema_cluster_size,
        })
    }

    /// The codebook `K×D`.
    pub fn codebook(&self) -> &Tensor {
        &self.embedding
    }

    /// Number of codes `K`.
    pub fn num_embeddings(&self) -> usize {
        self.embedding.dims()[0]
    }

    /// Squared distances `‖f‖² + ‖e‖² − 2 f·eᵀ` from every row of `flat` (`N×D`) to every code,
    /// `N×K`, in the expanded form of the reference (it decides near-ties the same way).
    pub fn squared_distances(&self, flat: &Tensor) -> candle_core::Result<Tensor> {
        let codebook = self.embedding.detach();
        let code_norms = codebook.sqr()?.sum(1)?.unsqueeze(0)?;
        squared_distances(&flat.detach(), &codebook, &code_norms)
    }

    /// Nearest-code indices of a `B×D×h×w` map, `B×h×w` `u32` (first index on ties). Computed
    /// without gradient, in row chunks so that memory stays bounded.
    pub fn indices(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, d, h, w) = xs.dims4()?;
        if d != self.embedding.dim(1)? {
            return Err(Error::Input(format!(
                "vector quantizer expects {} channels, got {d}",
                self.embedding.dim(1)?
            )));
        }
        let flat = flatten_positions(&xs.detach())?;
        let codebook = self.embedding.detach();
        let code_norms = codebook.sqr()?.sum(1)?.unsqueeze(0)?;
        let n = b * h * w;
        let mut chunks = Vec::with_capacity(n.div_ceil(DISTANCE_CHUNK_ROWS));
        let mut start = 0;
        while start < n {
            let len = DISTANCE_CHUNK_ROWS.min(n - start);
            let rows = flat.narrow(0, start, len)?;
            chunks.push(nearest_codes(&rows, &codebook, &code_norms)?);
            start += len;
        }
        Ok(Tensor::cat(&chunks, 0)?.reshape((b, h, w))?)
    }

    /// The code vectors of `indices` (`B×h×w`) as a `B×D×h×w` map.
    pub fn lookup(&self, indices: &Tensor) -> Result<Tensor> {
        let (b, h, w) = indices.dims3()?;
        let rows = self
            .embedding
            .detach()
            .index_select(&indices.flatten_all()?, 0)?;
        Ok(rows
            .reshape((b, h, w, ()))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }

    /// Quantizes `xs` (`B×D×h×w`): nearest code per position, returned through the
    /// straight-through estimator `x + (q − x)`, whose gradient w.r.t. `x` is the identity. The
    /// codebook receives no gradient.
    pub fn forward(&self, xs: &Tensor) -> Result<Quantized> {
        let indices = self.indices(xs)?;
        let q = self.lookup(&indices)?;
        let quantized = (xs + (q - xs)?.detach())?;
        Ok(Quantized { quantized, indices })
    }

    /// Phase-1 quantization with the EMA codebook update of the original recipe: quantizes with
    /// the current codebook, then updates `_ema_cluster_size`, `_ema_w` and `_embedding.weight`
    /// in place:
    ///
    /// * `N ← decay·N + (1 − decay)·counts`, then Laplace smoothing
    ///   `N ← (N + ε) / (ΣN + K·ε) · ΣN`;
    /// * `W ← decay·W + (1 − decay)·Σ_{x→k} x`;
    /// * `E ← W / N`.
    ///
    /// The quantizer must have been built from trainable variables (a `VarMap`), otherwise an
    /// error is returned.
    pub fn forward_ema(&self, xs: &Tensor, cfg: &EmaConfig) -> Result<EmaQuantized> {
        let output = self.forward(xs)?;
        // The commitment loss uses the codebook before this step's update, as the reference does.
        let q_before = self.lookup(&output.indices)?;
        let commitment_loss = ((q_before - xs)?.sqr()?.mean_all()? * cfg.commitment_cost)?;
        let flat = flatten_positions(&xs.detach())?;
        let k = self.num_embeddings();
        let idx = output.indices.flatten_all()?;
        let counts = Tensor::zeros(k, DType::F32, xs.device())?.index_add(
            &idx,
            &Tensor::ones(idx.dim(0)?, DType::F32, xs.device())?,
            0,
        )?;
        let dw =
            Tensor::zeros((k, flat.dim(1)?), DType::F32, xs.device())?.index_add(&idx, &flat, 0)?;

        let decay = cfg.decay;
        let size = ((self.ema_cluster_size.detach() * decay)? + (counts.clone() * (1.0 - decay))?)?;
        let total = size.sum_all()?.to_scalar::<f32>()? as f64;
        let size = ((size + cfg.epsilon)? * (total / (total + k as f64 * cfg.epsilon)))?;
        let ema_w = ((self.ema_w.detach() * decay)? + (dw * (1.0 - decay))?)?;
        let embedding = ema_w.broadcast_div(&size.unsqueeze(1)?)?;
        for (target, value, name) in [
            (&self.ema_cluster_size, &size, "_ema_cluster_size"),
            (&self.ema_w, &ema_w, "_ema_w"),
            (&self.embedding, &embedding, "_embedding.weight"),
        ] {
            if !target.is_variable() {
                return Err(Error::Input(format!(
                    "the EMA update needs a trainable codebook, but {name} is a constant (build the model from a VarMap)"
                )));
            }
            Var::from_tensor(target)?.set(value)?;
        }

        let probs = (counts / idx.dim(0)? as f64)?.to_vec1::<f32>()?;
        let entropy: f64 = probs
            .iter()
            .map(|&p| -(p as f64) * ((p as f64) + 1e-10).ln())
            .sum();
        let codes_used = probs.iter().filter(|&&p| p > 0.0).count();
        Ok(EmaQuantized {
            output,
            commitment_loss,
            perplexity: entropy.exp(),
            codes_used,
        })
    }

    /// Replaces the codes listed in `codes` by the rows of `vectors` (`len(codes)×D`) and resets
    /// their EMA statistics to a cluster of size one at that vector. Used in phase 1 to revive
    /// codes that no input selects.
    pub fn reseed_codes(&self, codes: &[u32], vectors: &Tensor) -> Result<()> {
        if codes.is_empty() {
            return Ok(());
        }
        if !self.embedding.is_variable() {
            return Err(Error::Input(
                "re-seeding codes needs a trainable codebook (build the model from a VarMap)"
                    .into(),
            ));
        }
        let device = self.embedding.device();
        let idx = Tensor::from_slice(codes, codes.len(), device)?;
        let vectors = vectors.detach().to_dtype(DType::F32)?;
        let keep = Tensor::ones(self.num_embeddings(), DType::F32, device)?.index_add(
            &idx,
            &Tensor::full(-1f32, codes.len(), device)?,
            0,
        )?;
        let emb = self
            .embedding
            .detach()
            .broadcast_mul(&keep.unsqueeze(1)?)?
            .index_add(&idx, &vectors, 0)?;
        let size = (self.ema_cluster_size.detach() * &keep)?.index_add(
            &idx,
            &Tensor::ones(codes.len(), DType::F32, device)?,
            0,
        )?;
        let ema_w = emb.broadcast_mul(&size.unsqueeze(1)?)?;
        Var::from_tensor(&self.embedding)?.set(&emb)?;
        Var::from_tensor(&self.ema_cluster_size)?.set(&size)?;
        Var::from_tensor(&self.ema_w)?.set(&ema_w)?;
        Ok(())
    }
}

/// `B×D×h×w` → `(B·h·w)×D`, rows ordered by (b, y, x).
pub(crate) fn flatten_positions(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (b, d, h, w) = xs.dims4()?;
    xs.permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((b * h * w, d))
}

/// For every row of `flat` (`N×D`), the index (`u32`) of the code with the smallest
/// [`squared_distances`], the first on ties. On the CPU the distances are formed row by row from
/// the products `f·eᵀ`, with the same f32 operations as [`squared_distances`] (so the same
/// values), and never stored: four passes over an `N×K` matrix become one.
fn nearest_codes(
    flat: &Tensor,
    codebook: &Tensor,
    code_norms: &Tensor,
) -> candle_core::Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(f32_cpu(flat) && f32_cpu(codebook) && f32_cpu(code_norms)) {
        return squared_distances(flat, codebook, code_norms)?.argmin(1);
    }
    let k = codebook.dim(0)?;
    if k == 0 {
        candle_core::bail!("vector quantizer: the codebook is empty");
    }
    let row_norms = flat.sqr()?.sum_keepdim(D::Minus1)?;
    let dots = flat.matmul(&codebook.t()?)?;
    let indices = with_f32_data(&row_norms, |rows| {
        with_f32_data(code_norms, |codes| {
            with_f32_data(&dots, |dots| {
                Ok(dots
                    .par_chunks_exact(k)
                    .zip(rows.par_iter())
                    .map(|(products, &row)| {
                        // (‖f‖² + ‖e‖²) − (2·f·e + 0), as broadcast_add, affine and sub do.
                        let distance = |j: usize| (row + codes[j]) - (products[j] * 2.0 + 0.0);
                        let mut best = (distance(0), 0);
                        for j in 1..k {
                            let d = distance(j);
                            if d < best.0 {
                                best = (d, j);
                            }
                        }
                        best.1 as u32
                    })
                    .collect::<Vec<u32>>())
            })
        })
    })?;
    let n = indices.len();
    Tensor::from_vec(indices, n, flat.device())
}

/// `(‖f‖² + ‖e‖²) − 2 f·eᵀ` for rows `flat` (`N×D`), `codebook` (`K×D`), `code_norms` (`1×K`).
fn squared_distances(
    flat: &Tensor,
    codebook: &Tensor,
    code_norms: &Tensor,
) -> candle_core::Result<Tensor> {
    let row_norms = flat.sqr()?.sum_keepdim(D::Minus1)?;
    let dots = flat.matmul(&codebook.t()?)?;
    row_norms.broadcast_add(code_norms)? - (dots * 2.0)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nearest_codes_match_the_distance_matrix_and_break_ties_low() {
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n as u32)
                .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let (n, k, d) = (300, 37, 5);
        let flat = Tensor::from_vec(values(n * d, 7), (n, d), &Device::Cpu).unwrap();
        // Codes 3 and 9 are the same vector: rows nearest to it must get 3.
        let mut codes = values(k * d, 11);
        let copy: Vec<f32> = codes[3 * d..4 * d].to_vec();
        codes[9 * d..10 * d].copy_from_slice(&copy);
        let codebook = Tensor::from_vec(codes, (k, d), &Device::Cpu).unwrap();
        let code_norms = codebook
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let expected: Vec<u32> = squared_distances(&flat, &codebook, &code_norms)
            .unwrap()
            .argmin(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let got: Vec<u32> = nearest_codes(&flat, &codebook, &code_norms)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(got, expected);
        assert!(got.contains(&3) && !got.contains(&9));
    }
}
