//! Send requests (`hakobu request`): one row per request this node asked
//! (`out`), served (`in`) or was given by `hakobu send` without a path
//! (`local`). A row moves `queued` → `working` (served, or published to
//! the asked node) → `answered`, with the outcome and the transfers it
//! started. Also the receive rows of the files a request brought.

use rusqlite::{OptionalExtension, params};

use super::row::{Direction, ReceiveRow};
use super::{COLUMNS, Cached, Call, Store};
use crate::domain::{FileId, NodeName, TransferId};
use crate::error_code::ErrorCode;

/// Whose request a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestDir {
    /// Asked by this node of another (`hakobu request`).
    Out,
    /// Asked of this node by another.
    In,
    /// `hakobu send` without a path: this node's own profile, sent to `peer`
    /// (or, when `peer` is this node, to the profile's `to`).
    Local,
}

impl RequestDir {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestDir::Out => "out",
            RequestDir::In => "in",
            RequestDir::Local => "local",
        }
    }

    fn parse(text: &str) -> Option<RequestDir> {
        [RequestDir::Out, RequestDir::In, RequestDir::Local]
            .into_iter()
            .find(|d| d.as_str() == text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    /// Recorded; the agent has not taken it yet.
    Queued,
    /// Being served (in, local), or published and awaiting the reply (out).
    Working,
    /// Settled: `ok`, or refused with a code.
    Answered,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Queued => "queued",
            RequestStatus::Working => "working",
            RequestStatus::Answered => "answered",
        }
    }

    fn parse(text: &str) -> Option<RequestStatus> {
        [
            RequestStatus::Queued,
            RequestStatus::Working,
            RequestStatus::Answered,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// One request as the ledger records it.
#[derive(Debug, Clone)]
pub struct RequestRow {
    pub request_id: TransferId,
    pub dir: RequestDir,
    /// The other node: asked (out), asking (in), or the one to send to (local).
    pub peer: NodeName,
    pub file_id: FileId,
    pub status: RequestStatus,
    pub ok: Option<bool>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub transfer_ids: Vec<TransferId>,
    pub created_at: String,
    /// For `local`: the parent of the transfers it sends (a hook's `hakobu send`).
    pub parent_id: Option<TransferId>,
}

impl RequestRow {
    pub fn new(request_id: TransferId, dir: RequestDir, peer: NodeName, file_id: FileId) -> Self {
        RequestRow {
            request_id,
            dir,
            peer,
            file_id,
            status: RequestStatus::Queued,
            ok: None,
            error_code: None,
            error: None,
            transfer_ids: Vec::new(),
            created_at: crate::clock::now_rfc3339(),
            parent_id: None,
        }
    }

    fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRow> {
        let text = |col: &str| -> rusqlite::Result<String> { r.get(col) };
        let bad = |what: &str, v: String| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("unknown request {what} {v:?} in the state database").into(),
            )
        };
        let dir = text("direction")?;
        let status = text("status")?;
        let ids: String = text("transfer_ids")?;
        let ids: Vec<String> = serde_json::from_str(&ids).unwrap_or_default();
        Ok(RequestRow {
            request_id: r.get("request_id")?,
            dir: RequestDir::parse(&dir).ok_or_else(|| bad("direction", dir.clone()))?,
            peer: r.get("peer")?,
            file_id: r.get("file_id")?,
            status: RequestStatus::parse(&status).ok_or_else(|| bad("status", status.clone()))?,
            ok: r.get("ok")?,
            error_code: r.get("error_code")?,
            error: r.get("error")?,
            transfer_ids: ids
                .iter()
                .filter_map(|t| TransferId::parse(t).ok())
                .collect(),
            created_at: text("created_at")?,
            parent_id: r.get("parent_id")?,
        })
    }
}

const REQUEST_COLUMNS: &str = "direction, request_id, peer, file_id, status, ok, error_code, error, \
     transfer_ids, created_at, parent_id";

#[derive(Clone)]
pub struct RequestLedger {
    store: Store,
}

impl RequestLedger {
    pub(super) fn new(store: Store) -> Self {
        RequestLedger { store }
    }

    /// Records a new request; false when one with this id and direction
    /// exists (a redelivered request).
    pub fn insert(&self, row: RequestRow) -> Call<bool> {
        self.store.call(move |db| {
            let n = db.run(
                "INSERT OR IGNORE INTO requests (direction, request_id, peer, file_id, status,
                    transfer_ids, created_at, parent_id) VALUES (?1, ?2, ?3, ?4, ?5, '[]', ?6, ?7)",
                params![
                    row.dir.as_str(),
                    row.request_id,
                    row.peer,
                    row.file_id,
                    row.status.as_str(),
                    row.created_at,
                    row.parent_id
                ],
            )?;
            Ok(n == 1)
        })
    }

    pub fn get(&self, dir: RequestDir, id: &TransferId) -> Call<Option<RequestRow>> {
        let id = id.clone();
        self.store.call(move |db| {
            db.one(
                &format!(
                    "SELECT {REQUEST_COLUMNS} FROM requests WHERE direction = ?1 AND request_id = ?2"
                ),
                params![dir.as_str(), id],
                RequestRow::from_sql,
            )
            .optional()
        })
    }

    /// Requests in `status`, oldest first.
    pub fn in_status(&self, status: RequestStatus) -> Call<Vec<RequestRow>> {
        self.store.call(move |db| {
            db.all(
                &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE status = ?1 ORDER BY rowid"),
                params![status.as_str()],
                RequestRow::from_sql,
            )
        })
    }

    /// Moves a request from `from` to `to`; false when it was not in `from`.
    pub fn advance(
        &self,
        (dir, id): (RequestDir, &TransferId),
        from: RequestStatus,
        to: RequestStatus,
    ) -> Call<bool> {
        let id = id.clone();
        self.store.call(move |db| {
            let n = db.run(
                "UPDATE requests SET status = ?4 WHERE direction = ?1 AND request_id = ?2
                    AND status = ?3",
                params![dir.as_str(), id, from.as_str(), to.as_str()],
            )?;
            Ok(n == 1)
        })
    }

    /// Records the outcome (once: an answered request stays as it was).
    /// For `out` rows only a reply from the asked node counts (`peer`).
    /// False when nothing changed.
    pub fn answer(
        &self,
        (dir, id, peer): (RequestDir, &TransferId, &NodeName),
        error: Option<(&str, &str)>,
        transfer_ids: &[TransferId],
    ) -> Call<bool> {
        let (id, peer) = (id.clone(), peer.clone());
        let (code, sentence) = error.map(|(c, s)| (c.to_string(), s.to_string())).unzip();
        let ids: Vec<&str> = transfer_ids.iter().map(TransferId::as_str).collect();
        let ids = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
        self.store.call(move |db| {
            let n = db.run(
                "UPDATE requests SET status = 'answered', ok = ?4, error_code = ?5, error = ?6,
                    transfer_ids = ?7, answered_at = ?8
                 WHERE direction = ?1 AND request_id = ?2 AND peer = ?3 AND status != 'answered'",
                params![
                    dir.as_str(),
                    id,
                    peer,
                    code.is_none(),
                    code,
                    sentence,
                    ids,
                    crate::clock::now_rfc3339()
                ],
            )?;
            Ok(n == 1)
        })
    }

    /// Fails every request left `working` by an agent that stopped while
    /// it served them (`in`, `local`); `out` rows keep waiting for their
    /// reply. Returns the requests failed.
    pub fn interrupt_working(&self) -> Call<Vec<RequestRow>> {
        self.store.call(move |db| {
            let rows = db.all(
                &format!(
                    "SELECT {REQUEST_COLUMNS} FROM requests
                     WHERE status = 'working' AND direction != 'out'"
                ),
                [],
                RequestRow::from_sql,
            )?;
            db.run(
                "UPDATE requests SET status = 'answered', ok = 0, error_code = ?1,
                    error = 'the agent stopped while it served the request; ask again',
                    answered_at = ?2
                 WHERE status = 'working' AND direction != 'out'",
                params![
                    ErrorCode::RequestInterrupted.as_str(),
                    crate::clock::now_rfc3339()
                ],
            )?;
            Ok(rows)
        })
    }

    /// The receive rows of the transfers `tids` from `peer`.
    pub fn received(&self, peer: &NodeName, tids: &[TransferId]) -> Call<Vec<ReceiveRow>> {
        let peer = peer.clone();
        let ids: Vec<String> = tids.iter().map(|t| t.to_string()).collect();
        let ids = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
        self.store.call(move |db| {
            db.all(
                &format!(
                    "SELECT {COLUMNS} FROM transfers WHERE direction = ?1 AND peer = ?2
                       AND transfer_id IN (SELECT value FROM json_each(?3))"
                ),
                params![Direction::Receive, peer, ids],
                ReceiveRow::from_sql,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: &str) -> NodeName {
        NodeName::parse(n).unwrap()
    }

    /// A request is recorded once, taken once, answered once and only by
    /// the node it was asked of; one served when the agent stopped is
    /// failed at the next start, one asked keeps waiting for its reply.
    #[tokio::test]
    async fn requests_are_taken_and_answered_once() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("state.db")).unwrap();
        let ledger = store.requests();
        let (id, file) = (TransferId::new(), FileId::parse("STOCK").unwrap());
        let out = RequestRow::new(id.clone(), RequestDir::Out, node("alpha"), file.clone());
        assert!(ledger.insert(out.clone()).await.unwrap());
        assert!(!ledger.insert(out).await.unwrap(), "a duplicate is ignored");
        // The same id served here is another row.
        let served = RequestRow::new(id.clone(), RequestDir::In, node("beta"), file);
        assert!(ledger.insert(served).await.unwrap());
        assert_eq!(
            ledger.in_status(RequestStatus::Queued).await.unwrap().len(),
            2
        );
        for dir in [RequestDir::Out, RequestDir::In] {
            let key = (dir, &id);
            let (q, w) = (RequestStatus::Queued, RequestStatus::Working);
            assert!(ledger.advance(key, q, w).await.unwrap());
            assert!(!ledger.advance(key, q, w).await.unwrap(), "taken once");
        }
        // Only alpha answers the request asked of it, and only once.
        let tids = [TransferId::new()];
        let wrong = (RequestDir::Out, &id, &node("mallory"));
        assert!(!ledger.answer(wrong, None, &tids).await.unwrap());
        let right = (RequestDir::Out, &id, &node("alpha"));
        assert!(ledger.answer(right, None, &tids).await.unwrap());
        let denied = Some(("request_denied", "no"));
        assert!(!ledger.answer(right, denied, &[]).await.unwrap());
        let row = ledger.get(RequestDir::Out, &id).await.unwrap().unwrap();
        assert_eq!((row.status, row.ok), (RequestStatus::Answered, Some(true)));
        assert_eq!(row.transfer_ids, tids);
        // The served one was under way when the agent stopped.
        let failed = ledger.interrupt_working().await.unwrap();
        assert_eq!(failed.len(), 1);
        let row = ledger.get(RequestDir::In, &id).await.unwrap().unwrap();
        assert_eq!(row.ok, Some(false));
        assert_eq!(row.error_code.as_deref(), Some("request_interrupted"));
        assert!(
            ledger
                .received(&node("alpha"), &tids)
                .await
                .unwrap()
                .is_empty()
        );
    }
}
