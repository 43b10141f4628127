//! The general phase-1 codebooks shipped inside the library.
//!
//! DSR's second and third phases start from a discrete latent model (encoders, EMA codebooks,
//! general decoder) trained on varied natural images: the paper uses one trained on ImageNet. A
//! phase 1 of a few minutes on a category's few dozen training images gives codes that fit those
//! images and little else, and the detection module then learns far less (docs/accuracy.md:
//! pixel AUROC 0.78 against 0.65 on battery_weld at the same step count). The project therefore
//! ships discrete models trained for hours on a pool of freely licensed, varied images, one per
//! model width that has none elsewhere, compiled into the binary so that `dsr train` and
//! `dsr demo` work from any folder. Provenance, licences and the command that reproduces them:
//! `assets/codebooks/README.md`.
//!
//! ```
//! use dsr_train::codebook::GeneralCodebook;
//!
//! let small = dsr_core::DsrConfig {
//!     embedding_dim: 32,
//!     num_embeddings: 256,
//!     num_hiddens: 32,
//!     num_residual_hiddens: 16,
//!     anomaly_detection_module_base_width: 16,
//!     upsampling_module_base_width: 16,
//!     ..dsr_core::DsrConfig::default()
//! };
//! let codebook = GeneralCodebook::for_config(&small).expect("the small widths have one");
//! assert_eq!(codebook.name(), "general-small");
//! let ckpt = codebook.checkpoint()?;
//! assert!(ckpt.tensors.keys().all(|k| k.starts_with("discrete_latent_model.")));
//! # Ok::<(), dsr_core::Error>(())
//! ```

use std::path::Path;

use dsr_core::weights::{safetensors_from_bytes, Checkpoint};
use dsr_core::DsrConfig;
use serde::{Deserialize, Serialize};

/// The small widths' codebook (float32, 0.6 MB).
const SMALL: &[u8] = include_bytes!("../../../assets/codebooks/general_small.safetensors");
/// The reference widths' codebook (stored as float16, 8 MB).
const REFERENCE: &[u8] =
    include_bytes!("../../../assets/codebooks/general_reference_f16.safetensors");

/// A shipped general discrete model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GeneralCodebook {
    /// For the `small` preset (embedding 32, 256 codes, hidden 32).
    GeneralSmall,
    /// For the reference widths (embedding 128, 4096 codes, hidden 128); the official
    /// ImageNet weights (`cargo xtask fetch-weights`) are preferred when cached.
    GeneralReference,
}

impl GeneralCodebook {
    /// Every shipped codebook.
    pub const ALL: [GeneralCodebook; 2] = [
        GeneralCodebook::GeneralSmall,
        GeneralCodebook::GeneralReference,
    ];

    /// Its name (`general-small`, `general-reference`), as in the run configuration.
    pub fn name(self) -> &'static str {
        match self {
            GeneralCodebook::GeneralSmall => "general-small",
            GeneralCodebook::GeneralReference => "general-reference",
        }
    }

    /// The file it was made from, under `assets/codebooks/`.
    pub fn file_name(self) -> &'static str {
        match self {
            GeneralCodebook::GeneralSmall => "general_small.safetensors",
            GeneralCodebook::GeneralReference => "general_reference_f16.safetensors",
        }
    }

    fn bytes(self) -> &'static [u8] {
        match self {
            GeneralCodebook::GeneralSmall => SMALL,
            GeneralCodebook::GeneralReference => REFERENCE,
        }
    }

    /// The discrete model's weights (float32, under their PyTorch names).
    pub fn checkpoint(self) -> dsr_core::Result<Checkpoint> {
        let path = Path::new("assets/codebooks").join(self.file_name());
        safetensors_from_bytes(&path, self.bytes())
    }

    /// The configuration it was trained with (its discrete part is what must match).
    pub fn config(self) -> dsr_core::Result<DsrConfig> {
        let ckpt = self.checkpoint()?;
        ckpt.config.ok_or_else(|| {
            dsr_core::Error::weights(&ckpt.path, "no dsr.config metadata in the shipped codebook")
        })
    }

    /// The shipped codebook whose discrete model fits `cfg`, if any.
    pub fn for_config(cfg: &DsrConfig) -> Option<Self> {
        Self::ALL.into_iter().find(|c| {
            c.config()
                .map(|own| discrete_part(&own) == discrete_part(cfg))
                .unwrap_or(false)
        })
    }
}

impl std::fmt::Display for GeneralCodebook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The fields of a configuration that the discrete model depends on.
pub fn discrete_part(c: &DsrConfig) -> (usize, usize, usize, usize, usize) {
    (
        c.embedding_dim,
        c.num_embeddings,
        c.num_hiddens,
        c.num_residual_layers,
        c.num_residual_hiddens,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsr_core::weights::{check_tensors, DISCRETE_PREFIX};
    use std::collections::HashMap;

    #[test]
    fn every_shipped_codebook_loads_and_fits_its_own_configuration() {
        for c in GeneralCodebook::ALL {
            let ckpt = c.checkpoint().unwrap();
            let cfg = ckpt.config.unwrap();
            let unprefixed: HashMap<_, _> = ckpt
                .tensors
                .iter()
                .map(|(k, v)| {
                    (
                        k.strip_prefix(DISCRETE_PREFIX).unwrap().to_string(),
                        v.clone(),
                    )
                })
                .collect();
            check_tensors(
                &ckpt.path,
                &unprefixed,
                &cfg.discrete_state_dict_shapes().unwrap(),
            )
            .unwrap();
            assert_eq!(GeneralCodebook::for_config(&cfg), Some(c));
            for t in ckpt.tensors.values() {
                assert_eq!(t.dtype(), candle_core::DType::F32);
            }
        }
    }

    #[test]
    fn the_reference_widths_get_the_general_reference_codebook_and_tiny_none() {
        assert_eq!(
            GeneralCodebook::for_config(&DsrConfig::default()),
            Some(GeneralCodebook::GeneralReference)
        );
        assert_eq!(GeneralCodebook::for_config(&DsrConfig::tiny()), None);
    }
}
