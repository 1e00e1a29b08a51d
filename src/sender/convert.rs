//! Code conversion on the sending side (`convert:` on a send profile): the
//! spooled file is converted before it is sent, so the converted file is
//! what is chunked and digested. The order keeps a crash from converting a
//! file twice:
//!
//! 1. the spooled file (as the outbox held it) is converted into a hidden
//!    sibling `.<transfer_id>.conv` (never listed as a spool entry),
//!    flushed;
//! 2. the transfer's rows are recorded with the converted size and line
//!    count (`records`);
//! 3. the sibling is renamed over the spooled file.
//!
//! Until 2 the spooled file is the original (a crash: the rows are recorded
//! at the next start, from a fresh conversion); after 2 a leftover sibling
//! is complete and only its rename is redone ([`finish_leftover`]). A file
//! that does not convert is never sent: its rows are recorded failed
//! (`conversion_failed`) and it stays in the spool as it came.

use std::io;
use std::path::{Path, PathBuf};

use super::spool::{Spooled, open_source};
use crate::domain::TransferId;
use crate::transform::convert::{self, Convert, ConvertError, Converted};

/// A spooled file converted into its hidden sibling, which takes the
/// spooled file's place once the rows are recorded ([`Pending::commit`]).
pub struct Pending {
    tmp: PathBuf,
    path: PathBuf,
    pub converted: Converted,
}

/// The hidden sibling a spooled file is converted into.
fn sibling(path: &Path, tid: &TransferId) -> PathBuf {
    path.with_file_name(format!(".{tid}.conv"))
}

/// Step 1: converts `file` into its sibling and flushes it. The error is
/// the sentence for `conversion_failed`.
pub fn prepare(spec: &Convert, file: &Spooled) -> Result<Pending, String> {
    let tmp = sibling(&file.path, &file.tid);
    let write = || -> Result<Converted, ConvertError> {
        let _ = crate::durable::remove_if_exists(&tmp);
        let mut src = open_source(&file.path).map_err(|e| {
            ConvertError::Io(match e {
                super::spool::SourceError::Io(e) => e,
                super::spool::SourceError::Unsafe(why) => {
                    io::Error::other(format!("the spooled file {why}"))
                }
            })
        })?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut w = io::BufWriter::with_capacity(1 << 20, &out);
        let converted = convert::convert(spec, &mut src, &mut w)?;
        drop(w);
        out.sync_all()?;
        Ok(converted)
    };
    match write() {
        Ok(converted) => Ok(Pending {
            tmp,
            path: file.path.clone(),
            converted,
        }),
        Err(e) => {
            let _ = crate::durable::remove_if_exists(&tmp);
            Err(match e {
                ConvertError::Io(e) => format!(
                    "cannot convert the spooled file {}: {e}; check the state directory's space and permissions, then resend",
                    file.path.display()
                ),
                e => e.to_string(),
            })
        }
    }
}

impl Pending {
    /// Step 3: the converted file takes the spooled file's name, durably.
    pub fn commit(&self) -> io::Result<()> {
        crate::failpoint::hit("sender.convert.recorded");
        match crate::durable::rename_durable(&self.tmp, &self.path) {
            // The publisher put it in place first ([`finish_recorded`]).
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.tmp.exists() => Ok(()),
            other => other,
        }
    }

    /// Drops the converted file (its transfer was not recorded).
    pub fn discard(&self) {
        let _ = crate::durable::remove_if_exists(&self.tmp);
    }
}

/// Before a transfer recorded as converted is read for sending: its
/// converted sibling, if still there, takes its place first (the claim or
/// `hakobu send` that recorded it has not renamed it yet, or crashed).
pub fn finish_recorded(path: &Path, tid: &TransferId) -> io::Result<()> {
    let tmp = sibling(path, tid);
    match crate::durable::rename_durable(&tmp, path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// True when `file` has a converted sibling left by a crash.
pub fn has_leftover(file: &Spooled) -> bool {
    sibling(&file.path, &file.tid).exists()
}

/// At start-up, for a file with a converted sibling: when its transfer has
/// rows (`recorded`), the sibling is complete and takes its place now;
/// otherwise it is dropped (the file is converted again when its rows are
/// recorded).
pub fn finish_leftover(file: &Spooled, recorded: bool) {
    let tmp = sibling(&file.path, &file.tid);
    if recorded {
        if let Err(e) = crate::durable::rename_durable(&tmp, &file.path) {
            tracing::error!(message = "Cannot put a converted file in place in the spool.",
                transfer_id = %file.tid, error = %e);
        }
    } else {
        let _ = crate::durable::remove_if_exists(&tmp);
    }
}
