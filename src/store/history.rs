//! History: the transfers of both sides, newest first, as `hakobu history`
//! shows them, and every row of one transfer, as `hakobu rerun` looks it up.

use rusqlite::params;
use serde::{Serialize, Serializer};

use super::row::{Direction, ReceiveRow, SendRow, Transfer};
use super::{BY_ID, COLUMNS, Cached, Call, Store};
use crate::domain::TransferId;

/// One row of history, of either side.
#[derive(Debug, Clone)]
pub enum Entry {
    Send(SendRow),
    Receive(ReceiveRow),
}

/// Said after a wait for a receipt once its `receipt_timeout` ran out
/// (`hakobu history` and `hakobu status` alike).
pub const PAST_RECEIPT_TIMEOUT: &str = ", past receipt_timeout (failure hook ran)";

impl Entry {
    pub fn direction(&self) -> Direction {
        match self {
            Entry::Send(_) => Direction::Send,
            Entry::Receive(_) => Direction::Receive,
        }
    }

    pub fn transfer(&self) -> &Transfer {
        match self {
            Entry::Send(r) => &r.transfer,
            Entry::Receive(r) => &r.transfer,
        }
    }

    /// For a sending row that waits for its receipt, how long it has
    /// (`awaiting receipt for 3h 12m 5s`), and whether its
    /// `receipt_timeout` ran out; `hakobu status` shows the same wait.
    pub fn awaiting_note(&self, now: i64) -> Option<String> {
        let Entry::Send(r) = self else { return None };
        let secs = r.awaiting_receipt_secs(now)?;
        let mut note = format!(
            "awaiting receipt for {}",
            humantime::format_duration(std::time::Duration::from_secs(secs))
        );
        if r.receipt_timeout_at.is_some() {
            note.push_str(PAST_RECEIPT_TIMEOUT);
        }
        Some(note)
    }

    pub(super) fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
        let dir: String = r.get("direction")?;
        Ok(if dir == Direction::Send.as_str() {
            Entry::Send(SendRow::from_sql(r)?)
        } else {
            Entry::Receive(ReceiveRow::from_sql(r)?)
        })
    }
}

/// One flat JSON object per row, every column of both sides (the other
/// side's as their empty values), as `hakobu history --json` always wrote.
#[derive(Serialize)]
struct Flat<'a> {
    direction: Direction,
    #[serde(flatten)]
    transfer: &'a Transfer,
    path: Option<String>,
    remote_path: Option<&'a str>,
    remote_hook_exit: Option<i32>,
    receipt_sent: bool,
    delivered: bool,
    inode: Option<u64>,
    progress: u64,
    /// Sending rows waiting for their receipt: seconds waited so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    awaiting_receipt_secs: Option<u64>,
    /// When a sending row's `receipt_timeout` ran out (unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    receipt_timeout_at: Option<i64>,
}

impl Serialize for Entry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let flat = match self {
            Entry::Send(r) => Flat {
                direction: Direction::Send,
                transfer: &r.transfer,
                path: Some(r.path.to_string_lossy().into_owned()),
                remote_path: r.remote_path.as_deref(),
                remote_hook_exit: r.remote_hook_exit,
                receipt_sent: false,
                delivered: r.delivered,
                inode: None,
                progress: r.progress,
                awaiting_receipt_secs: r.awaiting_receipt_secs(crate::clock::unix_now()),
                receipt_timeout_at: r.receipt_timeout_at,
            },
            Entry::Receive(r) => Flat {
                direction: Direction::Receive,
                transfer: &r.transfer,
                path: r.path.as_ref().map(|p| p.to_string_lossy().into_owned()),
                remote_path: None,
                remote_hook_exit: None,
                receipt_sent: r.receipt_sent,
                delivered: false,
                inode: r.inode,
                progress: 0,
                awaiting_receipt_secs: None,
                receipt_timeout_at: None,
            },
        };
        flat.serialize(s)
    }
}

impl Store {
    /// The latest `limit` rows, newest first.
    pub fn history(&self, limit: usize) -> Call<Vec<Entry>> {
        self.call(move |db| {
            db.all(
                &format!("SELECT {COLUMNS} FROM transfers ORDER BY seq DESC LIMIT ?1"),
                params![limit as i64],
                Entry::from_sql,
            )
        })
    }

    /// Every row with this transfer id, both sides.
    pub fn find(&self, tid: &TransferId) -> Call<Vec<Entry>> {
        let tid = tid.clone();
        self.call(move |db| {
            db.all(
                &format!("SELECT {COLUMNS} FROM transfers WHERE {BY_ID} ORDER BY direction, peer"),
                params![tid],
                Entry::from_sql,
            )
        })
    }
}
