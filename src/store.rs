//! The state database (SQLite in `state_dir`): the history of every transfer on
//! both sides, and the ledger that makes placement and hooks happen once.
//! Only this module knows SQL.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
#[error("state database: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

impl StoreError {
    pub const fn code(&self) -> &'static str {
        "state_db_error"
    }
}

type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Send,
    Receive,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Send => "send",
            Direction::Receive => "receive",
        }
    }
}

/// Where a transfer stands. Sending: (`queued` →) `sending` → `awaiting_receipt` →
/// `hook_running` → `sent` | `send_failed`. Receiving: `receiving` →
/// `placing` → `hook_running` → `received` | `receive_failed`. Either side:
/// `hook_failed`, and `hook_interrupted` when the agent died while a hook ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for the agent to pick it up (`hakobu send`, `hakobu resend`).
    Queued,
    Sending,
    AwaitingReceipt,
    Receiving,
    Placing,
    HookRunning,
    Sent,
    SendFailed,
    Received,
    ReceiveFailed,
    HookFailed,
    HookInterrupted,
}

impl Status {
    const ALL: [Status; 12] = [
        Status::Queued,
        Status::Sending,
        Status::AwaitingReceipt,
        Status::Receiving,
        Status::Placing,
        Status::HookRunning,
        Status::Sent,
        Status::SendFailed,
        Status::Received,
        Status::ReceiveFailed,
        Status::HookFailed,
        Status::HookInterrupted,
    ];

    /// The statuses that are (or are not) final, as an SQL list: `'a', 'b'`.
    fn sql_list(final_: bool) -> String {
        Status::ALL
            .iter()
            .filter(|s| s.is_final() == final_)
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Sending => "sending",
            Status::AwaitingReceipt => "awaiting_receipt",
            Status::Receiving => "receiving",
            Status::Placing => "placing",
            Status::HookRunning => "hook_running",
            Status::Sent => "sent",
            Status::SendFailed => "send_failed",
            Status::Received => "received",
            Status::ReceiveFailed => "receive_failed",
            Status::HookFailed => "hook_failed",
            Status::HookInterrupted => "hook_interrupted",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "queued" => Status::Queued,
            "sending" => Status::Sending,
            "awaiting_receipt" => Status::AwaitingReceipt,
            "receiving" => Status::Receiving,
            "placing" => Status::Placing,
            "hook_running" => Status::HookRunning,
            "sent" => Status::Sent,
            "send_failed" => Status::SendFailed,
            "received" => Status::Received,
            "receive_failed" => Status::ReceiveFailed,
            "hook_failed" => Status::HookFailed,
            _ => Status::HookInterrupted,
        }
    }

    /// Nothing more will happen to a transfer in this state without an operator.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Sent
                | Status::SendFailed
                | Status::Received
                | Status::ReceiveFailed
                | Status::HookFailed
                | Status::HookInterrupted
        )
    }
}

/// One transfer as seen from one side, toward one peer.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub direction: Direction,
    pub transfer_id: String,
    /// The other node: the receiver when sending, the sender when receiving.
    pub peer: String,
    pub file_id: String,
    pub file_name: String,
    pub size: u64,
    pub sha256: Option<String>,
    pub chunk_size: u64,
    pub status: Status,
    pub error_code: Option<String>,
    pub error: Option<String>,
    /// Sending: the spooled file. Receiving: where the file was placed.
    pub path: Option<String>,
    /// Sending: where the receiver placed it, from the receipt.
    pub remote_path: Option<String>,
    /// Sending: the receiver's hook exit code, from the receipt.
    pub remote_hook_exit: Option<i32>,
    pub meta: std::collections::BTreeMap<String, String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub hook_exit: Option<i32>,
    pub hook_ms: Option<u64>,
    pub hook_tail: Option<String>,
    /// Receiving: the receipt has been confirmed by the broker.
    pub receipt_sent: bool,
    /// Sending: the receipt said the file was placed.
    pub delivered: bool,
    /// Receiving: inode of the file placed under the inbox name, recorded
    /// before the rename so that recovery can tell whether it happened.
    pub inode: Option<u64>,
    /// The failure hooks were started (they run at most once).
    pub failure_hook: bool,
    /// Sending: bytes the broker has confirmed so far.
    pub progress: u64,
}

impl Row {
    /// A new transfer row: what is known when a transfer begins, the rest empty.
    pub fn begin(
        direction: Direction,
        transfer_id: &str,
        peer: &str,
        file_id: &str,
        file_name: &str,
        (size, chunk_size): (u64, u64),
        status: Status,
    ) -> Row {
        Row {
            direction,
            transfer_id: transfer_id.to_string(),
            peer: peer.to_string(),
            file_id: file_id.to_string(),
            file_name: file_name.to_string(),
            size,
            sha256: None,
            chunk_size,
            status,
            error_code: None,
            error: None,
            path: None,
            remote_path: None,
            remote_hook_exit: None,
            meta: Default::default(),
            started_at: crate::clock::now_rfc3339(),
            finished_at: None,
            hook_exit: None,
            hook_ms: None,
            hook_tail: None,
            receipt_sent: false,
            delivered: false,
            inode: None,
            failure_hook: false,
            progress: 0,
        }
    }
}

/// How a transfer's hooks ended, as history records it.
#[derive(Debug, Clone, Copy)]
pub struct HookRecord<'a> {
    /// The exit code; `None` when killed by a signal or never started.
    pub exit: Option<i32>,
    pub ms: u64,
    /// The end of what the hook printed.
    pub tail: &'a str,
}

const COLUMNS: &str = "direction, transfer_id, peer, file_id, file_name, size, sha256, chunk_size, \
     status, error_code, error, path, remote_path, remote_hook_exit, meta, started_at, finished_at, \
     hook_exit, hook_ms, hook_tail, receipt_sent, delivered, inode, failure_hook, progress";

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let dir: String = r.get(0)?;
    let meta: String = r.get(14)?;
    Ok(Row {
        direction: if dir == "send" {
            Direction::Send
        } else {
            Direction::Receive
        },
        transfer_id: r.get(1)?,
        peer: r.get(2)?,
        file_id: r.get(3)?,
        file_name: r.get(4)?,
        size: r.get::<_, i64>(5)? as u64,
        sha256: r.get(6)?,
        chunk_size: r.get::<_, i64>(7)? as u64,
        status: Status::parse(&r.get::<_, String>(8)?),
        error_code: r.get(9)?,
        error: r.get(10)?,
        path: r.get(11)?,
        remote_path: r.get(12)?,
        remote_hook_exit: r.get(13)?,
        meta: serde_json::from_str(&meta).unwrap_or_default(),
        started_at: r.get(15)?,
        finished_at: r.get(16)?,
        hook_exit: r.get(17)?,
        hook_ms: r.get::<_, Option<i64>>(18)?.map(|v| v as u64),
        hook_tail: r.get(19)?,
        receipt_sent: r.get(20)?,
        delivered: r.get(21)?,
        inode: r.get::<_, Option<i64>>(22)?.map(|v| v as u64),
        failure_hook: r.get(23)?,
        progress: r.get::<_, i64>(24)? as u64,
    })
}

/// Statements through SQLite's statement cache: the agent runs the same few
/// statements over and over, and parsing them cost more than running them.
trait Cached {
    fn run<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn one<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T>;
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
}

/// One `INSERT OR IGNORE` of a transfer row; 1 when it was new.
fn insert_row(db: &Connection, row: &Row) -> rusqlite::Result<usize> {
    db.run(
        "INSERT OR IGNORE INTO transfers (direction, transfer_id, peer, file_id, file_name, size,
            sha256, chunk_size, status, error_code, error, path, meta, started_at, finished_at, touched_at, seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
            (SELECT IFNULL(MAX(seq), 0) + 1 FROM transfers))",
        params![
            row.direction.as_str(),
            row.transfer_id,
            row.peer,
            row.file_id,
            row.file_name,
            row.size as i64,
            row.sha256,
            row.chunk_size as i64,
            row.status.as_str(),
            row.error_code,
            row.error,
            row.path,
            serde_json::to_string(&row.meta).unwrap_or_else(|_| "{}".into()),
            row.started_at,
            row.finished_at,
            unix_now(),
        ],
    )
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A handle on the state database, cheap to clone.
///
/// Group commit: statements commit with `synchronous = NORMAL` (into the
/// WAL, not yet on disk), and every use of the connection ends, once the
/// connection is released, by waiting until everything committed so far is
/// flushed ([`Flush`]). So each call returns only once what it wrote, and
/// what it read, is durable, as with `synchronous = FULL`; but callers that
/// arrive together share one fdatasync instead of paying one each.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    flush: Arc<Flush>,
    /// False for a [`Store::deferred`] handle.
    wait: bool,
}

/// The WAL's group flush. `changed` is SQLite's running count of changed rows
/// on the connection (`total_changes`), published after every use; `flushed`
/// the count the last completed fdatasync of the WAL file covered.
struct Flush {
    wal: PathBuf,
    changed: AtomicU64,
    state: Mutex<FlushState>,
    done: Condvar,
}

struct FlushState {
    flushed: u64,
    flushing: bool,
    /// Our own descriptor on the WAL file (the agent's connection keeps the
    /// WAL alive; reopened if its inode ever changes).
    file: Option<File>,
}

impl Flush {
    /// Returns once every change counted up to now is on disk. One caller
    /// flushes; those arriving meanwhile wait and are usually covered by it.
    fn wait(&self) -> std::io::Result<()> {
        let target = self.changed.load(Ordering::SeqCst);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if st.flushed >= target {
                return Ok(());
            }
            if !st.flushing {
                break;
            }
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        // Everything counted before this load has been written to the WAL.
        let covers = self.changed.load(Ordering::SeqCst);
        st.flushing = true;
        let mut file = st.file.take();
        drop(st);
        let result = self.sync(&mut file);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.flushing = false;
        st.file = file;
        if result.is_ok() {
            st.flushed = st.flushed.max(covers);
        }
        self.done.notify_all();
        result
    }

    fn sync(&self, file: &mut Option<File>) -> std::io::Result<()> {
        let ino = std::fs::metadata(&self.wal)?.ino();
        if file
            .as_ref()
            .map(|f| f.metadata().map(|m| m.ino()))
            .transpose()?
            != Some(ino)
        {
            *file = Some(File::open(&self.wal)?);
        }
        file.as_ref().map_or(Ok(()), File::sync_data)
    }
}

/// The connection, locked; on release it publishes the change count and
/// waits for the group flush (outside the lock, so others keep committing).
struct Db<'a> {
    guard: Option<MutexGuard<'a, Connection>>,
    flush: &'a Flush,
    wait: bool,
}

impl std::ops::Deref for Db<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.guard.as_deref().expect("connection held until drop")
    }
}

impl std::ops::DerefMut for Db<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.guard
            .as_deref_mut()
            .expect("connection held until drop")
    }
}

impl Drop for Db<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.guard.take() {
            self.flush
                .changed
                .fetch_max(conn.total_changes(), Ordering::SeqCst);
        }
        if !self.wait || std::thread::panicking() {
            return;
        }
        if let Err(e) = blocking(|| self.flush.wait()) {
            // After a failed fdatasync the kernel may have dropped the dirty
            // pages: nothing this process believes committed can be trusted.
            // Stop, as databases do; SQLite recovers the WAL at the next start.
            tracing::error!(message = "Cannot flush the state database to disk; stopping. Check the disk, then start the agent again.",
                wal = %self.flush.wal.display(), error = %e, error_code = "state_db_flush_failed");
            std::process::exit(70);
        }
    }
}

/// Runs a blocking wait; on a multi-threaded runtime's worker, tells tokio
/// first, so the worker's other tasks move on meanwhile.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        // Status changes are the exactly-once ledger: the schema commits with
        // FULL, everything after with NORMAL plus the group flush (see Store).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // The schema's version, for migrations when it changes.
        conn.pragma_update(None, "user_version", 1)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS transfers (
                direction TEXT NOT NULL, transfer_id TEXT NOT NULL, peer TEXT NOT NULL,
                file_id TEXT NOT NULL, file_name TEXT NOT NULL, size INTEGER NOT NULL,
                sha256 TEXT, chunk_size INTEGER NOT NULL, status TEXT NOT NULL,
                error_code TEXT, error TEXT, path TEXT, remote_path TEXT, remote_hook_exit INTEGER,
                meta TEXT NOT NULL DEFAULT '{}', started_at TEXT NOT NULL, finished_at TEXT,
                hook_exit INTEGER, hook_ms INTEGER, hook_tail TEXT,
                receipt_sent INTEGER NOT NULL DEFAULT 0,
                delivered INTEGER NOT NULL DEFAULT 0, inode INTEGER,
                failure_hook INTEGER NOT NULL DEFAULT 0,
                progress INTEGER NOT NULL DEFAULT 0,
                chunks_have INTEGER NOT NULL DEFAULT 0,
                touched_at INTEGER NOT NULL DEFAULT 0,
                seq INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (direction, transfer_id, peer));
             CREATE INDEX IF NOT EXISTS transfers_status ON transfers(status);
             CREATE INDEX IF NOT EXISTS transfers_seq ON transfers(seq);
             CREATE TABLE IF NOT EXISTS chunks (
                transfer_id TEXT NOT NULL, idx INTEGER NOT NULL,
                PRIMARY KEY (transfer_id, idx)) WITHOUT ROWID;",
        )?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.set_prepared_statement_cache_capacity(64);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let flush = Flush {
            wal: PathBuf::from(wal),
            changed: AtomicU64::new(conn.total_changes()),
            state: Mutex::new(FlushState {
                flushed: conn.total_changes(),
                flushing: false,
                file: None,
            }),
            done: Condvar::new(),
        };
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            flush: Arc::new(flush),
            wait: true,
        })
    }

    /// A handle whose calls return before what they wrote is on disk: for
    /// steps whose only outside effect comes after a later waiting call (on
    /// any handle), which flushes them too. A receiver's chunk bookkeeping,
    /// for one, needs to be durable only by the time the chunk is acked.
    pub fn deferred(&self) -> Store {
        Store {
            wait: false,
            ..self.clone()
        }
    }

    fn db(&self) -> Db<'_> {
        // A panic while holding the lock cannot leave SQLite inconsistent.
        Db {
            guard: Some(self.conn.lock().unwrap_or_else(|p| p.into_inner())),
            flush: &self.flush,
            wait: self.wait,
        }
    }

    /// Records new transfer rows in one transaction; existing rows are left
    /// as they are.
    pub fn insert_all(&self, rows: &[Row]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for row in rows {
            insert_row(&tx, row)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a new transfer row; an existing row is left as it is.
    pub fn insert(&self, row: &Row) -> Result<bool> {
        Ok(insert_row(&self.db(), row)? == 1)
    }

    pub fn get(&self, dir: Direction, transfer_id: &str, peer: &str) -> Result<Option<Row>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3"
        );
        Ok(self
            .db()
            .one(&sql, params![dir.as_str(), transfer_id, peer], row_from)
            .optional()?)
    }

    /// Every row of one transfer on one side (one per peer when multicast).
    pub fn rows_of(&self, dir: Direction, transfer_id: &str) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND transfer_id = ?2 ORDER BY peer"
        );
        let db = self.db();
        let mut stmt = db.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![dir.as_str(), transfer_id], row_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Any row with this transfer id received, whatever its sender.
    pub fn received(&self, transfer_id: &str) -> Result<Option<Row>> {
        Ok(self
            .rows_of(Direction::Receive, transfer_id)?
            .into_iter()
            .next())
    }

    /// Rows not yet in a final state, or received rows whose receipt is unsent.
    pub fn unfinished(&self) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM transfers WHERE status IN ({})
               OR (direction = 'receive' AND receipt_sent = 0) ORDER BY seq",
            Status::sql_list(false)
        );
        let db = self.db();
        let mut stmt = db.prepare_cached(&sql)?;
        let rows = stmt.query_map([], row_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn set_status(
        &self,
        dir: Direction,
        transfer_id: &str,
        peer: &str,
        status: Status,
    ) -> Result<()> {
        let finished = status.is_final().then(crate::clock::now_rfc3339);
        self.db().run(
            "UPDATE transfers SET status = ?4, finished_at = IFNULL(?5, finished_at)
             WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3",
            params![dir.as_str(), transfer_id, peer, status.as_str(), finished],
        )?;
        Ok(())
    }

    /// Moves from `from` to `to`; false when the row was no longer in `from`.
    pub fn advance(
        &self,
        dir: Direction,
        transfer_id: &str,
        peer: &str,
        from: Status,
        to: Status,
    ) -> Result<bool> {
        let finished = to.is_final().then(crate::clock::now_rfc3339);
        let n = self.db().run(
            "UPDATE transfers SET status = ?5, finished_at = IFNULL(?6, finished_at)
             WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND status = ?4",
            params![
                dir.as_str(),
                transfer_id,
                peer,
                from.as_str(),
                to.as_str(),
                finished
            ],
        )?;
        Ok(n == 1)
    }

    /// Rows in `status` on one side, oldest first.
    pub fn in_status(&self, dir: Direction, status: Status) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND status = ?2 ORDER BY seq"
        );
        let db = self.db();
        let mut stmt = db.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![dir.as_str(), status.as_str()], row_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete(&self, dir: Direction, transfer_id: &str) -> Result<()> {
        self.db().run(
            "DELETE FROM transfers WHERE direction = ?1 AND transfer_id = ?2",
            params![dir.as_str(), transfer_id],
        )?;
        Ok(())
    }

    /// Records the inode that will carry the inbox name `target`, and moves
    /// a received transfer to `placing`, before the step that makes the name
    /// visible: recovery then tells placed from not placed by the inode.
    pub fn placing(&self, transfer_id: &str, peer: &str, target: &str, inode: u64) -> Result<()> {
        self.placing_all(&[(transfer_id, peer, target, inode)])
    }

    /// [`Store::placing`] for several transfers, in one transaction.
    pub fn placing_all(&self, placements: &[(&str, &str, &str, u64)]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for (transfer_id, peer, target, inode) in placements {
            tx.run(
                "UPDATE transfers SET path = ?3, inode = ?4,
                    status = CASE status WHEN 'receiving' THEN 'placing' ELSE status END
                 WHERE direction = 'receive' AND transfer_id = ?1 AND peer = ?2",
                params![transfer_id, peer, target, *inode as i64],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The file is in place: forgets its chunk rows and moves the transfer
    /// from `placing` to `next` (its success hooks, or `received` when it has
    /// none), in one transaction.
    pub fn placed(&self, transfer_id: &str, peer: &str, next: Status) -> Result<()> {
        self.placed_all(&[(transfer_id, peer, next)])
    }

    /// [`Store::placed`] for several transfers, in one transaction.
    pub fn placed_all(&self, placed: &[(&str, &str, Status)]) -> Result<()> {
        let mut db = self.db();
        let tx = db.transaction()?;
        for (transfer_id, peer, next) in placed {
            let finished = next.is_final().then(crate::clock::now_rfc3339);
            tx.run(
                "DELETE FROM chunks WHERE transfer_id = ?1",
                params![transfer_id],
            )?;
            tx.run(
                "UPDATE transfers SET status = ?3, finished_at = IFNULL(?4, finished_at)
                 WHERE direction = 'receive' AND transfer_id = ?1 AND peer = ?2 AND status = 'placing'",
                params![transfer_id, peer, next.as_str(), finished],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records how many bytes of a transfer the broker has confirmed.
    pub fn set_progress(&self, transfer_id: &str, peer: &str, bytes: u64) -> Result<()> {
        self.db().run(
            "UPDATE transfers SET progress = ?3 WHERE direction = 'send' AND transfer_id = ?1 AND peer = ?2",
            params![transfer_id, peer, bytes as i64],
        )?;
        Ok(())
    }

    /// Forgets a placement that did not happen (the name belongs to someone else).
    pub fn clear_placement(&self, transfer_id: &str, peer: &str) -> Result<()> {
        self.db().run(
            "UPDATE transfers SET path = NULL, inode = NULL WHERE direction = 'receive' AND transfer_id = ?1 AND peer = ?2",
            params![transfer_id, peer],
        )?;
        Ok(())
    }

    /// Claims the one run of a transfer's failure hooks; false if already claimed.
    pub fn claim_failure_hook(
        &self,
        dir: Direction,
        transfer_id: &str,
        peer: &str,
    ) -> Result<bool> {
        let n = self.db().run(
            "UPDATE transfers SET failure_hook = 1
             WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND failure_hook = 0",
            params![dir.as_str(), transfer_id, peer],
        )?;
        Ok(n == 1)
    }

    /// Moves to a failed state with a stable code and a sentence.
    pub fn fail(
        &self,
        dir: Direction,
        transfer_id: &str,
        peer: &str,
        status: Status,
        code: &str,
        error: &str,
    ) -> Result<()> {
        // A final status stands: the first reason a transfer failed (or the
        // fact that it succeeded) is never overwritten by a later one.
        let sql = format!(
            "UPDATE transfers SET status = ?4, error_code = ?5, error = ?6, finished_at = ?7
             WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND status NOT IN ({})",
            Status::sql_list(true)
        );
        self.db().run(
            &sql,
            params![
                dir.as_str(),
                transfer_id,
                peer,
                status.as_str(),
                code,
                error,
                crate::clock::now_rfc3339()
            ],
        )?;
        Ok(())
    }

    pub fn set_path(
        &self,
        dir: Direction,
        transfer_id: &str,
        peer: &str,
        path: &str,
    ) -> Result<()> {
        self.db().run(
            "UPDATE transfers SET path = ?4 WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3",
            params![dir.as_str(), transfer_id, peer, path],
        )?;
        Ok(())
    }

    /// Records the trailer of a received transfer: the digest, metadata and start time.
    pub fn set_trailer(
        &self,
        transfer_id: &str,
        peer: &str,
        sha256: &str,
        started_at: &str,
        meta: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        self.db().run(
            "UPDATE transfers SET sha256 = ?3, started_at = ?4, meta = ?5
             WHERE direction = 'receive' AND transfer_id = ?1 AND peer = ?2",
            params![
                transfer_id,
                peer,
                sha256,
                started_at,
                serde_json::to_string(meta).unwrap_or_else(|_| "{}".into())
            ],
        )?;
        Ok(())
    }

    /// Every chunk of a sent transfer is confirmed: records its digest and
    /// moves it from `sending` to `awaiting_receipt`.
    pub fn set_published(&self, transfer_id: &str, peer: &str, sha256: &str) -> Result<()> {
        self.db().run(
            "UPDATE transfers SET sha256 = ?3, progress = size, status = 'awaiting_receipt'
             WHERE direction = 'send' AND transfer_id = ?1 AND peer = ?2 AND status = 'sending'",
            params![transfer_id, peer, sha256],
        )?;
        Ok(())
    }

    pub fn set_hook(
        &self,
        dir: Direction,
        transfer_id: &str,
        peer: &str,
        hook: &HookRecord<'_>,
    ) -> Result<()> {
        self.db().run(
            "UPDATE transfers SET hook_exit = ?4, hook_ms = ?5, hook_tail = ?6
             WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3",
            params![
                dir.as_str(),
                transfer_id,
                peer,
                hook.exit,
                hook.ms as i64,
                hook.tail
            ],
        )?;
        Ok(())
    }

    /// Records how a transfer's hooks ended and moves it from `hook_running`
    /// to its final `status` (with the failure's code and sentence, if any),
    /// in one statement.
    pub fn finish_hooks(
        &self,
        dir: Direction,
        transfer_id: &str,
        peer: &str,
        hook: &HookRecord<'_>,
        status: Status,
        error: Option<(&str, &str)>,
    ) -> Result<()> {
        let (code, message) = error.unzip();
        self.db().run(
            "UPDATE transfers SET hook_exit = ?4, hook_ms = ?5, hook_tail = ?6, status = ?7,
                error_code = IFNULL(?8, error_code), error = IFNULL(?9, error), finished_at = ?10
             WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND status = 'hook_running'",
            params![
                dir.as_str(),
                transfer_id,
                peer,
                hook.exit,
                hook.ms as i64,
                hook.tail,
                status.as_str(),
                code,
                message,
                crate::clock::now_rfc3339()
            ],
        )?;
        Ok(())
    }

    /// Records a receipt on the sending side. Returns false when no such
    /// transfer waits for one (a duplicate, or a receipt naming another
    /// transfer or file id).
    /// The row moves to `next`: `hook_running` when the sender's hooks come
    /// next, else straight to its final status.
    pub fn record_receipt(&self, r: &crate::wire::Receipt, next: Status) -> Result<bool> {
        let finished = next.is_final().then(crate::clock::now_rfc3339);
        let n = self.db().run(
            "UPDATE transfers SET remote_path = ?3, remote_hook_exit = ?4, error_code = ?5, error = ?6,
                delivered = ?7, status = ?8, finished_at = IFNULL(?9, finished_at)
             WHERE direction = 'send' AND transfer_id = ?1 AND peer = ?2 AND file_id = ?10
               AND status IN ('sending', 'awaiting_receipt')",
            params![
                r.transfer_id,
                r.from,
                r.path,
                r.hook_exit,
                r.error_code,
                r.error,
                r.ok,
                next.as_str(),
                finished,
                r.file_id
            ],
        )?;
        Ok(n == 1)
    }

    pub fn set_receipt_sent(&self, transfer_id: &str, peer: &str) -> Result<()> {
        self.db().run(
            "UPDATE transfers SET receipt_sent = 1 WHERE direction = 'receive' AND transfer_id = ?1 AND peer = ?2",
            params![transfer_id, peer],
        )?;
        Ok(())
    }

    /// Records chunks that are on disk, in one transaction (one fsync for the
    /// batch); returns, per chunk, how many distinct chunks its transfer has
    /// and whether its digest (the trailer) is known. The chunk rows and the
    /// counters move together, so a crash cannot leave a transfer one chunk
    /// short forever.
    pub fn add_chunks(&self, chunks: &[(&str, u64)]) -> Result<Vec<(u64, bool)>> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let now = unix_now();
        let mut have = Vec::with_capacity(chunks.len());
        for (transfer_id, idx) in chunks {
            // Only while the transfer is receiving: a chunk committed after
            // its transfer failed (or ended) leaves no row behind.
            let inserted = tx.run(
                "INSERT OR IGNORE INTO chunks (transfer_id, idx)
                 SELECT ?1, ?2 WHERE EXISTS (SELECT 1 FROM transfers
                    WHERE direction = 'receive' AND transfer_id = ?1 AND status = 'receiving')",
                params![transfer_id, *idx as i64],
            )?;
            tx.run(
                "UPDATE transfers SET chunks_have = chunks_have + ?2, touched_at = ?3
                 WHERE direction = 'receive' AND transfer_id = ?1",
                params![transfer_id, inserted as i64, now],
            )?;
            let (n, digest): (i64, bool) = tx.one(
                "SELECT chunks_have, sha256 IS NOT NULL FROM transfers
                 WHERE direction = 'receive' AND transfer_id = ?1",
                params![transfer_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            have.push((n as u64, digest));
        }
        tx.commit()?;
        Ok(have)
    }

    /// Receiving transfers of `file_id` that no chunk has touched for `idle`.
    pub fn stale_receiving(&self, file_id: &str, idle: std::time::Duration) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM transfers WHERE direction = 'receive' AND status = 'receiving'
               AND file_id = ?1 AND touched_at < ?2 ORDER BY seq"
        );
        let before = unix_now() - idle.as_secs() as i64;
        let db = self.db();
        let mut stmt = db.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![file_id, before], row_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn chunk_count(&self, transfer_id: &str) -> Result<u64> {
        let n: i64 = self.db().one(
            "SELECT COUNT(*) FROM chunks WHERE transfer_id = ?1",
            params![transfer_id],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    pub fn forget_chunks(&self, transfer_id: &str) -> Result<()> {
        self.db().run(
            "DELETE FROM chunks WHERE transfer_id = ?1",
            params![transfer_id],
        )?;
        Ok(())
    }

    /// The latest transfers, newest first.
    pub fn history(&self, limit: usize) -> Result<Vec<Row>> {
        let sql = format!("SELECT {COLUMNS} FROM transfers ORDER BY seq DESC LIMIT ?1");
        let db = self.db();
        let mut stmt = db.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![limit as i64], row_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every row with this transfer id, both directions.
    pub fn find(&self, transfer_id: &str) -> Result<Vec<Row>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM transfers WHERE transfer_id = ?1 ORDER BY direction, peer"
        );
        let db = self.db();
        let mut stmt = db.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![transfer_id], row_from)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_is_listed_once_as_final_or_not() {
        let (done, open) = (Status::sql_list(true), Status::sql_list(false));
        assert!(done.contains("'hook_interrupted'") && open.contains("'queued'"));
        assert_eq!(done.split(", ").count() + open.split(", ").count(), 12);
    }

    #[test]
    fn a_final_status_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let row = Row::begin(
            Direction::Receive,
            "t1",
            "alpha",
            "sales",
            "a.csv",
            (10, 10),
            Status::Receiving,
        );
        assert!(store.insert(&row).unwrap());
        let (rx, code) = (Direction::Receive, "digest_mismatch");
        store
            .fail(rx, "t1", "alpha", Status::ReceiveFailed, code, "first")
            .unwrap();
        // A later chunk of the same transfer fails it again for another reason.
        store
            .fail(
                rx,
                "t1",
                "alpha",
                Status::ReceiveFailed,
                "inconsistent_chunk",
                "second",
            )
            .unwrap();
        let got = store.received("t1").unwrap().unwrap();
        assert_eq!(got.status, Status::ReceiveFailed);
        assert_eq!(got.error_code.as_deref(), Some(code));
        assert_eq!(got.error.as_deref(), Some("first"));
    }

    #[test]
    fn a_received_transfer_moves_through_placing_to_its_hooks_in_few_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let rx = Direction::Receive;
        let row = Row::begin(
            rx,
            "t1",
            "alpha",
            "sales",
            "a.csv",
            (10, 10),
            Status::Receiving,
        );
        store.insert(&row).unwrap();
        assert_eq!(store.add_chunks(&[("t1", 0)]).unwrap(), vec![(1, false)]);
        // The inode is recorded with `placing`, before the name appears.
        store.placing("t1", "alpha", "/in/a.csv", 42).unwrap();
        let got = store.received("t1").unwrap().unwrap();
        assert_eq!((got.status, got.inode), (Status::Placing, Some(42)));
        // Placed: the chunk rows go and the hooks are next, together.
        store.placed("t1", "alpha", Status::HookRunning).unwrap();
        assert_eq!(store.chunk_count("t1").unwrap(), 0);
        assert_eq!(
            store.received("t1").unwrap().unwrap().status,
            Status::HookRunning
        );
        let hook = HookRecord {
            exit: Some(3),
            ms: 5,
            tail: "boom",
        };
        let failed = Some(("hook_failed", "hook x exited with code 3"));
        store
            .finish_hooks(rx, "t1", "alpha", &hook, Status::HookFailed, failed)
            .unwrap();
        // Only a running hook finishes: a second report changes nothing.
        let ok = HookRecord {
            exit: Some(0),
            ms: 1,
            tail: "",
        };
        store
            .finish_hooks(rx, "t1", "alpha", &ok, Status::Received, None)
            .unwrap();
        let got = store.received("t1").unwrap().unwrap();
        assert_eq!(got.status, Status::HookFailed);
        assert_eq!(
            (got.hook_exit, got.hook_tail.as_deref()),
            (Some(3), Some("boom"))
        );
        assert_eq!(got.error_code.as_deref(), Some("hook_failed"));
        assert!(got.finished_at.is_some());
    }

    #[test]
    fn a_receipt_settles_only_its_own_transfer_and_file_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let tx = Direction::Send;
        let row = Row::begin(
            tx,
            "t1",
            "beta",
            "sales",
            "a.csv",
            (10, 10),
            Status::Sending,
        );
        store.insert(&row).unwrap();
        let mut receipt = crate::wire::Receipt {
            transfer_id: "t1".into(),
            file_id: "orders".into(),
            from: "beta".into(),
            to: "alpha".into(),
            ok: true,
            error_code: None,
            error: None,
            path: Some("/in/a.csv".into()),
            hook_exit: Some(0),
            finished_at: "2026-11-25T00:00:00Z".into(),
        };
        assert!(!store.record_receipt(&receipt, Status::Sent).unwrap());
        receipt.file_id = "sales".into();
        // No sender hooks: the receipt ends the transfer.
        assert!(store.record_receipt(&receipt, Status::Sent).unwrap());
        let got = store.get(tx, "t1", "beta").unwrap().unwrap();
        assert_eq!(got.status, Status::Sent);
        assert!(got.delivered && got.finished_at.is_some());
        // A duplicate is recognised as one.
        assert!(!store.record_receipt(&receipt, Status::Sent).unwrap());
    }
}
