//! Our checkpoint format: safetensors files with the metadata of [`super`], read with every
//! offset, shape and dtype checked before a tensor is built.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::{parse_metadata, read_up_to, Checkpoint};
use crate::{Error, Result};

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
    let mut file = crate::files::open_regular(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut head = [0u8; 8];
    let n = read_up_to(&mut file, &mut head).map_err(io)?;
    check_safetensors_header(path, &head[..n], len)?;
    // Reserved fallibly: a file larger than the memory available is an error, not an abort.
    let mut bytes = Vec::new();
    usize::try_from(len)
        .ok()
        .and_then(|len| bytes.try_reserve_exact(len).ok())
        .ok_or_else(|| {
            Error::weights(
                path,
                format!(
                    "the file has {len} bytes, more than the memory available can hold ({})",
                    crate::memory::available_bytes()
                        .map_or_else(|| "unknown".to_string(), crate::memory::human_bytes)
                ),
            )
        })?;
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

pub(crate) fn to_f32(t: Tensor, path: &Path) -> Result<Tensor> {
    match t.dtype() {
        DType::F32 => Ok(t),
        DType::F16 | DType::BF16 | DType::F64 => Ok(t.to_dtype(DType::F32)?),
        other => Err(Error::weights(
            path,
            format!("unsupported tensor dtype {other:?} (expected floating point)"),
        )),
    }
}
