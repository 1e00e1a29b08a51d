//! Recovery and expiry: at start-up, resume what the last run left (from the
//! ledger alone) and sweep the partial files nobody needs; while running,
//! expire transfers whose sender stopped sending.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::Receiver;
use super::error::ReceiveError;
use super::partial;
use crate::domain::TransferId;
use crate::store::{Status, StoreError};

impl Receiver {
    /// Resumes what the last run left: transfers complete but not placed,
    /// placements, receipts not yet sent, and hooks that were running when
    /// the agent died (recorded as interrupted, never re-run silently).
    pub(super) async fn resume(self: &Arc<Self>) -> Result<(), StoreError> {
        self.sweep_partials().await?;
        for row in self.ledger.unfinished().await? {
            let tid = &row.transfer_id;
            match row.status {
                Status::HookRunning => {
                    warn!(message = "A success hook was running when the agent stopped; not re-running it.", transfer_id = %tid);
                    let e = ReceiveError::HookInterrupted;
                    self.fail_with((tid, &row.peer), Status::HookInterrupted, &e)
                        .await?;
                }
                // Not complete yet: its sender's chunks are still to come.
                Status::Receiving if !row.complete() => continue,
                // Complete, not placed: in turn, a slot each (`waiting.rs`).
                Status::Receiving => {
                    self.waiting.add();
                    continue;
                }
                _ => {}
            }
            self.spawn_completion(row.transfer.transfer_id);
        }
        Ok(())
    }

    /// Removes partial files left by transfers that are past placing: a
    /// second link to a placed file (placing makes only the new name
    /// durable), or the partial of a transfer that failed. Partial files of
    /// transfers still receiving or placing, or unknown here, stay. The
    /// partial directory is listed and its entries removed through its
    /// descriptor (`partial.rs`): a link planted at its name is not
    /// followed, and a directory not the agent's own is left alone.
    async fn sweep_partials(&self) -> Result<(), StoreError> {
        for p in &self.cfg.receive {
            let Ok(dirs) = partial::open_dirs(&p.inbox, false) else {
                continue;
            };
            let names: Vec<String> = match dirs.partial.try_clone().map(nix::dir::Dir::from_fd) {
                Ok(Ok(mut dir)) => dir
                    .iter()
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().ok().map(String::from))
                    .collect(),
                _ => continue,
            };
            for name in names {
                // `.conv`: a converted file (`staged.rs`).
                let Some(tid) = name
                    .strip_suffix(".part")
                    .or_else(|| name.strip_suffix(".conv"))
                    .and_then(|t| TransferId::parse(t).ok())
                else {
                    continue;
                };
                let done = self
                    .ledger
                    .get(&tid)
                    .await?
                    .is_some_and(|r| !matches!(r.status, Status::Receiving | Status::Placing));
                if done {
                    info!(message = "Removing a leftover partial file.", transfer_id = %tid);
                    let _ = partial::remove_at(&dirs, &name);
                }
            }
        }
        Ok(())
    }

    /// Expires transfers that stopped receiving chunks (a sender that died
    /// for good, or a flood of transfers begun and never finished), until
    /// `stop`: the expiry is recorded, then the partial file removed, then
    /// the failure hook runs and a receipt goes back.
    pub(super) async fn expire(self: Arc<Self>, stop: CancellationToken) {
        let shortest = self
            .cfg
            .receive
            .iter()
            .map(|p| p.partial_ttl)
            .min()
            .unwrap_or(Duration::from_secs(3600));
        let period = (shortest / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            for p in &self.cfg.receive {
                let stale = match self.ledger.stale(&p.file_id, p.partial_ttl).await {
                    Ok(rows) => rows,
                    Err(e) => {
                        warn!(message = "Cannot look for stale transfers.", error = %e, error_code = %e.code());
                        continue;
                    }
                };
                // A complete transfer is not stale: it waits for a
                // completion slot (`waiting.rs`), its sender is done.
                for row in stale.into_iter().filter(|r| !r.complete()) {
                    let tid = &row.transfer_id;
                    if !self.claim(tid) {
                        continue;
                    }
                    let e = ReceiveError::Expired(p.partial_ttl);
                    warn!(message = "Expiring a transfer that stopped.", transfer_id = %tid, from = %row.peer, error_code = %e.code());
                    if let Err(se) = self
                        .fail_with((tid, &row.peer), Status::ReceiveFailed, &e)
                        .await
                    {
                        error!(message = "Cannot record an expiry; trying again later.", error = %se, error_code = %se.code());
                        self.release(tid);
                        continue;
                    }
                    crate::failpoint::hit("receiver.expire.recorded");
                    let _ = partial::remove(&p.inbox, tid);
                    self.digests.forget(tid);
                    self.tasks
                        .spawn(self.clone().complete(row.transfer.transfer_id));
                }
            }
        }
    }
}
