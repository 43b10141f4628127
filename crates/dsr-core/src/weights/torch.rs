//! PyTorch zip archives (`torch.save`): the official pretrained discrete model (`.pckl`) and
//! anomalib Lightning checkpoints (`.ckpt`). Every archive is checked before candle reads it
//! (entry counts and sizes, no compression, a pickle pre-scan by [`super::pickle_guard`]), and
//! candle's pickle reader runs behind a guard that turns its panics into errors naming the file.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::safetensors::to_f32;
use super::{
    check_tensors, detect_format, Checkpoint, WeightFormat, DISCRETE_PREFIX, LEGACY_HINT,
    LIGHTNING_PREFIX,
};
use crate::{DsrConfig, Error, Result};

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
    let file = crate::files::open_regular(path).map_err(|source| Error::Io {
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
        super::pickle_guard::scan(&sink).map_err(|e| {
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
