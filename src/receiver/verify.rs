//! Verification: a complete transfer's partial file must hold exactly the
//! declared size and hash to the declared SHA-256 before it may be placed.
//! The digest is usually computed as the chunks arrive ([`RunningDigests`]),
//! so that verifying need not read the file back.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;

use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::error::ReceiveError;
use crate::domain::TransferId;

/// The largest buffer a partial file is read back through.
const READ_BACK_BUF: usize = 64 << 10;

/// Checks that `partial` holds exactly `size` bytes hashing to `sha256`.
/// `hashed` is the digest computed as the chunks arrived, when they came in
/// order; otherwise the file is read back. No flush here: each chunk was
/// flushed (fdatasync) before it was recorded, so a complete transfer's
/// partial file is on disk already.
#[cfg(test)]
pub fn verify(
    partial: &std::path::Path,
    size: u64,
    sha256: &str,
    hashed: Option<String>,
) -> Result<(), ReceiveError> {
    let mut f =
        File::open(partial).map_err(|e| ReceiveError::from_io("opening the partial file", e))?;
    verify_file(&mut f, size, sha256, hashed)
}

/// [`verify`] on a partial file already open (and checked, `partial.rs`).
pub fn verify_file(
    f: &mut File,
    size: u64,
    sha256: &str,
    hashed: Option<String>,
) -> Result<(), ReceiveError> {
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
            // Sized to the file, at most READ_BACK_BUF: up to COMPLETING_MAX
            // files are read back at once (those that waited in the ledger
            // lost their running digest), and a 1 MiB buffer each for 4 KiB
            // files raised the receiver's peak by 14 MiB (backlog bench).
            let mut buf = vec![0u8; (actual_size as usize).clamp(4096, READ_BACK_BUF)];
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

/// The running SHA-256 of each transfer whose chunks have so far arrived in
/// order: bytes hashed and the hasher's state. A transfer whose chunk came
/// out of order or twice keeps `None` (verify then reads the file back).
#[derive(Default)]
pub struct RunningDigests(Mutex<HashMap<TransferId, Option<Running>>>);

/// Bytes hashed so far, and the state after them.
pub type Running = (u64, Sha256);

impl RunningDigests {
    /// Takes the transfer's running digest, when a chunk at `offset`
    /// continues it (the first chunk starts one). `None` stops it for good:
    /// a chunk out of order, or one seen twice.
    pub fn take_for(&self, tid: &TransferId, offset: u64) -> Option<Running> {
        match self.lock().remove(tid) {
            None if offset == 0 => Some((0, Sha256::new())),
            None => None,
            Some(state) => state.filter(|(next, _)| *next == offset),
        }
    }

    /// Puts back what [`RunningDigests::take_for`] took, continued by the chunk.
    pub fn put(&self, tid: &TransferId, state: Option<Running>) {
        self.lock().insert(tid.clone(), state);
    }

    /// The digest of the whole file when every one of its `size` bytes was
    /// hashed in order as it arrived; forgets the transfer's running digest.
    pub fn finish(&self, tid: &TransferId, size: u64) -> Option<String> {
        let (hashed, hasher) = self.lock().remove(tid)??;
        (hashed == size).then(|| hex::encode(hasher.finalize()))
    }

    pub fn forget(&self, tid: &TransferId) {
        self.lock().remove(tid);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TransferId, Option<Running>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn verify_checks_size_and_digest() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.part");
        std::fs::write(&p, b"abc").unwrap();
        verify(&p, 3, ABC, None).unwrap();
        let code = |r: Result<(), ReceiveError>| r.unwrap_err().code().as_str();
        assert_eq!(code(verify(&p, 4, ABC, None)), "size_mismatch");
        assert_eq!(
            code(verify(&p, 3, &"0".repeat(64), None)),
            "sha256_mismatch"
        );
        // A digest computed as the chunks arrived stands for the read-back.
        verify(&p, 3, ABC, Some(ABC.to_string())).unwrap();
        assert_eq!(
            code(verify(&p, 3, ABC, Some("1".repeat(64)))),
            "sha256_mismatch"
        );
        assert_eq!(code(verify(&p, 4, ABC, Some(ABC.into()))), "size_mismatch");
    }

    #[test]
    fn a_running_digest_survives_only_chunks_in_order() {
        let digests = RunningDigests::default();
        let t = TransferId::new();
        let feed = |offset: u64, body: &[u8]| {
            let state = digests.take_for(&t, offset).map(|(n, mut h)| {
                h.update(body);
                (n + body.len() as u64, h)
            });
            digests.put(&t, state);
        };
        feed(0, b"a");
        feed(1, b"bc");
        assert_eq!(digests.finish(&t, 3).as_deref(), Some(ABC));
        // Out of order: no digest, verify reads the file instead.
        feed(0, b"a");
        feed(2, b"c");
        feed(1, b"b");
        assert_eq!(digests.finish(&t, 3), None);
        // A short hash (the last chunk missing) is no digest either.
        feed(0, b"ab");
        assert_eq!(digests.finish(&t, 3), None);
    }
}
