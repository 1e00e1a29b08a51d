//! What the agent is doing now, as `hakobu status` shows it: transfers in
//! flight with their progress, sent transfers waiting for a receipt (and
//! since when), failures of the last hours.

use std::time::{Duration, SystemTime};

use rusqlite::params;
use serde::Serialize;

use super::row::{Direction, Status};
use super::{Cached, Call, Store, unix_now};

/// Statuses of a transfer under way (not yet settled, not waiting for the
/// other side).
const IN_FLIGHT: [Status; 5] = [
    Status::Queued,
    Status::Sending,
    Status::Receiving,
    Status::Placing,
    Status::HookRunning,
];
/// Statuses of a failed transfer.
const FAILED: [Status; 4] = [
    Status::SendFailed,
    Status::ReceiveFailed,
    Status::HookFailed,
    Status::HookInterrupted,
];

/// One transfer toward (or from) one peer, as `hakobu status` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Activity {
    pub direction: Direction,
    pub transfer_id: String,
    pub peer: String,
    pub file_id: String,
    pub file_name: String,
    pub status: String,
    pub size: u64,
    /// Bytes done: confirmed by the broker (sending), received (receiving).
    pub done: u64,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Seconds since `touched_at`: since it was published (waiting for its
    /// receipt), its last chunk (receiving), it was queued (sending).
    pub idle_secs: u64,
    pub error_code: Option<String>,
    pub error: Option<String>,
    /// When its `receipt_timeout` ran out (unix seconds), for a transfer
    /// still waiting for its receipt after that.
    pub receipt_timeout_at: Option<i64>,
}

/// The three lists of `hakobu status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Activities {
    pub in_flight: Vec<Activity>,
    pub awaiting_receipt: Vec<Activity>,
    pub failed: Vec<Activity>,
}

/// ?1 is the sending direction, ?2 the limit of rows.
const SELECT: &str = "SELECT direction, transfer_id, peer, file_id, file_name, status, size,
    CASE WHEN direction = ?1 THEN progress
         ELSE MIN(size, chunks_have * chunk_size) END AS done,
    started_at, finished_at, touched_at, error_code, error, receipt_timeout_at FROM transfers";

fn activity(r: &rusqlite::Row<'_>, now: i64) -> rusqlite::Result<Activity> {
    let dir: String = r.get("direction")?;
    let touched: i64 = r.get("touched_at")?;
    Ok(Activity {
        direction: if dir == Direction::Send.as_str() {
            Direction::Send
        } else {
            Direction::Receive
        },
        transfer_id: r.get("transfer_id")?,
        peer: r.get("peer")?,
        file_id: r.get("file_id")?,
        file_name: r.get("file_name")?,
        status: r.get("status")?,
        size: r.get::<_, i64>("size")?.max(0) as u64,
        done: r.get::<_, i64>("done")?.max(0) as u64,
        started_at: r.get("started_at")?,
        finished_at: r.get("finished_at")?,
        idle_secs: (now - touched).max(0) as u64,
        error_code: r.get("error_code")?,
        error: r.get("error")?,
        receipt_timeout_at: r.get("receipt_timeout_at")?,
    })
}

impl Store {
    /// Transfers in flight (oldest first), those waiting for a receipt
    /// (longest waiting first), and those that failed within `failed_within`
    /// (newest first); at most `limit` of each.
    pub fn activities(&self, failed_within: Duration, limit: usize) -> Call<Activities> {
        let since = humantime::format_rfc3339_millis(
            SystemTime::now()
                .checked_sub(failed_within)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        )
        .to_string();
        let limit = limit as i64;
        self.call(move |db| {
            let now = unix_now();
            let tx = Direction::Send;
            let [q, sg, rc, pl, hr] = IN_FLIGHT;
            let in_flight = db.all(
                &format!("{SELECT} WHERE status IN (?3, ?4, ?5, ?6, ?7) ORDER BY seq LIMIT ?2"),
                params![tx, limit, q, sg, rc, pl, hr],
                |r| activity(r, now),
            )?;
            let awaiting_receipt = db.all(
                &format!("{SELECT} WHERE status = ?3 ORDER BY touched_at, seq LIMIT ?2"),
                params![tx, limit, Status::AwaitingReceipt],
                |r| activity(r, now),
            )?;
            let [sf, rf, hf, hi] = FAILED;
            let failed = db.all(
                &format!(
                    "{SELECT} WHERE status IN (?3, ?4, ?5, ?6)
                       AND COALESCE(finished_at, started_at) >= ?7
                     ORDER BY seq DESC LIMIT ?2"
                ),
                params![tx, limit, sf, rf, hf, hi, since],
                |r| activity(r, now),
            )?;
            Ok(Activities {
                in_flight,
                awaiting_receipt,
                failed,
            })
        })
    }
}
