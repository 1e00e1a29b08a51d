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

/// Creates `dir` (and any missing parent) with mode 0700, or tightens an
/// existing one to 0700: the state directory, the spool and the embedded
/// broker's data hold files other local users must not read or replace.
/// A directory owned by another user is refused (it could change what is
/// in it whatever its mode). The umask plays no part.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    let me = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to the agent's user (uid {me}); give the agent a directory of its own",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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

    #[test]
    fn a_private_dir_is_created_or_tightened_to_0700() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let new = d.path().join("a/b");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        fs::set_permissions(&new, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
    }
}
