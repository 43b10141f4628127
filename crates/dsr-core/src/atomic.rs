//! Atomic file writing, the one place every output of this project goes through: a temporary
//! file in the same folder, `fsync`, then a rename over the target, so a crash or a full disk
//! never leaves a half-written file (and a failed write keeps the previous one).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Writes `bytes` to `path` through a temporary file in the same folder, `fsync` and rename.
/// If anything fails (e.g. the disk is full) the previous file at `path` is left untouched, the
/// temporary file is removed, and the error ([`Error::Write`]) says whether a previous file is
/// still there.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Distinguishes the temporary files of concurrent writes from one process.
static TEMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The prefix of [`write_atomic`]'s temporary files.
pub const TEMP_PREFIX: &str = ".dsr-tmp-";

/// The temporary file [`write_atomic`] writes before renaming it to its target:
/// `.dsr-tmp-<pid>-<n>` in the same folder. The name does not contain the target's, so a target
/// name of any legal length has a temporary name far below the file-name limit.
fn temp_path(dir: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()))
}

/// Whether `file_name` is one of [`write_atomic`]'s temporary files (left behind only when a
/// process was killed during a write): `.dsr-tmp-<pid>-<n>`.
pub fn is_temp_file(file_name: &str) -> bool {
    file_name.strip_prefix(TEMP_PREFIX).is_some_and(|rest| {
        let mut parts = rest.split('-');
        let numeric = |p: Option<&str>| {
            p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        numeric(parts.next()) && numeric(parts.next()) && parts.next().is_none()
    })
}

/// Whether the process `pid` of a temporary file's name is still running (its temporary files
/// must then be left alone).
pub fn temp_file_owner_alive(file_name: &str) -> bool {
    let Some(pid) = file_name
        .strip_prefix(TEMP_PREFIX)
        .and_then(|rest| rest.split('-').next())
    else {
        return false;
    };
    Path::new("/proc").join(pid).exists() && pid != std::process::id().to_string()
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
    if path.file_name().is_none() {
        return Err(Error::weights(path, "not a file path"));
    }
    let tmp = temp_path(&dir);
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
    use std::collections::{BTreeMap, HashMap};

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::weights::{load_checkpoint, save_checkpoint};
    use crate::DsrConfig;

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
        let tmp = temp_path(dir);
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert!(is_temp_file(name), "{name}");
        assert!(name.len() < 40, "{name}");
        assert!(
            !temp_file_owner_alive(name),
            "this process's own files are not 'alive'"
        );
        assert!(!is_temp_file(".dsr-tmp-1"));
        assert!(!is_temp_file(".dsr-tmp-1-x"));
        assert!(!is_temp_file(".a.png.1.2.tmp"));
        assert!(!is_temp_file("a.png"));
        // A pid above the kernel's largest (2^22) is never running.
        assert!(!temp_file_owner_alive(".dsr-tmp-4194305-7"));
    }

    /// A target name of 255 bytes (the longest legal one) is written: the temporary name does
    /// not grow with it.
    #[test]
    fn the_longest_legal_name_is_written() {
        let dir = scratch("long");
        let path = dir.join("x".repeat(255));
        write_atomic(&path, b"abc").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
