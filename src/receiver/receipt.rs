//! The receipt: the receiver's outcome, published back to the sender until
//! the broker confirms it, so that the sender's own hooks know it. Only
//! nodes this configuration names get one, so a forged `from` cannot make
//! the agent create queues for strangers.

use std::time::Duration;

use tracing::{debug, info, warn};

use super::Receiver;
use crate::clock::now_rfc3339;
use crate::retry_log::Say;
use crate::store::{ReceiveRow, Status, StoreError};
use crate::wire::{Message, Receipt};

impl Receiver {
    /// Publishes the receipt of a settled transfer until the broker confirms
    /// it, then records that it went.
    pub(super) async fn send_receipt(&self, row: &ReceiveRow) -> Result<(), StoreError> {
        let key = (&row.transfer_id, &row.peer);
        if !self.cfg.knows(&row.peer) {
            info!(message = "No receipt for a sender this configuration does not name.", transfer_id = %row.transfer_id, from = %row.peer);
            return self.ledger.set_receipt_sent(key, row.attempt).await;
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
            path: row
                .inode
                .and(row.path.as_ref())
                .map(|p| p.to_string_lossy().into_owned()),
            hook_exit: row.hook_exit,
            finished_at: row.finished_at.clone().unwrap_or_else(now_rfc3339),
            attempt: row.attempt,
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            // Receipts that wait together travel as one message.
            let sent = self
                .out
                .publish(&row.peer, Message::Receipt(receipt.clone()))
                .await;
            match sent {
                Ok(()) => {
                    for r in self.retries.succeeded() {
                        info!(message = "The broker takes receipts again.", failed_with = %r.code, failures = r.failures, failed_for = ?r.failed_for);
                    }
                    break;
                }
                Err(e) => {
                    // Every receipt waiting retries: said once, not at each try.
                    match self.retries.failed(e.code()) {
                        Say::First => {
                            warn!(message = "Receipt not confirmed; retrying until the broker takes it. Said once; if it goes on, once a minute.",
                            transfer_id = %row.transfer_id, error = %e, error_code = %e.code())
                        }
                        Say::Again { since_last } => {
                            warn!(message = "Receipts still not confirmed; retrying.",
                            failures = since_last, transfer_id = %row.transfer_id, error = %e, error_code = %e.code())
                        }
                        Say::Quiet => debug!(message = "Receipt not confirmed; retrying.",
                            transfer_id = %row.transfer_id, error = %e, error_code = %e.code()),
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Not flushed before going on: if a crash loses it, recovery sends
        // the receipt again and the sender ignores the duplicate.
        if let Err(e) = self
            .ledger
            .deferred()
            .set_receipt_sent(key, row.attempt)
            .await
        {
            warn!(message = "Cannot record that a receipt was sent; it is sent again at the next start.",
                transfer_id = %row.transfer_id, error = %e, error_code = %e.code());
        }
        info!(message = "Receipt sent.", transfer_id = %row.transfer_id, to = %row.peer, ok, error_code = ?row.error_code);
        Ok(())
    }
}
