//! Commit, stage two of receiving a chunk: make what ingest wrote durable
//! (one fsync per partial file a batch touched), record it (one ledger
//! transaction for the batch), then ack it. A chunk that completes its
//! transfer hands it to the completion stage; from then on the ledger, not
//! the broker, carries the transfer, so no delivery of it stays unacked
//! while its hook runs. With `COMPLETING_MAX` completions under way, a
//! transfer completed by a batch waits in the ledger (`waiting.rs`), and
//! the stage goes on with the next batch.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::error;

use super::error::ReceiveError;
use super::ingest::sync_partial;
use super::{Receiver, SIDE_BY_SIDE};
use crate::broker::Delivery;
use crate::domain::TransferId;
use crate::hooks::Slot;
use crate::wire::ChunkHeader;

/// A chunk written, waiting for its batch's fsync and ledger commit.
pub struct Written {
    pub h: ChunkHeader,
    pub idx: u64,
    pub partial: PathBuf,
    pub d: Delivery,
    /// The body's length as it travelled (compressed, sealed).
    pub wire: u64,
}

/// The commit stage's inbox (see [`Receiver::start_commits`]). Dropping it
/// ends the stage once what was handed over is committed.
pub struct Commits(mpsc::UnboundedSender<Vec<Written>>);

impl Commits {
    /// Hands written chunks over; when the stage has stopped, they are given
    /// back to the broker unacked, to be delivered again.
    pub async fn hand_over(&self, written: Vec<Written>) {
        if written.is_empty() {
            return;
        }
        if let Err(mpsc::error::SendError(written)) = self.0.send(written) {
            for w in written {
                let _ = w.d.requeue().await;
            }
        }
    }
}

impl Receiver {
    /// Starts the commit stage: a task, tracked with the completion tasks,
    /// that commits whatever was handed over while the last commit ran, in
    /// one batch.
    pub(super) fn commits(self: &Arc<Self>) -> Commits {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Written>>();
        let this = self.clone();
        self.tasks.spawn(async move {
            while let Some(mut batch) = rx.recv().await {
                while let Ok(more) = rx.try_recv() {
                    batch.extend(more);
                }
                this.commit(batch).await;
            }
        });
        Commits(tx)
    }

    async fn commit(self: &Arc<Self>, written: Vec<Written>) {
        // A transfer failed (or finished) since its chunk was staged: the
        // chunk is moot, and its partial file may be gone.
        let (moot, written): (Vec<Written>, Vec<Written>) = written
            .into_iter()
            .partition(|w| self.is_busy(&w.h.transfer_id));
        futures::future::join_all(moot.iter().map(|w| w.d.ack())).await;
        let (ok, bad) = sync_all(written).await;
        for (w, e) in bad {
            self.reject(&w.h, e, w.d).await;
        }
        if ok.is_empty() {
            return;
        }
        let keys: Vec<(TransferId, u64, u64)> = ok
            .iter()
            .map(|w| (w.h.transfer_id.clone(), w.idx, w.wire))
            .collect();
        let complete = match self.ledger.add_chunks(keys).await {
            Ok(complete) => complete,
            Err(e) => {
                error!(message = "State database failed while recording chunks; requeueing them.",
                    error = %e, error_code = %e.code(), transfer_ids = ?ok.iter().map(|w| w.h.transfer_id.as_str()).collect::<Vec<_>>());
                tokio::time::sleep(Duration::from_secs(1)).await;
                futures::future::join_all(ok.iter().map(|w| w.d.requeue())).await;
                return;
            }
        };
        futures::future::join_all(ok.iter().map(|w| w.d.ack())).await;
        // Complete: read from the recorded row (its chunk count and digest,
        // whichever batch brought them), never from this batch alone.
        let done: Vec<TransferId> = ok
            .into_iter()
            .zip(complete)
            .filter(|(w, complete)| *complete && self.claim(&w.h.transfer_id))
            .map(|(w, _)| w.h.transfer_id)
            .collect();
        // A slot each among COMPLETING_MAX. With none free, the transfer
        // waits in the ledger, unclaimed, its running digest dropped (the
        // file is read back when its turn comes): memory does not grow
        // with the number waiting.
        let mut group = Vec::new();
        let mut wait = false;
        for tid in done {
            match self.completing.clone().try_acquire_owned() {
                Ok(p) => group.push((tid, Slot::new(self.completing.clone(), p))),
                Err(_) => {
                    self.digests.forget(&tid);
                    self.release(&tid);
                    wait = true;
                }
            }
        }
        self.start_completions(group);
        if wait {
            self.waiting.add();
        }
    }

    /// Completes transfers, each in its slot: together when there are
    /// several (their files placed in one pass).
    pub(super) fn start_completions(self: &Arc<Self>, mut group: Vec<(TransferId, Slot)>) {
        if group.len() > 1 {
            self.tasks.spawn(self.clone().complete_together(group));
        } else if let Some((tid, slot)) = group.pop() {
            self.tasks.spawn(slot.hold(self.clone().complete(tid)));
        }
    }
}

/// Durable before recorded: one fsync per partial file the batch touched,
/// in parallel (the filesystem commits its journal once for fsyncs that
/// arrive together). Returns the chunks whose file synced, and the others
/// with why not.
async fn sync_all(written: Vec<Written>) -> (Vec<Written>, Vec<(Written, ReceiveError)>) {
    let mut partials: Vec<PathBuf> = written.iter().map(|w| w.partial.clone()).collect();
    partials.sort();
    partials.dedup();
    let syncs = partials.into_iter().map(|p| async move {
        let path = p.clone();
        let r = tokio::task::spawn_blocking(move || sync_partial(&path))
            .await
            .unwrap_or_else(|e| Err(ReceiveError::Io(e.to_string())));
        (p, r)
    });
    let mut failed: HashMap<PathBuf, ReceiveError> = futures::stream::iter(syncs)
        .buffer_unordered(SIDE_BY_SIDE)
        .filter_map(|(p, r)| async move { r.err().map(|e| (p, e)) })
        .collect()
        .await;
    let (ok, bad): (Vec<Written>, Vec<Written>) = written
        .into_iter()
        .partition(|w| !failed.contains_key(&w.partial));
    let bad = bad
        .into_iter()
        .map(|w| {
            let e = failed
                .remove(&w.partial)
                .unwrap_or_else(|| ReceiveError::Io("syncing the partial file failed".into()));
            (w, e)
        })
        .collect();
    (ok, bad)
}
