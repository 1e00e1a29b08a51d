//! Completion: the state machine that drives a transfer whose chunks are all
//! recorded (or that has failed) to its end, one step per recorded status:
//! `receiving`/`placing` → verify and place → `hook_running` → the success
//! hook → `received` | `hook_failed`; a failed transfer → its failure hook;
//! then the receipt. Each status is recorded before the step it announces,
//! so a restart resumes from the ledger and nothing happens twice.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use tracing::{debug, error, info, warn};

use super::error::ReceiveError;
use super::ingest::partial_path;
use super::{Receiver, alert_limit};
use crate::config::ReceiveProfile;
use crate::domain::{NodeName, TransferId};
use crate::error_code::ErrorCode;
use crate::hooks::{self, Event, HookContext, Slot};
use crate::store::{ReceiveRow, Status, StoreError};

impl Receiver {
    /// Drives one transfer from its recorded status to a sent receipt.
    pub(super) async fn complete(self: Arc<Self>, tid: TransferId) {
        self.complete_from(tid, false).await;
    }

    /// Completes transfers whose last chunks were committed together: those
    /// that can be are placed together ([`Receiver::place_together`]), then
    /// each goes on by itself (hooks, receipt) side by side.
    pub(super) async fn complete_together(self: Arc<Self>, work: Vec<(TransferId, Slot)>) {
        let tids: Vec<TransferId> = work.iter().map(|(tid, _)| tid.clone()).collect();
        let placed = match self.place_together(&tids).await {
            Ok(placed) => placed,
            Err(e) => {
                // Nothing was placed: each transfer tries again by itself.
                error!(message = "State database failed while placing files together; placing them one by one.",
                    error = %e, error_code = %e.code(), transfer_ids = ?tids);
                HashSet::new()
            }
        };
        let each = work.into_iter().map(|(tid, slot)| {
            let placed_here = placed.contains(&tid);
            slot.hold(self.clone().complete_from(tid, placed_here))
        });
        futures::future::join_all(each).await;
    }

    async fn complete_from(self: Arc<Self>, tid: TransferId, placed_here: bool) {
        match self.advance(&tid, placed_here).await {
            Ok(()) => self.release(&tid),
            // Left busy: nothing re-runs this transfer before a restart, whose
            // recovery resumes it from the ledger.
            Err(e) => {
                error!(message = "State database failed while completing a transfer; it resumes at the next start.",
                    error = %e, error_code = %e.code(), transfer_id = %tid)
            }
        }
    }

    /// Drives one transfer on from its recorded status. `placed_here`: the
    /// caller placed it just now (a success hook runs only right after its
    /// transfer was placed; one found already in `hook_running` was cut off
    /// mid-hook).
    async fn advance(&self, tid: &TransferId, mut placed_here: bool) -> Result<(), StoreError> {
        // The first read waits for a flush: the status may have been
        // written by another task's call still waiting for its own (a
        // rejection, say), and what this loop does next (remove a partial
        // file) must not come before it is durable. Later reads see what
        // this loop's own waiting calls wrote.
        let mut reads = self.ledger.clone();
        loop {
            let row = reads.get(tid).await?;
            reads = self.ledger.deferred();
            let Some(row) = row else {
                return Ok(());
            };
            let key = (tid, &row.peer);
            let profile = self.cfg.receive_profile(&row.file_id);
            match (row.status, profile) {
                // Every chunk is in (a completion runs only then): verify
                // and place; `placing` is recorded with the inode, just
                // before the name appears.
                (Status::Receiving | Status::Placing, Some(p)) => match self.place(&row, p).await {
                    Ok(path) => {
                        info!(message = "Placed.", transfer_id = %tid, path = %path.display());
                        let done = vec![(tid.clone(), row.peer.clone(), after_placing(p))];
                        self.ledger.placed(done).await?;
                        placed_here = true;
                    }
                    Err(e) => {
                        let partial = partial_path(&p.inbox, tid);
                        self.placing_failed(&row, &partial, &e).await?;
                    }
                },
                (Status::Receiving | Status::Placing, None) => {
                    let e = ReceiveError::UnknownFileId(row.file_id.to_string());
                    self.fail_with(key, Status::ReceiveFailed, &e).await?;
                }
                (Status::HookRunning, Some(p)) if placed_here => {
                    if !self.run_success_hook(&row, p).await? {
                        // Stopped between the hook's runs: the row stays
                        // `hook_running`, `hook_interrupted` at the next start.
                        return Ok(());
                    }
                }
                (Status::HookRunning, _) => {
                    // Not placed by this task: the hook runs in another
                    // process (`hakobu rerun`), which records its end.
                    // (A hook the last run left running was recorded as
                    // interrupted by recovery, before any task started.)
                    info!(message = "A hook runs elsewhere for this transfer; leaving it.", transfer_id = %tid);
                    return Ok(());
                }
                (status, p) if status.is_final() => {
                    // A rejection recorded just before a crash may have left
                    // the partial file: remove it (idempotent), under the
                    // transfer's own profile.
                    if let (Status::ReceiveFailed, Some(p)) = (status, p) {
                        let _ = super::partial::remove(&p.inbox, tid);
                    }
                    if matches!(status, Status::ReceiveFailed | Status::HookFailed) {
                        self.run_failure_hook(&row).await?;
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
    pub(super) async fn fail_with(
        &self,
        key: (&TransferId, &NodeName),
        status: Status,
        e: &ReceiveError,
    ) -> Result<(), StoreError> {
        self.ledger
            .fail(key, status, (e.code(), &e.to_string()))
            .await
    }

    /// A file could not be placed: the failure is recorded first (with the
    /// placement it had recorded forgotten), then its partial file goes. A
    /// crash in between leaves a failed transfer whose leftover partial the
    /// next start removes, never a transfer that looks complete without its
    /// file. The failure hook and the receipt follow.
    pub(super) async fn placing_failed(
        &self,
        row: &ReceiveRow,
        partial: &Path,
        e: &ReceiveError,
    ) -> Result<(), StoreError> {
        let tid = &row.transfer_id;
        warn!(message = "Failed to place file.", transfer_id = %tid, error_code = %e.code(), error = %e);
        self.ledger
            .placing_failed((tid, &row.peer), (e.code(), &e.to_string()))
            .await?;
        crate::failpoint::hit("receiver.placing_failed.recorded");
        let _ = super::partial::remove_path(partial);
        Ok(())
    }

    /// Runs the success hook (again while it fails and its `retry:`
    /// allows) and records its end; false when the agent stopped between
    /// two runs, leaving the row `hook_running`.
    async fn run_success_hook(
        &self,
        row: &ReceiveRow,
        p: &ReceiveProfile,
    ) -> Result<bool, StoreError> {
        let key = (&row.transfer_id, &row.peer);
        let Some(spec) = &p.on_success else {
            // The profile lost its hook since the transfer was placed.
            self.ledger
                .advance(key, Status::HookRunning, Status::Received)
                .await?;
            return Ok(true);
        };
        let ctx = HookContext::for_received(row, &self.cfg.node, Event::Received);
        let log = hooks::log_path(&self.cfg.log_dir(), &row.transfer_id, Event::Received);
        let record = Some((&*self.ledger, key));
        let Some(outcome) = hooks::run_retrying(spec, &ctx, &log, &self.stop, record).await else {
            return Ok(false);
        };
        if outcome.ok() {
            let ms = outcome.duration.as_millis() as u64;
            info!(message = "Success hook finished.", transfer_id = %row.transfer_id, ms);
            self.ledger
                .finish_hook(key, outcome.record(), Status::Received, None)
                .await?;
        } else {
            let (code, sentence) = outcome.failure();
            warn!(message = "Success hook failed.", transfer_id = %row.transfer_id, error_code = %code, error = %sentence);
            self.ledger
                .finish_hook(
                    key,
                    outcome.record(),
                    Status::HookFailed,
                    Some((code, sentence)),
                )
                .await?;
        }
        Ok(true)
    }

    /// Runs the profile's failure hook for a failed transfer, at most once:
    /// the run is claimed in the ledger before it starts.
    async fn run_failure_hook(&self, row: &ReceiveRow) -> Result<(), StoreError> {
        let key = (&row.transfer_id, &row.peer);
        let Some(spec) = self
            .cfg
            .receive_profile(&row.file_id)
            .and_then(|p| p.on_failure.as_ref())
        else {
            return Ok(());
        };
        if row.failure_hook || !self.ledger.claim_failure_hook(key).await? {
            return Ok(());
        }
        let refused = row
            .error_code
            .as_deref()
            .and_then(ErrorCode::parse)
            .is_some_and(alert_limit::is_refusal);
        if refused && !self.alerts.admit() {
            debug!(message = "Failure hook suppressed by the rate limit.", transfer_id = %row.transfer_id);
            return Ok(());
        }
        let ctx = HookContext::for_received(row, &self.cfg.node, Event::ReceiveFailed);
        let log = hooks::log_path(&self.cfg.log_dir(), &row.transfer_id, Event::ReceiveFailed);
        // A failed run is not recorded over a success hook's exit code.
        let record = row.hook_exit.is_none().then_some((&*self.ledger, key));
        let Some(outcome) = hooks::run_retrying(spec, &ctx, &log, &self.stop, record).await else {
            // Stopped between runs: the failure hook was claimed and runs
            // no more (its log says so); the receipt follows.
            return Ok(());
        };
        // A success hook's exit code, if any, stays; the failure hook's is logged.
        if row.hook_exit.is_none() {
            self.ledger.set_hook(key, outcome.record()).await?;
        }
        if !outcome.ok() {
            warn!(message = "Failure hook failed too.", transfer_id = %row.transfer_id, exit = ?outcome.exit);
        }
        Ok(())
    }
}

/// The status a transfer of profile `p` takes once its file is placed: its
/// success hook next, or `received` when it has none.
pub(super) fn after_placing(p: &ReceiveProfile) -> Status {
    if p.on_success.is_some() {
        Status::HookRunning
    } else {
        Status::Received
    }
}
