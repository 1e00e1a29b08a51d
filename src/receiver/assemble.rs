//! Assembly: checks each chunk against its transfer and the profile, and
//! writes it at its offset into the partial file. Duplicates, redelivery and
//! reordering are harmless: a chunk always lands on the same bytes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::config::ReceiveProfile;
use crate::store::Row;
use crate::wire::ChunkHeader;

use super::error::ReceiveError;

/// Directory, inside the inbox, where partial files live: same filesystem as
/// the final name, and a dot name that no outbox watcher picks up.
pub const PARTIAL_DIR: &str = ".hakobu-partial";

pub fn partial_path(inbox: &Path, transfer_id: &str) -> PathBuf {
    inbox.join(PARTIAL_DIR).join(format!("{transfer_id}.part"))
}

/// A transfer id names files: UUIDs and ULIDs only.
pub fn valid_transfer_id(id: &str) -> bool {
    (10..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A base name that cannot escape the inbox or confuse a hook.
pub fn check_file_name(name: &str) -> Result<(), ReceiveError> {
    let bad = name.is_empty()
        || name.len() > 255
        || name == "."
        || name == ".."
        || name.starts_with('.')
        || name.contains('/')
        || name.contains('\\')
        || name.chars().any(|c| c.is_control());
    if bad {
        Err(ReceiveError::BadFileName(name.to_string()))
    } else {
        Ok(())
    }
}

/// Checks a transfer's first chunk against the receive profile.
pub fn admit(h: &ChunkHeader, profile: Option<&ReceiveProfile>) -> Result<(), ReceiveError> {
    let profile = profile.ok_or_else(|| ReceiveError::UnknownFileId(h.file_id.clone()))?;
    if !profile.from.iter().any(|f| f == &h.from) {
        return Err(ReceiveError::SenderNotAllowed(
            h.from.clone(),
            h.file_id.clone(),
        ));
    }
    check_file_name(&h.file_name)?;
    if h.size > profile.max_size {
        return Err(ReceiveError::TooLarge {
            size: h.size,
            max: profile.max_size,
        });
    }
    if !(crate::config::MIN_CHUNK..=crate::config::MAX_CHUNK).contains(&h.chunk_size) {
        return Err(ReceiveError::Inconsistent("the chunk size"));
    }
    Ok(())
}

/// Checks a chunk against what earlier chunks of its transfer declared.
pub fn check_chunk(h: &ChunkHeader, row: &Row, body_len: u64) -> Result<u64, ReceiveError> {
    if h.file_id != row.file_id {
        return Err(ReceiveError::Inconsistent("the file id"));
    }
    if h.file_name != row.file_name {
        return Err(ReceiveError::Inconsistent("the file name"));
    }
    if h.size != row.size || h.chunk_size != row.chunk_size {
        return Err(ReceiveError::Inconsistent("the size"));
    }
    match h.expected_len() {
        Some(n) if n == body_len => Ok(h.index()),
        _ => Err(ReceiveError::ChunkOutOfRange {
            offset: h.offset,
            len: body_len,
            size: h.size,
        }),
    }
}

/// Writes `body` at `offset` of the partial file. Not yet durable: the
/// caller syncs every partial file a batch touched ([`sync_partial`]) before
/// recording (and acking) the batch's chunks.
pub fn write_chunk(partial: &Path, offset: u64, body: &[u8]) -> Result<(), ReceiveError> {
    if let Some(dir) = partial.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| ReceiveError::from_io("creating the partial directory", e))?;
    }
    let f: File = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(partial)
        .map_err(|e| ReceiveError::from_io("opening the partial file", e))?;
    f.write_all_at(body, offset)
        .map_err(|e| ReceiveError::from_io("writing a chunk", e))
}

/// Flushes a partial file's data (one fsync for all the chunks a batch wrote).
pub fn sync_partial(partial: &Path) -> Result<(), ReceiveError> {
    File::open(partial)
        .and_then(|f| f.sync_data())
        .map_err(|e| ReceiveError::from_io("syncing the partial file", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            "a\0b",
            "a\nb",
            ".hidden",
            "a\\b",
            "x\u{7f}",
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["sales.csv", "売上.csv", "a b.txt", "x..y"] {
            assert!(check_file_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn transfer_ids() {
        assert!(valid_transfer_id("0190f6c4-1234-7000-8000-0123456789ab"));
        assert!(valid_transfer_id("01ARZ3NDEKTSV4RRFFQ69G5FAV"));
        assert!(!valid_transfer_id("../../etc"));
        assert!(!valid_transfer_id("short"));
    }
}
