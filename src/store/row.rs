//! Rows and statuses: what the ledger records of a transfer, as typed values.
//! [`Transfer`] holds what both sides record; [`SendRow`] and [`ReceiveRow`]
//! add what only one side has (a spooled file on one, a placed inode on the
//! other). Statuses and directions travel to SQL only as bound parameters.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::Serialize;

use crate::domain::{FileId, NodeName, TransferId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Send,
    Receive,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Send => "send",
            Direction::Receive => "receive",
        }
    }
}

/// Where a transfer stands. Sending: (`queued` →) `sending` →
/// `awaiting_receipt` → (`hook_running` →) `sent` | `send_failed` |
/// `hook_failed`. Receiving: `receiving` → `placing` → (`hook_running` →)
/// `received` | `receive_failed` | `hook_failed`. Either side:
/// `hook_interrupted` when the agent died while a hook ran.
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

/// Text in the `status` column that no status of this version has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transfer status {0:?} in the state database")]
pub struct UnknownStatus(pub String);

impl Status {
    pub const ALL: [Status; 12] = [
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

    pub fn parse(text: &str) -> Result<Status, UnknownStatus> {
        Status::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| UnknownStatus(text.to_string()))
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

    /// The final (or the other) statuses as one bound parameter, a JSON
    /// array for `status IN (SELECT value FROM json_each(?))`.
    pub(super) fn set(final_: bool) -> String {
        let names: Vec<&str> = Status::ALL
            .into_iter()
            .filter(|s| s.is_final() == final_)
            .map(Status::as_str)
            .collect();
        serde_json::to_string(&names).unwrap_or_else(|_| "[]".into())
    }
}

/// How a hook run ended, as history records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRun {
    /// The exit code; `None` when killed by a signal or never started.
    pub exit: Option<i32>,
    pub ms: u64,
    /// The end of what the hook printed.
    pub tail: String,
    /// Runs of the hook (its `retry:`); `exit` is the last one's.
    pub attempts: u32,
}

/// What both sides record of a transfer, toward one peer.
#[derive(Debug, Clone, Serialize)]
pub struct Transfer {
    pub transfer_id: TransferId,
    /// The other node: the receiver when sending, the sender when receiving.
    pub peer: NodeName,
    pub file_id: FileId,
    /// The name the sender gave; on the receiving side it may be a name that
    /// was refused (`bad_file_name`), kept so that history shows it.
    pub file_name: String,
    pub size: u64,
    pub sha256: Option<String>,
    pub chunk_size: u64,
    pub status: Status,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub meta: BTreeMap<String, String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub hook_exit: Option<i32>,
    pub hook_ms: Option<u64>,
    pub hook_tail: Option<String>,
    /// The failure hook was started (it runs at most once).
    pub failure_hook: bool,
    /// The send request (`hakobu request`) this file was sent for.
    pub request_id: Option<TransferId>,
    /// Which try of the transfer this row records, from 1 (a send
    /// profile's `retry:` sends it again under the same id).
    pub attempt: u32,
    /// Runs of the hook whose exit `hook_exit` holds.
    pub hook_attempts: Option<u32>,
    /// With `convert:`, the SHA-256 of the file as placed (receiving) or as
    /// sent after conversion (sending); `sha256` is of the bytes received.
    pub placed_sha256: Option<String>,
    /// With `convert:`, the lines of the converted file.
    pub records: Option<u64>,
    /// Bytes of chunk bodies on the wire (compressed, sealed): published
    /// by the sender, every attempt counted; received by the receiver.
    pub wire_bytes: u64,
    /// The transfer that started this one (a hook's `hakobu send`, a done
    /// marker's `parent=`), as the sender recorded it and the chunks carried it.
    pub parent_id: Option<TransferId>,
}

impl Transfer {
    /// A new transfer: what is known when it begins, the rest empty.
    pub fn begin(
        transfer_id: TransferId,
        peer: NodeName,
        file_id: FileId,
        file_name: &str,
        (size, chunk_size): (u64, u64),
        status: Status,
    ) -> Transfer {
        Transfer {
            transfer_id,
            peer,
            file_id,
            file_name: file_name.to_string(),
            size,
            sha256: None,
            chunk_size,
            status,
            error_code: None,
            error: None,
            meta: BTreeMap::new(),
            started_at: crate::clock::now_rfc3339(),
            finished_at: None,
            hook_exit: None,
            hook_ms: None,
            hook_tail: None,
            failure_hook: false,
            request_id: None,
            attempt: 1,
            hook_attempts: None,
            placed_sha256: None,
            records: None,
            wire_bytes: 0,
            parent_id: None,
        }
    }

    fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<Transfer> {
        let meta: String = r.get("meta")?;
        Ok(Transfer {
            transfer_id: r.get("transfer_id")?,
            peer: r.get("peer")?,
            file_id: r.get("file_id")?,
            file_name: r.get("file_name")?,
            size: r.get::<_, i64>("size")? as u64,
            sha256: r.get("sha256")?,
            chunk_size: r.get::<_, i64>("chunk_size")? as u64,
            status: r.get("status")?,
            error_code: r.get("error_code")?,
            error: r.get("error")?,
            meta: serde_json::from_str(&meta).unwrap_or_default(),
            started_at: r.get("started_at")?,
            finished_at: r.get("finished_at")?,
            hook_exit: r.get("hook_exit")?,
            hook_ms: r.get::<_, Option<i64>>("hook_ms")?.map(|v| v as u64),
            hook_tail: r.get("hook_tail")?,
            failure_hook: r.get("failure_hook")?,
            request_id: r.get("request_id")?,
            attempt: r.get::<_, i64>("attempt")?.clamp(1, u32::MAX as i64) as u32,
            hook_attempts: r
                .get::<_, Option<i64>>("hook_attempts")?
                .map(|v| v.clamp(0, u32::MAX as i64) as u32),
            placed_sha256: r.get("placed_sha256")?,
            records: r.get::<_, Option<i64>>("records")?.map(|v| v as u64),
            wire_bytes: r.get::<_, i64>("wire_bytes")? as u64,
            parent_id: r.get("parent_id")?,
        })
    }

    pub(super) fn meta_json(&self) -> String {
        serde_json::to_string(&self.meta).unwrap_or_else(|_| "{}".into())
    }
}

/// A transfer as the sending side records it, toward one receiving node.
#[derive(Debug, Clone)]
pub struct SendRow {
    pub transfer: Transfer,
    /// The spooled file; after `after_send: move_to`, where it went.
    pub path: PathBuf,
    /// Where the receiver placed it, from the receipt.
    pub remote_path: Option<String>,
    /// The receiver's success hook exit code, from the receipt.
    pub remote_hook_exit: Option<i32>,
    /// The receipt reported success: placed, and the receiver's success
    /// hook (if it has one) exited 0. False for a failure receipt, a
    /// `hook_failed` one included, and until a receipt arrives.
    pub delivered: bool,
    /// Bytes the broker has confirmed so far.
    pub progress: u64,
    /// While `awaiting_receipt`: since when (unix seconds, the time its
    /// last chunk was confirmed); `None` in any other status.
    pub awaiting_since: Option<i64>,
    /// When its `receipt_timeout` ran out and the failure hook was run
    /// (unix seconds); it stays set once the late receipt settles the row.
    pub receipt_timeout_at: Option<i64>,
}

/// A transfer as the receiving side records it, from one sending node.
#[derive(Debug, Clone)]
pub struct ReceiveRow {
    pub transfer: Transfer,
    /// The inbox name the file takes (recorded with `placing`) or took.
    pub path: Option<PathBuf>,
    /// The inode that carries (or will carry) the inbox name, recorded
    /// before the rename so that recovery can tell whether it happened.
    pub inode: Option<u64>,
    /// The broker confirmed the receipt.
    pub receipt_sent: bool,
    /// Distinct chunks recorded: the one count of what has arrived.
    pub chunks_have: u64,
}

impl std::ops::Deref for SendRow {
    type Target = Transfer;
    fn deref(&self) -> &Transfer {
        &self.transfer
    }
}

impl std::ops::Deref for ReceiveRow {
    type Target = Transfer;
    fn deref(&self) -> &Transfer {
        &self.transfer
    }
}

impl SendRow {
    pub fn new(transfer: Transfer, path: PathBuf) -> SendRow {
        SendRow {
            transfer,
            path,
            remote_path: None,
            remote_hook_exit: None,
            delivered: false,
            progress: 0,
            awaiting_since: None,
            receipt_timeout_at: None,
        }
    }

    /// How long it has waited for its receipt, `None` unless it waits.
    pub fn awaiting_receipt_secs(&self, now: i64) -> Option<u64> {
        self.awaiting_since.map(|t| (now - t).max(0) as u64)
    }

    pub(super) fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<SendRow> {
        let transfer = Transfer::from_sql(r)?;
        let status = transfer.status;
        Ok(SendRow {
            transfer,
            path: PathBuf::from(r.get::<_, Option<String>>("path")?.unwrap_or_default()),
            remote_path: r.get("remote_path")?,
            remote_hook_exit: r.get("remote_hook_exit")?,
            delivered: r.get("delivered")?,
            progress: r.get::<_, i64>("progress")? as u64,
            awaiting_since: match status {
                Status::AwaitingReceipt => Some(r.get("touched_at")?),
                _ => None,
            },
            receipt_timeout_at: r.get("receipt_timeout_at")?,
        })
    }
}

impl ReceiveRow {
    pub fn new(transfer: Transfer) -> ReceiveRow {
        ReceiveRow {
            transfer,
            path: None,
            inode: None,
            receipt_sent: false,
            chunks_have: 0,
        }
    }

    pub(super) fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReceiveRow> {
        Ok(ReceiveRow {
            transfer: Transfer::from_sql(r)?,
            path: r.get::<_, Option<String>>("path")?.map(PathBuf::from),
            inode: r.get::<_, Option<i64>>("inode")?.map(|v| v as u64),
            receipt_sent: r.get("receipt_sent")?,
            chunks_have: r.get::<_, i64>("chunks_have")? as u64,
        })
    }

    /// Every chunk is recorded and the digest known: the transfer can be
    /// verified and placed. The one test of completeness, at commit and at
    /// recovery alike.
    pub fn complete(&self) -> bool {
        complete(
            self.chunks_have,
            self.sha256.is_some(),
            self.size,
            self.chunk_size,
        )
    }
}

/// See [`ReceiveRow::complete`]; for the counts the chunk commit reads.
pub(super) fn complete(chunks_have: u64, digest_known: bool, size: u64, chunk_size: u64) -> bool {
    digest_known && Some(chunks_have) == crate::wire::chunk_count(size, chunk_size)
}

impl ToSql for Status {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for Status {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        Status::parse(value.as_str()?).map_err(|e| FromSqlError::Other(Box::new(e)))
    }
}

impl ToSql for Direction {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

/// The checked names are stored as text and checked again when read: the
/// database is input too.
macro_rules! sql_name {
    ($($name:ty),+) => {$(
        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                <$name>::parse(value.as_str()?).map_err(|e| FromSqlError::Other(Box::new(e)))
            }
        }
    )+};
}

sql_name!(TransferId, NodeName, FileId);

#[cfg(test)]
mod tests {
    use super::*;

    /// The position of each status in `Status::ALL`, by an exhaustive match:
    /// a new status does not compile until it is placed here, and the test
    /// below fails until `ALL` has it in that place.
    fn position(s: Status) -> usize {
        match s {
            Status::Queued => 0,
            Status::Sending => 1,
            Status::AwaitingReceipt => 2,
            Status::Receiving => 3,
            Status::Placing => 4,
            Status::HookRunning => 5,
            Status::Sent => 6,
            Status::SendFailed => 7,
            Status::Received => 8,
            Status::ReceiveFailed => 9,
            Status::HookFailed => 10,
            Status::HookInterrupted => 11,
        }
    }

    #[test]
    fn every_status_is_in_all_once_and_parses_back() {
        for (i, s) in Status::ALL.into_iter().enumerate() {
            assert_eq!(position(s), i, "{s:?} is out of place in Status::ALL");
            assert_eq!(Status::parse(s.as_str()), Ok(s));
        }
        let finals: Vec<String> = serde_json::from_str(&Status::set(true)).unwrap();
        let open: Vec<String> = serde_json::from_str(&Status::set(false)).unwrap();
        assert_eq!(finals.len() + open.len(), Status::ALL.len());
        assert!(finals.contains(&"hook_interrupted".to_string()));
        assert!(open.contains(&"placing".to_string()));
    }

    #[test]
    fn unknown_status_text_is_refused_not_guessed() {
        assert_eq!(
            Status::parse("hook_interupted"),
            Err(UnknownStatus("hook_interupted".into()))
        );
        assert!(Status::parse("").is_err());
    }
}
