//! Weight I/O: our safetensors checkpoints, the official pretrained `.pckl` of the discrete
//! model, anomalib Lightning checkpoints, and the checks that make a bad file fail with a
//! message naming the file and the problem.
//!
//! Tensor names are always the PyTorch state_dict keys; the constructors spell them with
//! `vb.pp(…)`, so no renaming table exists anywhere.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::{DiscreteLatentModel, DsrConfig, DsrModel, Error, Result};

/// Metadata key of the model configuration (JSON) in our checkpoints.
pub const META_CONFIG: &str = "dsr.config";
/// Metadata key of the training image size (JSON `[H, W]`) in our checkpoints.
pub const META_IMAGE_SIZE: &str = "dsr.image_size";
/// Prefix of the discrete latent model's keys inside a full DSR state_dict.
pub const DISCRETE_PREFIX: &str = "discrete_latent_model.";
/// Prefix of the model's keys inside an anomalib Lightning checkpoint's `state_dict`.
pub const LIGHTNING_PREFIX: &str = "model.";

/// A `VarBuilder` backend that hands out detached copies of another builder's tensors, so that
/// the layers built from it are constants for autograd (used for the frozen discrete model).
pub(crate) struct DetachedBackend<'a> {
    inner: VarBuilder<'a>,
}

impl<'a> DetachedBackend<'a> {
    pub(crate) fn new(inner: VarBuilder<'a>) -> Self {
        Self { inner }
    }
}

impl SimpleBackend for DetachedBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        Ok(t.to_device(dev)?.detach())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Ok(self
            .inner
            .get_unchecked_dtype(name, dtype)?
            .to_device(dev)?
            .detach())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A backend that records every requested (name, shape) and returns zero-copy zero tensors, to
/// list the tensors a configuration needs without allocating them.
struct ShapeRecorder {
    seen: Mutex<Vec<(String, Vec<usize>)>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .map_err(|_| candle_core::Error::Msg("shape recorder poisoned".into()))?
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: {name} requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn record_shapes(
    build: impl FnOnce(VarBuilder<'static>) -> Result<()>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let recorder = std::sync::Arc::new(ShapeRecorder {
        seen: Mutex::new(Vec::new()),
    });
    struct Shared(std::sync::Arc<ShapeRecorder>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, name, h, dtype, dev)
        }
        fn get_unchecked(
            &self,
            name: &str,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(name, dtype, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(recorder.clone())), DType::F32, Device::Cpu);
    build(vb)?;
    let mut seen = recorder
        .seen
        .lock()
        .map_err(|_| Error::Config("shape recorder poisoned".into()))?
        .clone();
    seen.sort();
    seen.dedup();
    Ok(seen)
}

impl DsrConfig {
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
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
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
        if head[8] == b'{' && header_len > 1 && header_len < 100_000_000 {
            return Ok(WeightFormat::Safetensors);
        }
    }
    Err(Error::weights(
        path,
        "not a weight file this program reads (expected safetensors, or a PyTorch zip archive such as a .pckl/.pth/.ckpt)",
    ))
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

const LEGACY_HINT: &str = "this is the legacy (non-zip) PyTorch format, which is not supported; re-save it in PyTorch with `torch.save(torch.load(path), path)` (PyTorch ≥ 1.6 writes the zip format by default)";

/// Reads a safetensors file with its metadata.
pub fn load_safetensors(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::weights(path, format!("not a valid safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::weights(path, format!("not a valid safetensors file: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| Error::weights(path, format!("tensor '{name}': {e}")))?;
        tensors.insert(name, to_f32(t, path)?);
    }
    let metadata: BTreeMap<String, String> = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let config = match metadata.get(META_CONFIG) {
        Some(json) => Some(serde_json::from_str::<DsrConfig>(json).map_err(|e| {
            Error::weights(
                path,
                format!("metadata '{META_CONFIG}' is not a valid configuration: {e}"),
            )
        })?),
        None => None,
    };
    let image_size = match metadata.get(META_IMAGE_SIZE) {
        Some(json) => Some(serde_json::from_str::<[usize; 2]>(json).map_err(|e| {
            Error::weights(
                path,
                format!("metadata '{META_IMAGE_SIZE}' must be [H, W]: {e}"),
            )
        })?),
        None => None,
    };
    Ok(Checkpoint {
        path: path.to_path_buf(),
        tensors,
        config,
        image_size,
        metadata,
    })
}

fn to_f32(t: Tensor, path: &Path) -> Result<Tensor> {
    match t.dtype() {
        DType::F32 => Ok(t),
        DType::F16 | DType::BF16 | DType::F64 => Ok(t.to_dtype(DType::F32)?),
        other => Err(Error::weights(
            path,
            format!("unsupported tensor dtype {other:?} (expected floating point)"),
        )),
    }
}

/// Reads the tensors of a PyTorch zip archive; `key` selects a nested dictionary (e.g.
/// `state_dict` in a Lightning checkpoint). Tensors that are not floating point are skipped.
pub fn load_torch(path: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    match detect_format(path)? {
        WeightFormat::TorchZip => {}
        WeightFormat::TorchLegacy => return Err(Error::weights(path, LEGACY_HINT)),
        WeightFormat::Safetensors => {
            return Err(Error::weights(
                path,
                "this is a safetensors file, not a PyTorch archive",
            ))
        }
    }
    let pth = candle_core::pickle::PthTensors::new(path, key)
        .map_err(|e| Error::weights(path, format!("cannot read the PyTorch archive: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, info) in pth.tensor_infos() {
        if !matches!(
            info.dtype,
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            continue;
        }
        let t = pth
            .get(name)
            .map_err(|e| Error::weights(path, format!("tensor '{name}': {e}")))?
            .ok_or_else(|| {
                Error::weights(path, format!("tensor '{name}' vanished while reading"))
            })?;
        tensors.insert(name.clone(), to_f32(t, path)?);
    }
    if tensors.is_empty() {
        return Err(Error::weights(
            path,
            "the archive holds no floating-point tensors (is it a state_dict?)",
        ));
    }
    Ok(tensors)
}

/// Reads the official pretrained discrete model (`vq_model_pretrained_128_4096.pckl`, a
/// `torch.save`d state_dict of 40 tensors without prefix), checks it against the configuration
/// its shapes imply, and returns it under full DSR keys (`discrete_latent_model.…`).
pub fn load_discrete_pckl(path: &Path) -> Result<Checkpoint> {
    let tensors = load_torch(path, None)?;
    let config = DsrConfig::from_discrete_tensors(&tensors, path)?;
    check_tensors(path, &tensors, &config.discrete_state_dict_shapes()?)?;
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| (format!("{DISCRETE_PREFIX}{k}"), v))
        .collect();
    Ok(Checkpoint {
        path: path.to_path_buf(),
        tensors,
        config: Some(config),
        image_size: None,
        metadata: BTreeMap::new(),
    })
}

/// Reads an anomalib Lightning checkpoint (`model.ckpt`): the `state_dict` entries under
/// `model.` become the model tensors; the post-processor's scalar state (thresholds, min/max)
/// is kept in the metadata as `anomalib.<name>` when present.
pub fn load_lightning_ckpt(path: &Path) -> Result<Checkpoint> {
    let all = load_torch(path, Some("state_dict"))?;
    let mut tensors = HashMap::new();
    let mut metadata = BTreeMap::new();
    for (k, v) in all {
        if let Some(stripped) = k.strip_prefix(LIGHTNING_PREFIX) {
            tensors.insert(stripped.to_string(), v);
        } else if let Some(name) = k.strip_prefix("post_processor.") {
            if v.elem_count() == 1 {
                let value = v.flatten_all()?.to_vec1::<f32>()?[0];
                metadata.insert(format!("anomalib.{name}"), value.to_string());
            }
        }
    }
    if tensors.is_empty() {
        return Err(Error::weights(
            path,
            "the checkpoint's state_dict has no 'model.' entries: not an anomalib DSR checkpoint",
        ));
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        tensors,
        config: None,
        image_size: None,
        metadata,
    })
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
        let t = &tensors[key];
        let finite = t.abs()?.max_all()?.to_scalar::<f32>()?.is_finite() || t.elem_count() == 0;
        if !finite {
            return Err(Error::weights(
                path,
                format!("tensor '{key}' holds NaN or infinite values"),
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

    /// Builds a [`DsrModel`] (inference constants) after checking every key and shape against
    /// `cfg`.
    pub fn build_model(&self, cfg: &DsrConfig, device: &Device) -> Result<DsrModel> {
        check_tensors(&self.path, &self.tensors, &cfg.state_dict_shapes()?)?;
        let vb = VarBuilder::from_tensors(self.tensors.clone(), DType::F32, device);
        DsrModel::new(cfg, vb)
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
    let bytes = safetensors::serialize(sorted.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata))
        .map_err(|e| Error::weights(path, format!("cannot serialise the checkpoint: {e}")))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same folder, `fsync` and rename.
/// If anything fails (e.g. the disk is full) the previous file at `path` is left untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::weights(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            // Persist the rename itself; not every platform can sync a directory.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
