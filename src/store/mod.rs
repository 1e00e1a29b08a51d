//! The state database (SQLite in `state_dir`): the history of every transfer
//! on both sides, and the ledger whose status rows make placement and hooks
//! happen once. Only this folder knows SQL.
//!
//! # Layout
//! - [`Store`] (here): the handle, and the one thread that runs every
//!   statement, so that SQL never runs on an async worker.
//! - `flush.rs`: the group commit; a call returns once what it wrote, and
//!   what it read, is on disk ([`Store::deferred`] skips that wait).
//! - `schema.rs`: the schema and its migrations (`user_version`).
//! - `row.rs`: statuses and the typed rows of each side.
//! - `send_ledger.rs`, `receive_ledger.rs`: one typed facade per side.
//! - `ledger.rs`: the statements both ledgers share (insert, status changes, hooks).
//! - `history.rs`: what `hakobu history` and `hakobu rerun` look up.
//! - `query.rs`: history searched by filters, a page at a time (HTTP API, console).
//! - `events.rs`: each row's status timeline, written by triggers.
//! - `figures.rs`: what `/metrics` reads at each scrape, from indexes only.
//! - `chain.rs`: a transfer's job flow across nodes (`hakobu history --chain`).

mod chain;
mod events;
mod figures;
mod flush;
mod history;
mod inflight;
mod ledger;
mod query;
mod receive_ledger;
mod requests;
mod row;
mod schema;
mod send_ledger;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::mpsc;
use std::task::{Context, Poll};

use rusqlite::Connection;
use tokio::sync::oneshot;

pub use chain::{Chain, Step, StepView};
pub use events::{Event, MAX_EVENTS};
pub use figures::{Figures, InFlight, Total};
pub use history::{Entry, PAST_RECEIPT_TIMEOUT};
pub use inflight::{Activities, Activity};
pub use ledger::Side;
pub use query::{HistoryFilter, MAX_PAGE};
pub use receive_ledger::{Placing, ReceiveLedger};
pub use requests::{RequestDir, RequestLedger, RequestRow, RequestStatus};
pub use row::{Direction, HookRun, ReceiveRow, SendRow, Status, Transfer, UnknownStatus};
pub use schema::LATEST as SCHEMA_VERSION;
pub use send_ledger::SendLedger;

use crate::clock::unix_now;
use crate::error_code::ErrorCode;
use flush::{Flusher, Reply};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(
        "the state database was written by a newer hakobu (schema version {found}, this one knows up to {known}); run that version, or give this one another state_dir"
    )]
    TooNew { found: i64, known: i64 },
    #[error("cannot start the state database's threads: {0}")]
    Thread(std::io::Error),
    #[error("the state database's thread has stopped; restart the agent")]
    Stopped,
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::TooNew { .. } => ErrorCode::StateDbTooNew,
            // The state directory's disk (or the user's quota) is full.
            StoreError::Sql(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull =>
            {
                ErrorCode::DiskFull
            }
            _ => ErrorCode::StateDbError,
        }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One statement (or transaction) for the database thread; returns what
/// sends the caller its result.
type Job = Box<dyn FnOnce(&mut Connection) -> Reply + Send>;

/// A handle on the state database, cheap to clone. Every call is run, in the
/// order it was made, by the database thread; the returned [`Call`] is its
/// result, to `.await` (or [`Call::wait`] for on a thread outside the
/// async runtime). A call runs whether or not its result is awaited.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<(bool, Job)>,
    /// False for a [`Store::deferred`] handle.
    wait: bool,
}

impl Store {
    /// Opens (or creates) the database at `path`, migrates it to this
    /// version's schema, and starts its threads. It blocks (the migration
    /// runs on the calling thread): call it from a blocking task or before
    /// the runtime's work starts.
    pub fn open(path: &Path) -> Result<Store> {
        let mut conn = Connection::open(path)?;
        // The schema commits with FULL, everything after with NORMAL plus
        // the group flush (see `flush.rs`).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        schema::migrate(&mut conn)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // The agent runs the same few statements over and over, and parsing
        // them cost more than running them.
        conn.set_prepared_statement_cache_capacity(64);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let flusher =
            Flusher::start(wal.into(), conn.total_changes()).map_err(StoreError::Thread)?;
        let (jobs, rx) = mpsc::channel::<(bool, Job)>();
        std::thread::Builder::new()
            .name("hakobu-db".into())
            .spawn(move || serve(conn, rx, flusher))
            .map_err(StoreError::Thread)?;
        Ok(Store { jobs, wait: true })
    }

    /// A handle whose calls return before what they wrote is on disk: for
    /// steps whose only outside effect comes after a later waiting call (on
    /// any handle), which flushes them too, because calls run in order. A
    /// receiver's chunk bookkeeping, for one, needs to be durable only by
    /// the time the chunk is acked; a read of a status that a waiting call
    /// wrote needs no flush.
    pub fn deferred(&self) -> Store {
        Store {
            wait: false,
            ..self.clone()
        }
    }

    /// The sending side's ledger.
    pub fn sending(&self) -> SendLedger {
        SendLedger::new(self.clone())
    }

    /// The receiving side's ledger.
    pub fn receiving(&self) -> ReceiveLedger {
        ReceiveLedger::new(self.clone())
    }

    /// Send requests asked, served and queued.
    pub fn requests(&self) -> RequestLedger {
        RequestLedger::new(self.clone())
    }

    /// The calls both ledgers make alike, for the side `dir` (for a caller
    /// that holds a row of either side, as `hakobu rerun` does).
    pub fn side(&self, dir: Direction) -> Side {
        Side::new(self.clone(), dir)
    }

    /// Runs `f` on the database thread.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Call<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = f(conn).map_err(StoreError::from);
            Box::new(move || {
                let _ = tx.send(result);
            })
        });
        // If the thread is gone, the dropped sender reports it (`Stopped`).
        let _ = self.jobs.send((self.wait, job));
        Call(rx)
    }
}

/// The database thread: runs each call, then answers it at once (deferred)
/// or once the flush thread has made it durable.
fn serve(mut conn: Connection, jobs: mpsc::Receiver<(bool, Job)>, flusher: Flusher) {
    while let Ok((wait, job)) = jobs.recv() {
        let reply = job(&mut conn);
        let changes = conn.total_changes();
        flusher.published(changes);
        if wait {
            flusher.after(changes, reply);
        } else {
            reply();
        }
    }
    // Every handle is gone: the last waiting calls are flushed before the
    // connection closes.
    flusher.close();
    drop(conn);
}

/// The result of a [`Store`] call.
#[must_use = "a call runs anyway; await it to know that it did, and its result"]
pub struct Call<T>(oneshot::Receiver<Result<T>>);

impl<T> Future for Call<T> {
    type Output = Result<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Stopped)))
    }
}

impl<T> Call<T> {
    /// Lets the call run without waiting for it: for a write whose loss in a
    /// crash only means a step is done again (a progress figure, a receipt
    /// sent twice).
    pub fn detach(self) {}

    /// Blocks this thread for the result: for a blocking task or a thread
    /// of its own, never an async worker.
    pub fn wait(self) -> Result<T> {
        self.0.blocking_recv().unwrap_or(Err(StoreError::Stopped))
    }
}

/// Statements through SQLite's statement cache.
trait Cached {
    fn run<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn one<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T>;
    fn all<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Vec<T>>;
}

impl Cached for Connection {
    fn run<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }
    fn one<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
    fn all<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Vec<T>> {
        let mut stmt = self.prepare_cached(sql)?;
        let rows = stmt.query_map(params, f)?;
        rows.collect()
    }
}

/// Every column a row type reads, in one place.
const COLUMNS: &str = "direction, transfer_id, peer, file_id, file_name, size, sha256, chunk_size, \
     status, error_code, error, path, remote_path, remote_hook_exit, meta, started_at, finished_at, \
     hook_exit, hook_ms, hook_tail, receipt_sent, delivered, inode, failure_hook, progress, chunks_have, \
     request_id, attempt, hook_attempts, placed_sha256, records, wire_bytes, parent_id, touched_at, \
     receipt_timeout_at";

/// The rows of one transfer id (`?1`), both sides, found through the primary
/// key (direction, transfer_id, peer): no index on the id alone to keep up.
const BY_ID: &str = "direction IN ('receive', 'send') AND transfer_id = ?1";
