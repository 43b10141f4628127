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

use crate::model::OutputMap;
use crate::{DiscreteLatentModel, DsrConfig, DsrModel, Error, Result};

/// Metadata key of the model configuration (JSON) in our checkpoints.
pub const META_CONFIG: &str = "dsr.config";
/// Metadata key of the training image size (JSON `[H, W]`) in our checkpoints.
pub const META_IMAGE_SIZE: &str = "dsr.image_size";
/// Metadata key of the mask a model gives as its anomaly map (`"refined"` or `"detection"`,
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

/// The largest safetensors header accepted (the safetensors crate's own limit): 100 MB of JSON.
pub const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Reads a safetensors file with its metadata.
///
/// The 8-byte header length is checked against the file size (and against
/// [`MAX_SAFETENSORS_HEADER`]) before anything else is read, so a corrupt or hostile length
/// never leads to a large allocation; the tensors' offsets and sizes are then checked against the
/// data by the safetensors crate before any tensor is built.
pub fn load_safetensors(path: &Path) -> Result<Checkpoint> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut head = [0u8; 8];
    let n = read_up_to(&mut file, &mut head).map_err(io)?;
    check_safetensors_header(path, &head[..n], len)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    bytes.extend_from_slice(&head[..n]);
    file.read_to_end(&mut bytes).map_err(io)?;
    safetensors_from_bytes(path, &bytes)
}

/// Checks the first 8 bytes of a safetensors file (the little-endian length of its JSON header)
/// against the file's length `len`.
fn check_safetensors_header(path: &Path, head: &[u8], len: u64) -> Result<()> {
    let Ok(head) = <[u8; 8]>::try_from(head) else {
        return Err(Error::weights(
            path,
            format!(
                "not a valid safetensors file: it has {len} bytes, fewer than the 8 of the header length"
            ),
        ));
    };
    let header_len = u64::from_le_bytes(head);
    if header_len > len - 8 {
        return Err(Error::weights(
            path,
            format!(
                "not a valid safetensors file: its header length field says {header_len} bytes but only {} follow (truncated, or not a safetensors file)",
                len - 8
            ),
        ));
    }
    if header_len > MAX_SAFETENSORS_HEADER {
        return Err(Error::weights(
            path,
            format!(
                "not a valid safetensors file: a header of {header_len} bytes is larger than the {MAX_SAFETENSORS_HEADER} accepted"
            ),
        ));
    }
    Ok(())
}

/// Reads a safetensors file already in memory; `path` names it in messages. The same checks as
/// [`load_safetensors`] apply: the header, every tensor's offsets, shape and dtype, and the
/// metadata this program understands ([`META_CONFIG`], [`META_IMAGE_SIZE`]).
pub fn safetensors_from_bytes(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    check_safetensors_header(path, bytes.get(..8).unwrap_or(bytes), bytes.len() as u64)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::weights(path, format!("not a valid safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(bytes)
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
    let (config, image_size) = parse_metadata(path, &metadata)?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        tensors,
        config,
        image_size,
        metadata,
    })
}

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

/// The most entries a PyTorch archive may hold (a full DSR state_dict has 188 tensors).
pub const MAX_ARCHIVE_ENTRIES: usize = 65_536;
/// The largest pickle (`data.pkl`) read from a PyTorch archive, uncompressed: 64 MiB.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// The largest expansion reported as a zip bomb rather than as an unsupported compression
/// (uncompressed size / compressed size, for entries above 1 MiB).
pub const MAX_COMPRESSION_RATIO: u64 = 100;

/// What [`check_torch_archive`] found: every entry's declared uncompressed size.
struct ArchiveIndex {
    sizes: HashMap<String, u64>,
}

/// Checks a PyTorch zip archive before candle reads it, without inflating anything: a readable
/// central directory, at most [`MAX_ARCHIVE_ENTRIES`] entries with distinct names, every entry
/// stored uncompressed as `torch.save` writes them (a compressed entry is refused, as a
/// possible zip bomb when it claims to expand more than [`MAX_COMPRESSION_RATIO`] times), entry
/// sizes that add up to at most the file's size (overlapping entries are the other kind of zip
/// bomb), and pickles of at most [`MAX_PICKLE_BYTES`] that pass the pickle pre-scan.
fn check_torch_archive(path: &Path) -> Result<ArchiveIndex> {
    let bad = |message: String| Error::weights(path, message);
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("cannot read the PyTorch archive: {e}")))?;
    if archive.len() > MAX_ARCHIVE_ENTRIES {
        return Err(bad(format!(
            "the archive has {} entries, more than the {MAX_ARCHIVE_ENTRIES} accepted",
            archive.len()
        )));
    }
    let file_len = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut sizes = HashMap::new();
    let mut pickles = Vec::new();
    let mut total: u64 = 0;
    let mut compressed = None;
    for i in 0..archive.len() {
        let entry = archive
            .by_index_raw(i)
            .map_err(|e| bad(format!("cannot read archive entry {i}: {e}")))?;
        let name = entry.name().to_string();
        let (size, packed) = (entry.size(), entry.compressed_size());
        match entry.compression() {
            zip::CompressionMethod::Stored if size != packed => {
                return Err(bad(format!(
                    "archive entry '{name}' is stored uncompressed but declares {size} bytes for {packed} stored: the archive is corrupt"
                )))
            }
            zip::CompressionMethod::Stored => {}
            method => {
                if size > (1 << 20) && size / packed.max(1) > MAX_COMPRESSION_RATIO {
                    return Err(bad(format!(
                        "archive entry '{name}' would inflate from {packed} to {size} bytes (more than {MAX_COMPRESSION_RATIO} times): refused as a possible zip bomb"
                    )));
                }
                // Reported after every entry was checked for a zip bomb.
                compressed.get_or_insert_with(|| {
                    bad(format!(
                        "archive entry '{name}' is compressed ({method}); PyTorch archives store their entries uncompressed (re-save the file with torch.save)"
                    ))
                });
                continue;
            }
        }
        total = total.saturating_add(size);
        if total > file_len {
            return Err(bad(format!(
                "the archive's entries add up to more than its {file_len} bytes (overlapping entries): refused as a possible zip bomb"
            )));
        }
        if name.ends_with("data.pkl") {
            if size > MAX_PICKLE_BYTES {
                return Err(bad(format!(
                    "archive entry '{name}' declares a pickle of {size} bytes, more than the {MAX_PICKLE_BYTES} accepted"
                )));
            }
            pickles.push((name.clone(), size));
        }
        if sizes.insert(name.clone(), size).is_some() {
            return Err(bad(format!(
                "the archive holds two entries named '{name}': it is corrupt"
            )));
        }
    }
    if let Some(e) = compressed {
        return Err(e);
    }
    for (name, size) in pickles {
        let entry = archive
            .by_name(&name)
            .map_err(|e| bad(format!("cannot read archive entry '{name}': {e}")))?;
        let mut sink = Vec::new();
        let read = entry
            .take(size + 1)
            .read_to_end(&mut sink)
            .map_err(|e| bad(format!("cannot inflate archive entry '{name}': {e}")))?;
        if read as u64 != size {
            return Err(bad(format!(
                "archive entry '{name}' inflates to {} bytes but declares {size}: the archive is corrupt (or a zip bomb)",
                if read as u64 > size {
                    format!("more than {size}")
                } else {
                    read.to_string()
                }
            )));
        }
        crate::pickle_guard::scan(&sink).map_err(|e| {
            bad(format!(
                "archive entry '{name}' is not a usable pickle: {e}"
            ))
        })?;
    }
    Ok(ArchiveIndex { sizes })
}

thread_local! {
    /// Set while [`guarded`] runs candle's pickle reader on this thread: its panics are turned
    /// into errors, so the panic hook must not print them.
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that stays silent for the panics [`guarded`] catches and hands
/// every other panic to the hook that was there before.
fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
}

/// Runs `f` (a call into candle's pickle reader) and turns a panic into an error naming the
/// file, so that a malformed archive that slipped past [`check_torch_archive`] (candle indexes
/// pickle tuples without checking their length) cannot bring the program down.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    install_quiet_hook();
    let was_quiet = QUIET_PANICS.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was_quiet));
    result.unwrap_or_else(|payload| {
        let detail = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown problem".to_string());
        Err(Error::weights(
            path,
            format!("{what}: the PyTorch archive is malformed ({detail})"),
        ))
    })
}

/// Reads the tensors of a PyTorch zip archive; `key` selects a nested dictionary (e.g.
/// `state_dict` in a Lightning checkpoint). Tensors that are not floating point are skipped.
///
/// The archive is checked first (see the `MAX_*` limits of this module): no entry is inflated
/// beyond its declared size, and a tensor is only read when the bytes its shape needs fit in
/// the archive entry that holds it, so a corrupt or hostile file cannot cause a large
/// allocation.
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
    let index = check_torch_archive(path)?;
    let pth = guarded(path, "cannot read the PyTorch archive", || {
        candle_core::pickle::PthTensors::new(path, key)
            .map_err(|e| Error::weights(path, format!("cannot read the PyTorch archive: {e}")))
    })?;
    let declared_total: u64 = index.sizes.values().sum();
    let mut needed_total: u64 = 0;
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for name in names {
        let info = &pth.tensor_infos()[name];
        if !matches!(
            info.dtype,
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            continue;
        }
        let entry = info.path.as_str();
        let available = index.sizes.get(entry).copied().ok_or_else(|| {
            Error::weights(
                path,
                format!("tensor '{name}' refers to '{entry}', which the archive does not hold"),
            )
        })?;
        let needed = info
            .layout
            .dims()
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(info.dtype.size_in_bytes() as u64))
            // candle keeps the storage offset in bytes.
            .and_then(|n| n.checked_add(info.layout.start_offset() as u64))
            .filter(|&n| n <= available)
            .ok_or_else(|| {
                Error::weights(
                    path,
                    format!(
                        "tensor '{name}' of shape {:?} needs more bytes than the {available} of its archive entry '{entry}': the archive is corrupt",
                        info.layout.dims()
                    ),
                )
            })?;
        needed_total += needed;
        // Tensors may share a storage (views), but never need more than twice the data.
        if needed_total > 2 * declared_total + (1 << 20) {
            return Err(Error::weights(
                path,
                "the tensors need more than twice the archive's data: the archive is corrupt",
            ));
        }
        let t = guarded(path, &format!("tensor '{name}'"), || {
            pth.get(name)
                .map_err(|e| Error::weights(path, format!("tensor '{name}': {e}")))?
                .ok_or_else(|| {
                    Error::weights(path, format!("tensor '{name}' vanished while reading"))
                })
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
        check_tensors(&self.path, &self.tensors, &cfg.state_dict_shapes()?)?;
        let output = self.output_map()?;
        let vb = VarBuilder::from_tensors(self.tensors.clone(), DType::F32, device);
        Ok(DsrModel::new(cfg, vb)?.with_output_map(output))
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
/// If anything fails (e.g. the disk is full) the previous file at `path` is left untouched, the
/// temporary file is removed, and the error ([`Error::Write`]) says whether a previous file is
/// still there.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Distinguishes the temporary files of concurrent writes from one process.
static TEMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The temporary file [`write_atomic`] writes before renaming it to `path`:
/// `.<name>.<pid>.<n>.tmp` in the same folder.
fn temp_path(dir: &Path, name: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Whether `file_name` is one of [`write_atomic`]'s temporary files for a file named `name`
/// (left behind only when the process was killed during a write).
pub fn is_temp_file_of(file_name: &str, name: &str) -> bool {
    file_name
        .strip_prefix('.')
        .and_then(|rest| rest.strip_prefix(name))
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_suffix(".tmp"))
        .is_some_and(|middle| {
            let mut parts = middle.split('.');
            let numeric = |p: Option<&str>| {
                p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            };
            numeric(parts.next()) && numeric(parts.next()) && parts.next().is_none()
        })
}

/// [`write_atomic`] with the writing of the content injected (the seam that tests use to make
/// a write fail half-way, as a full disk does).
fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::weights(path, "not a file path"))?
        .to_string_lossy()
        .into_owned();
    let tmp = temp_path(&dir, &name);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        write(&mut file)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            // Persist the rename itself; not every platform can sync a directory.
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Write {
            path: path.to_path_buf(),
            source,
            previous_kept: path.exists(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "dsr-core-weights-{name}-{}-{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A disk that fills up half-way through the write: the previous checkpoint is unchanged,
    /// no temporary file is left, and the message says the previous file is intact.
    #[test]
    fn a_write_failing_half_way_keeps_the_previous_checkpoint() {
        let dir = scratch("full");
        let path = dir.join("last.safetensors");
        let tensors: HashMap<String, Tensor> = [(
            "w".to_string(),
            Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap(),
        )]
        .into();
        save_checkpoint(&path, &tensors, &DsrConfig::tiny(), None, &BTreeMap::new()).unwrap();
        let before = std::fs::read(&path).unwrap();
        let err = write_atomic_with(&path, |file| {
            file.write_all(&[0u8; 100])?;
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "No space left on device",
            ))
        })
        .unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(
                err,
                Error::Write {
                    previous_kept: true,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("No space left on device"), "{message}");
        assert!(
            message.contains("previous version of this file is intact"),
            "{message}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let loaded = load_checkpoint(&path).unwrap();
        assert_eq!(
            loaded.tensors["w"].to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["last.safetensors".to_string()]);

        // Without a previous file the message says that nothing was left.
        let fresh = dir.join("new.safetensors");
        let err = write_atomic_with(&fresh, |_| {
            Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("no file was written"), "{err}");
        assert!(!fresh.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temporary_file_names_are_recognised() {
        let dir = Path::new("/x");
        let tmp = temp_path(dir, "a.png");
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert!(is_temp_file_of(name, "a.png"), "{name}");
        assert!(!is_temp_file_of(name, "a.npy"));
        assert!(!is_temp_file_of(".a.png.tmp", "a.png"));
        assert!(!is_temp_file_of(".a.png.1.x.tmp", "a.png"));
        assert!(!is_temp_file_of("a.png", "a.png"));
    }
    /// The output map recorded in a checkpoint reaches the built model: "detection" gives the
    /// detection module's mask as the anomaly map, no entry the refined mask, and an unknown
    /// value is an error naming the file and the key.
    #[test]
    fn the_recorded_output_map_chooses_the_anomaly_map() {
        let cfg = DsrConfig::tiny();
        let tensors = DsrModel::seeded_weights(&cfg, 3).unwrap();
        let dir = scratch("output-map");
        let path = dir.join("model.safetensors");
        let pixels: Vec<f32> = (0..3 * 64 * 64)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let image = Tensor::from_vec(pixels, (1, 3, 64, 64), &Device::Cpu).unwrap();
        let map_of = |extra: &BTreeMap<String, String>| {
            save_checkpoint(&path, &tensors, &cfg, Some([64, 64]), extra).unwrap();
            let ckpt = load_safetensors(&path).unwrap();
            ckpt.build_model(&cfg, &Device::Cpu).map(|model| {
                let trace = model.forward_eval(&image).unwrap();
                (model.output_map(), trace)
            })
        };
        let (output, trace) = map_of(&BTreeMap::new()).unwrap();
        assert_eq!(output, OutputMap::Refined);
        let refined = trace
            .upsampling_softmax
            .narrow(1, 1, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
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
        assert_eq!(diff(&trace.inference.anomaly_map, &refined), 0.0);
        let detection: BTreeMap<String, String> =
            [(META_OUTPUT_MAP.to_string(), "detection".to_string())].into();
        let (output, trace) = map_of(&detection).unwrap();
        assert_eq!(output, OutputMap::Detection);
        let mask = trace
            .adm_softmax
            .narrow(1, 1, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
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
