//! The receiving side: consume → assemble → verify → place → record → hooks →
//! receipt. Every step is driven by the transfer's status in the ledger, so a
//! restart resumes where the last run stopped and nothing happens twice.

mod assemble;
mod error;
mod place;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use assemble::{PARTIAL_DIR, check_file_name, partial_path, valid_transfer_id};
pub use error::ReceiveError;

use crate::broker::Delivery;
use crate::clock::now_rfc3339;
use crate::coalesce::Coalescer;
use crate::config::{Config, ReceiveProfile, is_valid_id};
use crate::hooks::{self, Event, HookContext};
use crate::store::{Direction, Row, Status, Store};
use crate::wire::{ChunkHeader, Message, Receipt};

const RX: Direction = Direction::Receive;

pub struct Receiver {
    cfg: Arc<Config>,
    store: Store,
    /// Publishes to the broker, coalescing what waits for the same node.
    out: Arc<Coalescer>,
    /// Transfers whose completion runs now; their chunks are duplicates.
    busy: Mutex<HashSet<String>>,
    /// Completion tasks, awaited on a graceful stop.
    tasks: TaskTracker,
    /// One lock per inbox name: two transfers of the same name (two
    /// senders, or one name sent twice) are placed one after the other, so
    /// `append` and `generations` never interleave.
    names: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// The running SHA-256 of each transfer whose chunks have so far arrived
    /// in order (bytes hashed, state), so that verifying need not read the
    /// file back; `None` once a chunk came out of order or twice (verify
    /// then reads the file).
    digests: Mutex<HashMap<String, Option<(u64, Sha256)>>>,
}

impl Receiver {
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        out: Arc<Coalescer>,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Receiver {
            cfg,
            store,
            out,
            busy: Mutex::new(HashSet::new()),
            tasks,
            names: Mutex::new(HashMap::new()),
            digests: Mutex::new(HashMap::new()),
        })
    }

    /// Resumes what the last run left: placements, receipts not yet sent, and
    /// hooks that were running when the agent died (never re-run silently).
    pub async fn recover(self: &Arc<Self>) -> Result<(), crate::store::StoreError> {
        self.sweep_partials()?;
        for row in self.store.unfinished()? {
            if row.direction != RX {
                continue;
            }
            match row.status {
                Status::HookRunning => {
                    let e = ReceiveError::HookInterrupted;
                    warn!(message = "A success hook was running when the agent stopped; not re-running it.", transfer_id = %row.transfer_id);
                    self.fail_with(&row.transfer_id, &row.peer, Status::HookInterrupted, &e)?;
                }
                Status::Receiving => {
                    let complete = row.sha256.is_some()
                        && Some(self.store.chunk_count(&row.transfer_id)?)
                            == crate::wire::chunk_count(row.size, row.chunk_size);
                    if !complete {
                        continue;
                    }
                }
                _ => {}
            }
            if self.claim(&row.transfer_id) {
                self.tasks
                    .spawn(self.clone().complete(row.transfer_id.clone()));
            }
        }
        Ok(())
    }

    /// Removes partial files left by transfers that are past placing: a
    /// second link to a placed file (placing makes only the new name
    /// durable), or the partial of a transfer that failed. Partial files of
    /// transfers still receiving or placing, or unknown here, stay.
    fn sweep_partials(&self) -> Result<(), crate::store::StoreError> {
        for p in &self.cfg.receive {
            let Ok(entries) = std::fs::read_dir(p.inbox.join(PARTIAL_DIR)) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(tid) = name.strip_suffix(".part").filter(|t| valid_transfer_id(t)) else {
                    continue;
                };
                let done = self
                    .store
                    .received(tid)?
                    .is_some_and(|r| !matches!(r.status, Status::Receiving | Status::Placing));
                if done {
                    info!(message = "Removing a leftover partial file.", transfer_id = %tid);
                    let _ = crate::durable::remove_if_exists(&entry.path());
                }
            }
        }
        Ok(())
    }

    /// Expires transfers that stopped receiving chunks (a sender that died
    /// for good, or a flood of transfers begun and never finished): their
    /// partial files are removed, the failure hook runs, a receipt goes back.
    pub async fn expire_stale(self: Arc<Self>) {
        let shortest = self
            .cfg
            .receive
            .iter()
            .map(|p| p.partial_ttl)
            .min()
            .unwrap_or(Duration::from_secs(3600));
        let period = (shortest / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::time::sleep(period).await;
            for p in &self.cfg.receive {
                let stale = match self.store.stale_receiving(&p.file_id, p.partial_ttl) {
                    Ok(rows) => rows,
                    Err(e) => {
                        warn!(message = "Cannot look for stale transfers.", error = %e);
                        continue;
                    }
                };
                for row in stale {
                    if !self.claim(&row.transfer_id) {
                        continue;
                    }
                    let e = ReceiveError::Expired(p.partial_ttl);
                    warn!(message = "Expiring a transfer that stopped.", transfer_id = %row.transfer_id, from = %row.peer, error_code = e.code());
                    let _ =
                        crate::durable::remove_if_exists(&partial_path(&p.inbox, &row.transfer_id));
                    self.forget_digest(&row.transfer_id);
                    let recorded = self.store.forget_chunks(&row.transfer_id).and_then(|()| {
                        self.fail_with(&row.transfer_id, &row.peer, Status::ReceiveFailed, &e)
                    });
                    match recorded {
                        Ok(()) => {
                            self.tasks.spawn(self.clone().complete(row.transfer_id));
                        }
                        Err(se) => error!(message = "Cannot record an expiry.", error = %se),
                    }
                }
            }
        }
    }

    fn claim(&self, transfer_id: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(transfer_id.to_string())
    }

    fn release(&self, transfer_id: &str) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(transfer_id);
    }

    /// Starts the commit stage (see [`Receiver::on_chunks`]): a task, tracked
    /// with the completion tasks, that makes staged chunks durable, records
    /// and acks them. It ends once the returned handle is dropped and what
    /// was handed to it is done.
    pub fn start_commits(self: &Arc<Self>) -> Commits {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Written>>();
        let this = self.clone();
        self.tasks.spawn(async move {
            while let Some(mut batch) = rx.recv().await {
                // Whatever was staged while the last commit ran joins this one.
                while let Ok(more) = rx.try_recv() {
                    batch.extend(more);
                }
                this.commit(batch).await;
            }
        });
        Commits(tx)
    }

    /// Stage one of receiving a batch of chunks: checks each and writes it
    /// into its partial file (the page cache), transfers side by side, the
    /// chunks of one transfer in order; then hands them to the commit stage
    /// and returns. Stage two ([`Receiver::commit`]) makes them durable and
    /// acks them while the next deliveries are already being written: the
    /// disk's flush and the network's next chunks overlap.
    pub async fn on_chunks(
        self: &Arc<Self>,
        batch: Vec<(ChunkHeader, Bytes, Delivery)>,
        commits: &Commits,
    ) {
        let mut by_transfer: HashMap<String, Vec<(ChunkHeader, Bytes, Delivery)>> = HashMap::new();
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
        if written.is_empty() {
            return;
        }
        if let Err(mpsc::error::SendError(written)) = commits.0.send(written) {
            // Stopping: not acked, so the broker delivers them again.
            for w in written {
                let _ = w.d.requeue().await;
            }
        }
    }

    /// Stage two: one fsync per partial file the batch touched and one ledger
    /// transaction for the whole batch (group commit), then the acks. A chunk
    /// that completes a transfer hands it to a completion task; from then on
    /// the ledger, not the broker, carries the transfer, so no delivery stays
    /// unacked while hooks run.
    async fn commit(self: &Arc<Self>, written: Vec<Written>) {
        // A transfer failed (or finished) since its chunk was staged: the
        // chunk is moot, and its partial file may be gone.
        let (moot, written): (Vec<Written>, Vec<Written>) = {
            let busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
            written
                .into_iter()
                .partition(|w| busy.contains(&w.h.transfer_id))
        };
        futures::future::join_all(moot.iter().map(|w| w.d.ack())).await;
        // Durable before recorded: one fsync per partial file the batch touched.
        let mut partials: Vec<PathBuf> = written.iter().map(|w| w.partial.clone()).collect();
        partials.sort();
        partials.dedup();
        // In parallel: the filesystem commits its journal once for fsyncs
        // that arrive together.
        let syncs = partials.into_iter().map(|p| async move {
            let path = p.clone();
            let r = tokio::task::spawn_blocking(move || assemble::sync_partial(&path))
                .await
                .unwrap_or_else(|e| Err(ReceiveError::Io(e.to_string())));
            (p, r)
        });
        let synced: Vec<_> = futures::stream::iter(syncs)
            .buffer_unordered(SIDE_BY_SIDE)
            .collect()
            .await;
        let mut failed: HashMap<PathBuf, ReceiveError> = HashMap::new();
        for (path, result) in synced {
            if let Err(e) = result {
                failed.insert(path, e);
            }
        }
        let (ok, bad): (Vec<Written>, Vec<Written>) = written
            .into_iter()
            .partition(|w| !failed.contains_key(&w.partial));
        for w in bad {
            let e = failed
                .remove(&w.partial)
                .unwrap_or_else(|| ReceiveError::Io("sync failed".into()));
            self.reject(&w.h, e, w.d).await;
        }
        if ok.is_empty() {
            return;
        }
        let keys: Vec<(&str, u64)> = ok
            .iter()
            .map(|w| (w.h.transfer_id.as_str(), w.idx))
            .collect();
        let have = match self.store.add_chunks(&keys) {
            Ok(have) => have,
            Err(e) => {
                error!(message = "State database failed while recording chunks; requeueing them.", error = %e);
                tokio::time::sleep(Duration::from_secs(1)).await;
                futures::future::join_all(ok.iter().map(|w| w.d.requeue())).await;
                return;
            }
        };
        futures::future::join_all(ok.iter().map(|w| w.d.ack())).await;
        let mut complete = Vec::new();
        for (w, have) in ok.into_iter().zip(have) {
            // Complete: every chunk recorded, and the trailer's digest (the
            // recorded row's, whichever batch brought it).
            let (have, digest_known) = have;
            if digest_known && Some(have) == w.h.chunk_count() && self.claim(&w.h.transfer_id) {
                complete.push(w.h.transfer_id);
            }
        }
        match complete.len() {
            0 => {}
            1 => {
                let tid = complete.swap_remove(0);
                self.tasks.spawn(self.clone().complete(tid));
            }
            _ => {
                self.tasks.spawn(self.clone().complete_together(complete));
            }
        }
    }

    /// Checks one chunk and writes it to its partial file. Returns it when it
    /// still has to be synced, recorded and acked; settles it here otherwise.
    async fn stage(self: &Arc<Self>, h: ChunkHeader, body: Bytes, d: Delivery) -> Option<Written> {
        if !valid_transfer_id(&h.transfer_id) || !is_valid_id(&h.from) || h.to != self.cfg.node {
            warn!(message = "Dead-lettering a chunk with an unusable transfer id, sender or recipient.",
                transfer_id = ?h.transfer_id, from = ?h.from, to = ?h.to, error_code = "malformed_message");
            let _ = d.dead_letter().await;
            return None;
        }
        if self.cfg.verify_sender() && d.user_id.as_deref() != Some(h.from.as_str()) {
            // Not answered: the claimed sender cannot be trusted to be the one
            // a receipt would reach, and its transfer must not be touched.
            let e = ReceiveError::SenderMismatch {
                user: d.user_id.clone().unwrap_or_default(),
                node: h.from.clone(),
            };
            warn!(message = "Dead-lettering a chunk whose sender is not its broker user.",
                transfer_id = %h.transfer_id, error_code = e.code(), error = %e);
            let _ = d.dead_letter().await;
            return None;
        }
        if self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&h.transfer_id)
        {
            let _ = d.ack().await;
            return None;
        }
        match self.write(&h, body).await {
            Ok(Staged::Written { idx, partial }) => Some(Written { h, idx, partial, d }),
            Ok(Staged::Settled) => {
                let _ = d.ack().await;
                if self.claim(&h.transfer_id) {
                    self.tasks.spawn(self.clone().complete(h.transfer_id));
                }
                None
            }
            Ok(Staged::Ignore) => {
                let _ = d.ack().await;
                None
            }
            Err(Failure::Store(e)) => {
                error!(message = "State database failed while receiving a chunk; requeueing it.", error = %e, transfer_id = %h.transfer_id);
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

    /// Fails a transfer for a bad chunk: records why, removes the partial
    /// file, acks, and lets the completion task run the failure hook and
    /// send the failure receipt.
    async fn reject(self: &Arc<Self>, h: &ChunkHeader, e: ReceiveError, d: Delivery) {
        let tid = &h.transfer_id;
        // Another chunk of the same batch may have failed the transfer first:
        // its reason stands.
        if matches!(self.store.received(tid), Ok(Some(r)) if r.status.is_final()) {
            let _ = d.ack().await;
            return;
        }
        warn!(message = "Rejecting transfer.", transfer_id = %tid, error_code = e.code(), error = %e);
        if let Err(se) = self.fail_with(tid, &h.from, Status::ReceiveFailed, &e) {
            error!(message = "State database failed while recording a rejection; requeueing.", error = %se, transfer_id = %tid);
            let _ = d.requeue().await;
            return;
        }
        if let Some(p) = self.cfg.receive_profile(&h.file_id) {
            let _ = crate::durable::remove_if_exists(&partial_path(&p.inbox, tid));
        }
        self.forget_digest(tid);
        let _ = self.store.forget_chunks(tid);
        let _ = d.ack().await;
        if self.claim(tid) {
            self.tasks.spawn(self.clone().complete(tid.clone()));
        }
    }

    async fn write(&self, h: &ChunkHeader, body: Bytes) -> Result<Staged, Failure> {
        let tid = &h.transfer_id;
        // Durable by the ack: on_chunks records the batch with a waiting call.
        let store = self.store.deferred();
        let mut inserted = false;
        let row = match store.received(tid)? {
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
                store.insert(&row)?;
                inserted = true;
                assemble::admit(h, profile)?;
                info!(message = "Receiving.", transfer_id = %tid, from = %h.from, file_id = %h.file_id, file_name = %h.file_name, size = h.size);
                row
            }
        };
        let profile = self
            .cfg
            .receive_profile(&row.file_id)
            .ok_or_else(|| ReceiveError::UnknownFileId(row.file_id.clone()))?;
        let idx = assemble::check_chunk(h, &row, body.len() as u64)?;
        if let Some(t) = &h.last {
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ReceiveError::Inconsistent("the digest (not 64 hex digits)").into());
            }
        }
        let partial = partial_path(&profile.inbox, tid);
        let (path, offset) = (partial.clone(), h.offset);
        let running = self.running_digest(tid, offset);
        // The write and the digest off the async workers, together.
        let running = tokio::task::spawn_blocking(move || {
            assemble::write_chunk(&path, offset, &body)?;
            Ok::<_, ReceiveError>(running.map(|(next, mut hasher)| {
                hasher.update(&body);
                (next + body.len() as u64, hasher)
            }))
        })
        .await
        .map_err(|e| ReceiveError::Io(e.to_string()))??;
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tid.to_string(), running);
        // A transfer's first chunk that is also its last (a small file)
        // brought the trailer into the new row.
        if let (Some(t), false) = (&h.last, inserted) {
            store.set_trailer(tid, &h.from, &t.sha256, &t.started_at, &t.meta)?;
        }
        Ok(Staged::Written { idx, partial })
    }

    /// Takes the transfer's running digest, when `offset` continues it (the
    /// first chunk starts one); `None` stops it for good (out of order, or a
    /// chunk seen twice), and verify then reads the file back.
    fn running_digest(&self, tid: &str, offset: u64) -> Option<(u64, Sha256)> {
        let taken = self
            .digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tid);
        match taken {
            None if offset == 0 => Some((0, Sha256::new())),
            None => None,
            Some(state) => state.filter(|(next, _)| *next == offset),
        }
    }

    /// The digest of a transfer's whole file when every byte of it was hashed
    /// in order as it arrived; forgets the transfer's running digest.
    fn take_digest(&self, tid: &str, size: u64) -> Option<String> {
        let state = self
            .digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tid)??;
        (state.0 == size).then(|| hex::encode(state.1.finalize()))
    }

    fn forget_digest(&self, tid: &str) {
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tid);
    }

    /// Drives one transfer from its current status to a sent receipt.
    async fn complete(self: Arc<Self>, tid: String) {
        self.complete_from(tid, false).await;
    }

    /// Completes transfers whose last chunks were committed together: those
    /// that can be are placed together ([`Receiver::place_together`]), then
    /// each goes on by itself (hooks, receipt) side by side.
    async fn complete_together(self: Arc<Self>, tids: Vec<String>) {
        let placed = match self.place_together(&tids).await {
            Ok(placed) => placed,
            Err(e) => {
                // Nothing was placed: each transfer tries again by itself.
                error!(message = "State database failed while placing files together; placing them one by one.", error = %e);
                HashSet::new()
            }
        };
        let each = tids.into_iter().map(|tid| {
            let placed_here = placed.contains(&tid);
            self.clone().complete_from(tid, placed_here)
        });
        futures::future::join_all(each).await;
    }

    async fn complete_from(self: Arc<Self>, tid: String, placed_here: bool) {
        match self.advance(&tid, placed_here).await {
            Ok(()) => self.release(&tid),
            // Left busy: nothing re-runs this transfer before a restart, whose
            // recovery resumes it from the ledger.
            Err(e) => {
                error!(message = "State database failed while completing a transfer; it resumes at the next start.", error = %e, transfer_id = %tid)
            }
        }
    }

    /// Drives one transfer on from its recorded status. `placed_here`: the
    /// caller placed it just now (success hooks run only right after their
    /// transfer was placed; one found already in `hook_running` was cut off
    /// mid-hook).
    async fn advance(
        &self,
        tid: &str,
        mut placed_here: bool,
    ) -> Result<(), crate::store::StoreError> {
        // Reads need not wait for a flush: every status this loop acts on
        // was written by a call that waited (here, or before the transfer
        // was handed to this task).
        let reads = self.store.deferred();
        loop {
            let Some(row) = reads.received(tid)? else {
                return Ok(());
            };
            let profile = self.cfg.receive_profile(&row.file_id);
            match (row.status, profile) {
                // Every chunk is in (a completion runs only then): verify
                // and place; `placing` is recorded with the inode, just
                // before the name appears.
                (Status::Receiving | Status::Placing, Some(p)) => match self.place(&row, p).await {
                    Ok(path) => {
                        info!(message = "Placed.", transfer_id = %tid, path = %path.display());
                        let next = after_placing(p);
                        self.store.placed(tid, &row.peer, next)?;
                        placed_here = true;
                    }
                    Err(e) => self.placing_failed(&row, p, &e)?,
                },
                (Status::Receiving | Status::Placing, None) => {
                    let e = ReceiveError::UnknownFileId(row.file_id.clone());
                    self.fail_with(tid, &row.peer, Status::ReceiveFailed, &e)?;
                }
                (Status::HookRunning, Some(p)) if placed_here => {
                    self.run_success_hooks(&row, p).await?;
                }
                (Status::HookRunning, _) => {
                    let e = ReceiveError::HookInterrupted;
                    self.fail_with(tid, &row.peer, Status::HookInterrupted, &e)?;
                }
                (status, p) if status.is_final() => {
                    // A rejection recorded just before a crash may have left
                    // the partial file: remove it (idempotent), under the
                    // transfer's own profile.
                    if let (Status::ReceiveFailed, Some(p)) = (status, p) {
                        let _ = crate::durable::remove_if_exists(&partial_path(&p.inbox, tid));
                    }
                    if matches!(status, Status::ReceiveFailed | Status::HookFailed) {
                        self.run_failure_hooks(&row).await?;
                    }
                    if !row.receipt_sent {
                        self.send_receipt(&row).await?;
                    }
                    return Ok(());
                }
                (status, _) => {
                    warn!(message = "Transfer in an unexpected state; leaving it.", transfer_id = %tid, status = status.as_str());
                    return Ok(());
                }
            }
        }
    }

    /// Moves a received transfer to a failed `status` for `e`.
    fn fail_with(
        &self,
        tid: &str,
        peer: &str,
        status: Status,
        e: &ReceiveError,
    ) -> Result<(), crate::store::StoreError> {
        self.store
            .fail(RX, tid, peer, status, e.code(), &e.to_string())
    }

    /// Records that a file could not be placed: its partial file goes, the
    /// transfer fails (its failure hook and receipt follow).
    fn placing_failed(
        &self,
        row: &Row,
        p: &ReceiveProfile,
        e: &ReceiveError,
    ) -> Result<(), crate::store::StoreError> {
        let tid = &row.transfer_id;
        warn!(message = "Failed to place file.", transfer_id = %tid, error_code = e.code(), error = %e);
        let _ = crate::durable::remove_if_exists(&partial_path(&p.inbox, tid));
        self.store.forget_chunks(tid)?;
        self.store.clear_placement(tid, &row.peer)?;
        self.fail_with(tid, &row.peer, Status::ReceiveFailed, e)
    }

    /// Places transfers that completed together as one group: one ledger
    /// transaction records every `placing`, the renames (or links) follow,
    /// then one flush per inbox directory, then one transaction records
    /// every `placed`. Per transfer the order is the one [`Receiver::place`]
    /// keeps, so recovery reads the ledger the same way; the group only
    /// shares the flushes. Only transfers just completed (`receiving`) in
    /// modes `new` and `replace`, each name once, join; the rest, and any
    /// that fails here, are left to go on alone. Returns those placed.
    async fn place_together(
        &self,
        tids: &[String],
    ) -> Result<HashSet<String>, crate::store::StoreError> {
        struct Item {
            row: Row,
            partial: PathBuf,
            target: PathBuf,
            mode: crate::config::Mode,
            next: Status,
            hashed: Option<String>,
        }
        let reads = self.store.deferred();
        let mut items = Vec::new();
        let mut names = HashSet::new();
        for tid in tids {
            let Some(row) = reads.received(tid)? else {
                continue;
            };
            let Some(p) = self.cfg.receive_profile(&row.file_id) else {
                continue;
            };
            let target = p.inbox.join(&row.file_name);
            if row.status != Status::Receiving
                || !place::simple(p.mode)
                || !names.insert(target.clone())
            {
                continue;
            }
            let next = after_placing(p);
            let hashed = self.take_digest(tid, row.size);
            items.push(Item {
                partial: partial_path(&p.inbox, tid),
                target,
                mode: p.mode,
                next,
                hashed,
                row,
            });
        }
        if items.is_empty() {
            return Ok(HashSet::new());
        }
        // One name at a time across the agent: take the locks in one order.
        items.sort_by(|a, b| a.target.cmp(&b.target));
        let locks: Vec<_> = items.iter().map(|i| self.name_lock(&i.target)).collect();
        let mut held = Vec::with_capacity(locks.len());
        for lock in &locks {
            held.push(lock.lock().await);
        }
        // Verify each and read the inode that will carry its name. (Should
        // a blocking task fail, each transfer goes on alone, from whatever
        // its ledger row says.)
        let Ok((items, inodes)) = tokio::task::spawn_blocking(move || {
            let inodes: Vec<Result<u64, ReceiveError>> = items
                .iter_mut()
                .map(|i| {
                    let sha = i.row.sha256.clone().unwrap_or_default();
                    place::verify(&i.partial, i.row.size, &sha, i.hashed.take())?;
                    place::partial_inode(&i.partial)
                })
                .collect();
            (items, inodes)
        })
        .await
        else {
            return Ok(HashSet::new());
        };
        // Those that did not verify are left out: each fails by itself
        // (reading the file back, as a lone transfer does).
        let ready: Vec<(Item, u64)> = items
            .into_iter()
            .zip(inodes)
            .filter_map(|(i, ino)| ino.ok().map(|ino| (i, ino)))
            .collect();
        if ready.is_empty() {
            return Ok(HashSet::new());
        }
        let targets: Vec<String> = ready
            .iter()
            .map(|(i, _)| i.target.display().to_string())
            .collect();
        let placing: Vec<(&str, &str, &str, u64)> = ready
            .iter()
            .zip(&targets)
            .map(|((i, ino), t)| {
                (
                    i.row.transfer_id.as_str(),
                    i.row.peer.as_str(),
                    t.as_str(),
                    *ino,
                )
            })
            .collect();
        self.store.placing_all(&placing)?;
        let Ok((ready, results)) = tokio::task::spawn_blocking(move || {
            let mut results: Vec<Result<(), ReceiveError>> = ready
                .iter()
                .map(|(i, ino)| place::put(&i.partial, &i.target, i.mode, *ino))
                .collect();
            // One flush per directory, for every name put there.
            let mut dirs: Vec<&Path> = ready
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .filter_map(|((i, _), _)| i.target.parent())
                .collect();
            dirs.sort();
            dirs.dedup();
            let failed_dirs: Vec<(PathBuf, String)> = dirs
                .into_iter()
                .filter_map(|d| {
                    crate::durable::fsync_dir(d)
                        .err()
                        .map(|e| (d.to_path_buf(), e.to_string()))
                })
                .collect();
            for ((i, _), r) in ready.iter().zip(results.iter_mut()) {
                if r.is_err() {
                    continue;
                }
                if let Some((_, e)) = failed_dirs
                    .iter()
                    .find(|(d, _)| Some(d.as_path()) == i.target.parent())
                {
                    *r = Err(ReceiveError::Io(format!(
                        "flushing the inbox directory: {e}"
                    )));
                } else {
                    *r = place::tidy(&i.partial, i.mode);
                }
            }
            (ready, results)
        })
        .await
        else {
            return Ok(HashSet::new());
        };
        let mut placed = Vec::new();
        for ((i, _), result) in ready.iter().zip(results) {
            match result {
                Ok(()) => placed.push(i),
                Err(e) => {
                    let p = self.cfg.receive_profile(&i.row.file_id);
                    if let Some(p) = p {
                        self.placing_failed(&i.row, p, &e)?;
                    }
                }
            }
        }
        let done: Vec<(&str, &str, Status)> = placed
            .iter()
            .map(|i| (i.row.transfer_id.as_str(), i.row.peer.as_str(), i.next))
            .collect();
        self.store.placed_all(&done)?;
        drop(held);
        drop(locks);
        self.prune_name_locks();
        for i in &placed {
            info!(message = "Placed.", transfer_id = %i.row.transfer_id, path = %i.target.display());
        }
        Ok(placed.iter().map(|i| i.row.transfer_id.clone()).collect())
    }

    async fn place(&self, row: &Row, p: &ReceiveProfile) -> Result<PathBuf, ReceiveError> {
        let partial = partial_path(&p.inbox, &row.transfer_id);
        if let (Some(ino), Some(path)) = (row.inode, &row.path) {
            let target = PathBuf::from(path);
            if place::already_placed(&target, ino) {
                // Placed before a restart; only the partial (ours, by its
                // transfer id) may remain.
                let _ = crate::durable::remove_if_exists(&partial);
                return Ok(target);
            }
        }
        let (store, tid, peer) = (
            self.store.clone(),
            row.transfer_id.clone(),
            row.peer.clone(),
        );
        let (inbox, name, mode, size) = (p.inbox.clone(), row.file_name.clone(), p.mode, row.size);
        let sha = row.sha256.clone().unwrap_or_default();
        let verify_partial = partial.clone();
        let hashed = self.take_digest(&row.transfer_id, size);
        tokio::task::spawn_blocking(move || place::verify(&verify_partial, size, &sha, hashed))
            .await
            .map_err(|e| ReceiveError::Io(e.to_string()))??;
        let name_lock = self.name_lock(&inbox.join(&name));
        let _placing = name_lock.lock().await;
        let placed = tokio::task::spawn_blocking(move || {
            place::place(&partial, &inbox, &name, mode, |target, ino| {
                store
                    .placing(&tid, &peer, &target.display().to_string(), ino)
                    .map_err(|e| ReceiveError::Io(e.to_string()))
            })
        })
        .await
        .map_err(|e| ReceiveError::Io(e.to_string()))?;
        drop(_placing);
        self.prune_name_locks();
        placed
    }

    fn name_lock(&self, target: &std::path::Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names.entry(target.to_path_buf()).or_default().clone()
    }

    /// Drops the locks nobody holds, so the map stays as small as the work.
    fn prune_name_locks(&self) {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        names.retain(|_, lock| Arc::strong_count(lock) > 1);
    }

    /// True for nodes this configuration names: only they get receipts, so
    /// a forged `from` cannot make this agent create queues for strangers.
    fn known_peer(&self, node: &str) -> bool {
        self.cfg
            .receive
            .iter()
            .any(|p| p.from.iter().any(|f| f == node))
            || self.cfg.send.iter().any(|p| p.to.iter().any(|t| t == node))
    }

    async fn run_success_hooks(
        &self,
        row: &Row,
        p: &ReceiveProfile,
    ) -> Result<(), crate::store::StoreError> {
        let ctx = HookContext::for_row(row, &self.cfg.node, Event::Received);
        let log = hooks::log_path(&self.cfg.log_dir(), &row.transfer_id, Event::Received);
        match hooks::run_all(&p.on_success, &ctx, &log).await {
            None => {
                self.store.advance(
                    RX,
                    &row.transfer_id,
                    &row.peer,
                    Status::HookRunning,
                    Status::Received,
                )?;
            }
            Some((argv0, outcome)) => {
                let ms = outcome.duration.as_millis() as u64;
                if outcome.ok() {
                    info!(message = "Success hook finished.", transfer_id = %row.transfer_id, ms);
                    self.store.finish_hooks(
                        RX,
                        &row.transfer_id,
                        &row.peer,
                        &outcome.record(),
                        Status::Received,
                        None,
                    )?;
                } else {
                    let e = ReceiveError::Hook(outcome.error_code(), outcome.describe(&argv0));
                    warn!(message = "Success hook failed.", transfer_id = %row.transfer_id, error_code = e.code(), error = %e);
                    self.store.finish_hooks(
                        RX,
                        &row.transfer_id,
                        &row.peer,
                        &outcome.record(),
                        Status::HookFailed,
                        Some((e.code(), &e.to_string())),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Runs the profile's failure hooks for a failed transfer, at most once:
    /// the run is claimed in the ledger before it starts.
    async fn run_failure_hooks(&self, row: &Row) -> Result<(), crate::store::StoreError> {
        let Some(p) = self.cfg.receive_profile(&row.file_id) else {
            return Ok(());
        };
        if p.on_failure.is_empty()
            || row.failure_hook
            || !self
                .store
                .claim_failure_hook(RX, &row.transfer_id, &row.peer)?
        {
            return Ok(());
        }
        let ctx = HookContext::for_row(row, &self.cfg.node, Event::ReceiveFailed);
        let log = hooks::log_path(&self.cfg.log_dir(), &row.transfer_id, Event::ReceiveFailed);
        if let Some((_, outcome)) = hooks::run_all(&p.on_failure, &ctx, &log).await {
            // A success hook's exit code, if any, stays; the failure hook's is logged.
            if row.hook_exit.is_none() {
                self.store
                    .set_hook(RX, &row.transfer_id, &row.peer, &outcome.record())?;
            }
            if !outcome.ok() {
                warn!(message = "Failure hook failed too.", transfer_id = %row.transfer_id, exit = ?outcome.exit);
            }
        }
        Ok(())
    }

    /// Publishes the receipt until the broker confirms it.
    async fn send_receipt(&self, row: &Row) -> Result<(), crate::store::StoreError> {
        if !self.known_peer(&row.peer) {
            info!(message = "No receipt for a sender this configuration does not name.", transfer_id = %row.transfer_id, from = %row.peer);
            return self.store.set_receipt_sent(&row.transfer_id, &row.peer);
        }
        let ok = row.status == Status::Received;
        let receipt = Receipt {
            transfer_id: row.transfer_id.clone(),
            file_id: row.file_id.clone(),
            from: self.cfg.node.clone(),
            to: row.peer.clone(),
            ok,
            error_code: row.error_code.clone(),
            error: row.error.clone(),
            path: row.inode.and(row.path.clone()),
            hook_exit: row.hook_exit,
            finished_at: row.finished_at.clone().unwrap_or_else(now_rfc3339),
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            // Receipts that wait together travel as one message.
            let sent = self
                .out
                .publish(&row.peer, Message::Receipt(receipt.clone()))
                .await;
            match sent {
                Ok(()) => break,
                Err(e) => {
                    warn!(message = "Receipt not confirmed; retrying.", transfer_id = %row.transfer_id, error = %e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Not waited for: if a crash loses it, recovery sends the receipt
        // again and the sender ignores the duplicate.
        self.store
            .deferred()
            .set_receipt_sent(&row.transfer_id, &row.peer)?;
        info!(message = "Receipt sent.", transfer_id = %row.transfer_id, to = %row.peer, ok, error_code = ?row.error_code);
        Ok(())
    }
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

/// Files one batch creates, writes or flushes at once: enough for the disk
/// to see many requests together, few enough that a batch of small files
/// does not start a blocking thread for each.
const SIDE_BY_SIDE: usize = 16;

/// The commit stage's inbox (see [`Receiver::start_commits`]).
pub struct Commits(mpsc::UnboundedSender<Vec<Written>>);

/// A chunk written, waiting for the batch's fsync and ledger commit.
struct Written {
    h: ChunkHeader,
    idx: u64,
    partial: PathBuf,
    d: Delivery,
}

enum Failure {
    Store(crate::store::StoreError),
    Transfer(ReceiveError),
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Failure::Store(e)
    }
}

impl From<ReceiveError> for Failure {
    fn from(e: ReceiveError) -> Self {
        Failure::Transfer(e)
    }
}

/// The ledger row of a transfer seen for the first time, with the trailer
/// when this chunk carries it. Its path stays empty until the file is
/// placed: until then no inbox name is its own.
fn new_row(h: &ChunkHeader) -> Row {
    let row = Row::begin(
        RX,
        &h.transfer_id,
        &h.from,
        &h.file_id,
        &h.file_name,
        (h.size, h.chunk_size),
        Status::Receiving,
    );
    match &h.last {
        Some(t) => Row {
            sha256: Some(t.sha256.clone()),
            started_at: t.started_at.clone(),
            meta: t.meta.clone(),
            ..row
        },
        None => row,
    }
}

/// The status a transfer of profile `p` takes once its file is placed: its
/// success hooks next, or `received` when it has none.
fn after_placing(p: &ReceiveProfile) -> Status {
    if p.on_success.is_empty() {
        Status::Received
    } else {
        Status::HookRunning
    }
}
