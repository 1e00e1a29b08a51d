//! Ingest, stage one of receiving a chunk: check it against its transfer and
//! the profile, pass its body through the transform stage, and write it at
//! its offset into the partial file (the page cache; the commit stage makes
//! it durable). A bad chunk fails its transfer here ([`Receiver::reject`]).
//! Duplicates, redelivery and reordering are harmless: a chunk always lands
//! on the same bytes.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use sha2::Digest;
use tracing::{error, info, warn};

use super::commit::{Commits, Written};
use super::error::ReceiveError;
use super::{Receiver, SIDE_BY_SIDE};
use crate::broker::Delivery;
use crate::config::{MAX_CHUNK, MIN_CHUNK, ReceiveProfile};
use crate::domain::{FileName, TransferId, check_meta, escape_name};
use crate::error_code::ErrorCode;
use crate::store::{ReceiveRow, Status, StoreError, Transfer};
use crate::transform::Transform;
use crate::wire::{ChunkHeader, Trailer};

/// Directory, inside the inbox, where partial files live: same filesystem as
/// the final name, and a dot name that no outbox watcher picks up.
pub const PARTIAL_DIR: &str = ".hakobu-partial";

/// Where the partial file of `tid` lives in `inbox`.
pub fn partial_path(inbox: &Path, tid: &TransferId) -> PathBuf {
    inbox.join(PARTIAL_DIR).join(format!("{tid}.part"))
}

/// What checking and writing one chunk came to.
enum Staged {
    /// Written to the partial file; to be synced, recorded and acked.
    Written { idx: u64, partial: PathBuf },
    /// The transfer is already past assembly.
    Settled,
    /// Not ours to process; ack and forget.
    Ignore,
}

enum Failure {
    Store(StoreError),
    Transfer(ReceiveError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl From<ReceiveError> for Failure {
    fn from(e: ReceiveError) -> Self {
        Failure::Transfer(e)
    }
}

impl Receiver {
    /// Checks and writes a batch of chunks, transfers side by side and the
    /// chunks of one transfer in order, then hands what was written to the
    /// commit stage and returns: the disk's flush of this batch overlaps the
    /// network's next chunks.
    pub(super) async fn ingest(
        self: &Arc<Self>,
        batch: Vec<(ChunkHeader, Bytes, Delivery)>,
        commits: &Commits,
    ) {
        let mut by_transfer: HashMap<TransferId, Vec<(ChunkHeader, Bytes, Delivery)>> =
            HashMap::new();
        for c in batch {
            by_transfer
                .entry(c.0.transfer_id.clone())
                .or_default()
                .push(c);
        }
        let staged = by_transfer.into_values().map(|chunks| async move {
            let mut written = Vec::new();
            for (h, body, d) in chunks {
                written.extend(self.stage(h, body, d).await);
            }
            written
        });
        let written: Vec<Written> = futures::stream::iter(staged)
            .buffer_unordered(SIDE_BY_SIDE)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect();
        commits.hand_over(written).await;
    }

    /// Checks one chunk and writes it to its partial file. Returns it when it
    /// still has to be synced, recorded and acked; settles it here otherwise.
    async fn stage(self: &Arc<Self>, h: ChunkHeader, body: Bytes, d: Delivery) -> Option<Written> {
        if h.to != self.cfg.node {
            warn!(message = "Dead-lettering a chunk addressed to another node.",
                transfer_id = %h.transfer_id, from = %h.from, to = %h.to, error_code = %ErrorCode::MalformedMessage);
            let _ = d.dead_letter().await;
            return None;
        }
        if self.cfg.verify_sender() && d.user_id.as_deref() != Some(h.from.as_str()) {
            // Not answered: the claimed sender cannot be trusted to be the one
            // a receipt would reach, and its transfer must not be touched.
            let e = ReceiveError::SenderMismatch {
                user: d.user_id.clone().unwrap_or_default(),
                node: h.from.to_string(),
            };
            warn!(message = "Dead-lettering a chunk whose sender is not its broker user.",
                transfer_id = %h.transfer_id, error_code = %e.code(), error = %e);
            let _ = d.dead_letter().await;
            return None;
        }
        if self.is_busy(&h.transfer_id) {
            let _ = d.ack().await;
            return None;
        }
        let wire = body.len() as u64;
        match self.write(&h, body).await {
            Ok(Staged::Written { idx, partial }) => Some(Written {
                h,
                idx,
                partial,
                d,
                wire,
            }),
            Ok(Staged::Settled) => {
                let _ = d.ack().await;
                self.spawn_completion(h.transfer_id);
                None
            }
            Ok(Staged::Ignore) => {
                let _ = d.ack().await;
                None
            }
            Err(Failure::Store(e)) => {
                error!(message = "State database failed while receiving a chunk; requeueing it.",
                    error = %e, error_code = %e.code(), transfer_id = %h.transfer_id);
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = d.requeue().await;
                None
            }
            Err(Failure::Transfer(e)) => {
                self.reject(&h, e, d).await;
                None
            }
        }
    }

    /// Fails a transfer for a bad chunk: records why, then removes the
    /// partial file, acks, and lets the completion task run the failure
    /// hook and send the failure receipt.
    pub(super) async fn reject(self: &Arc<Self>, h: &ChunkHeader, e: ReceiveError, d: Delivery) {
        let tid = &h.transfer_id;
        // Another chunk of the same batch may have failed the transfer first:
        // its reason stands.
        if matches!(self.ledger.get(tid).await, Ok(Some(r)) if r.status.is_final()) {
            let _ = d.ack().await;
            return;
        }
        warn!(message = "Rejecting transfer.", transfer_id = %tid, error_code = %e.code(), error = %e);
        if let Err(se) = self
            .fail_with((tid, &h.from), Status::ReceiveFailed, &e)
            .await
        {
            error!(message = "State database failed while recording a rejection; requeueing.",
                error = %se, error_code = %se.code(), transfer_id = %tid);
            let _ = d.requeue().await;
            return;
        }
        if let Some(p) = self.cfg.receive_profile(&h.file_id) {
            let _ = super::partial::remove(&p.inbox, tid);
        }
        self.digests.forget(tid);
        let _ = d.ack().await;
        self.spawn_completion(tid.clone());
    }

    async fn write(&self, h: &ChunkHeader, body: Bytes) -> Result<Staged, Failure> {
        let tid = &h.transfer_id;
        // Durable by the ack: the commit stage records the batch with a
        // waiting call.
        let ledger = self.ledger.deferred();
        let mut inserted = false;
        let row = match ledger.get(tid).await? {
            Some(r) if r.peer != h.from => {
                warn!(message = "Ignoring a chunk whose transfer id belongs to another sender.", transfer_id = %tid, from = %h.from);
                return Ok(Staged::Ignore);
            }
            Some(r) if h.attempt != r.attempt => match self.next_try(h, r).await? {
                Some(r) => r,
                None => return Ok(Staged::Ignore),
            },
            // Already settled, or resumed by recovery: make sure the sender heard.
            Some(r) if r.status != Status::Receiving => return Ok(Staged::Settled),
            Some(r) => r,
            None => {
                let profile = self.cfg.receive_profile(&h.file_id);
                let row = new_row(h);
                ledger.insert(&row).await?;
                inserted = true;
                admit(h, profile)?;
                info!(message = "Receiving.", transfer_id = %tid, from = %h.from, file_id = %h.file_id, file_name = %h.file_name, size = h.size);
                row
            }
        };
        let profile = self
            .cfg
            .receive_profile(&row.file_id)
            .ok_or_else(|| ReceiveError::UnknownFileId(row.file_id.to_string()))?;
        let body = Transform::for_chunk(profile, &self.cfg.keys, h)?.decode(h, body)?;
        let idx = check_chunk(h, &row, body.len() as u64)?;
        if let Some(t) = &h.last {
            check_trailer(t)?;
        }
        let partial = partial_path(&profile.inbox, tid);
        let (path, offset) = (partial.clone(), h.offset);
        let running = self.digests.take_for(tid, offset);
        // The write and the digest off the async workers, together.
        let running = tokio::task::spawn_blocking(move || {
            write_chunk(&path, offset, &body)?;
            Ok::<_, ReceiveError>(running.map(|(next, mut hasher)| {
                hasher.update(&body);
                (next + body.len() as u64, hasher)
            }))
        })
        .await
        .map_err(|e| ReceiveError::Io(e.to_string()))??;
        self.digests.put(tid, running);
        // A transfer's first chunk that is also its last (a small file)
        // brought the trailer into the new row.
        if let (Some(t), false) = (&h.last, inserted) {
            ledger
                .set_trailer((tid, &h.from), &t.sha256, &t.started_at, &t.meta)
                .await?;
        }
        Ok(Staged::Written { idx, partial })
    }
}

impl Receiver {
    /// A chunk of another try than the row's (the sender's `retry:`). One
    /// of an earlier try is stale: ignored, so that it cannot touch the
    /// later try's file. One of a later try, of a transfer that failed
    /// here, starts it again: the row is reset for that try (its chunks,
    /// failure and receipt forgotten) and any partial file of the earlier
    /// try removed. The row to go on with; `None` to ignore the chunk.
    async fn next_try(
        &self,
        h: &ChunkHeader,
        r: ReceiveRow,
    ) -> Result<Option<ReceiveRow>, Failure> {
        let tid = &h.transfer_id;
        if h.attempt < r.attempt || r.status != Status::ReceiveFailed {
            info!(message = "Ignoring a chunk of another try of a transfer.", transfer_id = %tid,
                from = %h.from, chunk_attempt = h.attempt, attempt = r.attempt, status = r.status.as_str());
            return Ok(None);
        }
        let profile = self.cfg.receive_profile(&h.file_id);
        let ledger = self.ledger.deferred();
        if ledger.restart(&new_row(h)).await? {
            info!(message = "Receiving a transfer again (the sender's next try).", transfer_id = %tid,
                from = %h.from, attempt = h.attempt, error_code = ?r.error_code);
            if let Some(p) = self.cfg.receive_profile(&r.file_id) {
                let _ = super::partial::remove(&p.inbox, tid);
            }
            self.digests.forget(tid);
        }
        // Restarted by this chunk or by another of the same try just now.
        match ledger.get(tid).await? {
            Some(r) if r.attempt == h.attempt && r.status == Status::Receiving => {
                admit(h, profile)?;
                Ok(Some(r))
            }
            _ => Ok(None),
        }
    }
}

/// The ledger row of a transfer seen for the first time, with the trailer
/// when this chunk carries it. Its path stays empty until the file is
/// placed: until then no inbox name is its own. The name and the metadata
/// come from the network before admission checked them, and a rejected
/// transfer's row reaches the failure hook: the name is recorded escaped
/// and metadata only when it is valid.
fn new_row(h: &ChunkHeader) -> ReceiveRow {
    let mut t = Transfer::begin(
        h.transfer_id.clone(),
        h.from.clone(),
        h.file_id.clone(),
        &escape_name(&h.file_name),
        (h.size, h.chunk_size),
        Status::Receiving,
    );
    t.request_id = h.request_id.clone();
    t.parent_id = h.parent_id.clone();
    t.attempt = h.attempt.max(1);
    if let Some(trailer) = &h.last {
        t.sha256 = Some(trailer.sha256.clone());
        if crate::clock::looks_like_rfc3339(&trailer.started_at) {
            t.started_at = trailer.started_at.clone();
        }
        if check_meta(&trailer.meta).is_ok() {
            t.meta = trailer.meta.clone();
        }
    }
    ReceiveRow::new(t)
}

/// The last chunk's trailer: everything in it reaches the ledger and the
/// hooks' environment.
fn check_trailer(t: &Trailer) -> Result<(), ReceiveError> {
    if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ReceiveError::Inconsistent("the digest (not 64 hex digits)"));
    }
    if !crate::clock::looks_like_rfc3339(&t.started_at) {
        return Err(ReceiveError::Inconsistent("the start time"));
    }
    check_meta(&t.meta).map_err(ReceiveError::BadMetadata)
}

/// Checks a transfer's first chunk against the receive profile.
fn admit(h: &ChunkHeader, profile: Option<&ReceiveProfile>) -> Result<(), ReceiveError> {
    let profile = profile.ok_or_else(|| ReceiveError::UnknownFileId(h.file_id.to_string()))?;
    if !profile.from.contains(&h.from) {
        return Err(ReceiveError::SenderNotAllowed(
            h.from.to_string(),
            h.file_id.to_string(),
        ));
    }
    FileName::parse(&h.file_name)
        .map_err(|_| ReceiveError::BadFileName(escape_name(&h.file_name)))?;
    if h.size > profile.max_size {
        return Err(ReceiveError::TooLarge {
            size: h.size,
            max: profile.max_size,
        });
    }
    if profile.max_size == u64::MAX {
        // No max_size: the declared size is bounded by the inbox's free space.
        if let Some(free) = free_space(&profile.inbox) {
            if h.size > free {
                return Err(ReceiveError::DiskFull(format!(
                    "the file declares {} bytes, the inbox's filesystem has {free} free; set max_size or free space",
                    h.size
                )));
            }
        }
    }
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&h.chunk_size) {
        return Err(ReceiveError::Inconsistent("the chunk size"));
    }
    Ok(())
}

/// Bytes available to the agent on the filesystem of `dir` (or of its
/// nearest existing ancestor); `None` when it cannot be told.
fn free_space(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|d| d.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Checks a chunk against what earlier chunks of its transfer declared;
/// `body_len` is the body's length after the transform stage.
fn check_chunk(h: &ChunkHeader, row: &ReceiveRow, body_len: u64) -> Result<u64, ReceiveError> {
    if h.file_id != row.file_id {
        return Err(ReceiveError::Inconsistent("the file id"));
    }
    if h.file_name != row.file_name {
        return Err(ReceiveError::Inconsistent("the file name"));
    }
    if h.size != row.size || h.chunk_size != row.chunk_size {
        return Err(ReceiveError::Inconsistent("the size"));
    }
    if h.parent_id != row.parent_id {
        return Err(ReceiveError::Inconsistent("the parent id"));
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

/// Writes `body` at `offset` of the partial file, reached without following
/// links (`partial.rs`): created once, mode 0600, in the inbox's private
/// partial directory. Not yet durable: the commit stage syncs every partial
/// file a batch touched ([`sync_partial`]) before recording (and acking)
/// the batch's chunks.
fn write_chunk(partial: &Path, offset: u64, body: &[u8]) -> Result<(), ReceiveError> {
    let (Some(inbox), Some(name)) = (
        partial.parent().and_then(Path::parent),
        partial.file_name().and_then(|n| n.to_str()),
    ) else {
        return Err(ReceiveError::Io(format!(
            "not a partial file: {}",
            partial.display()
        )));
    };
    let dirs = super::partial::open_dirs(inbox, true)?;
    let f: File = super::partial::open_file(&dirs, name, true)?;
    f.write_all_at(body, offset)
        .map_err(|e| ReceiveError::from_io("writing a chunk", e))
}

/// Flushes a partial file's data (one fsync for all the chunks a batch wrote).
pub fn sync_partial(partial: &Path) -> Result<(), ReceiveError> {
    super::partial::open_path(partial)?
        .sync_data()
        .map_err(|e| ReceiveError::from_io("syncing the partial file", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_max_size_a_declared_size_is_bounded_by_free_space() {
        let d = tempfile::tempdir().unwrap();
        let free = free_space(&d.path().join("not/yet")).unwrap();
        assert!(free > 0);
        let text = format!(
            "node: beta\nstate_dir: {r}/s\nbroker:\n  embedded: {{ listen: \"127.0.0.1:0\" }}\nreceive:\n  - file_id: A\n    from: [ alpha ]\n    inbox: {r}/in\n",
            r = d.path().display()
        );
        let cfg = crate::config::Config::parse(Path::new("t.yaml"), &text).unwrap();
        let h = |size: u64| ChunkHeader {
            transfer_id: TransferId::new(),
            file_id: crate::domain::FileId::parse("A").unwrap(),
            from: crate::domain::NodeName::parse("alpha").unwrap(),
            to: crate::domain::NodeName::parse("beta").unwrap(),
            file_name: "f".into(),
            size,
            chunk_size: MIN_CHUNK,
            offset: 0,
            last: None,
            sealed: None,
            request_id: None,
            attempt: 1,
            compressed: None,
            parent_id: None,
        };
        let p = cfg.receive_profile("A");
        admit(&h(1000), p).unwrap();
        let e = admit(&h(free.saturating_mul(2).max(1 << 62)), p).unwrap_err();
        assert_eq!(e.code(), ErrorCode::DiskFull, "{e}");
    }
}
