//! Receipts: a receiving node's outcome for a transfer sent to it. It is
//! recorded (once: a duplicate finds no transfer waiting), acked, and then
//! the sender's own hook for that outcome runs and `after_send` follows,
//! in one of [`SETTLING_MAX`] slots taken before the ack: with none free
//! the dispatcher waits, and the receipts after it wait in the broker, not
//! in this agent's memory (a restarted sender with 100,000 receipts to
//! drain otherwise held a task for each).

use std::sync::Arc;

use tracing::{error, info, warn};

use super::Sender;
use crate::broker::Delivery;
use crate::domain::{NodeName, TransferId};
use crate::error_code::ErrorCode;
use crate::hooks::{self, Event, HookContext, Slot};
use crate::store::{Status, StoreError};
use crate::wire::Receipt;

/// How long a receipt that could not be recorded waits for its next try.
const RECEIPT_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Receipts settling at once (their hook, then `after_send`); like the
/// receiver's completions, a hook waiting for its next run gives its slot
/// back meanwhile (`hooks/slot.rs`).
pub(super) const SETTLING_MAX: usize = 256;

impl Sender {
    pub(super) async fn receipt(self: &Arc<Self>, r: Receipt, d: Delivery) {
        if self.cfg.verify_sender() && d.user_id.as_deref() != Some(r.from.as_str()) {
            // A forged receipt could make this agent delete the only copy.
            warn!(message = "Dead-lettering a receipt whose sender is not its broker user.",
                transfer_id = %r.transfer_id, from = %r.from, user = ?d.user_id, error_code = %ErrorCode::SenderMismatch);
            let _ = d.dead_letter().await;
            return;
        }
        let r = tame(r);
        if r.to != self.cfg.node {
            warn!(message = "Ignoring a receipt addressed to another node.", to = %r.to, transfer_id = %r.transfer_id);
            let _ = d.ack().await;
            return;
        }
        match self.retry_later(&r).await {
            Ok(true) => {
                let _ = d.ack().await;
                return;
            }
            Ok(false) => {}
            Err(()) => return self.retry_receipt(r, d),
        }
        // Without a hook for this outcome the transfer ends with the receipt.
        let hook = self
            .cfg
            .send_profile(&r.file_id)
            .is_some_and(|p| if r.ok { &p.on_success } else { &p.on_failure }.is_some());
        let next = match (hook, r.ok) {
            (true, _) => Status::HookRunning,
            (false, true) => Status::Sent,
            (false, false) => Status::SendFailed,
        };
        match self.ledger.record_receipt(&r, next).await {
            Ok(true) => {
                info!(message = "Receipt.", transfer_id = %r.transfer_id, from = %r.from, ok = r.ok, error_code = ?r.error_code);
                // Recorded: a stop while this waits leaves the row to the
                // next start (`recovery.rs`), and the broker's redelivery
                // finds it recorded.
                let Ok(permit) = self.settling_slots.clone().acquire_owned().await else {
                    return;
                };
                let _ = d.ack().await;
                let this = self.clone();
                let slot = Slot::new(self.settling_slots.clone(), permit);
                self.tasks.spawn(slot.hold(async move {
                    if hook {
                        if let Err(e) = this.run_hook(&r.transfer_id, &r.from).await {
                            error!(message = "State database failed while running a sender hook.", error = %e, error_code = %e.code());
                        }
                    }
                    this.settle_spool(&r.transfer_id).await;
                }));
            }
            Ok(false) => {
                // A receipt counts only from a node the transfer was sent to.
                match self.ledger.get((&r.transfer_id, &r.from)).await {
                    Ok(None) => {
                        warn!(message = "Ignoring a receipt from a node this transfer was not sent to (or for a transfer this node did not send); nothing changes.",
                            transfer_id = %r.transfer_id, from = %r.from, error_code = %ErrorCode::UnexpectedReceipt);
                    }
                    _ => {
                        info!(message = "Duplicate or unknown receipt.", transfer_id = %r.transfer_id, from = %r.from)
                    }
                }
                let _ = d.ack().await;
            }
            Err(e) => {
                error!(message = "State database failed while recording a receipt; it is tried again in a moment.",
                    transfer_id = %r.transfer_id, error = %e, error_code = %e.code());
                self.retry_receipt(r, d);
            }
        }
    }

    /// A receipt the state database could not take (a full disk, say) is
    /// handled again after [`RECEIPT_RETRY`], in a task of its own (the
    /// dispatcher goes on), unacked meanwhile: a requeue would count toward
    /// the broker's delivery limit and dead-letter it after a few dozen
    /// tries. A stop ends the wait; the broker delivers it again then.
    fn retry_receipt(self: &Arc<Self>, r: Receipt, d: Delivery) {
        let this = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = this.stop.cancelled() => {}
                _ = tokio::time::sleep(RECEIPT_RETRY) => Box::pin(this.receipt(r, d)).await,
            }
        });
    }

    /// Runs the send profile's hook for the receipt's outcome, recorded in
    /// `hook_running` by the receipt itself.
    pub(super) async fn run_hook(
        &self,
        tid: &TransferId,
        peer: &NodeName,
    ) -> Result<(), StoreError> {
        let key = (tid, peer);
        // The row was recorded with the receipt by a call that waited.
        let Some(row) = self.ledger.deferred().get(key).await? else {
            return Ok(());
        };
        let status = if row.delivered {
            Status::Sent
        } else {
            Status::SendFailed
        };
        let (event, spec) = match self.cfg.send_profile(&row.file_id) {
            Some(p) if row.delivered => (Event::Sent, p.on_success.as_ref()),
            Some(p) => (Event::SendFailed, p.on_failure.as_ref()),
            None => (Event::Sent, None),
        };
        let Some(spec) = spec else {
            // The profile lost its hook since the receipt was recorded.
            self.ledger
                .advance(key, Status::HookRunning, status)
                .await?;
            return Ok(());
        };
        let ctx = HookContext::for_sent(&row, &self.cfg.node, event);
        let log = hooks::log_path(&self.cfg.log_dir(), tid, event);
        let record = Some((&*self.ledger, key));
        let Some(outcome) = hooks::run_retrying(spec, &ctx, &log, &self.stop, record).await else {
            // Stopped between the hook's runs: the row stays
            // `hook_running`, `hook_interrupted` at the next start.
            return Ok(());
        };
        let mut error = None;
        let mut status = status;
        if !outcome.ok() {
            warn!(message = "Sender hook failed.", transfer_id = %tid, error = %outcome.describe());
            if row.delivered {
                status = Status::HookFailed;
                error = Some(outcome.failure());
            }
        }
        self.ledger
            .finish_hook(key, outcome.record(), status, error)
            .await?;
        Ok(())
    }
}

/// A receipt's free text comes from another node and goes into history,
/// `hakobu history` and this node's hook environment: control and format
/// characters escaped, an error code that is no code dropped to `None`
/// (the sentence stays), a sentence cut to 2000 bytes.
fn tame(mut r: Receipt) -> Receipt {
    use crate::domain::escape_text;
    r.error_code = r.error_code.filter(|c| {
        (1..=40).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    });
    r.error = r.error.map(|e| {
        let mut e = escape_text(&e);
        if e.len() > 2000 {
            let cut = (0..=2000)
                .rev()
                .find(|&i| e.is_char_boundary(i))
                .unwrap_or(0);
            e.truncate(cut);
        }
        e
    });
    r.path = r.path.map(|p| escape_text(&p));
    if !crate::clock::looks_like_rfc3339(&r.finished_at) {
        r.finished_at = crate::clock::now_rfc3339();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_text_is_tamed() {
        let r = Receipt {
            transfer_id: TransferId::new(),
            file_id: crate::domain::FileId::parse("F").unwrap(),
            from: NodeName::parse("beta").unwrap(),
            to: NodeName::parse("alpha").unwrap(),
            ok: false,
            error_code: Some("x\u{1b}[2J".into()),
            error: Some(format!("bad\n{}", "e".repeat(5000))),
            path: Some("/in/\u{202E}x".into()),
            hook_exit: None,
            finished_at: "\u{1b}".into(),
            attempt: 1,
        };
        let t = tame(r);
        assert_eq!(t.error_code, None);
        let e = t.error.unwrap();
        assert!(
            e.starts_with("bad\\u{a}e") && e.len() == 2000,
            "{}",
            &e[..20]
        );
        assert_eq!(t.path.as_deref(), Some("/in/\\u{202e}x"));
        assert!(t.finished_at.starts_with("20"));
    }
}
