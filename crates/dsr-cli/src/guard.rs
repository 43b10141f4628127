//! What the commands may write, checked against what they read: no command overwrites, deletes
//! or renames a file it did not write itself.
//!
//! * A folder of outputs ([`OutputDir`]) keeps a ledger, `<dir>/.dsr-outputs`, of the files this
//!   program wrote there; an existing file is replaced only if the ledger lists it, and never
//!   when it is one of the inputs (compared by device and inode, so symbolic and hard links
//!   count). The folder of an input cannot be the output folder. The ledger is locked while the
//!   command runs, so two commands never write into one folder at once.
//! * A single output file ([`check_output_file`]) must not be an input, and an existing file is
//!   replaced only when it is a checkpoint this program wrote (safetensors with `dsr.` metadata).
//!
//! Output names made from input names ([`escape_name`]) are lossless: bytes that are not UTF-8,
//! control characters, `%` and `/` are written as `%XX`, so two different inputs never share an
//! output, and long names are shortened with a hash so the name stays within the file system's
//! limit.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dsr_core::files::{identity, same_file};

/// The ledger of the files this program wrote in an output folder.
pub const LEDGER: &str = ".dsr-outputs";

/// The longest output stem, in bytes (file names are limited to 255 bytes; the rest is left
/// for `_N` suffixes and extensions).
pub const MAX_STEM: usize = 200;

/// FNV-1a (64 bits).
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A file name or path as text, losslessly: UTF-8 text is kept except `%` and control
/// characters, which are written `%XX` as every byte that is not UTF-8. Two different names give
/// two different texts.
pub fn escape_os(name: &std::ffi::OsStr) -> String {
    #[cfg(unix)]
    let bytes = {
        use std::os::unix::ffi::OsStrExt;
        name.as_bytes().to_vec()
    };
    #[cfg(not(unix))]
    let bytes = name.to_string_lossy().into_owned().into_bytes();
    let mut out = String::new();
    let mut rest: &[u8] = &bytes;
    while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, &[][..]),
            Err(e) => (
                std::str::from_utf8(&rest[..e.valid_up_to()]).expect("valid prefix"),
                &rest[e.valid_up_to()..],
            ),
        };
        for c in valid.chars() {
            if c == '%' || c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            } else {
                out.push(c);
            }
        }
        if bad.is_empty() {
            break;
        }
        let n = std::str::from_utf8(bad)
            .err()
            .and_then(|e| e.error_len())
            .unwrap_or(bad.len());
        for b in &bad[..n] {
            out.push_str(&format!("%{b:02X}"));
        }
        rest = &bad[n..];
    }
    out
}

/// A path as text, losslessly (see [`escape_os`]).
pub fn path_text(path: &Path) -> String {
    escape_os(path.as_os_str())
}

/// The output stem of an input file: its escaped stem ([`escape_os`], `/` cannot occur), cut to
/// [`MAX_STEM`] bytes with a hash of the whole stem when longer.
pub fn output_stem(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(escape_os)
        .unwrap_or_else(|| "image".to_string());
    if stem.len() <= MAX_STEM {
        return stem;
    }
    let mut cut = MAX_STEM - 17;
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{:016x}", &stem[..cut], fnv64(stem.as_bytes()))
}

/// A folder of outputs, with its ledger (locked while this value lives).
#[derive(Debug)]
pub struct OutputDir {
    dir: PathBuf,
    owned: HashSet<String>,
    ledger: File,
    inputs: HashSet<(u64, u64)>,
}

impl OutputDir {
    /// Creates (if missing) and takes the output folder `dir` of a command reading the files
    /// `inputs` (images, masks) and `other_reads` (a model, a configuration). Refused: `dir` is
    /// not a folder, it is the folder of one of the `inputs`, or another command is writing into
    /// it. No output will replace any of the files read.
    pub fn open(
        dir: &Path,
        inputs: &[PathBuf],
        other_reads: &[PathBuf],
        what: &str,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
        if let Some(input) = inputs.iter().find(|i| {
            let parent = match i.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            same_file(parent, dir)
        }) {
            bail!(
                "the output folder {} holds the input {}: its outputs would be written among (and over) the inputs; give another --out",
                dir.display(),
                input.display()
            );
        }
        let path = dir.join(LEDGER);
        let mut ledger = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        lock(&ledger).map_err(|e| {
            anyhow::anyhow!(
                "the output folder {} is in use by another {what} ({e}); wait for it to finish or give another --out",
                dir.display()
            )
        })?;
        let mut text = String::new();
        ledger
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let owned = text.lines().map(str::to_string).collect();
        let inputs = inputs
            .iter()
            .chain(other_reads)
            .filter_map(|p| identity(p))
            .collect();
        let out = Self {
            dir: dir.to_path_buf(),
            owned,
            ledger,
            inputs,
        };
        out.remove_stale_temporaries();
        Ok(out)
    }

    /// Checks that `name` may be written in the folder: it does not exist, or it is a regular
    /// file this program wrote (listed in the ledger) that is none of the inputs.
    pub fn check(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            return Ok(path);
        };
        if identity(&path).is_some_and(|id| self.inputs.contains(&id)) {
            bail!(
                "{} is one of the inputs (the same file, through a link); it is not overwritten: give another --out",
                path.display()
            );
        }
        if !meta.is_file() {
            bail!(
                "{} exists and is not a regular file this program wrote; it is left alone: give another --out",
                path.display()
            );
        }
        if !self.owned.contains(name) {
            bail!(
                "{} exists and was not written by dsr (it is not in {}); it is not overwritten: move it away or give another --out",
                path.display(),
                self.dir.join(LEDGER).display()
            );
        }
        Ok(path)
    }

    /// Records `name` in the ledger (before the file is written, so an interrupted write leaves
    /// a file the next run may replace).
    fn own(&mut self, name: &str) -> Result<()> {
        if self.owned.insert(name.to_string()) {
            self.ledger
                .write_all(format!("{name}\n").as_bytes())
                .with_context(|| format!("cannot write {}", self.dir.join(LEDGER).display()))?;
        }
        Ok(())
    }

    /// Writes `name` atomically after [`OutputDir::check`]; returns its path.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let path = self.check(name)?;
        self.own(name)?;
        crate::io::write_file(&path, bytes)?;
        Ok(path)
    }

    /// Opens `name` for appending (created if missing), after [`OutputDir::check`].
    pub fn append(&mut self, name: &str) -> Result<File> {
        let path = self.check(name)?;
        self.own(name)?;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))
    }

    /// Removes the temporary files that interrupted writes of a dead process left here.
    fn remove_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if dsr_core::weights::is_temp_file(name)
                && !dsr_core::weights::temp_file_owner_alive(name)
                && entry.file_type().is_ok_and(|t| t.is_file())
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

fn lock(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether `path` is a safetensors file written by this program (its metadata holds `dsr.`
/// entries); only its header is read.
fn is_our_checkpoint(path: &Path) -> bool {
    let Ok(mut file) = dsr_core::files::open_regular(path) else {
        return false;
    };
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        return false;
    }
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return false;
    }
    let mut header = vec![0u8; len as usize];
    if file.read_exact(&mut header).is_err() {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(&header).is_ok_and(|v| {
        v.get("__metadata__")
            .and_then(|m| m.as_object())
            .is_some_and(|m| m.keys().any(|k| k.starts_with("dsr.")))
    })
}

/// Checks the single output file `out` of a command reading `inputs`: it is none of the inputs,
/// and if it exists it is a checkpoint this program wrote.
pub fn check_output_file(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    if let Some(input) = inputs.iter().find(|i| same_file(i, out)) {
        bail!(
            "the output {} is the input {} (the same file): it is not overwritten; write to another file",
            out.display(),
            input.display()
        );
    }
    if std::fs::symlink_metadata(out).is_ok() && !is_our_checkpoint(out) {
        bail!(
            "{} exists and is not a checkpoint written by dsr; it is not overwritten: write to another file or move it away",
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_names_are_lossless_and_short() {
        use std::os::unix::ffi::OsStrExt;
        let a = std::ffi::OsStr::from_bytes(b"img\xff");
        let b = std::ffi::OsStr::from_bytes(b"img\xfe");
        assert_eq!(escape_os(a), "img%FF");
        assert_ne!(escape_os(a), escape_os(b));
        assert_eq!(escape_os(std::ffi::OsStr::new("img%FF")), "img%25FF");
        assert_eq!(escape_os(std::ffi::OsStr::new("a\nb")), "a%0Ab");
        assert_eq!(escape_os(std::ffi::OsStr::new("défaut 1")), "défaut 1");
        let long = format!("{}.png", "é".repeat(120));
        let stem = output_stem(Path::new(&long));
        assert!(stem.len() <= MAX_STEM, "{}", stem.len());
        let other = format!("{}x.png", "é".repeat(120));
        assert_ne!(stem, output_stem(Path::new(&other)));
        assert_eq!(output_stem(Path::new("/x/a.b.png")), "a.b");
    }
}
