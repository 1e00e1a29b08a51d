//! Ingest, stage one of receiving a chunk: check it against its transfer and
//! the profile, pass its body through the transform stage, and write it at
//! its offset into the partial file (the page cache; the commit stage makes
//! it durable). A bad chunk fails its transfer here ([`Receiver::reject`]).
//! Duplicates, redelivery and reordering are harmless: a chunk always lands
//! on the same bytes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
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
use crate::domain::{FileName, TransferId};
use crate::error_code::ErrorCode;
use crate::store::{ReceiveRow, Status, StoreError, Transfer};
use crate::transform::Transform;
use crate::wire::ChunkHeader;

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
        match self.write(&h, body).await {
            Ok(Staged::Written { idx, partial }) => Some(Written { h, idx, partial, d }),
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
            let _ = crate::durable::remove_if_exists(&partial_path(&p.inbox, tid));
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
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ReceiveError::Inconsistent("the digest (not 64 hex digits)").into());
            }
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

/// The ledger row of a transfer seen for the first time, with the trailer
/// when this chunk carries it. Its path stays empty until the file is
/// placed: until then no inbox name is its own.
fn new_row(h: &ChunkHeader) -> ReceiveRow {
    let mut t = Transfer::begin(
        h.transfer_id.clone(),
        h.from.clone(),
        h.file_id.clone(),
        &h.file_name,
        (h.size, h.chunk_size),
        Status::Receiving,
    );
    if let Some(trailer) = &h.last {
        t.sha256 = Some(trailer.sha256.clone());
        t.started_at = trailer.started_at.clone();
        t.meta = trailer.meta.clone();
    }
    ReceiveRow::new(t)
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
    FileName::parse(&h.file_name).map_err(|_| ReceiveError::BadFileName(h.file_name.clone()))?;
    if h.size > profile.max_size {
        return Err(ReceiveError::TooLarge {
            size: h.size,
            max: profile.max_size,
        });
    }
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&h.chunk_size) {
        return Err(ReceiveError::Inconsistent("the chunk size"));
    }
    Ok(())
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
/// commit stage syncs every partial file a batch touched ([`sync_partial`])
/// before recording (and acking) the batch's chunks.
fn write_chunk(partial: &Path, offset: u64, body: &[u8]) -> Result<(), ReceiveError> {
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
