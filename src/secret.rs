//! Secret files: broker credentials, tokens, private keys. A secret is read
//! only from a regular file that neither its group nor others may read, and
//! is written once, mode 0600, never over an existing file (`O_EXCL`), so a
//! planted link cannot redirect it. Nothing here ever prints a secret.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Longest secret file read; anything larger is not a secret file.
const MAX_SECRET: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the secret file {path} has mode {mode:04o}: its group or others may access it; run `chmod 600 {path}`"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the secret file {path} is not a regular file (or is larger than 64 KiB)")]
    NotRegular { path: PathBuf },
    #[error("the secret file {path} is empty")]
    Empty { path: PathBuf },
    #[error("cannot create the secret file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reads a secret file, surrounding white space ignored. Refuses a file its
/// group or others may access, a non-regular file, and an empty one.
pub fn read(path: &Path) -> Result<String, SecretError> {
    let io = |source| SecretError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    check(path, &meta)?;
    let mut text = String::new();
    Read::by_ref(&mut f)
        .take(MAX_SECRET)
        .read_to_string(&mut text)
        .map_err(io)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(text.to_string())
}

/// The checks `read` makes on an open secret file's metadata.
pub fn check(path: &Path, meta: &std::fs::Metadata) -> Result<(), SecretError> {
    check_private(path, meta, MAX_SECRET)
}

/// A regular file of at most `max_len` bytes that neither its group nor
/// others may read or write: the checks of every private file hakobu reads
/// (secrets, keys, the embedded broker's users file).
pub fn check_private(
    path: &Path,
    meta: &std::fs::Metadata,
    max_len: u64,
) -> Result<(), SecretError> {
    if !meta.file_type().is_file() || meta.len() > max_len {
        return Err(SecretError::NotRegular {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Creates `path` with mode 0600 and writes `text` to it, durably. Fails if
/// anything (a file or a link) is already at `path`.
pub fn create(path: &Path, text: &str) -> Result<(), SecretError> {
    let err = |source| SecretError::Create {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    // The umask may only have narrowed the mode; make it exactly 0600.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.write_all(b"\n").map_err(err)?;
    f.sync_all().map_err(err)?;
    if let Some(dir) = path.parent() {
        crate::durable::fsync_dir(dir).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_round_trips_and_an_exposed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        create(&p, "hunter2").unwrap();
        assert_eq!(read(&p).unwrap(), "hunter2");
        assert!(matches!(create(&p, "x"), Err(SecretError::Create { .. })));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read(&p).unwrap_err();
        assert!(matches!(e, SecretError::Exposed { mode: 0o640, .. }), "{e}");
        assert!(!e.to_string().contains("hunter2"));
        let empty = dir.path().join("e");
        create(&empty, "  ").unwrap();
        assert!(matches!(read(&empty), Err(SecretError::Empty { .. })));
        assert!(matches!(
            read(dir.path()),
            Err(SecretError::NotRegular { .. })
        ));
    }

    #[test]
    fn create_does_not_follow_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "mine").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create(&link, "secret").is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "mine");
    }
}
