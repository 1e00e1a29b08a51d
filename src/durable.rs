//! Durable file operations: the fsync of a directory after a rename or a new
//! name, renames made durable, an append made durable, a removal that
//! tolerates a missing file. The receiver's placement (`receiver/place.rs`),
//! the sender's spool and `after_send` use them, so that a crash leaves
//! either the old name or the new one, never a half-written file under a
//! name.

use std::fs::{self, File, OpenOptions};
use std::io;
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
    fn rename_then_append() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        fs::write(&a, b"two").unwrap();
        let b = d.path().join("b");
        rename_durable(&a, &b).unwrap();
        assert!(!a.exists());
        let c = d.path().join("c");
        fs::write(&c, b"3").unwrap();
        assert_eq!(append_durable(&c, &b).unwrap(), 1);
        assert_eq!(fs::read(&b).unwrap(), b"two3");
        remove_if_exists(&c).unwrap();
        remove_if_exists(&c).unwrap();
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
