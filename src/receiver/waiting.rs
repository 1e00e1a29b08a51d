//! Waiting completions: a transfer whose last chunk is recorded while all
//! [`COMPLETING_MAX`](super::COMPLETING_MAX) completion slots are taken
//! waits in the ledger (complete, still `receiving`, its partial file on
//! disk), not in memory and not in the broker. The commit stage acks its
//! chunks and goes on; this task gives the waiting transfers slots as
//! completions end, oldest first, reading the ledger a window at a time.
//!
//! Holding them in the broker instead (the commit stage waiting for a slot,
//! its chunks unacked) used up the consumer's prefetch: no receipt reached
//! the agent either, and hooks that run `hakobu send --wait` (a received
//! file sent on, waiting for the next node's receipt) waited for receipts
//! that could not arrive until their timeout, with 700 files or more
//! arriving at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use super::Receiver;
use crate::hooks::Slot;

/// Rows read from the ledger at a time.
const WINDOW: usize = 256;

/// Whether transfers wait in the ledger for a completion slot.
#[derive(Default)]
pub(super) struct Waiting {
    more: AtomicBool,
    wake: Notify,
}

impl Waiting {
    /// A transfer now waits in the ledger: the task looks again.
    pub(super) fn add(&self) {
        self.more.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

impl Receiver {
    /// Gives the transfers waiting in the ledger a completion slot each,
    /// until the agent stops.
    pub async fn complete_waiting(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.waiting.wake.notified() => {}
            }
            // Cleared before the pass: a transfer that starts waiting
            // during it sets it again, for another pass.
            while self.waiting.more.swap(false, Ordering::SeqCst) {
                if let Err(e) = self.pass().await {
                    warn!(message = "Cannot read the transfers waiting to be completed; retrying.", error = %e, error_code = %e.code());
                    self.waiting.more.store(true, Ordering::SeqCst);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                if self.stop.is_cancelled() {
                    return;
                }
            }
        }
    }

    /// One pass over the ledger's complete `receiving` rows, a window at a
    /// time: each not driven already gets a slot, those that find one free
    /// together completed together (their files placed in one pass); with
    /// none free, this waits for the next.
    async fn pass(self: &Arc<Self>) -> Result<(), crate::store::StoreError> {
        let mut after = 0;
        let mut started = 0usize;
        loop {
            let rows = self.ledger.completable(after, WINDOW).await?;
            let Some(&(last, _)) = rows.last() else { break };
            after = last;
            let mut group = Vec::new();
            for tid in rows.into_iter().filter_map(|(_, tid)| tid) {
                let permit = match self.completing.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        self.start_completions(std::mem::take(&mut group));
                        tokio::select! {
                            _ = self.stop.cancelled() => return Ok(()),
                            p = self.completing.clone().acquire_owned() => match p {
                                Ok(p) => p,
                                Err(_) => return Ok(()),
                            },
                        }
                    }
                };
                // Driven already (a duplicate of its last chunk, say).
                if !self.claim(&tid) {
                    continue;
                }
                started += 1;
                group.push((tid, Slot::new(self.completing.clone(), permit)));
            }
            self.start_completions(group);
        }
        if started > 0 {
            info!(
                message = "Transfers that waited in the state database for a completion slot are being completed.",
                transfers = started
            );
        }
        Ok(())
    }
}
