//! The discrete latent model: two encoders, two codebooks and the general appearance decoder
//! (PyTorch prefix `discrete_latent_model.`, 40 tensors; the official pretrained file holds the
//! same names without the prefix).
//!
//! Terminology: "hi" is the fine level at H/4 (the reference's "bottom", `_b`), "lo" the coarse
//! level at H/8 (the reference's "top", `_t`).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::layers::{Conv2d, ConvTranspose2d};
use crate::quantizer::{EmaConfig, EmaQuantized, Quantized, VectorQuantizer};
use crate::{DsrConfig, Result};

/// One residual layer (`_layers.{i}`): `relu(x) + conv1×1(relu(conv3×3(relu(x))))`.
///
/// The reference's block starts with an in-place ReLU that overwrites its input before the
/// skip addition, so the skip carries `relu(x)`, not `x`; the pretrained weights were trained
/// that way and this layer reproduces it without aliasing.
#[derive(Debug, Clone)]
pub struct ResidualLayer {
    conv3: Conv2d,
    conv1: Conv2d,
}

impl ResidualLayer {
    /// Reads `_block.1.weight` (3×3, `channels→hidden`) and `_block.3.weight` (1×1,
    /// `hidden→channels`), both without bias.
    pub fn new(channels: usize, hidden: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("_block");
        Ok(Self {
            conv3: Conv2d::new(channels, hidden, 3, 1, 1, false, vb.pp("1"))?,
            conv1: Conv2d::new(hidden, channels, 1, 1, 0, false, vb.pp("3"))?,
        })
    }
}

impl Module for ResidualLayer {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = xs.relu()?;
        let block = xs.apply(&self.conv3)?.relu()?.apply(&self.conv1)?;
        xs + block
    }
}

/// `num_residual_layers` residual layers in sequence, then a ReLU (`_residual_stack`).
#[derive(Debug, Clone)]
pub struct ResidualStack {
    layers: Vec<ResidualLayer>,
}

impl ResidualStack {
    /// Reads `_layers.{i}` for every layer.
    pub fn new(
        channels: usize,
        hidden: usize,
        num_layers: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let vb = vb.pp("_layers");
        let layers = (0..num_layers)
            .map(|i| ResidualLayer::new(channels, hidden, vb.pp(i)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { layers })
    }
}

impl Module for ResidualStack {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = xs.apply(layer)?;
        }
        xs.relu()
    }
}

/// The fine encoder (`_encoder_b`): `3×H×W → Nh×H/4×W/4`.
#[derive(Debug, Clone)]
pub struct EncoderBot {
    conv_1: Conv2d,
    conv_2: Conv2d,
    conv_3: Conv2d,
    residual_stack: ResidualStack,
}

impl EncoderBot {
    /// Builds the encoder for `cfg` under `vb` (`_encoder_b`).
    pub fn new(cfg: &DsrConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let nh = cfg.num_hiddens;
        Ok(Self {
            conv_1: Conv2d::new(3, nh / 2, 4, 2, 1, true, vb.pp("_conv_1"))?,
            conv_2: Conv2d::new(nh / 2, nh, 4, 2, 1, true, vb.pp("_conv_2"))?,
            conv_3: Conv2d::new(nh, nh, 3, 1, 1, true, vb.pp("_conv_3"))?,
            residual_stack: ResidualStack::new(
                nh,
                cfg.num_residual_hiddens,
                cfg.num_residual_layers,
                vb.pp("_residual_stack"),
            )?,
        })
    }
}

impl Module for EncoderBot {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.apply(&self.conv_1)?
            .relu()?
            .apply(&self.conv_2)?
            .relu()?
            .apply(&self.conv_3)?
            .apply(&self.residual_stack)
    }
}

/// The coarse encoder (`_encoder_t`): `Nh×H/4 → Nh×H/8`.
#[derive(Debug, Clone)]
pub struct EncoderTop {
    conv_1: Conv2d,
    conv_2: Conv2d,
    residual_stack: ResidualStack,
}

impl EncoderTop {
    /// Builds the encoder for `cfg` under `vb` (`_encoder_t`).
    pub fn new(cfg: &DsrConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let nh = cfg.num_hiddens;
        Ok(Self {
            conv_1: Conv2d::new(nh, nh, 4, 2, 1, true, vb.pp("_conv_1"))?,
            conv_2: Conv2d::new(nh, nh, 3, 1, 1, true, vb.pp("_conv_2"))?,
            residual_stack: ResidualStack::new(
                nh,
                cfg.num_residual_hiddens,
                cfg.num_residual_layers,
                vb.pp("_residual_stack"),
            )?,
        })
    }
}

impl Module for EncoderTop {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.apply(&self.conv_1)?
            .relu()?
            .apply(&self.conv_2)?
            .relu()?
            .apply(&self.residual_stack)
    }
}

/// The general object appearance decoder (`_decoder_b`): `2D×H/4 → 3×H`, no output activation.
#[derive(Debug, Clone)]
pub struct DecoderBot {
    conv_1: Conv2d,
    residual_stack: ResidualStack,
    conv_trans_1: ConvTranspose2d,
    conv_trans_2: ConvTranspose2d,
}

impl DecoderBot {
    /// Builds the decoder for `cfg` under `vb` (`_decoder_b`).
    pub fn new(cfg: &DsrConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let nh = cfg.num_hiddens;
        Ok(Self {
            conv_1: Conv2d::new(2 * cfg.embedding_dim, nh, 3, 1, 1, true, vb.pp("_conv_1"))?,
            residual_stack: ResidualStack::new(
                nh,
                cfg.num_residual_hiddens,
                cfg.num_residual_layers,
                vb.pp("_residual_stack"),
            )?,
            conv_trans_1: ConvTranspose2d::up2(nh, nh / 2, vb.pp("_conv_trans_1"))?,
            conv_trans_2: ConvTranspose2d::up2(nh / 2, 3, vb.pp("_conv_trans_2"))?,
        })
    }
}

impl Module for DecoderBot {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        xs.apply(&self.conv_1)?
            .apply(&self.residual_stack)?
            .apply(&self.conv_trans_1)?
            .relu()?
            .apply(&self.conv_trans_2)
    }
}

/// Everything the shared encoder pass computes, kept for the later stages and for
/// parity checks.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Fine encoder output, `B×Nh×H/4×W/4`.
    pub enc_b: Tensor,
    /// Coarse encoder output, `B×Nh×H/8×W/8`.
    pub enc_t: Tensor,
    /// F_lo: coarse features before quantization, `B×D×H/8×W/8`.
    pub z_t: Tensor,
    /// Q_lo: quantized coarse features and their code indices.
    pub q_t: Quantized,
    /// `upsample_t(Q_lo)`, `B×D×H/4×W/4`.
    pub up_t: Tensor,
    /// F_hi: fine features before quantization, `B×D×H/4×W/4`.
    pub z_b: Tensor,
    /// Q_hi: quantized fine features and their code indices.
    pub q_b: Quantized,
}

/// What the phase-1 forward returns.
#[derive(Debug, Clone)]
pub struct Pretrained {
    /// The reconstruction `B×3×H×W`.
    pub recon: Tensor,
    /// Coarse features before quantization (for re-seeding unused codes).
    pub z_t: Tensor,
    /// Fine features before quantization (for re-seeding unused codes).
    pub z_b: Tensor,
    /// The coarse quantizer's output, commitment loss and statistics.
    pub top: EmaQuantized,
    /// The fine quantizer's output, commitment loss and statistics.
    pub bot: EmaQuantized,
}

/// The discrete latent model (VQ-VAE-2 style): encoders, pre-quantization convolutions, the two
/// codebooks, `upsample_t` and the general appearance decoder.
#[derive(Debug, Clone)]
pub struct DiscreteLatentModel {
    encoder_b: EncoderBot,
    encoder_t: EncoderTop,
    pre_vq_conv_top: Conv2d,
    pre_vq_conv_bot: Conv2d,
    vq_top: VectorQuantizer,
    vq_bot: VectorQuantizer,
    upsample_t: ConvTranspose2d,
    decoder_b: DecoderBot,
}

impl DiscreteLatentModel {
    /// Builds the model for `cfg`; `vb` points at the model's own keys (`discrete_latent_model`
    /// inside a full DSR checkpoint, the root of the official `.pckl`).
    pub fn new(cfg: &DsrConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, k, nh) = (cfg.embedding_dim, cfg.num_embeddings, cfg.num_hiddens);
        Ok(Self {
            encoder_b: EncoderBot::new(cfg, vb.pp("_encoder_b"))?,
            encoder_t: EncoderTop::new(cfg, vb.pp("_encoder_t"))?,
            pre_vq_conv_top: Conv2d::new(nh, d, 1, 1, 0, true, vb.pp("_pre_vq_conv_top"))?,
            pre_vq_conv_bot: Conv2d::new(nh + d, d, 1, 1, 0, true, vb.pp("_pre_vq_conv_bot"))?,
            vq_top: VectorQuantizer::new(k, d, vb.pp("_vq_vae_top"))?,
            vq_bot: VectorQuantizer::new(k, d, vb.pp("_vq_vae_bot"))?,
            upsample_t: ConvTranspose2d::up2(d, d, vb.pp("upsample_t"))?,
            decoder_b: DecoderBot::new(cfg, vb.pp("_decoder_b"))?,
        })
    }

    /// The fine encoder.
    pub fn encoder_bot(&self) -> &EncoderBot {
        &self.encoder_b
    }

    /// The coarse encoder.
    pub fn encoder_top(&self) -> &EncoderTop {
        &self.encoder_t
    }

    /// The coarse ("top", lo) codebook.
    pub fn vq_top(&self) -> &VectorQuantizer {
        &self.vq_top
    }

    /// The fine ("bottom", hi) codebook.
    pub fn vq_bot(&self) -> &VectorQuantizer {
        &self.vq_bot
    }

    /// The general appearance decoder.
    pub fn decoder_bot(&self) -> &DecoderBot {
        &self.decoder_b
    }

    /// `upsample_t`: lifts a coarse map `B×D×H/8` to `B×D×H/4`.
    pub fn upsample_t(&self, lo: &Tensor) -> candle_core::Result<Tensor> {
        lo.apply(&self.upsample_t)
    }

    /// The fine pre-quantization features `F_hi = _pre_vq_conv_bot(cat(enc_b, up_lo))`.
    pub fn pre_vq_bot(&self, enc_b: &Tensor, up_lo: &Tensor) -> candle_core::Result<Tensor> {
        Tensor::cat(&[enc_b, up_lo], 1)?.apply(&self.pre_vq_conv_bot)
    }

    /// The shared encoder pass of an image batch `B×3×H×W`.
    pub fn encode(&self, image: &Tensor) -> Result<Encoded> {
        let enc_b = image.apply(&self.encoder_b)?;
        let enc_t = enc_b.apply(&self.encoder_t)?;
        let z_t = enc_t.apply(&self.pre_vq_conv_top)?;
        let q_t = self.vq_top.forward(&z_t)?;
        let up_t = self.upsample_t(&q_t.quantized)?;
        let z_b = self.pre_vq_bot(&enc_b, &up_t)?;
        let q_b = self.vq_bot.forward(&z_b)?;
        Ok(Encoded {
            enc_b,
            enc_t,
            z_t,
            q_t,
            up_t,
            z_b,
            q_b,
        })
    }

    /// General decoder input `cat(up_lo, hi)` (coarse first) → image `B×3×H×W`.
    pub fn decode_joined(&self, up_lo: &Tensor, hi: &Tensor) -> candle_core::Result<Tensor> {
        Tensor::cat(&[up_lo, hi], 1)?.apply(&self.decoder_b)
    }

    /// The object-specific decoder input `cat(upsample_t(Q̃_lo), Q̃_hi)`.
    pub fn decode_specific_input(&self, lo: &Tensor, hi: &Tensor) -> candle_core::Result<Tensor> {
        Tensor::cat(&[&self.upsample_t(lo)?, hi], 1)
    }

    /// The phase-1 (pretraining) forward: encode with the EMA codebook update of both
    /// quantizers, decode, and return the reconstruction, both commitment losses and the
    /// codebook statistics. Gradients reach the encoders, the pre-quantization convolutions,
    /// `upsample_t` and the decoder; the codebooks move by EMA only.
    pub fn forward_pretrain(&self, image: &Tensor, ema: &EmaConfig) -> Result<Pretrained> {
        let enc_b = image.apply(&self.encoder_b)?;
        let enc_t = enc_b.apply(&self.encoder_t)?;
        let z_t = enc_t.apply(&self.pre_vq_conv_top)?;
        let top = self.vq_top.forward_ema(&z_t, ema)?;
        let up_t = self.upsample_t(&top.output.quantized)?;
        let z_b = self.pre_vq_bot(&enc_b, &up_t)?;
        let bot = self.vq_bot.forward_ema(&z_b, ema)?;
        let recon = self.decode_joined(&up_t, &bot.output.quantized)?;
        Ok(Pretrained {
            recon,
            z_t,
            z_b,
            top,
            bot,
        })
    }

    /// Reconstructs an image batch through the codebooks (encode, quantize, decode), as the
    /// discrete model alone does; returns `(reconstruction, encoded)`.
    pub fn reconstruct(&self, image: &Tensor) -> Result<(Tensor, Encoded)> {
        let enc = self.encode(image)?;
        let recon = self.decode_joined(&enc.up_t, &enc.q_b.quantized)?;
        Ok((recon, enc))
    }
}
