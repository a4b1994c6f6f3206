//! Creating output files safely in directories others may write to: temporaries created
//! exclusively under unpredictable names (never through a planted symbolic link), and
//! partial outputs opened without following links and locked, so one output has one writer.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The directory a file path lives in (`.` for a bare name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `DIR/.NAME.suffix` for `DIR/NAME`: the hidden companion files of an output.
pub(crate) fn hidden_sibling(path: &Path, suffix: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?;
    Ok(parent_dir(path).join(format!(".{}.{suffix}", name.to_string_lossy())))
}

/// Creates a new temporary file beside `path` (`.NAME.RANDOM.tmp`), exclusively: an existing
/// file or link of that name is never opened, and the random part makes the name unguessable.
pub(crate) fn create_temp(path: &Path) -> std::io::Result<(File, PathBuf)> {
    loop {
        let tmp = hidden_sibling(path, &format!("{:016x}.tmp", rand::random::<u64>()))
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e.to_string()))?;
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Opens an existing file for reading and writing without following a symbolic link.
fn open_existing(path: &Path) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    if std::fs::symlink_metadata(path)?.file_type().is_symlink() {
        return Err(std::io::Error::other("is a symbolic link"));
    }
    o.open(path)
}

/// Whether the open file `f` is the one `path` names now (not renamed or replaced meanwhile).
fn is_at(f: &File, path: &Path) -> std::io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (f.metadata()?, std::fs::symlink_metadata(path)?);
        Ok(a.dev() == b.dev() && a.ino() == b.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = (f, path);
        Ok(true)
    }
}

/// Opens `path` (creating it exclusively if absent) and takes an exclusive lock on it, which
/// lasts as long as the file stays open. A symbolic link at `path` is refused; a lock held by
/// another process is [`Error::OutputBusy`] naming `output`. Returns the file and whether it
/// existed before.
pub(crate) fn open_locked(path: &Path, output: &Path) -> Result<(File, bool)> {
    let ctx = || format!("writing {}", path.display());
    // A few rounds: between opening and locking, another writer may finish and rename the
    // file away; then it is opened again.
    for _ in 0..8 {
        let (f, existed) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => (f, false),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => match open_existing(path) {
                Ok(f) => (f, true),
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) if is_link_refusal(&e) => {
                    return Err(Error::io(format!(
                        "opening {}: it is a symbolic link, which edgediff does not write through (remove it)",
                        path.display()
                    ))(e))
                }
                Err(e) => return Err(Error::io(ctx())(e)),
            },
            Err(e) => return Err(Error::io(ctx())(e)),
        };
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::OutputBusy {
                    path: output.into(),
                    lock: path.into(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(ctx())(e)),
        }
        match is_at(&f, path) {
            Ok(true) => return Ok((f, existed)),
            Ok(false) => continue,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(ctx())(e)),
        }
    }
    Err(Error::OutputBusy {
        path: output.into(),
        lock: path.into(),
    })
}

/// ELOOP (Linux, macOS): what O_NOFOLLOW gives on a symbolic link.
fn is_link_refusal(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        e.raw_os_error() == Some(libc::ELOOP)
    }
    #[cfg(not(unix))]
    {
        e.kind() == ErrorKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_opener_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".x.npy.partial");
        let (first, existed) = open_locked(&p, Path::new("x.npy")).unwrap();
        assert!(!existed);
        let busy = open_locked(&p, Path::new("x.npy")).unwrap_err();
        assert!(matches!(busy, Error::OutputBusy { .. }), "{busy}");
        drop(first);
        let (_, existed) = open_locked(&p, Path::new("x.npy")).unwrap();
        assert!(existed);
    }

    #[cfg(unix)]
    #[test]
    fn a_planted_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let p = dir.path().join(".x.npy.partial");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let e = open_locked(&p, Path::new("x.npy")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        // Temporaries get fresh names, so a link at any guessable name is never used.
        let (_, t1) = create_temp(&dir.path().join("y.png")).unwrap();
        let (_, t2) = create_temp(&dir.path().join("y.png")).unwrap();
        assert_ne!(t1, t2);
    }
}
