//! A transfer's status timeline: every status a row has had, with the time
//! it took it. SQLite triggers on `transfers` write the events, so no code
//! path that changes a status can forget one, and a row's events go with it.

use rusqlite::{Transaction, params};
use serde::Serialize;

use super::{Cached, Call, Store};
use crate::domain::TransferId;

/// Events kept at most for one transfer in an answer (a transfer retried
/// many times has many).
pub const MAX_EVENTS: usize = 500;

/// One status a row took.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub direction: String,
    pub peer: String,
    pub status: String,
    pub error_code: Option<String>,
    /// RFC 3339, milliseconds, UTC (the format of `started_at`).
    pub at: String,
}

/// Migration 7 (issue 14, the API): the table, its triggers, and one event per existing row (its
/// status now, at its last known time).
pub(super) fn migration(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS transfer_events (
            transfer_id TEXT NOT NULL, direction TEXT NOT NULL, peer TEXT NOT NULL,
            status TEXT NOT NULL, error_code TEXT, at TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS transfer_events_tid ON transfer_events(transfer_id);
         INSERT INTO transfer_events
            SELECT transfer_id, direction, peer, status, error_code,
                   COALESCE(finished_at, started_at) FROM transfers;
         CREATE TRIGGER IF NOT EXISTS transfer_events_insert AFTER INSERT ON transfers
         BEGIN
            INSERT INTO transfer_events VALUES (new.transfer_id, new.direction, new.peer,
                new.status, new.error_code, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
         END;
         CREATE TRIGGER IF NOT EXISTS transfer_events_update
            AFTER UPDATE OF status ON transfers WHEN old.status IS NOT new.status
         BEGIN
            INSERT INTO transfer_events VALUES (new.transfer_id, new.direction, new.peer,
                new.status, new.error_code, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
         END;
         CREATE TRIGGER IF NOT EXISTS transfer_events_delete AFTER DELETE ON transfers
         BEGIN
            DELETE FROM transfer_events WHERE transfer_id = old.transfer_id
                AND direction = old.direction AND peer = old.peer;
         END;",
    )
}

impl Store {
    /// The events of every row of `tid`, oldest first, at most [`MAX_EVENTS`].
    pub fn timeline(&self, tid: &TransferId) -> Call<Vec<Event>> {
        let tid = tid.clone();
        self.call(move |db| {
            db.all(
                "SELECT direction, peer, status, error_code, at FROM transfer_events
                  WHERE transfer_id = ?1 ORDER BY rowid LIMIT ?2",
                params![tid, MAX_EVENTS as i64],
                |r| {
                    Ok(Event {
                        direction: r.get(0)?,
                        peer: r.get(1)?,
                        status: r.get(2)?,
                        error_code: r.get(3)?,
                        at: r.get(4)?,
                    })
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::{FileId, NodeName, TransferId};
    use crate::error_code::ErrorCode;
    use crate::store::{SendRow, Status, Store, Transfer};

    #[tokio::test]
    async fn every_status_change_is_an_event_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let tid = TransferId::new();
        let peer = NodeName::parse("beta").unwrap();
        let t = Transfer::begin(
            tid.clone(),
            peer.clone(),
            FileId::parse("DATA").unwrap(),
            "a.csv",
            (10, 65536),
            Status::Queued,
        );
        let tx = store.sending();
        tx.insert_all(vec![SendRow::new(t, dir.path().join("a.csv"))])
            .await
            .unwrap();
        tx.fail(
            (&tid, &peer),
            Status::SendFailed,
            (ErrorCode::DiskFull, "full"),
        )
        .await
        .unwrap();
        // A second failure of a final row changes nothing: no event.
        tx.fail(
            (&tid, &peer),
            Status::SendFailed,
            (ErrorCode::DiskFull, "full"),
        )
        .await
        .unwrap();
        let events = store.timeline(&tid).await.unwrap();
        let seen: Vec<(&str, Option<&str>)> = events
            .iter()
            .map(|e| (e.status.as_str(), e.error_code.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                (Status::Queued.as_str(), None),
                (Status::SendFailed.as_str(), Some("disk_full"))
            ]
        );
        assert!(
            events
                .iter()
                .all(|e| e.direction == "send" && e.peer == "beta")
        );
        assert!(events[0].at <= events[1].at && events[1].at.ends_with('Z'));
    }
}
