//! Verification and placement: the only way a file reaches an inbox name.
//! The partial file (every chunk of it fdatasynced before it was recorded)
//! is checked (size, SHA-256), then put in place atomically according to the
//! profile's mode.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::ReceiveError;
use crate::config::Mode;
use crate::durable;

/// Checks that `partial` holds exactly `size` bytes hashing to `sha256`.
/// `hashed` is the digest computed as the chunks arrived, when they came in
/// order; otherwise the file is read back. No flush here: each chunk was
/// flushed (fdatasync) before it was recorded, so a complete transfer's
/// partial file is on disk already.
pub fn verify(
    partial: &Path,
    size: u64,
    sha256: &str,
    hashed: Option<String>,
) -> Result<(), ReceiveError> {
    let mut f =
        File::open(partial).map_err(|e| ReceiveError::from_io("opening the partial file", e))?;
    let actual_size = f
        .metadata()
        .map_err(|e| ReceiveError::from_io("reading the partial file", e))?
        .len();
    if actual_size != size {
        return Err(ReceiveError::SizeMismatch {
            expected: size,
            actual: actual_size,
        });
    }
    let actual = match hashed {
        Some(digest) => digest,
        None => {
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f
                    .read(&mut buf)
                    .map_err(|e| ReceiveError::from_io("reading the partial file", e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            hex::encode(hasher.finalize())
        }
    };
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(ReceiveError::DigestMismatch {
            expected: sha256.to_string(),
            actual,
        });
    }
    Ok(())
}

fn inode(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// True when `target` is the file whose inode was recorded before placing:
/// the placement happened before a crash.
pub fn already_placed(target: &Path, recorded: u64) -> bool {
    inode(target).map(|i| i == recorded).unwrap_or(false)
}

/// Puts `partial` in place as `inbox/name`. `record(target, inode)` is called
/// with the inode that will carry the name, before the step that makes it
/// visible, so that recovery can tell whether that step happened.
pub fn place(
    partial: &Path,
    inbox: &Path,
    name: &str,
    mode: Mode,
    record: impl FnOnce(&Path, u64) -> Result<(), ReceiveError>,
) -> Result<PathBuf, ReceiveError> {
    let target = inbox.join(name);
    let io = |what: &'static str| move |e: io::Error| ReceiveError::from_io(what, e);
    match mode {
        Mode::New | Mode::Replace => {
            let ino = inode(partial).map_err(io("reading the partial file"))?;
            record(&target, ino)?;
            put(partial, &target, mode, ino)?;
            durable::fsync_dir(inbox).map_err(io("placing the file"))?;
            tidy(partial, mode)?;
        }
        Mode::Append => {
            // Build old + new beside the partial, then rename it over the
            // name: a reader sees the old file or the whole new one.
            let combined = partial.with_extension("append");
            durable::remove_if_exists(&combined).map_err(io("preparing the append"))?;
            if target.exists() {
                fs::copy(&target, &combined).map_err(io("copying the existing file"))?;
            }
            durable::append_durable(partial, &combined).map_err(io("appending"))?;
            let ino = inode(&combined).map_err(io("reading the appended file"))?;
            record(&target, ino)?;
            durable::rename_durable(&combined, &target).map_err(io("placing the file"))?;
            durable::remove_if_exists(partial).map_err(io("removing the partial file"))?;
        }
        Mode::Generations(keep) => {
            // Rotate only while the name is taken, so that a rotation redone
            // after a crash between rotating and placing does not shift twice.
            if target.exists() {
                rotate(inbox, name, keep).map_err(io("rotating generations"))?;
            }
            let ino = inode(partial).map_err(io("reading the partial file"))?;
            record(&target, ino)?;
            durable::rename_into(partial, &target).map_err(io("placing the file"))?;
        }
    }
    Ok(target)
}

/// The inode `partial` will carry under its inbox name (modes `new` and
/// `replace`), to record before [`put`].
pub fn partial_inode(partial: &Path) -> Result<u64, ReceiveError> {
    inode(partial).map_err(|e| ReceiveError::from_io("reading the partial file", e))
}

/// True for the modes whose placement is one rename or link, which
/// [`put`] does and several transfers can share a directory flush for.
pub fn simple(mode: Mode) -> bool {
    matches!(mode, Mode::New | Mode::Replace)
}

/// Gives `partial` (inode `ino`) the name `target`, mode `new` or `replace`,
/// without flushing the directory: the caller flushes it, once for every
/// file it put there, and then calls [`tidy`]. `new` never overwrites, and
/// knows its own earlier link.
pub fn put(partial: &Path, target: &Path, mode: Mode, ino: u64) -> Result<(), ReceiveError> {
    let io = |what: &'static str| move |e: io::Error| ReceiveError::from_io(what, e);
    if mode == Mode::Replace {
        // Only the new name needs to last: a leftover partial link after a
        // crash is removed at the next start (Receiver::sweep_partials).
        return fs::rename(partial, target).map_err(io("placing the file"));
    }
    match fs::hard_link(partial, target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && already_placed(target, ino) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(ReceiveError::FileExists(target.display().to_string()))
        }
        Err(e) => Err(io("placing the file")(e)),
    }
}

/// After [`put`] and the directory's flush: mode `new` drops the partial
/// file's name, which must outlive the flush of the new one (the two are in
/// different directories, and a crash may keep either change without the
/// other).
pub fn tidy(partial: &Path, mode: Mode) -> Result<(), ReceiveError> {
    if mode != Mode::New {
        return Ok(());
    }
    durable::remove_if_exists(partial)
        .map_err(|e| ReceiveError::from_io("removing the partial file", e))
}

/// `name.(keep-1)` → `name.keep` … `name` → `name.1`; the oldest drops off.
fn rotate(inbox: &Path, name: &str, keep: u32) -> io::Result<()> {
    let generation = |i: u32| inbox.join(format!("{name}.{i}"));
    durable::remove_if_exists(&generation(keep))?;
    for i in (1..keep).rev() {
        let from = generation(i);
        if from.exists() {
            fs::rename(&from, generation(i + 1))?;
        }
    }
    fs::rename(inbox.join(name), generation(1))?;
    durable::fsync_dir(inbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(content: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.part");
        fs::write(&p, content).unwrap();
        (d, p)
    }

    #[test]
    fn verify_checks_size_and_digest() {
        let (_d, p) = setup(b"abc");
        let sha = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify(&p, 3, sha, None).unwrap();
        assert_eq!(
            verify(&p, 4, sha, None).unwrap_err().code(),
            "size_mismatch"
        );
        assert_eq!(
            verify(&p, 3, &"0".repeat(64), None).unwrap_err().code(),
            "sha256_mismatch"
        );
        // A digest computed as the chunks arrived stands for the read-back.
        verify(&p, 3, sha, Some(sha.to_string())).unwrap();
        let wrong = Some("1".repeat(64));
        assert_eq!(
            verify(&p, 3, sha, wrong).unwrap_err().code(),
            "sha256_mismatch"
        );
        assert_eq!(
            verify(&p, 4, sha, Some(sha.into())).unwrap_err().code(),
            "size_mismatch"
        );
    }

    #[test]
    fn modes() {
        let (d, p) = setup(b"one");
        let inbox = d.path();
        let t = place(&p, inbox, "f", Mode::New, |_, _| Ok(())).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"one");
        assert!(!p.exists());
        fs::write(&p, b"two").unwrap();
        assert_eq!(
            place(&p, inbox, "f", Mode::New, |_, _| Ok(()))
                .unwrap_err()
                .code(),
            "file_exists"
        );
        place(&p, inbox, "f", Mode::Append, |_, _| Ok(())).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"onetwo");
        fs::write(&p, b"three").unwrap();
        place(&p, inbox, "f", Mode::Replace, |_, _| Ok(())).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"three");
        for g in ["g1", "g2", "g3"] {
            fs::write(&p, g).unwrap();
            place(&p, inbox, "f", Mode::Generations(2), |_, _| Ok(())).unwrap();
        }
        assert_eq!(fs::read(&t).unwrap(), b"g3");
        assert_eq!(fs::read(inbox.join("f.1")).unwrap(), b"g2");
        assert_eq!(fs::read(inbox.join("f.2")).unwrap(), b"g1");
        assert!(!inbox.join("f.3").exists());
    }

    #[test]
    fn new_mode_recognises_its_own_earlier_placement() {
        let (d, p) = setup(b"one");
        let target = d.path().join("f");
        // Simulates a crash after the link and before the partial was removed.
        fs::hard_link(&p, &target).unwrap();
        place(&p, d.path(), "f", Mode::New, |_, _| Ok(())).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"one");
    }
}
