//! [`DsrModel`]: the whole DSR network with one typed entry point per use.
//!
//! Naming: "hi" is the fine feature level at H/4 (the reference's "bottom", `_b`, `_bot`), "lo"
//! the coarse level at H/8 (the reference's "top", `_t`). F are continuous features, Q quantized
//! ones, `I_gen` the general reconstruction, `I_spc` the object-specific one, M the anomaly
//! mask.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::anomaly::{fake_anomalies, Randomness};
use crate::anomaly_detection::AnomalyDetectionModule;
use crate::config::validate_image_size;
use crate::discrete::{DiscreteLatentModel, Encoded};
use crate::exec::{self, Execution, Policy};
use crate::feature_memory::FeatureMemory;
use crate::layers::{avg_pool_same, max_pool, softmax_channels, upsample_nearest};
use crate::quantizer::Quantized;
use crate::reconstruction::ImageReconstructionNetwork;
use crate::subspace::SubspaceRestrictionModule;
use crate::upsampling::UpsamplingModule;
use crate::weights::DetachedBackend;
use crate::{DsrConfig, Error, Result};

/// Side of the averaging window that smooths the mask before the image score's global max.
pub const SCORE_SMOOTHING_KERNEL: usize = 21;

/// The image score of DSR from the detection module's mask probabilities `M` (`B×2×H×W`):
/// `M[:, 1:2]` averaged over 21×21 windows (zero padding counted), then the global maximum.
/// Returns `(averaged map B×1×H×W, score B)`.
pub fn image_score(mask_probs: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let smoothed = avg_pool_same(&mask_probs.narrow(1, 1, 1)?, SCORE_SMOOTHING_KERNEL)?;
    let score = smoothed.flatten_from(1)?.max(1)?;
    Ok((smoothed, score))
}

/// The anomaly map of DSR from the refined mask probabilities `M_up` (`B×2×H×W`): channel 1,
/// `B×H×W`.
pub fn anomaly_map(refined_probs: &Tensor) -> candle_core::Result<Tensor> {
    refined_probs.narrow(1, 1, 1)?.squeeze(1)
}

/// Which mask probability a model gives as its anomaly map.
///
/// The reference outputs the refined mask of the upsampling module (trained in phase 3). After a
/// short or no phase 3 the detection module's own mask (trained in phase 2) can localise better;
/// a model trained that way outputs [`OutputMap::Detection`]. The image score is the same for
/// both: it always comes from the detection module's mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMap {
    /// The upsampling module's refined mask `M_up[:, 1]` (the reference).
    #[default]
    Refined,
    /// The anomaly detection module's mask `M[:, 1]`.
    Detection,
    /// The distance of each pixel's features to the nearest feature of the training images
    /// ([`crate::feature_memory`]); needs a feature memory.
    Memory,
    /// The detection module's mask and the memory's distance map, each standardised and added
    /// ([`crate::feature_memory::Blend`]); needs a feature memory with a fitted blend.
    Combined,
}

impl OutputMap {
    /// The name used in checkpoints and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            OutputMap::Refined => "refined",
            OutputMap::Detection => "detection",
            OutputMap::Memory => "memory",
            OutputMap::Combined => "combined",
        }
    }
}

impl std::fmt::Display for OutputMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for OutputMap {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "refined" => Ok(OutputMap::Refined),
            "detection" => Ok(OutputMap::Detection),
            "memory" => Ok(OutputMap::Memory),
            "combined" => Ok(OutputMap::Combined),
            other => Err(Error::Config(format!(
                "output map '{other}' is not one of \"refined\" (the upsampling module's mask), \"detection\" (the detection module's mask), \"memory\" (the feature memory's distance) or \"combined\" (detection and memory)"
            ))),
        }
    }
}

/// The answer of the model for a batch.
#[derive(Debug, Clone)]
pub struct Inference {
    /// Per-pixel anomaly probability, `B×H×W`: of the refined mask, or of the detection
    /// module's mask when the model outputs [`OutputMap::Detection`].
    pub anomaly_map: Tensor,
    /// Image anomaly score: max of the 21×21-averaged non-refined mask, `B`.
    pub pred_score: Tensor,
}

/// Every tensor of the evaluation forward, for inspection and parity checks.
#[derive(Debug, Clone)]
pub struct EvalTrace {
    /// The shared encoder pass of the discrete model.
    pub encoded: Encoded,
    /// `cat(upsample_t(Q_lo), Q_hi)`, the general decoder input.
    pub quant_join_general: Tensor,
    /// `I_gen`: the general reconstruction, `B×3×H×W`.
    pub recon_image_general: Tensor,
    /// `(F̃_hi, Q̃_hi)` of the fine subspace restriction module.
    pub srm_hi: (Tensor, Quantized),
    /// `(F̃_lo, Q̃_lo)` of the coarse subspace restriction module.
    pub srm_lo: (Tensor, Quantized),
    /// `upsample_t(Q̃_lo)`.
    pub up_quantized_recon_t: Tensor,
    /// `cat(upsample_t(Q̃_lo), Q̃_hi)`, the image reconstruction network's input.
    pub quant_join_specific: Tensor,
    /// `I_spc`: the object-specific reconstruction, `B×3×H×W`.
    pub obj_spec_image: Tensor,
    /// Logits of the anomaly detection module, `B×2×H×W`.
    pub adm_logits: Tensor,
    /// `M = softmax(adm_logits)`, `B×2×H×W`.
    pub adm_softmax: Tensor,
    /// Logits of the upsampling module, `B×2×H×W`.
    pub upsampling_logits: Tensor,
    /// `M_up = softmax(upsampling_logits)`, `B×2×H×W`.
    pub upsampling_softmax: Tensor,
    /// 21×21 average of `M[:, 1:2]` (zero padding counted), `B×1×H×W`.
    pub score_avgpool: Tensor,
    /// The final answer.
    pub inference: Inference,
}

/// What the phase-2 training forward returns (the reference's dictionary, plus intermediates).
#[derive(Debug, Clone)]
pub struct Phase2Output {
    /// F̃_hi: restored fine features, `B×D×H/4×W/4` (trained towards `embedding_bot`).
    pub recon_feat_hi: Tensor,
    /// F̃_lo: restored coarse features, `B×D×H/8×W/8` (trained towards `embedding_top`).
    pub recon_feat_lo: Tensor,
    /// Q_hi of the clean image (target, no gradient).
    pub embedding_bot: Tensor,
    /// Q_lo of the clean image (target, no gradient).
    pub embedding_top: Tensor,
    /// I_spc: object-specific reconstruction of the anomalous codes, `B×3×H×W`.
    pub obj_spec_image: Tensor,
    /// M: softmax of the detection module on detached inputs, `B×2×H×W`.
    pub anomaly_map: Tensor,
    /// M_gt: the mask at the resolution of the level(s) where anomalies were placed, `B×1×H×W`.
    pub true_anomaly_map: Tensor,
    /// I_gen of the anomalous codes (the detection module's second input), `B×3×H×W`.
    pub recon_image: Tensor,
    /// The coarse codes given to the subspace module (anomalous or clean), `B×D×H/8×W/8`.
    pub anomaly_embedding_lo: Tensor,
    /// The fine codes given to the subspace module (anomalous or clean), `B×D×H/4×W/4`.
    pub anomaly_embedding_hi: Tensor,
    /// The codes picked by the three feature-space anomaly calls: `[call][sample][position]`.
    pub picked_codes: [Vec<Vec<u32>>; 3],
    /// Per sample: anomalies in both levels.
    pub use_both: Vec<bool>,
    /// Per sample (when not both): anomalies in the coarse level only (else the fine level only).
    pub use_lo: Vec<bool>,
}

/// The DSR model: a frozen discrete latent model, two subspace restriction modules, the image
/// reconstruction network, the anomaly detection module and the upsampling module.
///
/// The discrete model is always frozen here: its weights are read as constants, so no gradient
/// is ever computed for them (phase-1 pretraining builds a [`DiscreteLatentModel`] on its own).
#[derive(Debug, Clone)]
pub struct DsrModel {
    cfg: DsrConfig,
    /// How its calls compute (see [`crate::exec`]).
    policy: Policy,
    discrete: DiscreteLatentModel,
    srm_hi: SubspaceRestrictionModule,
    srm_lo: SubspaceRestrictionModule,
    irn: ImageReconstructionNetwork,
    adm: AnomalyDetectionModule,
    ups: UpsamplingModule,
    output: OutputMap,
    memory: Option<FeatureMemory>,
}

impl DsrModel {
    /// Every weight of the model for `cfg`, drawn as [`crate::init::init_seeded`] draws them
    /// (PyTorch's default initialisation) from `seed`, as plain tensors on the CPU under their
    /// PyTorch keys: a random but reproducible model for benchmarks and smoke runs.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use candle_nn::VarBuilder;
    /// use dsr_core::{DsrConfig, DsrModel};
    ///
    /// let cfg = DsrConfig { num_hiddens: 8, num_residual_hiddens: 4, embedding_dim: 4,
    ///     num_embeddings: 8, anomaly_detection_module_base_width: 4,
    ///     upsampling_module_base_width: 4, ..DsrConfig::default() };
    /// let weights = DsrModel::seeded_weights(&cfg, 7).unwrap();
    /// let model = DsrModel::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu));
    /// assert!(model.is_ok());
    /// ```
    pub fn seeded_weights(
        cfg: &DsrConfig,
        seed: u64,
    ) -> Result<std::collections::HashMap<String, Tensor>> {
        let varmap = candle_nn::VarMap::new();
        Self::new(
            cfg,
            VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &candle_core::Device::Cpu),
        )?;
        crate::init::init_seeded(&varmap, seed, crate::init::InitScheme::Pytorch, &[])?;
        let data = varmap.data().lock().expect("varmap lock");
        Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect())
    }

    /// Builds the model for `cfg`, reading every tensor under its PyTorch state_dict key from
    /// `vb`.
    pub fn new(cfg: &DsrConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let frozen = VarBuilder::from_backend(
            Box::new(DetachedBackend::new(vb.clone())),
            vb.dtype(),
            vb.device().clone(),
        );
        let d = cfg.embedding_dim;
        Ok(Self {
            cfg: *cfg,
            policy: Policy::default(),
            discrete: DiscreteLatentModel::new(cfg, frozen.pp("discrete_latent_model"))?,
            srm_hi: SubspaceRestrictionModule::new(d, vb.pp("subspace_restriction_module_hi"))?,
            srm_lo: SubspaceRestrictionModule::new(d, vb.pp("subspace_restriction_module_lo"))?,
            irn: ImageReconstructionNetwork::new(cfg, vb.pp("image_reconstruction_network"))?,
            adm: AnomalyDetectionModule::new(
                cfg.anomaly_detection_module_base_width,
                vb.pp("anomaly_detection_module"),
            )?,
            ups: UpsamplingModule::new(
                cfg.upsampling_module_base_width,
                vb.pp("upsampling_module"),
            )?,
            output: OutputMap::Refined,
            memory: None,
        })
    }

    /// The model with another execution policy (convolution algorithm, recomputation); a model
    /// built for inference goes on keeping its transformed filters.
    pub fn with_execution(mut self, exec: Execution) -> Self {
        self.policy.exec = exec;
        self
    }

    /// Marks the model as built from loaded weights that nothing changes: its layers may keep
    /// their weights' transformed copies between calls (see
    /// [`crate::Checkpoint::into_inference_model`]).
    pub(crate) fn keeping_filters(mut self) -> Self {
        self.policy.keep_filters = true;
        self
    }

    /// Its execution policy.
    pub fn execution(&self) -> Execution {
        self.policy.exec
    }

    /// The same model, giving `output` as its anomaly map.
    pub fn with_output_map(mut self, output: OutputMap) -> Self {
        self.output = output;
        self
    }

    /// Which mask the model gives as its anomaly map.
    pub fn output_map(&self) -> OutputMap {
        self.output
    }

    /// The same model with a memory of training features ([`OutputMap::Memory`],
    /// [`OutputMap::Combined`]).
    pub fn with_feature_memory(mut self, memory: FeatureMemory) -> Self {
        self.memory = Some(memory);
        self
    }

    /// Its feature memory, if it has one.
    pub fn feature_memory(&self) -> Option<&FeatureMemory> {
        self.memory.as_ref()
    }

    /// The anomaly map `B×H×W` that [`DsrModel::output_map`] names, from the forward's parts.
    fn output_of(&self, encoded: &Encoded, adm: &Tensor, ups: &Tensor) -> Result<Tensor> {
        let memory = || {
            self.memory.as_ref().ok_or_else(|| {
                Error::Config(format!(
                    "the model outputs the '{}' map but holds no feature memory",
                    self.output
                ))
            })
        };
        let (_, _, h, w) = adm.dims4()?;
        Ok(match self.output {
            OutputMap::Refined => anomaly_map(ups)?,
            OutputMap::Detection => anomaly_map(adm)?,
            OutputMap::Memory => memory()?.distance_map(encoded, h, w)?,
            OutputMap::Combined => {
                let memory = memory()?;
                memory.combine(&anomaly_map(adm)?, &memory.distance_map(encoded, h, w)?)?
            }
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DsrConfig {
        &self.cfg
    }

    /// The frozen discrete latent model.
    pub fn discrete(&self) -> &DiscreteLatentModel {
        &self.discrete
    }

    /// The fine subspace restriction module.
    pub fn subspace_hi(&self) -> &SubspaceRestrictionModule {
        &self.srm_hi
    }

    /// The coarse subspace restriction module.
    pub fn subspace_lo(&self) -> &SubspaceRestrictionModule {
        &self.srm_lo
    }

    /// The image reconstruction network (object-specific decoder).
    pub fn reconstruction(&self) -> &ImageReconstructionNetwork {
        &self.irn
    }

    /// The anomaly detection module.
    pub fn anomaly_detection(&self) -> &AnomalyDetectionModule {
        &self.adm
    }

    /// The upsampling (mask refinement) module.
    pub fn upsampling(&self) -> &UpsamplingModule {
        &self.ups
    }

    fn check_image(&self, image: &Tensor) -> Result<(usize, usize, usize)> {
        let dims = image.dims();
        if dims.len() != 4 || dims[1] != 3 {
            return Err(Error::Input(format!(
                "expected an image batch B×3×H×W, got shape {dims:?}"
            )));
        }
        validate_image_size(dims[2], dims[3])?;
        Ok((dims[0], dims[2], dims[3]))
    }

    /// Inference on a batch `B×3×H×W` with values in [0, 1] (RGB, no normalisation): the
    /// anomaly map ([`DsrModel::output_map`] says which) and the image score.
    pub fn infer(&self, image: &Tensor) -> Result<Inference> {
        Ok(self.forward_eval(image)?.inference)
    }

    /// The evaluation forward with every intermediate tensor.
    pub fn forward_eval(&self, image: &Tensor) -> Result<EvalTrace> {
        let _policy = exec::enter(self.policy);
        self.check_image(image)?;
        let encoded = self.discrete.encode(image)?;
        let quant_join_general = Tensor::cat(&[&encoded.up_t, &encoded.q_b.quantized], 1)?;
        let recon_image_general = quant_join_general.apply(self.discrete.decoder_bot())?;
        let srm_hi = self
            .srm_hi
            .forward(&encoded.q_b.quantized, self.discrete.vq_bot())?;
        let srm_lo = self
            .srm_lo
            .forward(&encoded.q_t.quantized, self.discrete.vq_top())?;
        let up_quantized_recon_t = self.discrete.upsample_t(&srm_lo.1.quantized)?;
        let quant_join_specific = Tensor::cat(&[&up_quantized_recon_t, &srm_hi.1.quantized], 1)?;
        let obj_spec_image = quant_join_specific.apply(&self.irn)?;
        let adm_logits = self.adm.forward(&obj_spec_image, &recon_image_general)?;
        let adm_softmax = softmax_channels(&adm_logits)?;
        let upsampling_logits =
            self.ups
                .forward(&obj_spec_image, &recon_image_general, &adm_softmax)?;
        let upsampling_softmax = softmax_channels(&upsampling_logits)?;
        let (score_avgpool, pred_score) = image_score(&adm_softmax)?;
        let anomaly_map = self.output_of(&encoded, &adm_softmax, &upsampling_softmax)?;
        Ok(EvalTrace {
            encoded,
            quant_join_general,
            recon_image_general,
            srm_hi,
            srm_lo,
            up_quantized_recon_t,
            quant_join_specific,
            obj_spec_image,
            adm_logits,
            adm_softmax,
            upsampling_logits,
            upsampling_softmax,
            score_avgpool,
            inference: Inference {
                anomaly_map,
                pred_score,
            },
        })
    }

    /// The wall time (seconds) of each stage of one evaluation forward ([`DsrModel::forward_eval`]),
    /// in order: the per-module profile of inference.
    pub fn profile_eval(&self, image: &Tensor) -> Result<Vec<(&'static str, f64)>> {
        let _policy = exec::enter(self.policy);
        self.check_image(image)?;
        let mut times = Vec::new();
        let mut clock = std::time::Instant::now();
        let mut lap = |name: &'static str, times: &mut Vec<(&'static str, f64)>| {
            times.push((name, clock.elapsed().as_secs_f64()));
            clock = std::time::Instant::now();
        };
        let encoded = self.discrete.encode(image)?;
        lap("discrete encoders + VQ", &mut times);
        let joined = Tensor::cat(&[&encoded.up_t, &encoded.q_b.quantized], 1)?;
        let general = joined.apply(self.discrete.decoder_bot())?;
        lap("general decoder", &mut times);
        let srm_hi = self
            .srm_hi
            .forward(&encoded.q_b.quantized, self.discrete.vq_bot())?;
        lap("subspace restriction hi", &mut times);
        let srm_lo = self
            .srm_lo
            .forward(&encoded.q_t.quantized, self.discrete.vq_top())?;
        lap("subspace restriction lo", &mut times);
        let up = self.discrete.upsample_t(&srm_lo.1.quantized)?;
        let specific = Tensor::cat(&[&up, &srm_hi.1.quantized], 1)?.apply(&self.irn)?;
        lap("upsample_t + reconstruction network", &mut times);
        let adm = softmax_channels(&self.adm.forward(&specific, &general)?)?;
        lap("anomaly detection module", &mut times);
        let ups = softmax_channels(&self.ups.forward(&specific, &general, &adm)?)?;
        lap("upsampling module", &mut times);
        let (_, score) = image_score(&adm)?;
        let map = self.output_of(&encoded, &adm, &ups)?;
        // Read the outputs so that nothing is left pending.
        let _ = (score.to_vec1::<f32>()?, map.sum_all()?.to_scalar::<f32>()?);
        lap("score and map", &mut times);
        Ok(times)
    }

    /// The phase-3 training forward on a (smudge-augmented) batch: the refined mask
    /// probabilities `M_up`, `B×2×H×W`. Only the upsampling module receives gradients.
    pub fn forward_phase3(&self, image: &Tensor) -> Result<Tensor> {
        let _policy = exec::enter(self.policy);
        self.check_image(image)?;
        let encoded = self.discrete.encode(image)?;
        let general = self
            .discrete
            .decode_joined(&encoded.up_t, &encoded.q_b.quantized)?
            .detach();
        let (_, q_hi) = self
            .srm_hi
            .forward(&encoded.q_b.quantized, self.discrete.vq_bot())?;
        let (_, q_lo) = self
            .srm_lo
            .forward(&encoded.q_t.quantized, self.discrete.vq_top())?;
        let specific = self
            .discrete
            .decode_specific_input(&q_lo.quantized, &q_hi.quantized)?
            .apply(&self.irn)?
            .detach();
        let mask = softmax_channels(&self.adm.forward(&specific, &general)?)?.detach();
        Ok(softmax_channels(
            &self.ups.forward(&specific, &general, &mask)?,
        )?)
    }

    /// The phase-2 training forward: feature-space anomalies are drawn from the
    /// codebooks inside `mask` (`B×1×H×W`, 0/1) with the random draws of `rng`.
    ///
    /// Gradients reach the subspace restriction modules (feature MSE, and the image MSE through
    /// the straight-through quantizers and the frozen `upsample_t`), the image reconstruction
    /// network (image MSE) and the anomaly detection module (focal term, on detached inputs);
    /// never the discrete model or the upsampling module.
    pub fn forward_phase2(
        &self,
        image: &Tensor,
        mask: &Tensor,
        rng: &mut dyn Randomness,
    ) -> Result<Phase2Output> {
        let _policy = exec::enter(self.policy);
        let (b, h, w) = self.check_image(image)?;
        let mdims = mask.dims();
        if mdims != [b, 1, h, w] {
            return Err(Error::Input(format!(
                "the anomaly mask must be {b}×1×{h}×{w} to match the images, got {mdims:?}"
            )));
        }
        let lambda = self.cfg.latent_anomaly_strength as f32;
        let strength = |u: Vec<f32>| {
            u.into_iter()
                .map(|r| r * (1.0 - lambda) + lambda)
                .collect::<Vec<f32>>()
        };
        let strength_lo = strength(rng.uniform(b)?);
        let strength_hi = strength(rng.uniform(b)?);

        let dm = &self.discrete;
        let enc = dm.encode(image)?;
        let (vq_top, vq_bot) = (dm.vq_top(), dm.vq_bot());
        let fake_lo = fake_anomalies(
            &enc.z_t,
            &enc.q_t.quantized,
            vq_top,
            mask,
            &strength_lo,
            rng,
        )?;
        let up_fake_lo = dm.upsample_t(&fake_lo.embeddings)?;
        let z_b_defect = dm.pre_vq_bot(&enc.enc_b, &up_fake_lo)?;
        let q_b_defect = vq_bot.forward(&z_b_defect)?;
        let fake_hi = fake_anomalies(
            &z_b_defect,
            &q_b_defect.quantized,
            vq_bot,
            mask,
            &strength_hi,
            rng,
        )?;
        let use_both: Vec<bool> = rng.below(b, 2)?.into_iter().map(|v| v == 1).collect();
        let use_lo: Vec<bool> = rng.below(b, 2)?.into_iter().map(|v| v == 1).collect();
        let fake_hi_only = fake_anomalies(
            &enc.z_b,
            &enc.q_b.quantized,
            vq_bot,
            mask,
            &strength_hi,
            rng,
        )?;

        let mask = mask.detach().to_dtype(image.dtype())?;
        let (lo_h, hi_h) = (enc.z_t.dim(2)?, enc.z_b.dim(2)?);
        let mask_lo = upsample_nearest(&max_pool(&mask, h / lo_h)?, h / lo_h)?;
        let mask_hi = upsample_nearest(&max_pool(&mask, h / hi_h)?, h / hi_h)?;

        let mut lo_parts = Vec::with_capacity(b);
        let mut hi_parts = Vec::with_capacity(b);
        let mut gt_parts = Vec::with_capacity(b);
        for i in 0..b {
            let pick = |t: &Tensor| t.narrow(0, i, 1);
            let (lo, hi, gt) = if use_both[i] {
                (
                    pick(&fake_lo.embeddings)?,
                    pick(&fake_hi.embeddings)?,
                    pick(&mask_lo)?,
                )
            } else if use_lo[i] {
                (
                    pick(&fake_lo.embeddings)?,
                    pick(&enc.q_b.quantized)?,
                    pick(&mask_lo)?,
                )
            } else {
                (
                    pick(&enc.q_t.quantized)?,
                    pick(&fake_hi_only.embeddings)?,
                    pick(&mask_hi)?,
                )
            };
            lo_parts.push(lo);
            hi_parts.push(hi);
            gt_parts.push(gt);
        }
        let anomaly_embedding_lo = Tensor::cat(&lo_parts, 0)?.detach();
        let anomaly_embedding_hi = Tensor::cat(&hi_parts, 0)?.detach();
        let true_anomaly_map = Tensor::cat(&gt_parts, 0)?;
        let recon_image = dm
            .decode_joined(
                &dm.upsample_t(&anomaly_embedding_lo)?,
                &anomaly_embedding_hi,
            )?
            .detach();

        let (recon_feat_hi, q_hi) = self.srm_hi.forward(&anomaly_embedding_hi, vq_bot)?;
        let (recon_feat_lo, q_lo) = self.srm_lo.forward(&anomaly_embedding_lo, vq_top)?;
        let obj_spec_image = dm
            .decode_specific_input(&q_lo.quantized, &q_hi.quantized)?
            .apply(&self.irn)?;
        let anomaly_map =
            softmax_channels(&self.adm.forward(&obj_spec_image.detach(), &recon_image)?)?;
        Ok(Phase2Output {
            recon_feat_hi,
            recon_feat_lo,
            embedding_bot: enc.q_b.quantized.detach(),
            embedding_top: enc.q_t.quantized.detach(),
            obj_spec_image,
            anomaly_map,
            true_anomaly_map,
            recon_image,
            anomaly_embedding_lo,
            anomaly_embedding_hi,
            picked_codes: [
                fake_lo.picked_codes,
                fake_hi.picked_codes,
                fake_hi_only.picked_codes,
            ],
            use_both,
            use_lo,
        })
    }
}
