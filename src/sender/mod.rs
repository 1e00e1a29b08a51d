//! The sending side. A claimed file lives in the spool until every receiver
//! has settled it; the ledger's status says which step comes next after a
//! restart.
//!
//! # Stages, one file each
//! 1. `watch.rs`: an outbox, and when a file in it is complete.
//! 2. `claim.rs`: the rename into the spool, then the ledger rows.
//! 3. `spool.rs`: the spool's layout (also for `hakobu send` and `resend`);
//!    `convert.rs`: a send profile's `convert:`, into the spool.
//! 4. `publish.rs`: chunks through the transform stage to the broker, in a
//!    window, until every one is confirmed; `backlog.rs`: how many publish
//!    at once, the rest waiting in the ledger.
//! 5. `receipt.rs`: the receiver's outcome, and the sender's hook for it;
//!    `receipt_timeout.rs`: the failure hook, once, for a receipt that
//!    takes longer than the profile's `receipt_timeout`.
//! 6. `after_send.rs`: delete, keep or move the spooled file.
//! 7. `recovery.rs`: start-up recovery from the ledger and the spool.
//!
//! Beside them: `before_send.rs`, the pre-send job run before a file is
//! read; `request.rs`, send requests (pull) served, asked and answered.
//! 8. `retry.rs`: a transient failure sent again (the profile's `retry:`).

mod after_send;
mod backlog;
mod before_send;
mod claim;
mod convert;
mod marker;
mod publish;
mod receipt;
mod receipt_timeout;
mod recovery;
mod request;
mod retry;
mod spool;
mod throttle;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

pub use claim::{QueueError, queue, queue_child};
pub use spool::{Spool, Spooled};
pub use watch::ignored;

use crate::broker::Delivery;
use crate::coalesce::Coalescer;
use crate::config::Config;
use crate::domain::FileId;
use crate::store::{RequestLedger, SendLedger, Status, StoreError};
use crate::wire::Receipt;

/// Queued transfers (`hakobu send`, `resend`, retries) started per poll.
const QUEUED_PER_POLL: usize = 256;

pub struct Sender {
    cfg: Arc<Config>,
    ledger: SendLedger,
    /// Send requests asked, served and queued (`request.rs`).
    requests: RequestLedger,
    spool: Spool,
    /// Publishes to the broker, coalescing what waits for the same node.
    out: Arc<Coalescer>,
    window: u64,
    /// Bytes in flight to the broker, shared by the transfers of one
    /// priority (indexed by it): urgent work never waits for permits that
    /// paused, less urgent work holds.
    permits: Vec<Semaphore>,
    /// The transfers being published, by priority (`throttle.rs`).
    priorities: throttle::Priorities,
    /// The agent's `bandwidth:`, and each send profile's.
    agent_cap: Option<throttle::Bucket>,
    caps: HashMap<FileId, throttle::Bucket>,
    /// The transfers being published now (`backlog.rs`).
    publishing: backlog::Publishing,
    /// Receipt hook tasks, awaited on a graceful stop.
    tasks: TaskTracker,
    /// Held while `after_send` runs.
    settling: tokio::sync::Mutex<()>,
    /// Permits for [`receipt::SETTLING_MAX`] receipts settling at once.
    settling_slots: Arc<Semaphore>,
    /// Cancelled when the agent stops taking work: watchers, the queue
    /// poller and publishers end (the ledger resumes them at the next start).
    stop: CancellationToken,
    /// Publishing failures, said once (then once a minute), not at every retry.
    retries: crate::retry_log::RetryLog,
}

impl Sender {
    pub fn new(
        cfg: Arc<Config>,
        ledger: SendLedger,
        out: Arc<Coalescer>,
        (window, tasks, stop): (u64, TaskTracker, CancellationToken),
    ) -> Arc<Self> {
        let permits = publish::permits_for(window, window) as usize;
        let agent_cap = cfg.bandwidth.map(throttle::Bucket::new);
        let caps = cfg
            .send
            .iter()
            .filter_map(|p| Some((p.file_id.clone(), throttle::Bucket::new(p.bandwidth?))))
            .collect();
        Arc::new(Sender {
            spool: Spool::new(cfg.spool_dir()),
            requests: ledger.requests(),
            cfg,
            ledger,
            out,
            window,
            permits: (0..=throttle::MAX_PRIORITY)
                .map(|_| Semaphore::new(permits * publish::PARALLEL_WINDOWS as usize))
                .collect(),
            priorities: throttle::Priorities::default(),
            agent_cap,
            caps,
            publishing: backlog::Publishing::default(),
            tasks,
            settling: tokio::sync::Mutex::new(()),
            settling_slots: Arc::new(Semaphore::new(receipt::SETTLING_MAX)),
            stop,
            retries: Default::default(),
        })
    }

    /// Resumes the last run's work (see `recovery.rs`). Call once, before
    /// the watchers start.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StoreError> {
        self.resume().await?;
        self.interrupt_requests().await;
        Ok(())
    }

    /// Starts one watcher per send profile with an outbox and a `to`, until
    /// the agent stops (an outbox only asked for is read when asked).
    pub fn start_watchers(self: &Arc<Self>) {
        for profile in &self.cfg.send {
            if profile.outbox.is_none() || profile.to.is_empty() {
                continue;
            }
            tokio::spawn(watch::watch(self.clone(), profile.clone()));
        }
    }

    /// Picks up transfers queued by `hakobu send` and `hakobu resend`, and
    /// requests (`request.rs`), and retries once due (`retry.rs`), until the
    /// agent stops.
    pub async fn poll_queued(self: Arc<Self>) {
        while !self.stop.is_cancelled() {
            self.poll_requests().await;
            match self.ledger.queued_due(QUEUED_PER_POLL).await {
                Ok(mut rows) => {
                    // Highest priority first; oldest first within one.
                    rows.sort_by_key(|r| std::cmp::Reverse(self.priority_of(&r.file_id)));
                    for row in rows {
                        let key = (&row.transfer_id, &row.peer);
                        if self
                            .publishing
                            .contains(&(row.transfer_id.clone(), row.peer.clone()))
                        {
                            // An earlier try's publisher has yet to see that
                            // its try ended: the next poll takes this one.
                            continue;
                        }
                        if let Ok(true) = self
                            .ledger
                            .advance(key, Status::Queued, Status::Sending)
                            .await
                        {
                            self.enqueue(&row);
                        }
                    }
                }
                Err(e) => {
                    warn!(message = "Cannot read queued transfers.", error = %e, error_code = %e.code())
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// The `priority:` of a file id's send profile (the default without one).
    fn priority_of(&self, file_id: &FileId) -> u8 {
        self.cfg
            .send_profile(file_id)
            .map_or(crate::config::DEFAULT_PRIORITY, |p| p.priority)
    }

    /// A receipt from a receiving node (see `receipt.rs`).
    pub async fn on_receipt(self: &Arc<Self>, r: Receipt, d: Delivery) {
        self.receipt(r, d).await;
    }
}
