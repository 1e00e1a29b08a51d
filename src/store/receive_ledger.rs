//! The receiving side's ledger: a row per transfer received (per sender),
//! the chunks recorded so far, the inode placed under the inbox name, the
//! receipt sent. What the receiver's state machine reads and moves.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{OptionalExtension, params};

use super::ledger;
use super::row::{self, Direction, ReceiveRow, Status};
use super::{COLUMNS, Cached, Call, Store, unix_now};
use crate::domain::{FileId, NodeName, TransferId};
use crate::error_code::ErrorCode;

const RX: Direction = Direction::Receive;

/// The condition of the partial index `transfers_receiving` (schema
/// migration 13), then ?1 the `seq` to read on after, ?2 the limit.
pub(super) const RECEIVING: &str = "WHERE direction = 'receive' AND status = 'receiving'
       AND seq > ?1 ORDER BY seq LIMIT ?2";

/// One placement, recorded before the name appears.
pub struct Placing {
    pub transfer_id: TransferId,
    pub peer: NodeName,
    pub target: PathBuf,
    pub inode: u64,
    /// With `convert:`, the digest and line count of the file as placed.
    pub converted: Option<(String, u64)>,
}

ledger::facade!(ReceiveLedger, RX);

impl ReceiveLedger {
    /// Records a transfer seen for the first time; an existing row stays as
    /// it is (false).
    pub fn insert(&self, row: &ReceiveRow) -> Call<bool> {
        let t = row.transfer.clone();
        self.store.call(move |db| ledger::insert(db, RX, &t, None))
    }

    /// The row of this transfer id, whatever its sender.
    pub fn get(&self, tid: &TransferId) -> Call<Option<ReceiveRow>> {
        let tid = tid.clone();
        self.store.call(move |db| {
            db.one(
                &format!(
                    "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND transfer_id = ?2
                     ORDER BY peer LIMIT 1"
                ),
                params![RX, tid],
                ReceiveRow::from_sql,
            )
            .optional()
        })
    }

    /// Transfers complete but still `receiving` (their completion waits
    /// for a slot, `receiver/waiting.rs`), oldest first, after `seq`, at
    /// most `limit` rows looked at: each with its `seq`, to read on from.
    pub fn completable(&self, after: i64, limit: usize) -> Call<Vec<(i64, Option<TransferId>)>> {
        self.store.call(move |db| {
            db.all(
                &format!(
                    "SELECT seq, transfer_id, chunks_have, sha256 IS NOT NULL, size, chunk_size
                       FROM transfers {RECEIVING}"
                ),
                params![after, limit as i64],
                |r| {
                    let (have, digest, size, chunk): (i64, bool, i64, i64) =
                        (r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?);
                    let whole = row::complete(have as u64, digest, size as u64, chunk as u64);
                    Ok((r.get(0)?, whole.then(|| r.get(1)).transpose()?))
                },
            )
        })
    }

    /// Rows not final, or whose receipt is not sent yet, oldest first.
    pub fn unfinished(&self) -> Call<Vec<ReceiveRow>> {
        self.store
            .call(|db| ledger::unfinished(db, RX, ReceiveRow::from_sql))
    }

    /// Records the trailer: the digest, the metadata and the start time.
    pub fn set_trailer(
        &self,
        (tid, peer): (&TransferId, &NodeName),
        sha256: &str,
        started_at: &str,
        meta: &BTreeMap<String, String>,
    ) -> Call<()> {
        let (tid, peer) = (tid.clone(), peer.clone());
        let (sha256, started_at) = (sha256.to_string(), started_at.to_string());
        let meta = serde_json::to_string(meta).unwrap_or_else(|_| "{}".into());
        self.store.call(move |db| {
            db.run(
                "UPDATE transfers SET sha256 = ?4, started_at = ?5, meta = ?6
                 WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3",
                params![RX, tid, peer, sha256, started_at, meta],
            )?;
            Ok(())
        })
    }

    /// Records chunks that are on disk, in one transaction; returns, per
    /// chunk, whether its transfer is now complete ([`ReceiveRow::complete`]).
    /// The chunk rows and the count move together, so a crash cannot leave a
    /// transfer one chunk short forever. A chunk of a transfer no longer
    /// receiving (failed or placed since) leaves no row.
    /// Each chunk comes with its body's length as it travelled (`wire_bytes`).
    pub fn add_chunks(&self, chunks: Vec<(TransferId, u64, u64)>) -> Call<Vec<bool>> {
        self.store.call(move |db| {
            let tx = db.transaction()?;
            let now = unix_now();
            let mut complete = Vec::with_capacity(chunks.len());
            for (tid, idx, wire) in &chunks {
                let inserted = tx.run(
                    "INSERT OR IGNORE INTO chunks (transfer_id, idx)
                     SELECT ?2, ?3 WHERE EXISTS (SELECT 1 FROM transfers
                        WHERE direction = ?1 AND transfer_id = ?2 AND status = ?4)",
                    params![RX, tid, *idx as i64, Status::Receiving],
                )?;
                let (have, digest, size, chunk_size): (i64, bool, i64, i64) = tx.one(
                    "UPDATE transfers SET chunks_have = chunks_have + ?3, touched_at = ?4,
                        wire_bytes = wire_bytes + ?3 * ?5
                     WHERE direction = ?1 AND transfer_id = ?2
                     RETURNING chunks_have, sha256 IS NOT NULL, size, chunk_size",
                    params![RX, tid, inserted as i64, now, *wire as i64],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )?;
                complete.push(row::complete(
                    have as u64,
                    digest,
                    size as u64,
                    chunk_size as u64,
                ));
            }
            tx.commit()?;
            Ok(complete)
        })
    }

    /// Receiving transfers of `file_id` that no chunk has touched for `idle`.
    pub fn stale(&self, file_id: &FileId, idle: Duration) -> Call<Vec<ReceiveRow>> {
        let file_id = file_id.clone();
        let before = unix_now() - idle.as_secs() as i64;
        self.store.call(move |db| {
            db.all(
                &format!(
                    "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND status = ?2
                       AND file_id = ?3 AND touched_at < ?4 ORDER BY seq"
                ),
                params![RX, Status::Receiving, file_id, before],
                ReceiveRow::from_sql,
            )
        })
    }

    /// Records the inodes that will carry the inbox names, and moves each
    /// transfer from `receiving` to `placing`, in one transaction, before
    /// the step that makes the names visible: recovery then tells placed
    /// from not placed by the inode.
    pub fn placing(&self, placements: Vec<Placing>) -> Call<()> {
        self.store.call(move |db| {
            let tx = db.transaction()?;
            for p in &placements {
                tx.run(
                    "UPDATE transfers SET path = ?4, inode = ?5,
                        status = CASE status WHEN ?6 THEN ?7 ELSE status END,
                        placed_sha256 = ?8, records = ?9
                     WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3",
                    params![
                        RX,
                        p.transfer_id,
                        p.peer,
                        p.target.to_string_lossy(),
                        p.inode as i64,
                        Status::Receiving,
                        Status::Placing,
                        p.converted.as_ref().map(|c| &c.0),
                        p.converted.as_ref().map(|c| c.1 as i64),
                    ],
                )?;
            }
            tx.commit()
        })
    }

    /// The files are in place: forgets each one's chunk rows and moves it
    /// from `placing` to its next status (its success hook, or `received`
    /// when it has none), in one transaction.
    pub fn placed(&self, placed: Vec<(TransferId, NodeName, Status)>) -> Call<()> {
        self.store.call(move |db| {
            let tx = db.transaction()?;
            for (tid, peer, next) in &placed {
                tx.run("DELETE FROM chunks WHERE transfer_id = ?1", params![tid])?;
                ledger::advance(&tx, RX, (tid, peer), Status::Placing, *next)?;
            }
            tx.commit()
        })
    }

    /// Fails a transfer for `code` (unless it is final already) and forgets
    /// its chunk rows, in one transaction. Callers record this before they
    /// remove any of the transfer's files.
    pub fn fail(
        &self,
        key: (&TransferId, &NodeName),
        status: Status,
        (code, error): (ErrorCode, &str),
    ) -> Call<()> {
        self.fail_and(key, status, (code, error), false)
    }

    /// [`ReceiveLedger::fail`] for a file that could not be placed: the
    /// placement recorded with `placing` is forgotten with it (the inbox
    /// name is not this transfer's).
    pub fn placing_failed(
        &self,
        key: (&TransferId, &NodeName),
        (code, error): (ErrorCode, &str),
    ) -> Call<()> {
        self.fail_and(key, Status::ReceiveFailed, (code, error), true)
    }

    fn fail_and(
        &self,
        (tid, peer): (&TransferId, &NodeName),
        status: Status,
        (code, error): (ErrorCode, &str),
        unplace: bool,
    ) -> Call<()> {
        let (tid, peer, error) = (tid.clone(), peer.clone(), error.to_string());
        self.store.call(move |db| {
            let tx = db.transaction()?;
            if unplace {
                tx.run(
                    "UPDATE transfers SET path = NULL, inode = NULL
                     WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3",
                    params![RX, tid, peer],
                )?;
            }
            ledger::fail(&tx, RX, (&tid, &peer), status, (code, &error))?;
            tx.run("DELETE FROM chunks WHERE transfer_id = ?1", params![tid])?;
            tx.commit()
        })
    }

    /// The receipt of try `attempt` went (a receipt of an earlier try,
    /// recorded late, leaves a later one's row as it is).
    pub fn set_receipt_sent(&self, key: (&TransferId, &NodeName), attempt: u32) -> Call<()> {
        let (tid, peer) = (key.0.clone(), key.1.clone());
        self.store.call(move |db| {
            db.run(
                "UPDATE transfers SET receipt_sent = 1
                 WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND attempt = ?4",
                params![RX, tid, peer, attempt],
            )?;
            Ok(())
        })
    }

    /// A later try of a transfer that failed here (the sender's `retry:`):
    /// the row starts again as `receiving` for try `row.attempt`, with what
    /// the earlier try recorded (failure, hook, receipt, chunks) forgotten,
    /// in one transaction. False when the row is no longer a failed earlier
    /// try (another chunk of the new try restarted it first).
    pub fn restart(&self, row: &ReceiveRow) -> Call<bool> {
        let t = row.transfer.clone();
        self.store.call(move |db| {
            let tx = db.transaction()?;
            let n = tx.run(
                "UPDATE transfers SET status = ?4, attempt = ?5, error_code = NULL, error = NULL,
                    finished_at = NULL, hook_exit = NULL, hook_ms = NULL, hook_tail = NULL,
                    hook_attempts = NULL, receipt_sent = 0, failure_hook = 0, path = NULL,
                    inode = NULL, chunks_have = 0, file_name = ?6, size = ?7, chunk_size = ?8,
                    sha256 = ?9, started_at = ?10, meta = ?11, touched_at = ?12
                 WHERE direction = ?1 AND transfer_id = ?2 AND peer = ?3 AND status = ?13
                   AND attempt < ?5",
                params![
                    RX,
                    t.transfer_id,
                    t.peer,
                    Status::Receiving,
                    t.attempt,
                    t.file_name,
                    t.size as i64,
                    t.chunk_size as i64,
                    t.sha256,
                    t.started_at,
                    t.meta_json(),
                    unix_now(),
                    Status::ReceiveFailed
                ],
            )?;
            if n == 1 {
                tx.run(
                    "DELETE FROM chunks WHERE transfer_id = ?1",
                    params![t.transfer_id],
                )?;
            }
            tx.commit()?;
            Ok(n == 1)
        })
    }
}
