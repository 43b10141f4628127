//! [`DsrConfig`]: the hyper-parameters that fix every tensor shape of a DSR model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::weights::record_shapes;
use crate::{DiscreteLatentModel, DsrModel, Error, Result};

/// Hyper-parameters of a DSR model.
///
/// The field names are those of anomalib's `DsrModel` constructor (and of the parity fixture's
/// `config.json`), so a JSON object written by either side maps straight onto this struct.
/// [`DsrConfig::default`] is the reference configuration (188 tensors, 40.3 M elements).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DsrConfig {
    /// Lower bound λ of the phase-2 anomaly strength, drawn from U[λ, 1) per sample.
    #[serde(default = "default_strength")]
    pub latent_anomaly_strength: f64,
    /// Width D of a codebook vector (and of the quantized feature maps).
    pub embedding_dim: usize,
    /// Number K of vectors in each of the two codebooks.
    pub num_embeddings: usize,
    /// Channel width of the encoders and decoders of the discrete latent model.
    pub num_hiddens: usize,
    /// Number of residual layers in every residual stack.
    pub num_residual_layers: usize,
    /// Hidden width of the residual layers.
    pub num_residual_hiddens: usize,
    /// Base width of the anomaly detection U-Net (64 in the reference).
    #[serde(default = "default_unet_width")]
    pub anomaly_detection_module_base_width: usize,
    /// Base width of the upsampling (mask refinement) U-Net (64 in the reference).
    #[serde(default = "default_unet_width")]
    pub upsampling_module_base_width: usize,
}

fn default_strength() -> f64 {
    0.2
}

fn default_unet_width() -> usize {
    64
}

impl Default for DsrConfig {
    fn default() -> Self {
        Self {
            latent_anomaly_strength: 0.2,
            embedding_dim: 128,
            num_embeddings: 4096,
            num_hiddens: 128,
            num_residual_layers: 2,
            num_residual_hiddens: 64,
            anomaly_detection_module_base_width: 64,
            upsampling_module_base_width: 64,
        }
    }
}

impl DsrConfig {
    /// A very small configuration for examples, doc tests and unit tests (runs in milliseconds on
    /// 64×64 inputs).
    pub fn tiny() -> Self {
        Self {
            latent_anomaly_strength: 0.2,
            embedding_dim: 4,
            num_embeddings: 32,
            num_hiddens: 8,
            num_residual_layers: 1,
            num_residual_hiddens: 4,
            anomaly_detection_module_base_width: 4,
            upsampling_module_base_width: 4,
        }
    }

    /// Checks that every field is usable; the error names the field and its value.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("embedding_dim", self.embedding_dim),
            ("num_hiddens", self.num_hiddens),
            ("num_residual_hiddens", self.num_residual_hiddens),
            (
                "anomaly_detection_module_base_width",
                self.anomaly_detection_module_base_width,
            ),
            (
                "upsampling_module_base_width",
                self.upsampling_module_base_width,
            ),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::Config(format!("{name} must be at least 1, got 0")));
            }
        }
        // Upper bounds far above any useful model, so that a corrupt configuration (read from a
        // file's metadata) is refused before shapes are computed or memory is reserved.
        let at_most = [
            ("embedding_dim", self.embedding_dim, 4096),
            ("num_embeddings", self.num_embeddings, 1 << 20),
            ("num_hiddens", self.num_hiddens, 4096),
            ("num_residual_layers", self.num_residual_layers, 64),
            ("num_residual_hiddens", self.num_residual_hiddens, 4096),
            (
                "anomaly_detection_module_base_width",
                self.anomaly_detection_module_base_width,
                1024,
            ),
            (
                "upsampling_module_base_width",
                self.upsampling_module_base_width,
                1024,
            ),
        ];
        for (name, value, max) in at_most {
            if value > max {
                return Err(Error::Config(format!(
                    "{name} must be at most {max}, got {value}"
                )));
            }
        }
        if self.num_hiddens % 2 != 0 {
            return Err(Error::Config(format!(
                "num_hiddens must be even (the first encoder and the last decoder layers use num_hiddens/2 channels), got {}",
                self.num_hiddens
            )));
        }
        if self.num_embeddings < 2 {
            return Err(Error::Config(format!(
                "num_embeddings must be at least 2, got {}",
                self.num_embeddings
            )));
        }
        if !(0.0..1.0).contains(&self.latent_anomaly_strength) {
            return Err(Error::Config(format!(
                "latent_anomaly_strength must lie in [0, 1), got {}",
                self.latent_anomaly_strength
            )));
        }
        Ok(())
    }

    /// Checks that a `height`×`width` input can flow through the network: both sides must be
    /// multiples of 32 and at least 64.
    pub fn validate_image_size(&self, height: usize, width: usize) -> Result<()> {
        validate_image_size(height, width)
    }

    /// Every tensor of a full DSR model with this configuration, as sorted `(PyTorch key,
    /// shape)` pairs (188 for the default configuration). Nothing is allocated.
    pub fn state_dict_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let cfg = *self;
        record_shapes(|vb| DsrModel::new(&cfg, vb).map(|_| ()))
    }

    /// The tensors of the discrete latent model alone, keys without prefix (40 by default).
    pub fn discrete_state_dict_shapes(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let cfg = *self;
        self.validate()?;
        record_shapes(|vb| {
            DiscreteLatentModel::new(&cfg, vb)
                .map(|_| ())
                .map_err(Error::from)
        })
    }

    /// Derives the discrete model's widths (D, K, Nh, Rh, number of residual layers) from its
    /// tensors (keys without prefix); the other fields keep their defaults.
    pub fn from_discrete_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<Self> {
        let dims = |key: &str| -> Result<Vec<usize>> {
            tensors.get(key).map(|t| t.dims().to_vec()).ok_or_else(|| {
                Error::weights(
                    path,
                    format!("missing tensor '{key}': this is not a DSR discrete model"),
                )
            })
        };
        let codebook = dims("_vq_vae_top._embedding.weight")?;
        let conv2 = dims("_encoder_b._conv_2.weight")?;
        let res = dims("_encoder_b._residual_stack._layers.0._block.1.weight")?;
        let layers = (0..)
            .take_while(|i| {
                tensors.contains_key(&format!(
                    "_encoder_b._residual_stack._layers.{i}._block.1.weight"
                ))
            })
            .count();
        if codebook.len() != 2 || conv2.len() != 4 || res.len() != 4 {
            return Err(Error::weights(
                path,
                "unexpected tensor ranks for a DSR discrete model",
            ));
        }
        Ok(Self {
            embedding_dim: codebook[1],
            num_embeddings: codebook[0],
            num_hiddens: conv2[0],
            num_residual_layers: layers,
            num_residual_hiddens: res[0],
            ..Self::default()
        })
    }
}

/// The largest image side [`validate_image_size`] accepts (far above what fits in memory for
/// DSR's feature maps; the bound keeps corrupt sizes from reserving memory).
pub const MAX_IMAGE_SIDE: usize = 8192;

/// Checks that a `height`×`width` input can flow through DSR: both sides must be multiples of 32
/// (three stride-2 encoder stages, then two 2×2 poolings in the coarse subspace module), at
/// least 64 and at most [`MAX_IMAGE_SIDE`].
pub fn validate_image_size(height: usize, width: usize) -> Result<()> {
    for (name, side) in [("height", height), ("width", width)] {
        if side < 64 || side % 32 != 0 {
            return Err(Error::Input(format!(
                "image {name} {side} is not supported: DSR needs sides that are multiples of 32 and at least 64 (for example 64, 128, 224, 256); got {height}×{width}"
            )));
        }
        if side > MAX_IMAGE_SIDE {
            return Err(Error::Input(format!(
                "image {name} {side} is not supported: sides of at most {MAX_IMAGE_SIDE} are accepted; got {height}×{width}"
            )));
        }
    }
    Ok(())
}
