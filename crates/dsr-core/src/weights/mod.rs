//! Weight I/O: our safetensors checkpoints, the official pretrained `.pckl` of the discrete
//! model, anomalib Lightning checkpoints, and the checks that make a bad file fail with a
//! message naming the file and the problem.
//!
//! Tensor names are always the PyTorch state_dict keys; the constructors spell them with
//! `vb.pp(…)`, so no renaming table exists anywhere.
//!
//! This module holds the checkpoint itself: [`Checkpoint`], every metadata key our files carry
//! (the `META_*` constants and [`parse_metadata`]), format detection, [`load_checkpoint`],
//! [`check_tensors`] and [`save_checkpoint`]. The formats live in [`safetensors`] (our
//! checkpoints) and [`torch`] (PyTorch zip archives behind a pickle guard: the official `.pckl`
//! and anomalib `.ckpt`); [`backends`] holds the `VarBuilder` backends the models are built
//! through. Files are written atomically by [`crate::atomic`].

mod backends;
mod pickle_guard;
pub mod safetensors;
pub mod torch;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub(crate) use self::backends::{record_shapes, DetachedBackend};
pub use self::safetensors::{load_safetensors, safetensors_from_bytes, MAX_SAFETENSORS_HEADER};
pub use self::torch::{
    load_discrete_pckl, load_lightning_ckpt, load_torch, MAX_ARCHIVE_ENTRIES,
    MAX_COMPRESSION_RATIO, MAX_PICKLE_BYTES,
};
pub use crate::atomic::{is_temp_file, temp_file_owner_alive, write_atomic};
use crate::feature_memory::{Blend, FeatureMemory, MEMORY_ROWS_KEY, META_FEATURE_MEMORY};
use crate::model::OutputMap;
use crate::{DsrConfig, DsrModel, Error, Execution, Result};

/// Metadata key of the model configuration (JSON) in our checkpoints.
pub const META_CONFIG: &str = "dsr.config";
/// Metadata key of the training image size (JSON `[H, W]`) in our checkpoints.
pub const META_IMAGE_SIZE: &str = "dsr.image_size";
/// Metadata key of the map a model gives as its anomaly map (`"refined"`, `"detection"`,
/// `"memory"` or `"combined"`,
/// see [`crate::model::OutputMap`]); absent means `"refined"`, the reference.
pub const META_OUTPUT_MAP: &str = "dsr.output_map";
/// Metadata key naming the file a checkpoint was converted from.
pub const META_CONVERTED_FROM: &str = "dsr.converted_from";
/// Metadata key marking a checkpoint that holds only part of the model (its value names the
/// part, e.g. `discrete_latent_model`).
pub const META_PARTIAL: &str = "dsr.partial";
/// Prefix of the discrete latent model's keys inside a full DSR state_dict.
pub const DISCRETE_PREFIX: &str = "discrete_latent_model.";
/// Prefix of the model's keys inside an anomalib Lightning checkpoint's `state_dict`.
pub const LIGHTNING_PREFIX: &str = "model.";

/// Weights read from a file, with what the file says about itself.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The file the weights came from.
    pub path: PathBuf,
    /// Every tensor, under its PyTorch key, as f32 on the CPU.
    pub tensors: HashMap<String, Tensor>,
    /// The model configuration, when the file records it.
    pub config: Option<DsrConfig>,
    /// The image size `[H, W]` the model was trained at, when the file records it.
    pub image_size: Option<[usize; 2]>,
    /// All string metadata of the file (unknown entries are kept and ignored).
    pub metadata: BTreeMap<String, String>,
}

/// The on-disk formats we can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// A safetensors file (ours, or any with PyTorch keys).
    Safetensors,
    /// A PyTorch zip archive written by `torch.save` (`.pckl`, `.pth`, `.pt`, Lightning `.ckpt`).
    TorchZip,
    /// The legacy (pre-1.6, non-zip) PyTorch pickle format, which we do not read.
    TorchLegacy,
}

/// Recognises a weight file by its first bytes.
pub fn detect_format(path: &Path) -> Result<WeightFormat> {
    let mut head = [0u8; 16];
    let mut file = crate::files::open_regular(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let n = read_up_to(&mut file, &mut head).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let head = &head[..n];
    if n == 0 {
        return Err(Error::weights(path, "the file is empty"));
    }
    if head.starts_with(b"PK\x03\x04") {
        return Ok(WeightFormat::TorchZip);
    }
    if head.first() == Some(&0x80) && n >= 2 && head[1] <= 5 {
        return Ok(WeightFormat::TorchLegacy);
    }
    if n >= 9 {
        let header_len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        // Any length is taken as safetensors here: the loader then checks it against the file
        // size and says what is wrong with it (a huge length is a corrupt safetensors file).
        if head[8] == b'{' && header_len > 1 {
            return Ok(WeightFormat::Safetensors);
        }
    }
    Err(Error::weights(
        path,
        "not a weight file this program reads (expected safetensors, or a PyTorch zip archive such as a .pckl/.pth/.ckpt)",
    ))
}

pub(crate) fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

pub(crate) const LEGACY_HINT: &str = "this is the legacy (non-zip) PyTorch format, which is not supported; re-save it in PyTorch with `torch.save(torch.load(path), path)` (PyTorch ≥ 1.6 writes the zip format by default)";

/// Reads the configuration ([`META_CONFIG`]) and the image size ([`META_IMAGE_SIZE`]) from a
/// checkpoint's metadata, when present; both must be usable (every field of the configuration
/// in range, an image size the network takes), else the error names the entry and the problem.
pub fn parse_metadata(
    path: &Path,
    metadata: &BTreeMap<String, String>,
) -> Result<(Option<DsrConfig>, Option<[usize; 2]>)> {
    let config = match metadata.get(META_CONFIG) {
        Some(json) => {
            let cfg = serde_json::from_str::<DsrConfig>(json).map_err(|e| {
                Error::weights(
                    path,
                    format!("metadata '{META_CONFIG}' is not a valid configuration: {e}"),
                )
            })?;
            cfg.validate().map_err(|e| {
                Error::weights(
                    path,
                    format!("metadata '{META_CONFIG}' is not a usable configuration: {e}"),
                )
            })?;
            Some(cfg)
        }
        None => None,
    };
    let image_size = match metadata.get(META_IMAGE_SIZE) {
        Some(json) => {
            let size = serde_json::from_str::<[usize; 2]>(json).map_err(|e| {
                Error::weights(
                    path,
                    format!("metadata '{META_IMAGE_SIZE}' must be [H, W]: {e}"),
                )
            })?;
            crate::config::validate_image_size(size[0], size[1]).map_err(|e| {
                Error::weights(
                    path,
                    format!("metadata '{META_IMAGE_SIZE}' is not usable: {e}"),
                )
            })?;
            Some(size)
        }
        None => None,
    };
    Ok((config, image_size))
}

/// Reads any supported weight file: safetensors, an anomalib `.ckpt`, or a PyTorch state_dict
/// (a full DSR one, or the discrete model alone, which is returned under full keys).
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    match detect_format(path)? {
        WeightFormat::Safetensors => load_safetensors(path),
        WeightFormat::TorchLegacy => Err(Error::weights(path, LEGACY_HINT)),
        WeightFormat::TorchZip => {
            // A Lightning checkpoint nests its weights under `state_dict`.
            if let Ok(ckpt) = load_lightning_ckpt(path) {
                return Ok(ckpt);
            }
            let tensors = load_torch(path, None)?;
            if tensors.keys().any(|k| k.starts_with(DISCRETE_PREFIX)) {
                Ok(Checkpoint {
                    path: path.to_path_buf(),
                    tensors,
                    config: None,
                    image_size: None,
                    metadata: BTreeMap::new(),
                })
            } else {
                load_discrete_pckl(path)
            }
        }
    }
}

/// Checks that `tensors` holds exactly the keys of `expected` with the same shapes and only
/// finite values; the error lists what is missing, unexpected or of the wrong shape.
pub fn check_tensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    expected: &[(String, Vec<usize>)],
) -> Result<()> {
    let mut problems = Vec::new();
    for (key, shape) in expected {
        match tensors.get(key) {
            None => problems.push(format!("missing tensor '{key}' (shape {shape:?})")),
            Some(t) if t.dims() != shape.as_slice() => problems.push(format!(
                "tensor '{key}' has shape {:?}, the configuration needs {shape:?}",
                t.dims()
            )),
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    extra.sort();
    for key in extra {
        problems.push(format!("unexpected tensor '{key}'"));
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(8);
        let more = if n > 8 {
            format!(" (and {} more)", n - 8)
        } else {
            String::new()
        };
        return Err(Error::weights(
            path,
            format!("does not match the model: {}{more}", problems.join("; ")),
        ));
    }
    for (key, _) in expected {
        // Element by element: a maximum skips NaN, so it cannot be used to find one.
        let values = tensors[key]
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::weights(
                path,
                format!(
                    "tensor '{key}' holds NaN or infinite values (element {i} is {})",
                    values[i]
                ),
            ));
        }
    }
    Ok(())
}

impl Checkpoint {
    /// The configuration to build the model with: the file's own, else `fallback`.
    pub fn config_or(&self, fallback: &DsrConfig) -> DsrConfig {
        self.config.unwrap_or(*fallback)
    }

    /// The mask the checkpoint's model outputs ([`META_OUTPUT_MAP`]; the refined one when
    /// absent); an unknown value is an error naming the file.
    pub fn output_map(&self) -> Result<OutputMap> {
        match self.metadata.get(META_OUTPUT_MAP) {
            None => Ok(OutputMap::Refined),
            Some(name) => name.parse().map_err(|e: Error| {
                Error::weights(&self.path, format!("metadata '{META_OUTPUT_MAP}': {e}"))
            }),
        }
    }

    /// Builds a [`DsrModel`] (inference constants) after checking every key and shape against
    /// `cfg`; it outputs the map the checkpoint records ([`Checkpoint::output_map`]).
    pub fn build_model(&self, cfg: &DsrConfig, device: &Device) -> Result<DsrModel> {
        let (tensors, memory) = self.split_memory(device)?;
        check_tensors(&self.path, &tensors, &cfg.state_dict_shapes()?)?;
        let output = self.output_map()?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = DsrModel::new(cfg, vb)?.with_output_map(output);
        self.attach_memory(model, memory, cfg)
    }

    /// The feature memory the file holds ([`MEMORY_ROWS_KEY`], with the blend of
    /// [`META_FEATURE_MEMORY`] when recorded), if any, on `device`.
    pub fn feature_memory(&self, device: &Device) -> Result<Option<FeatureMemory>> {
        Ok(self.split_memory(device)?.1)
    }

    /// The model's own tensors (every key but the feature memory's) and the feature memory.
    fn split_memory(
        &self,
        device: &Device,
    ) -> Result<(HashMap<String, Tensor>, Option<FeatureMemory>)> {
        let mut tensors = self.tensors.clone();
        let memory = match tensors.remove(MEMORY_ROWS_KEY) {
            None => None,
            Some(rows) => {
                let memory = FeatureMemory::new(rows.to_device(device)?)
                    .map_err(|e| Error::weights(&self.path, e.to_string()))?;
                match self.metadata.get(META_FEATURE_MEMORY) {
                    None => Some(memory),
                    Some(text) => {
                        let blend: Blend = serde_json::from_str(text).map_err(|e| {
                            Error::weights(
                                &self.path,
                                format!("metadata '{META_FEATURE_MEMORY}' is not a blend: {e}"),
                            )
                        })?;
                        blend
                            .validate(&format!("metadata '{META_FEATURE_MEMORY}'"))
                            .map_err(|e| Error::weights(&self.path, e.to_string()))?;
                        Some(memory.with_blend(blend))
                    }
                }
            }
        };
        Ok((tensors, memory))
    }

    /// Gives `model` its feature memory after checking it against the model's widths and the
    /// map the file says the model outputs.
    fn attach_memory(
        &self,
        model: DsrModel,
        memory: Option<FeatureMemory>,
        cfg: &DsrConfig,
    ) -> Result<DsrModel> {
        let output = model.output_map();
        match memory {
            Some(memory) => {
                let want = 2 * cfg.num_hiddens;
                if memory.channels() != want {
                    return Err(Error::weights(
                        &self.path,
                        format!(
                            "tensor '{MEMORY_ROWS_KEY}' has {} channels, the model's features have {want}",
                            memory.channels()
                        ),
                    ));
                }
                if output == OutputMap::Combined && memory.blend().is_none() {
                    return Err(Error::weights(
                        &self.path,
                        format!("the model outputs the combined map but the file has no '{META_FEATURE_MEMORY}' blend"),
                    ));
                }
                Ok(model.with_feature_memory(memory))
            }
            None if matches!(output, OutputMap::Memory | OutputMap::Combined) => {
                Err(Error::weights(
                    &self.path,
                    format!("the model outputs the {output} map but the file has no tensor '{MEMORY_ROWS_KEY}'"),
                ))
            }
            None => Ok(model),
        }
    }

    /// Builds the model for inference under `exec`, checking every tensor against `cfg` first.
    /// The tensors move into the model: weights read from a file, which nothing changes, so its
    /// layers keep the copies of their weights that the kernels take (the transformed filters of
    /// Winograd's algorithm, 4× the 3×3 weights) between calls instead of making them again
    /// each time (memory and time: docs/performance.md). Only for tensors that share no storage with training variables (a `Var`'s
    /// detached view would change under the kept copies); [`Checkpoint::build_model`] keeps
    /// nothing. Fails with [`crate::Error::Unsupported`] when `exec` asks for bf16 products on a
    /// CPU without AVX512-BF16.
    pub fn into_inference_model(
        self,
        cfg: &DsrConfig,
        device: &Device,
        exec: Execution,
    ) -> Result<DsrModel> {
        exec.precision.check_supported()?;
        let (tensors, memory) = self.split_memory(device)?;
        check_tensors(&self.path, &tensors, &cfg.state_dict_shapes()?)?;
        let output = self.output_map()?;
        if let Some((key, _)) = tensors.iter().find(|(_, t)| t.is_variable()) {
            return Err(Error::weights(
                &self.path,
                format!("'{key}' is a training variable, not a weight read from a file"),
            ));
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = DsrModel::new(cfg, vb)?
            .with_execution(exec)
            .with_output_map(output)
            .keeping_filters();
        self.attach_memory(model, memory, cfg)
    }
}

/// Writes `tensors` with our metadata (`dsr.config`, `dsr.image_size`, plus `extra`) to a
/// safetensors file, atomically: a temporary file in the same folder is written, synced and
/// renamed over `path`, so a crash never leaves a half-written checkpoint.
pub fn save_checkpoint(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    cfg: &DsrConfig,
    image_size: Option<[usize; 2]>,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    let mut metadata: HashMap<String, String> =
        extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    metadata.insert(
        META_CONFIG.into(),
        serde_json::to_string(cfg).map_err(|e| Error::Config(e.to_string()))?,
    );
    if let Some(size) = image_size {
        metadata.insert(
            META_IMAGE_SIZE.into(),
            format!("[{}, {}]", size[0], size[1]),
        );
    }
    let mut sorted: Vec<(&String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, v) in tensors {
        sorted.push((
            k,
            v.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?,
        ));
    }
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes =
        ::safetensors::serialize(sorted.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
            .map_err(|e| Error::weights(path, format!("cannot serialise the checkpoint: {e}")))?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output map recorded in a checkpoint reaches the built model (both builders):
    /// "detection" gives the detection module's mask as the anomaly map, no entry the refined
    /// mask, and an unknown value is an error naming the file and the key.
    #[test]
    fn the_recorded_output_map_chooses_the_anomaly_map() {
        let cfg = DsrConfig::tiny();
        let tensors = DsrModel::seeded_weights(&cfg, 3).unwrap();
        let dir = std::env::temp_dir().join(format!("dsr-output-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        let pixels: Vec<f32> = (0..3 * 64 * 64)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let image = Tensor::from_vec(pixels, (1, 3, 64, 64), &Device::Cpu).unwrap();
        let map_of = |extra: &BTreeMap<String, String>| {
            save_checkpoint(&path, &tensors, &cfg, Some([64, 64]), extra).unwrap();
            let ckpt = load_safetensors(&path).unwrap();
            let inference = ckpt
                .clone()
                .into_inference_model(&cfg, &Device::Cpu, Execution::default())
                .map(|m| m.output_map());
            ckpt.build_model(&cfg, &Device::Cpu).map(|model| {
                let trace = model.forward_eval(&image).unwrap();
                assert_eq!(inference.as_ref().ok(), Some(&model.output_map()));
                (model.output_map(), trace)
            })
        };
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let channel1 = |t: &Tensor| t.narrow(1, 1, 1).unwrap().squeeze(1).unwrap();
        let (output, trace) = map_of(&BTreeMap::new()).unwrap();
        assert_eq!(output, OutputMap::Refined);
        let refined = channel1(&trace.upsampling_softmax);
        assert_eq!(diff(&trace.inference.anomaly_map, &refined), 0.0);
        let detection: BTreeMap<String, String> =
            [(META_OUTPUT_MAP.to_string(), "detection".to_string())].into();
        let (output, trace) = map_of(&detection).unwrap();
        assert_eq!(output, OutputMap::Detection);
        let mask = channel1(&trace.adm_softmax);
        assert_eq!(diff(&trace.inference.anomaly_map, &mask), 0.0);
        assert!(diff(&mask, &refined) > 0.0);
        let bad: BTreeMap<String, String> =
            [(META_OUTPUT_MAP.to_string(), "sharpest".to_string())].into();
        let message = map_of(&bad).unwrap_err().to_string();
        assert!(message.contains(META_OUTPUT_MAP), "{message}");
        assert!(message.contains("sharpest"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
