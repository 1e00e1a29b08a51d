//! Durable file operations: every file the agent places or checkpoints goes
//! through here, so that a crash leaves either the old state or the new one,
//! never a half-written name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Flushes a directory's entries (a rename or a new name) to disk.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` through a temporary file: tmp → fsync → rename → fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Renames `from` over `to` (both on one filesystem) and makes it durable.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    fsync_dir(parent(to))?;
    if parent(from) != parent(to) {
        fsync_dir(parent(from))?;
    }
    Ok(())
}

/// Renames `from` to `to` (one filesystem) and makes the new name durable;
/// the old name's removal may still be lost in a crash. For placing a
/// partial file, whose leftover link recovery removes (it knows the inode).
pub fn rename_into(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    fsync_dir(parent(to))
}

/// Appends the whole of `from` to `to` (created if missing), then fsyncs `to`.
pub fn append_durable(from: &Path, to: &Path) -> io::Result<u64> {
    let mut src = File::open(from)?;
    let mut dst = OpenOptions::new().create(true).append(true).open(to)?;
    let n = io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    fsync_dir(parent(to))?;
    Ok(n)
}

/// Removes a file if it exists; a missing file is not an error.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_then_append() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        write_atomic(&a, b"one").unwrap();
        write_atomic(&a, b"two").unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"two");
        let b = d.path().join("b");
        fs::copy(&a, &b).unwrap();
        let c = d.path().join("c");
        write_atomic(&c, b"3").unwrap();
        assert_eq!(append_durable(&c, &b).unwrap(), 1);
        assert_eq!(fs::read(&b).unwrap(), b"two3");
        // Only the named files remain: no temporaries.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 3);
    }
}
