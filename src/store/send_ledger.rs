//! The sending side's ledger: a row per claimed file and receiving node, the
//! bytes confirmed so far, the receipt's outcome. What the sender's stages
//! read and move.

use std::path::Path;
use std::time::Duration;

use rusqlite::{OptionalExtension, params};

use super::ledger;
use super::row::{Direction, SendRow, Status};
use super::{COLUMNS, Cached, Call, Store, unix_now};
use crate::domain::{FileId, NodeName, TransferId};
use crate::error_code::ErrorCode;
use crate::wire::Receipt;

const TX: Direction = Direction::Send;

/// Now in unix milliseconds, the unit of `retry_at`.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

ledger::facade!(SendLedger, TX);

impl SendLedger {
    /// Records new rows (a claimed file, one per receiving node) in one
    /// transaction; existing rows stay as they are.
    pub fn insert_all(&self, rows: Vec<SendRow>) -> Call<()> {
        self.store.call(move |db| {
            let tx = db.transaction()?;
            for row in &rows {
                let path = row.path.to_string_lossy();
                ledger::insert(&tx, TX, &row.transfer, Some(&path))?;
            }
            tx.commit()
        })
    }

    pub fn get(&self, (tid, peer): (&TransferId, &NodeName)) -> Call<Option<SendRow>> {
        let (tid, peer) = (tid.clone(), peer.clone());
        self.store.call(move |db| {
            db.one(
                &format!(
                    "SELECT {COLUMNS} FROM transfers
                     WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3"
                ),
                params![TX, tid, peer],
                SendRow::from_sql,
            )
            .optional()
        })
    }

    /// Every row of one transfer (one per receiving node).
    pub fn rows_of(&self, tid: &TransferId) -> Call<Vec<SendRow>> {
        let tid = tid.clone();
        self.store.call(move |db| {
            db.all(
                &format!(
                    "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND transfer_id = ?2
                     ORDER BY peer"
                ),
                params![TX, tid],
                SendRow::from_sql,
            )
        })
    }

    /// Rows in `status`, oldest first.
    pub fn in_status(&self, status: Status) -> Call<Vec<SendRow>> {
        self.store.call(move |db| {
            db.all(
                &format!(
                    "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND status = ?2
                     ORDER BY seq"
                ),
                params![TX, status],
                SendRow::from_sql,
            )
        })
    }

    /// Queued rows whose retry (if they are one) is due, oldest first, at
    /// most `limit` (the rest are read at the next poll).
    pub fn queued_due(&self, limit: usize) -> Call<Vec<SendRow>> {
        self.store.call(move |db| {
            db.all(
                &format!(
                    "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND status = ?2
                       AND (retry_at IS NULL OR retry_at <= ?3) ORDER BY seq LIMIT ?4"
                ),
                params![TX, Status::Queued, unix_ms(), limit as i64],
                SendRow::from_sql,
            )
        })
    }

    /// Rows waiting to be published (`sending`), oldest first, at most
    /// `limit`: those of `file_id`, or with `None`, those of no file id in
    /// `known` (a profile since taken out of the configuration). Through
    /// the partial index `transfers_to_publish` (its condition spelled out,
    /// not bound, so that SQLite can use it).
    pub fn to_publish(
        &self,
        file_id: Option<FileId>,
        known: Vec<FileId>,
        limit: usize,
    ) -> Call<Vec<SendRow>> {
        self.store.call(move |db| match file_id {
            Some(f) => db.all(
                &format!("SELECT {COLUMNS} FROM transfers {TO_PUBLISH}"),
                params![f, limit as i64],
                SendRow::from_sql,
            ),
            None => {
                let known = serde_json::to_string(&known).unwrap_or_else(|_| "[]".into());
                db.all(
                    &format!("SELECT {COLUMNS} FROM transfers {TO_PUBLISH_UNKNOWN}"),
                    params![known, limit as i64],
                    SendRow::from_sql,
                )
            }
        })
    }

    /// A failure receipt with a transient code, for try `r.attempt` of a
    /// transfer that may be tried `max` times: the row becomes the next
    /// try, `queued` until `retry_at` (unix milliseconds), with the receipt's
    /// code and sentence kept to show why, due `backoff` from now. False
    /// when the row is not waiting for this try's receipt, or the tries
    /// are used up.
    pub fn retry(&self, r: &Receipt, max: u32, backoff: Duration) -> Call<bool> {
        let r = r.clone();
        let retry_at = unix_ms().saturating_add(backoff.as_millis().min(i64::MAX as u128) as i64);
        self.store.call(move |db| {
            let n = db.run(
                "UPDATE transfers SET status = ?5, attempt = attempt + 1, retry_at = ?6,
                    error_code = ?7, error = ?8, progress = 0, remote_path = NULL,
                    remote_hook_exit = NULL, delivered = 0, receipt_timeout_at = NULL
                 WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND file_id = ?4
                   AND attempt = ?9 AND attempt < ?10 AND status IN (?11, ?12)",
                params![
                    TX,
                    r.transfer_id,
                    r.from,
                    r.file_id,
                    Status::Queued,
                    retry_at,
                    r.error_code,
                    r.error,
                    r.attempt,
                    max,
                    Status::Sending,
                    Status::AwaitingReceipt
                ],
            )?;
            Ok(n == 1)
        })
    }

    /// Rows not final, oldest first: all at once, so only for tests (the
    /// sender's recovery takes them by status, a window at a time).
    #[cfg(test)]
    pub fn unfinished(&self) -> Call<Vec<SendRow>> {
        self.store
            .call(|db| ledger::unfinished(db, TX, SendRow::from_sql))
    }

    /// Records how many bytes of a transfer the broker has confirmed.
    pub fn set_progress(&self, key: (&TransferId, &NodeName), bytes: u64) -> Call<()> {
        let (tid, peer) = (key.0.clone(), key.1.clone());
        self.store.call(move |db| {
            db.run(
                "UPDATE transfers SET progress = ?4
                 WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3",
                params![TX, tid, peer, bytes as i64],
            )?;
            Ok(())
        })
    }

    /// Every chunk of try `attempt` is confirmed: records the file's digest
    /// and the bytes published, and moves the transfer from `sending` to
    /// `awaiting_receipt` (unless it is on a later try by now).
    pub fn published(
        &self,
        key: (&TransferId, &NodeName),
        sha256: &str,
        (attempt, wire_bytes): (u32, u64),
    ) -> Call<()> {
        let (tid, peer, sha256) = (key.0.clone(), key.1.clone(), sha256.to_string());
        self.store.call(move |db| {
            db.run(
                "UPDATE transfers SET sha256 = ?4, progress = size, status = ?6,
                    wire_bytes = wire_bytes + ?8, touched_at = ?9
                 WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND status = ?5
                   AND attempt = ?7",
                params![
                    TX,
                    tid,
                    peer,
                    sha256,
                    Status::Sending,
                    Status::AwaitingReceipt,
                    attempt,
                    wire_bytes as i64,
                    unix_now()
                ],
            )?;
            Ok(())
        })
    }

    /// Fails a transfer (unless it is final already) with a code and a sentence.
    pub fn fail(
        &self,
        key: (&TransferId, &NodeName),
        status: Status,
        (code, error): (ErrorCode, &str),
    ) -> Call<()> {
        let (tid, peer, error) = (key.0.clone(), key.1.clone(), error.to_string());
        self.store
            .call(move |db| ledger::fail(db, TX, (&tid, &peer), status, (code, &error)))
    }

    /// Records a receipt. False when no such transfer waits for one (a
    /// duplicate, a receipt naming another transfer or file id, or one of
    /// an earlier try). The row
    /// moves to `next`: `hook_running` when the sender's hook comes next,
    /// else straight to its final status.
    pub fn record_receipt(&self, r: &Receipt, next: Status) -> Call<bool> {
        let r = r.clone();
        self.store.call(move |db| {
            let finished = next.is_final().then(crate::clock::now_rfc3339);
            let n = db.run(
                "UPDATE transfers SET remote_path = ?5, remote_hook_exit = ?6, error_code = ?7,
                    error = ?8, delivered = ?9, status = ?10, finished_at = IFNULL(?11, finished_at)
                 WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND file_id = ?4
                   AND status IN (?12, ?13) AND attempt = ?14",
                params![
                    TX,
                    r.transfer_id,
                    r.from,
                    r.file_id,
                    r.path,
                    r.hook_exit,
                    r.error_code,
                    r.error,
                    r.ok,
                    next,
                    finished,
                    Status::Sending,
                    Status::AwaitingReceipt,
                    r.attempt
                ],
            )?;
            Ok(n == 1)
        })
    }

    /// Records where `after_send` moved the file, on every row of the transfer.
    pub fn moved(&self, tid: &TransferId, to: &Path) -> Call<()> {
        let (tid, to) = (tid.clone(), to.to_string_lossy().into_owned());
        self.store.call(move |db| {
            db.run(
                "UPDATE transfers SET path = ?3 WHERE direction = ?1 AND transfer_id = ?2",
                params![TX, tid, to],
            )?;
            Ok(())
        })
    }
}

impl SendLedger {
    /// Rows of `file_id` waiting for their receipt since before
    /// `published_before` (unix seconds, whole: a row published in that
    /// second is not yet due, so none is due early) whose `receipt_timeout` has not run out yet,
    /// longest waiting first, at most `limit`: through the partial index
    /// `transfers_receipt_due` (its condition spelled out, not bound, so that
    /// SQLite can use it).
    pub fn receipts_due(
        &self,
        file_id: &FileId,
        published_before: i64,
        limit: usize,
    ) -> Call<Vec<SendRow>> {
        let file_id = file_id.clone();
        self.store.call(move |db| {
            db.all(
                &format!("SELECT {COLUMNS} FROM transfers {RECEIPT_DUE}"),
                params![file_id, published_before, limit as i64],
                SendRow::from_sql,
            )
        })
    }

    /// Records that a row's `receipt_timeout` ran out: the time, and
    /// `receipt_timeout` with `error` as its code and sentence; the status
    /// stays `awaiting_receipt` (a late receipt still settles it). False when
    /// the row no longer waits for try `attempt`'s receipt or was timed out
    /// before: the caller runs the failure hook only on true, once.
    pub fn time_out_receipt(
        &self,
        (tid, peer): (&TransferId, &NodeName),
        attempt: u32,
        error: &str,
    ) -> Call<bool> {
        let (tid, peer, error) = (tid.clone(), peer.clone(), error.to_string());
        self.store.call(move |db| {
            let n = db.run(
                "UPDATE transfers SET receipt_timeout_at = ?4, error_code = ?5, error = ?6
                 WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND status = ?7
                   AND attempt = ?8 AND receipt_timeout_at IS NULL",
                params![
                    TX,
                    tid,
                    peer,
                    unix_now(),
                    ErrorCode::ReceiptTimeout.as_str(),
                    error,
                    Status::AwaitingReceipt,
                    attempt
                ],
            )?;
            Ok(n == 1)
        })
    }
}

/// The condition of the partial index `transfers_receipt_due` (schema
/// migration 11), then ?1 the file id, ?2 the second before which a row was published, ?3 the limit.
pub(super) const RECEIPT_DUE: &str = "WHERE direction = 'send' AND status = 'awaiting_receipt'
       AND receipt_timeout_at IS NULL AND file_id = ?1 AND touched_at < ?2
     ORDER BY touched_at LIMIT ?3";

/// The condition of the partial index `transfers_to_publish` (schema
/// migration 12), then ?1 the file id, ?2 the limit.
pub(super) const TO_PUBLISH: &str = "WHERE direction = 'send' AND status = 'sending'
       AND file_id = ?1 ORDER BY seq LIMIT ?2";
/// The same for the rows of no file id in ?1 (a JSON array), ?2 the limit.
pub(super) const TO_PUBLISH_UNKNOWN: &str = "WHERE direction = 'send' AND status = 'sending'
       AND file_id NOT IN (SELECT value FROM json_each(?1)) ORDER BY seq LIMIT ?2";

impl SendLedger {
    /// The requests ledger, on the same database.
    pub fn requests(&self) -> super::RequestLedger {
        super::RequestLedger::new(self.store.clone())
    }
}
