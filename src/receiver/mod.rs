//! The receiving side. Every step is driven by the transfer's status in the
//! ledger, so a restart resumes where the last run stopped and nothing
//! happens twice.
//!
//! # Stages, one file each
//! 1. `ingest.rs`: check each chunk, pass it through the transform stage,
//!    write it into the partial file; a bad chunk fails its transfer.
//! 2. `commit.rs`: fsync what a batch wrote, record it, ack it.
//! 3. `verify.rs`: size and SHA-256 of a complete transfer (the running
//!    digests, so that the file need not be read back).
//! 4. `place.rs`: the only way a file reaches an inbox name, by mode, one
//!    name at a time; transfers completed together placed together.
//!    `staged.rs`: the file placed, converted first with `convert:`
//!    (`transform/convert.rs`); `name.rs`: the inbox name (`name:`).
//! 5. `complete.rs`: the state machine from a complete (or failed) transfer
//!    to its hooks and receipt.
//! 6. `receipt.rs`: the outcome, back to the sender.
//! 7. `alert_limit.rs`: the failure hooks of refused transfers, rate-limited.
//! 8. `recovery.rs`: start-up recovery, the sweep of leftover partial files,
//!    expiry of transfers whose sender stopped.
//! 9. `waiting.rs`: complete transfers that found every completion slot
//!    taken wait in the ledger, and get one as completions end.

mod alert_limit;
mod commit;
mod complete;
mod error;
mod ingest;
pub mod name;
mod partial;
mod place;
mod receipt;
mod recovery;
mod staged;
mod verify;
mod waiting;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use commit::Commits;
pub use error::ReceiveError;
pub use ingest::{PARTIAL_DIR, partial_path};

use crate::broker::Delivery;
use crate::coalesce::Coalescer;
use crate::config::Config;
use crate::domain::TransferId;
use crate::store::{ReceiveLedger, StoreError};
use crate::wire::ChunkHeader;

/// Files one batch creates, writes or flushes at once: enough for the disk
/// to see many requests together, few enough that a batch of small files
/// does not start a blocking thread for each.
const SIDE_BY_SIDE: usize = 16;

/// Transfers completed side by side at most (placed, their hooks run,
/// their receipts sent). More wait in the ledger, complete, their partial
/// files on disk (`waiting.rs`), while chunks and receipts keep flowing: a
/// hook slower than the files arrive costs time and disk, not memory or
/// processes.
const COMPLETING_MAX: usize = 256;

pub struct Receiver {
    cfg: Arc<Config>,
    ledger: ReceiveLedger,
    /// Publishes to the broker (receipts), coalescing what waits for the
    /// same node.
    out: Arc<Coalescer>,
    /// Transfers a completion task drives now: their chunks are duplicates.
    busy: Mutex<HashSet<TransferId>>,
    /// The commit stage and completion tasks, awaited on a graceful stop.
    tasks: TaskTracker,
    /// Cancelled when the agent stops: a hook's wait between retries ends.
    stop: CancellationToken,
    names: place::NameLocks,
    digests: verify::RunningDigests,
    alerts: alert_limit::AlertLimit,
    /// Receipts not confirmed, said once (then once a minute), not at every retry.
    retries: crate::retry_log::RetryLog,
    /// Permits for [`COMPLETING_MAX`] completions at once.
    completing: Arc<tokio::sync::Semaphore>,
    /// Complete transfers waiting in the ledger for a permit.
    waiting: waiting::Waiting,
}

impl Receiver {
    pub fn new(
        cfg: Arc<Config>,
        ledger: ReceiveLedger,
        out: Arc<Coalescer>,
        (tasks, stop): (TaskTracker, CancellationToken),
    ) -> Arc<Self> {
        Arc::new(Receiver {
            cfg,
            ledger,
            out,
            busy: Mutex::new(HashSet::new()),
            tasks,
            stop,
            names: Default::default(),
            digests: Default::default(),
            alerts: Default::default(),
            retries: Default::default(),
            completing: Arc::new(tokio::sync::Semaphore::new(COMPLETING_MAX)),
            waiting: Default::default(),
        })
    }

    /// Resumes what the last run left (see `recovery.rs`). Call once, before
    /// the first delivery.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StoreError> {
        self.resume().await
    }

    /// Starts the commit stage; it ends once the returned handle is dropped
    /// and what was handed to it is committed.
    pub fn start_commits(self: &Arc<Self>) -> Commits {
        self.commits()
    }

    /// Receives a batch of chunks: ingest now, commit in the background.
    pub async fn on_chunks(
        self: &Arc<Self>,
        batch: Vec<(ChunkHeader, Bytes, Delivery)>,
        commits: &Commits,
    ) {
        self.ingest(batch, commits).await;
    }

    /// Expires transfers whose sender stopped, until `stop` is cancelled.
    pub async fn expire_stale(self: Arc<Self>, stop: CancellationToken) {
        self.expire(stop).await;
    }

    /// Marks `tid` as driven by a completion task; false if one drives it.
    fn claim(&self, tid: &TransferId) -> bool {
        self.busy_set().insert(tid.clone())
    }

    fn release(&self, tid: &TransferId) {
        self.busy_set().remove(tid);
    }

    fn is_busy(&self, tid: &TransferId) -> bool {
        self.busy_set().contains(tid)
    }

    fn busy_set(&self) -> std::sync::MutexGuard<'_, HashSet<TransferId>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a completion task for `tid`, unless one drives it already.
    fn spawn_completion(self: &Arc<Self>, tid: TransferId) {
        if self.claim(&tid) {
            self.tasks.spawn(self.clone().complete(tid));
        }
    }
}
