//! Opening input files safely: only regular files are read, and a FIFO, socket or device given
//! where a file is expected is refused at once instead of blocking the program (opening a FIFO
//! for reading waits for a writer; the file is therefore opened non-blocking, checked with
//! `fstat`, and only then read).

use std::fs::File;
use std::io::Read;
use std::path::Path;

/// What a path that is not a regular file is, in words.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    if meta.is_dir() {
        "a folder"
    } else {
        "something else"
    }
}

/// Opens `path` for reading if it is a regular file (symbolic links are followed). A FIFO,
/// socket, device or folder is an [`std::io::ErrorKind::InvalidInput`] error saying what it is
/// (`not a regular file but a FIFO (named pipe)`; callers name the path); a FIFO is never waited
/// on.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting; for a
        // regular file the flag changes nothing.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file but {}", kind_of(&meta)),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // Back to blocking reads (regular files ignore the flag, but leave no surprise).
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this function owns, with valid commands.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
    }
    Ok(file)
}

/// Checks that `path` is a regular file without opening it for long (see [`open_regular`]).
pub fn check_regular(path: &Path) -> std::io::Result<()> {
    open_regular(path).map(drop)
}

/// Reads a whole regular file (see [`open_regular`]); the buffer is reserved fallibly, so a file
/// larger than the memory available is an error, not an abort.
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let len = file.metadata()?.len();
    let mut bytes = Vec::new();
    let len = usize::try_from(len).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::OutOfMemory, "the file is too large")
    })?;
    bytes.try_reserve_exact(len).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::OutOfMemory,
            format!("cannot reserve {len} bytes to read it"),
        )
    })?;
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Reads a whole regular file as UTF-8 text (see [`read_regular`]).
pub fn read_regular_to_string(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is not UTF-8 text",
        )
    })
}

/// The identity of a file: its device and inode numbers (two paths name the same file, through
/// symbolic or hard links, exactly when their identities are equal). `None` when the file does
/// not exist or the platform has no inode numbers.
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Whether `a` and `b` name the same existing file or folder (same identity, or the same
/// canonical path).
pub fn same_file(a: &Path, b: &Path) -> bool {
    if let (Some(x), Some(y)) = (identity(a), identity(b)) {
        return x == y;
    }
    matches!(
        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
        (Ok(x), Ok(y)) if x == y
    )
}

/// An exclusive lock on a folder, held until dropped: the lock file `<dir>/<name>` (created if
/// missing, holding the owner's process id) locked with `flock`. A second process that asks for
/// it is refused at once. The kernel releases the lock when the process ends, however it ends, so
/// a killed run never leaves its folder locked.
#[derive(Debug)]
pub struct FolderLock {
    _file: File,
}

impl FolderLock {
    /// Takes the lock of `dir`, or says which process holds it. `what` names the work (e.g.
    /// `dsr train`) in the message.
    pub fn acquire(dir: &Path, name: &str, what: &str) -> std::io::Result<Self> {
        use std::io::{Seek, Write};
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this function owns.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!(
                            "{} is in use by another {what}{}; wait for it to finish (or stop it) and try again",
                            dir.display(),
                            if holder.is_empty() {
                                String::new()
                            } else {
                                format!(" (process {holder})")
                            }
                        ),
                    ));
                }
                return Err(e);
            }
        }
        file.set_len(0)?;
        file.seek(std::io::SeekFrom::Start(0))?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("dsr-core-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_fifo_is_refused_at_once_and_regular_files_read() {
        let dir = scratch("fifo");
        let fifo = dir.join("model.safetensors");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = read_regular(&dir).unwrap_err();
        assert!(e.to_string().contains("folder"), "{e}");
        let file = dir.join("a.txt");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(read_regular(&file).unwrap(), b"abc");
        let link = dir.join("b.txt");
        std::fs::hard_link(&file, &link).unwrap();
        assert!(same_file(&file, &link));
        let sym = dir.join("c.txt");
        std::os::unix::fs::symlink(&file, &sym).unwrap();
        assert!(same_file(&file, &sym));
        assert!(!same_file(&file, &fifo));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_lock_is_exclusive_until_dropped() {
        let dir = scratch("lock");
        let first = FolderLock::acquire(&dir, ".lock", "test").unwrap();
        let e = FolderLock::acquire(&dir, ".lock", "test").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains("in use by another test"), "{e}");
        assert!(
            e.to_string().contains(&std::process::id().to_string()),
            "{e}"
        );
        drop(first);
        FolderLock::acquire(&dir, ".lock", "test").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
