//! Publish: chunk one spooled file for one receiving node and publish it
//! until the broker confirms every chunk. SHA-256 computed while streaming;
//! each body passes the transform stage before it is framed; confirms
//! pipelined in a window bounded in bytes, and all transfers together
//! within a budget of bytes in flight. On a broker error the transfer
//! resumes from the first unconfirmed chunk, re-read from the spooled file.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, error, info, warn};

use super::Sender;
use super::throttle::Pace;
use crate::broker::BrokerError;
use crate::coalesce::Coalescer;
use crate::domain::{NodeName, TransferId};
use crate::error_code::ErrorCode;
use crate::retry_log::Say;
use crate::store::{SendRow, Status};
use crate::transform::Transform;
use crate::wire::{ChunkHeader, Message, Trailer, chunk_count};

/// Bytes in flight to the broker, as this many windows: four large files
/// publish at once, or many small ones (each weighs its size, rounded up to
/// [`PERMIT_UNIT`]); more wait their turn.
pub(super) const PARALLEL_WINDOWS: u64 = 4;
const PERMIT_UNIT: u64 = 64 << 10;

/// The permits a transfer of `bytes` holds while it publishes.
pub(super) fn permits_for(bytes: u64, window: u64) -> u32 {
    bytes
        .min(window)
        .div_ceil(PERMIT_UNIT)
        .clamp(1, u64::from(u32::MAX)) as u32
}

impl Sender {
    pub(super) async fn publish_until_confirmed(
        &self,
        tid: &TransferId,
        peer: &NodeName,
        size: u64,
        priority: u8,
    ) {
        // Registered while it waits for permits too: less urgent
        // publishers pause from now on.
        let _active = self.priorities.register(priority);
        let Some(permits) = self.permits.get(priority as usize) else {
            return;
        };
        let Ok(_permit) = permits.acquire_many(permits_for(size, self.window)).await else {
            return;
        };
        let mut resume = Resume::default();
        let mut backoff = Duration::from_millis(200);
        // The try this task publishes: a later one (`retry.rs`) starts
        // from the first chunk, in a task of its own.
        let mut attempt = None;
        loop {
            // `sending` was recorded by a call that waited (claim, recovery,
            // poll_queued): the read need not wait for a flush.
            let row = match self.ledger.deferred().get((tid, peer)).await {
                Ok(Some(r)) if r.status == Status::Sending => r,
                Ok(_) => return,
                Err(e) => {
                    error!(message = "State database failed; retrying.", error = %e, error_code = %e.code());
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            if *attempt.get_or_insert(row.attempt) != row.attempt {
                return;
            }
            // Progress for `hakobu send --wait`, written at most twice a
            // second; the end is recorded with the digest.
            let last = std::sync::Mutex::new(Instant::now());
            let record = |bytes: u64| {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if bytes < row.size && last.elapsed() >= Duration::from_millis(500) {
                    *last = Instant::now();
                    self.ledger
                        .deferred()
                        .set_progress((tid, peer), bytes)
                        .detach();
                }
            };
            let transform = match self.cfg.send_profile(&row.file_id) {
                Some(p) => match Transform::for_send(p, &self.cfg.keys, peer) {
                    Ok(t) => t,
                    Err(e) => {
                        error!(message = "Cannot encrypt for the receiving node; failing the transfer.",
                            transfer_id = %tid, to = %peer, error_code = %ErrorCode::PeerKeyMissing, error = %e);
                        let code = ErrorCode::PeerKeyMissing;
                        let msg = e.to_string();
                        let _ = self
                            .ledger
                            .fail((tid, peer), Status::SendFailed, (code, &msg))
                            .await;
                        return;
                    }
                },
                None => Transform::Identity,
            };
            let chunks = Chunks {
                node: &self.cfg.node,
                row: &row,
                transform,
                pace: Pace {
                    priorities: &self.priorities,
                    priority,
                    caps: [self.caps.get(&row.file_id), self.agent_cap.as_ref()]
                        .into_iter()
                        .flatten()
                        .collect(),
                },
            };
            match chunks
                .publish(&self.out, self.window, &mut resume, &record)
                .await
            {
                Ok((sha, wire_bytes)) => {
                    // Not waited for: a crash that loses it publishes the
                    // file again, and the receiver ignores the duplicate.
                    self.ledger
                        .deferred()
                        .published((tid, peer), &sha, (row.attempt, wire_bytes))
                        .detach();
                    info!(message = "Published; awaiting the receipt.", transfer_id = %tid, to = %peer, size = row.size, wire_bytes);
                    for r in self.retries.succeeded() {
                        info!(message = "The broker takes publishes again.", failed_with = %r.code, failures = r.failures, failed_for = ?r.failed_for);
                    }
                    return;
                }
                Err(PublishError::Spool(path, e)) => {
                    error!(message = "Spooled file unreadable; failing the transfer.", transfer_id = %tid, path, error = %e);
                    let msg =
                        format!("cannot read the spooled file {path}: {e}; send the file again");
                    let code = ErrorCode::SpoolUnreadable;
                    let _ = self
                        .ledger
                        .fail((tid, peer), Status::SendFailed, (code, &msg))
                        .await;
                    return;
                }
                Err(e @ PublishError::Unsafe(..)) => {
                    self.refuse_source(&row, &e.to_string()).await;
                    return;
                }
                Err(PublishError::Broker(e)) => {
                    // Every transfer under way retries: said once, not at each try.
                    match self.retries.failed(e.code()) {
                        Say::First => {
                            warn!(message = "Publishing interrupted; resuming from the first unconfirmed chunk, and retrying until the broker takes it. Said once; if it goes on, once a minute.",
                            transfer_id = %tid, to = %peer, next_chunk = resume.next, error_code = %e.code(), error = %e)
                        }
                        Say::Again { since_last } => {
                            warn!(message = "Publishing still interrupted; retrying.",
                            failures = since_last, transfer_id = %tid, to = %peer, error_code = %e.code(), error = %e)
                        }
                        Say::Quiet => debug!(message = "Publishing interrupted; retrying.",
                            transfer_id = %tid, to = %peer, next_chunk = resume.next, error_code = %e.code(), error = %e),
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Where to pick up after a failure: the first chunk not known to be durable,
/// and the digest state just before it; and the chunk body bytes published
/// so far, every attempt counted (history's `wire_bytes`).
#[derive(Clone, Default)]
pub struct Resume {
    pub next: u64,
    pub hasher: Sha256,
    pub wire: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot read the spooled file {0}: {1}; it may have been removed by hand")]
    Spool(String, std::io::Error),
    #[error("the spooled file {0} {1}")]
    Unsafe(String, &'static str),
}

struct InFlight {
    idx: u64,
    len: u64,
    hasher_before: Sha256,
    /// The broker's confirm, driven by a task of its own: looking whether it
    /// has resolved (`settle_ready`) must not poll the confirm itself, whose
    /// failure path takes the broker's connection lock; a poll that left it
    /// queued for that lock, never polled again while this task waited for
    /// the same lock to publish, deadlocked every publisher (chaos test
    /// `no_quorum_waits_then_completes`). Dropped, the task is aborted.
    confirm: AbortOnDropHandle<Result<(), BrokerError>>,
}

/// A confirm's outcome, its task's end included.
fn confirmed(
    r: Result<Result<(), BrokerError>, tokio::task::JoinError>,
) -> Result<(), BrokerError> {
    r.unwrap_or_else(|e| {
        Err(BrokerError::Connection(format!(
            "the confirm was lost: {e}"
        )))
    })
}

/// One spooled file's chunks, as framed for one receiving node.
struct Chunks<'a> {
    node: &'a NodeName,
    row: &'a SendRow,
    transform: Transform,
    pace: Pace<'a>,
}

impl Chunks<'_> {
    /// Publishes the chunks of the spooled file from `resume` on. Returns the
    /// file's SHA-256 once every chunk is confirmed, and the bytes of chunk
    /// bodies published (as framed: compressed, sealed); `on_progress` sees
    /// confirmed bytes.
    /// A file of one chunk goes through `out` with whatever else waits for the
    /// same node; the chunks of a larger one straight to the broker, in a window.
    async fn publish(
        &self,
        out: &Coalescer,
        window: u64,
        resume: &mut Resume,
        on_progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(String, u64), PublishError> {
        let row = self.row;
        let path = row.path.display().to_string();
        if row.records.is_some() {
            super::convert::finish_recorded(&row.path, &row.transfer_id)
                .map_err(|e| PublishError::Spool(path.clone(), e))?;
        }
        let file = super::spool::open_source(&row.path).map_err(|e| match e {
            super::spool::SourceError::Io(e) => PublishError::Spool(path.clone(), e),
            super::spool::SourceError::Unsafe(why) => PublishError::Unsafe(path.clone(), why),
        })?;
        let file = Arc::new(file);
        let count = chunk_count(row.size, row.chunk_size).unwrap_or(1);
        if count == 1 {
            let body = read_at(&file, &path, 0, row.size).await?;
            let sha256 = hex::encode(Sha256::digest(&body));
            let mut header = self.header(0, Some(sha256.clone()));
            let body = self
                .transform
                .encode(&mut header, body)
                .map_err(|e| PublishError::Spool(path.clone(), e))?;
            self.pace.before(body.len() as u64).await;
            resume.wire += body.len() as u64;
            let msg = Message::Chunk(header, body);
            out.publish(&row.peer, msg).await?;
            on_progress(row.size);
            return Ok((sha256, std::mem::take(&mut resume.wire)));
        }
        let broker = out.broker();
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut bytes_in_flight = 0u64;
        let mut idx = resume.next;
        let mut confirmed = idx * row.chunk_size;
        // Read ahead: the next chunk is read, hashed and framed on a blocking
        // thread while this one waits for room in the window.
        let mut hasher_before = resume.hasher.clone();
        let mut next =
            (idx < count).then(|| self.prepare(&file, idx, count, hasher_before.clone()));
        let mut digest = hex::encode(hasher_before.clone().finalize());

        while let Some(reading) = next.take() {
            let (payload, hasher_after, wire) = reading
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
                .map_err(|e| PublishError::Spool(path.clone(), e))?;
            let len = chunk_len(row, idx);
            if idx + 1 < count {
                next = Some(self.prepare(&file, idx + 1, count, hasher_after.clone()));
            } else {
                digest = hex::encode(hasher_after.clone().finalize());
            }
            while bytes_in_flight + len > window && !in_flight.is_empty() {
                let done = settle(&mut in_flight, resume).await?;
                bytes_in_flight -= done;
                confirmed += done;
                on_progress(confirmed);
            }
            // Confirms already in count as progress now, not only once the
            // window fills (a file smaller than the window would show none).
            let done = settle_ready(&mut in_flight, resume)?;
            if done > 0 {
                bytes_in_flight -= done;
                confirmed += done;
                on_progress(confirmed);
            }
            self.pace.before(wire).await;
            match broker.publish(&row.peer, payload).await {
                Ok(confirm) => {
                    resume.wire += wire;
                    in_flight.push_back(InFlight {
                        idx,
                        len,
                        hasher_before,
                        confirm: AbortOnDropHandle::new(tokio::spawn(confirm)),
                    })
                }
                Err(e) => {
                    let wire = resume.wire;
                    *resume = match in_flight.front() {
                        Some(f) => Resume {
                            next: f.idx,
                            hasher: f.hasher_before.clone(),
                            wire,
                        },
                        None => Resume {
                            next: idx,
                            hasher: hasher_before,
                            wire,
                        },
                    };
                    return Err(e.into());
                }
            }
            bytes_in_flight += len;
            hasher_before = hasher_after;
            idx += 1;
        }
        while !in_flight.is_empty() {
            confirmed += settle(&mut in_flight, resume).await?;
            on_progress(confirmed);
        }
        let wire = std::mem::take(resume).wire;
        Ok((digest, wire))
    }

    /// Reads chunk `idx` into its frame, on a blocking thread, and continues
    /// `hasher` with it. With a transform that works in place the body is read
    /// straight into the frame; otherwise it is read, transformed, then framed.
    /// The last chunk's header carries the file's digest, known only once its
    /// body is hashed: that one is framed after.
    fn prepare(
        &self,
        file: &Arc<std::fs::File>,
        idx: u64,
        count: u64,
        mut hasher: Sha256,
    ) -> Prepared {
        let file = file.clone();
        let offset = idx * self.row.chunk_size;
        let len = chunk_len(self.row, idx);
        let last = idx + 1 == count;
        let mut header = self.header(offset, last.then(String::new));
        let transform = self.transform.clone();
        tokio::task::spawn_blocking(move || {
            if !last && transform.in_place() {
                let (len, at) = (len as usize, transform.plain_at());
                let framed = transform.framed_len(len);
                let frame = Message::encode_chunk_in_place(&header, framed, |body| {
                    let plain = &mut body[at..at + len];
                    file.read_exact_at(plain, offset)?;
                    hasher.update(&*plain);
                    transform.encode_in_place(&header, body)
                })?;
                return Ok((frame, hasher, framed as u64));
            }
            let mut body = vec![0u8; len as usize];
            file.read_exact_at(&mut body, offset)?;
            hasher.update(&body);
            if let Some(t) = header.last.as_mut() {
                t.sha256 = hex::encode(hasher.clone().finalize());
            }
            let body = transform.encode(&mut header, Bytes::from(body))?;
            let wire = body.len() as u64;
            Ok((Message::Chunk(header, body).encode(), hasher, wire))
        })
    }

    /// The header of the chunk at `offset`; the last one carries the file's
    /// digest in its trailer.
    fn header(&self, offset: u64, digest: Option<String>) -> ChunkHeader {
        let row = self.row;
        ChunkHeader {
            transfer_id: row.transfer_id.clone(),
            file_id: row.file_id.clone(),
            from: self.node.clone(),
            to: row.peer.clone(),
            file_name: row.file_name.clone(),
            size: row.size,
            chunk_size: row.chunk_size,
            offset,
            last: digest.map(|sha256| Trailer {
                sha256,
                started_at: row.started_at.clone(),
                meta: row.meta.clone(),
            }),
            sealed: self.transform.sealed(),
            request_id: row.request_id.clone(),
            parent_id: row.parent_id.clone(),
            attempt: row.attempt,
            compressed: None,
        }
    }
}

fn chunk_len(row: &SendRow, idx: u64) -> u64 {
    let offset = idx * row.chunk_size;
    row.chunk_size.min(row.size - offset.min(row.size))
}

/// A chunk's frame, the digest state after it, and its body's framed length.
type Prepared = tokio::task::JoinHandle<std::io::Result<(Bytes, Sha256, u64)>>;

/// Awaits the oldest confirm; on failure, points `resume` at it.
async fn settle(
    in_flight: &mut VecDeque<InFlight>,
    resume: &mut Resume,
) -> Result<u64, PublishError> {
    let Some(front) = in_flight.pop_front() else {
        return Ok(0);
    };
    match confirmed(front.confirm.await) {
        Ok(()) => Ok(front.len),
        Err(e) => {
            *resume = Resume {
                next: front.idx,
                hasher: front.hasher_before,
                wire: resume.wire,
            };
            Err(e.into())
        }
    }
}

/// Settles the confirms at the front that have already resolved, without
/// waiting; returns their bytes.
fn settle_ready(
    in_flight: &mut VecDeque<InFlight>,
    resume: &mut Resume,
) -> Result<u64, PublishError> {
    use futures::FutureExt;
    let mut done = 0;
    while let Some(front) = in_flight.front_mut() {
        match (&mut front.confirm).now_or_never().map(confirmed) {
            None => break,
            Some(Ok(())) => done += front.len,
            Some(Err(e)) => {
                if let Some(front) = in_flight.pop_front() {
                    *resume = Resume {
                        next: front.idx,
                        hasher: front.hasher_before,
                        wire: resume.wire,
                    };
                }
                return Err(e.into());
            }
        }
        in_flight.pop_front();
    }
    Ok(done)
}

async fn read_at(
    file: &Arc<std::fs::File>,
    path: &str,
    offset: u64,
    len: u64,
) -> Result<Bytes, PublishError> {
    let f = file.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset).map(|()| Bytes::from(buf))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()));
    match read {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) | Err(e) => Err(PublishError::Spool(path.to_string(), e)),
    }
}
