//! Receivers gone for days: a send profile's `receipt_timeout`. One task
//! looks, every so often, for rows that have waited for their receipt
//! longer than their profile allows (a bounded batch per profile and round,
//! through the partial index `transfers_receipt_due`; no timer per
//! transfer). Each such row is marked in the ledger first (code
//! `receipt_timeout`, the time), and only then, if the mark was new, the
//! profile's `on_failure` hook runs: once per row, restarts included (a
//! crash during the hook does not run it again, like any hook). The status
//! stays `awaiting_receipt` and the file stays in the spool: a late
//! receipt settles the row as usual (`receipt.rs`, `after_send.rs`).

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, warn};

use super::Sender;
use crate::clock::unix_now;
use crate::domain::FileId;
use crate::error_code::ErrorCode;
use crate::hooks::{self, Event, HookContext};
use crate::store::{SendRow, StoreError};

/// Rows timed out per profile and round; their hooks run side by side and
/// the next round waits for them.
const BATCH: usize = 32;
/// How often the checker looks: a quarter of the shortest timeout, within
/// these bounds.
const MIN_PERIOD: Duration = Duration::from_millis(250);
const MAX_PERIOD: Duration = Duration::from_secs(60);

impl Sender {
    /// Runs until the agent stops; returns at once when no send profile has
    /// a `receipt_timeout`.
    pub async fn check_receipt_timeouts(self: Arc<Self>) {
        let profiles: Vec<(FileId, Duration)> = self
            .cfg
            .send
            .iter()
            .filter_map(|p| Some((p.file_id.clone(), p.receipt_timeout?)))
            .collect();
        let Some(shortest) = profiles.iter().map(|(_, t)| *t).min() else {
            return;
        };
        let period = (shortest / 4).clamp(MIN_PERIOD, MAX_PERIOD);
        while !self.stop.is_cancelled() {
            for (file_id, timeout) in &profiles {
                // A full batch means more may be due: look again at once.
                while !self.stop.is_cancelled() {
                    match self.time_out_batch(file_id, *timeout).await {
                        Ok(n) if n == BATCH => continue,
                        Ok(_) => break,
                        Err(e) => {
                            error!(message = "State database failed while looking for transfers past their receipt_timeout.",
                                error = %e, error_code = %e.code());
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => {}
                _ = tokio::time::sleep(period) => {}
            }
        }
    }

    /// Times out up to [`BATCH`] rows of one profile and runs their hooks;
    /// returns how many rows were due.
    async fn time_out_batch(
        self: &Arc<Self>,
        file_id: &FileId,
        timeout: Duration,
    ) -> Result<usize, StoreError> {
        let before = unix_now() - timeout.as_secs().min(i64::MAX as u64) as i64;
        let rows = self.ledger.receipts_due(file_id, before, BATCH).await?;
        let due = rows.len();
        let mut hooks = Vec::new();
        for row in rows {
            let waited =
                Duration::from_secs(row.awaiting_receipt_secs(unix_now()).unwrap_or_default());
            let sentence = format!(
                "No receipt from {} for {} (receipt_timeout {}); the file stays in the spool and the transfer completes if the receiver returns.",
                row.peer,
                humantime::format_duration(waited),
                humantime::format_duration(timeout)
            );
            let key = (&row.transfer_id, &row.peer);
            // The mark is on disk before the hook runs: it runs once.
            if !self
                .ledger
                .time_out_receipt(key, row.attempt, &sentence)
                .await?
            {
                continue;
            }
            warn!(message = "No receipt within receipt_timeout; running the failure hook. The transfer still waits for its receipt.",
                transfer_id = %row.transfer_id, peer = %row.peer, file_id = %row.file_id,
                waited_s = waited.as_secs(), error_code = %ErrorCode::ReceiptTimeout);
            let this = self.clone();
            hooks.push(self.tasks.spawn(async move {
                this.run_timeout_hook(row, sentence).await;
            }));
        }
        for h in hooks {
            let _ = h.await;
        }
        Ok(due)
    }

    /// The profile's `on_failure` for a row past its `receipt_timeout`:
    /// `HAKOBU_EVENT=send_failed`, `HAKOBU_ERROR_CODE=receipt_timeout`. Its
    /// run is recorded on the row (exit, time, output); the status stays.
    async fn run_timeout_hook(&self, row: SendRow, sentence: String) {
        let Some(spec) = self
            .cfg
            .send_profile(&row.file_id)
            .and_then(|p| p.on_failure.clone())
        else {
            return;
        };
        let mut ctx = HookContext::for_sent(&row, &self.cfg.node, Event::SendFailed);
        ctx.error_code = Some(ErrorCode::ReceiptTimeout.as_str().to_string());
        ctx.error = Some(sentence);
        let log = hooks::log_path(&self.cfg.log_dir(), &row.transfer_id, Event::SendFailed);
        let key = (&row.transfer_id, &row.peer);
        let record = Some((&*self.ledger, key));
        let Some(outcome) = hooks::run_retrying(&spec, &ctx, &log, &self.stop, record).await else {
            return;
        };
        if !outcome.ok() {
            warn!(message = "Failure hook for receipt_timeout failed.", transfer_id = %row.transfer_id,
                error = %outcome.describe());
        }
        if let Err(e) = self.ledger.set_hook(key, outcome.record()).await {
            error!(message = "State database failed while recording a hook run.", error = %e, error_code = %e.code());
        }
    }
}
