//! The statements both ledgers make alike: a new row, a status change, a
//! failure, the record of a hook run. Each takes the side it acts on; the
//! ledgers (`send_ledger.rs`, `receive_ledger.rs`) call them with theirs,
//! and offer the calls that need nothing else through [`Side`].

use rusqlite::{Connection, params};

use super::row::{Direction, HookRun, Status, Transfer};
use super::{Cached, Call, Store, unix_now};
use crate::domain::{NodeName, TransferId};
use crate::error_code::ErrorCode;

/// One `INSERT OR IGNORE` of a transfer row; true when it was new. `path`
/// is the spooled file on the sending side, nothing on the receiving side.
pub fn insert(
    db: &Connection,
    dir: Direction,
    t: &Transfer,
    path: Option<&str>,
) -> rusqlite::Result<bool> {
    let n = db.run(
        "INSERT OR IGNORE INTO transfers (direction, transfer_id, peer, file_id, file_name, size,
            sha256, chunk_size, status, error_code, error, path, meta, started_at, finished_at, touched_at,
            attempt, seq, request_id, placed_sha256, records, parent_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
            (SELECT IFNULL(MAX(seq), 0) + 1 FROM transfers), ?18, ?19, ?20, ?21)",
        params![
            dir,
            t.transfer_id,
            t.peer,
            t.file_id,
            t.file_name,
            t.size as i64,
            t.sha256,
            t.chunk_size as i64,
            t.status,
            t.error_code,
            t.error,
            path,
            t.meta_json(),
            t.started_at,
            t.finished_at,
            unix_now(),
            t.attempt,
            t.request_id,
            t.placed_sha256,
            t.records.map(|r| r as i64),
            t.parent_id,
        ],
    )?;
    Ok(n == 1)
}

/// Moves from `from` to `to`; false when the row was no longer in `from`.
pub fn advance(
    db: &Connection,
    dir: Direction,
    (tid, peer): (&TransferId, &NodeName),
    from: Status,
    to: Status,
) -> rusqlite::Result<bool> {
    let finished = to.is_final().then(crate::clock::now_rfc3339);
    let n = db.run(
        "UPDATE transfers SET status = ?5, finished_at = IFNULL(?6, finished_at)
         WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND status = ?4",
        params![dir, tid, peer, from, to, finished],
    )?;
    Ok(n == 1)
}

/// Moves to the failed `status` with a stable code and a sentence, unless
/// the row is final already: the first reason a transfer failed (or the
/// fact that it succeeded) is never overwritten by a later one.
pub fn fail(
    db: &Connection,
    dir: Direction,
    (tid, peer): (&TransferId, &NodeName),
    status: Status,
    (code, error): (ErrorCode, &str),
) -> rusqlite::Result<()> {
    db.run(
        "UPDATE transfers SET status = ?4, error_code = ?5, error = ?6, finished_at = ?7
         WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3
           AND status NOT IN (SELECT value FROM json_each(?8))",
        params![
            dir,
            tid,
            peer,
            status,
            code.as_str(),
            error,
            crate::clock::now_rfc3339(),
            Status::set(true)
        ],
    )?;
    Ok(())
}

/// Records how a hook run ended, leaving the status as it is.
pub fn set_hook(
    db: &Connection,
    dir: Direction,
    (tid, peer): (&TransferId, &NodeName),
    hook: &HookRun,
) -> rusqlite::Result<()> {
    db.run(
        "UPDATE transfers SET hook_exit = ?4, hook_ms = ?5, hook_tail = ?6, hook_attempts = ?7
         WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3",
        params![
            dir,
            tid,
            peer,
            hook.exit,
            hook.ms as i64,
            hook.tail,
            hook.attempts
        ],
    )?;
    Ok(())
}

/// Records how a transfer's hook ended and moves it from `hook_running` to
/// its final `status` (with the failure's code and sentence, if any; a
/// success, `sent` or `received`, clears an earlier one), in one
/// statement. False when the row was not in `hook_running`.
pub fn finish_hook(
    db: &Connection,
    dir: Direction,
    (tid, peer): (&TransferId, &NodeName),
    hook: &HookRun,
    status: Status,
    error: Option<(ErrorCode, &str)>,
) -> rusqlite::Result<bool> {
    let (code, message) = error.map(|(c, m)| (c.as_str(), m)).unzip();
    let success = matches!(status, Status::Sent | Status::Received);
    let n = db.run(
        "UPDATE transfers SET hook_exit = ?4, hook_ms = ?5, hook_tail = ?6, status = ?7,
            hook_attempts = ?13,
            error_code = CASE WHEN ?12 THEN NULL ELSE IFNULL(?8, error_code) END,
            error = CASE WHEN ?12 THEN NULL ELSE IFNULL(?9, error) END, finished_at = ?10
         WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND status = ?11",
        params![
            dir,
            tid,
            peer,
            hook.exit,
            hook.ms as i64,
            hook.tail,
            status,
            code,
            message,
            crate::clock::now_rfc3339(),
            Status::HookRunning,
            success,
            hook.attempts
        ],
    )?;
    Ok(n == 1)
}

/// Claims the one run of a transfer's failure hook; false if already claimed.
pub fn claim_failure_hook(
    db: &Connection,
    dir: Direction,
    (tid, peer): (&TransferId, &NodeName),
) -> rusqlite::Result<bool> {
    let n = db.run(
        "UPDATE transfers SET failure_hook = 1
         WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND failure_hook = 0",
        params![dir, tid, peer],
    )?;
    Ok(n == 1)
}

/// Rows of one side that are not final, oldest first; on the receiving
/// side also those whose receipt is not yet sent.
pub fn unfinished<T>(
    db: &Connection,
    dir: Direction,
    read: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    db.all(
        &format!(
            "SELECT {} FROM transfers WHERE direction = ?1
               AND (status IN (SELECT value FROM json_each(?2))
                    OR (direction = ?3 AND receipt_sent = 0))
             ORDER BY seq",
            super::COLUMNS
        ),
        params![dir, Status::set(false), Direction::Receive],
        read,
    )
}

type Key<'a> = (&'a TransferId, &'a NodeName);

/// The calls both ledgers make alike, bound to one side (each ledger
/// dereferences to its own).
#[derive(Clone)]
pub struct Side {
    store: Store,
    dir: Direction,
}

impl Side {
    pub(super) fn new(store: Store, dir: Direction) -> Side {
        Side { store, dir }
    }

    /// Moves from `from` to `to`; false when the row was no longer in `from`.
    pub fn advance(&self, (tid, peer): Key<'_>, from: Status, to: Status) -> Call<bool> {
        let (dir, tid, peer) = (self.dir, tid.clone(), peer.clone());
        self.store
            .call(move |db| advance(db, dir, (&tid, &peer), from, to))
    }

    /// See [`finish_hook`].
    pub fn finish_hook(
        &self,
        (tid, peer): Key<'_>,
        hook: HookRun,
        status: Status,
        error: Option<(ErrorCode, String)>,
    ) -> Call<bool> {
        let (dir, tid, peer) = (self.dir, tid.clone(), peer.clone());
        self.store.call(move |db| {
            let error = error.as_ref().map(|(c, m)| (*c, m.as_str()));
            finish_hook(db, dir, (&tid, &peer), &hook, status, error)
        })
    }

    /// Records a hook run without changing the status.
    pub fn set_hook(&self, (tid, peer): Key<'_>, hook: HookRun) -> Call<()> {
        let (dir, tid, peer) = (self.dir, tid.clone(), peer.clone());
        self.store
            .call(move |db| set_hook(db, dir, (&tid, &peer), &hook))
    }

    /// Claims the one run of the failure hook; false if claimed before.
    pub fn claim_failure_hook(&self, (tid, peer): Key<'_>) -> Call<bool> {
        let (dir, tid, peer) = (self.dir, tid.clone(), peer.clone());
        self.store
            .call(move |db| claim_failure_hook(db, dir, (&tid, &peer)))
    }
}

/// A ledger facade for one side: the store, and the [`Side`] it
/// dereferences to for the calls both sides make alike.
macro_rules! facade {
    ($name:ident, $dir:expr) => {
        #[derive(Clone)]
        pub struct $name {
            store: Store,
            side: super::ledger::Side,
        }

        impl std::ops::Deref for $name {
            type Target = super::ledger::Side;
            fn deref(&self) -> &super::ledger::Side {
                &self.side
            }
        }

        impl $name {
            pub(super) fn new(store: Store) -> Self {
                let side = super::ledger::Side::new(store.clone(), $dir);
                $name { store, side }
            }

            /// This ledger through a [`Store::deferred`] handle.
            pub fn deferred(&self) -> $name {
                $name::new(self.store.deferred())
            }
        }
    };
}
pub(super) use facade;
