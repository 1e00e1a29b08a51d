//! History searched: the rows the REST API and the web console list, by
//! status, file id, peer, side and time, a page at a time, newest first.

use rusqlite::types::Value;

use super::history::Entry;
use super::row::Direction;
use super::{COLUMNS, Cached, Call, Store};

/// Rows at most in one page.
pub const MAX_PAGE: usize = 1000;

/// What to list; every field that is set narrows the list.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Status names (`sent`, `receive_failed`, ...); any of them.
    pub status: Vec<String>,
    /// Only failed rows (a status that ends in `_failed`, or
    /// `hook_interrupted`).
    pub failed: bool,
    pub file_id: Option<String>,
    pub peer: Option<String>,
    pub direction: Option<Direction>,
    /// RFC 3339 times; a row's `started_at` within [since, until).
    pub since: Option<String>,
    pub until: Option<String>,
    /// Page size (at most [`MAX_PAGE`]) and rows to skip.
    pub limit: usize,
    pub offset: usize,
}

impl HistoryFilter {
    /// The WHERE clause and its parameters.
    fn clause(&self) -> (String, Vec<Value>) {
        let mut terms = Vec::new();
        let mut params: Vec<Value> = Vec::new();
        let param = |v: String, params: &mut Vec<Value>| {
            params.push(Value::Text(v));
            format!("?{}", params.len())
        };
        if !self.status.is_empty() {
            let marks: Vec<String> = self
                .status
                .iter()
                .map(|s| param(s.clone(), &mut params))
                .collect();
            terms.push(format!("status IN ({})", marks.join(", ")));
        }
        if self.failed {
            terms.push(
                "(status LIKE '%\\_failed' ESCAPE '\\' OR status = 'hook_interrupted')".into(),
            );
        }
        if let Some(f) = &self.file_id {
            terms.push(format!("file_id = {}", param(f.clone(), &mut params)));
        }
        if let Some(p) = &self.peer {
            terms.push(format!("peer = {}", param(p.clone(), &mut params)));
        }
        if let Some(d) = self.direction {
            terms.push(format!(
                "direction = {}",
                param(d.as_str().into(), &mut params)
            ));
        }
        if let Some(t) = &self.since {
            terms.push(format!("started_at >= {}", param(t.clone(), &mut params)));
        }
        if let Some(t) = &self.until {
            terms.push(format!("started_at < {}", param(t.clone(), &mut params)));
        }
        let clause = if terms.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", terms.join(" AND "))
        };
        (clause, params)
    }
}

impl Store {
    /// One page of the rows `filter` selects, newest first.
    pub fn search(&self, filter: HistoryFilter) -> Call<Vec<Entry>> {
        self.call(move |db| {
            let (clause, mut params) = filter.clause();
            params.push(Value::Integer(filter.limit.clamp(1, MAX_PAGE) as i64));
            params.push(Value::Integer(filter.offset as i64));
            let (l, o) = (params.len() - 1, params.len());
            db.all(
                &format!(
                    "SELECT {COLUMNS} FROM transfers {clause} ORDER BY seq DESC LIMIT ?{l} OFFSET ?{o}"
                ),
                rusqlite::params_from_iter(params),
                Entry::from_sql,
            )
        })
    }

    /// How many rows `filter` selects in all (its paging ignored).
    pub fn count(&self, filter: HistoryFilter) -> Call<u64> {
        self.call(move |db| {
            let (clause, params) = filter.clause();
            db.one(
                &format!("SELECT COUNT(*) FROM transfers {clause}"),
                rusqlite::params_from_iter(params),
                |r| r.get::<_, i64>(0).map(|n| n as u64),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{FileId, NodeName, TransferId};
    use crate::store::{ReceiveRow, Status, Transfer};

    #[tokio::test]
    async fn a_filter_narrows_and_pages() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("state.db")).unwrap();
        let rx = store.receiving();
        for (i, (peer, file, status)) in [
            ("alpha", "sales", Status::Received),
            ("alpha", "orders", Status::ReceiveFailed),
            ("beta", "sales", Status::Receiving),
            ("beta", "sales", Status::HookFailed),
        ]
        .into_iter()
        .enumerate()
        {
            let mut t = Transfer::begin(
                TransferId::new(),
                NodeName::parse(peer).unwrap(),
                FileId::parse(file).unwrap(),
                "a.csv",
                (10, 65536),
                status,
            );
            t.started_at = format!("2026-01-0{}T00:00:00.000Z", i + 1);
            rx.insert(&ReceiveRow::new(t)).await.unwrap();
        }
        let all = |f: HistoryFilter| {
            let store = store.clone();
            async move {
                let rows = store
                    .search(HistoryFilter { limit: 100, ..f })
                    .await
                    .unwrap();
                rows.iter()
                    .map(|e| e.transfer().started_at[8..10].to_string())
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            all(HistoryFilter::default()).await,
            ["04", "03", "02", "01"]
        );
        let failed = HistoryFilter {
            failed: true,
            ..Default::default()
        };
        assert_eq!(
            all(failed.clone()).await,
            ["04", "02"],
            "receive_failed and hook_failed"
        );
        let sales_beta = HistoryFilter {
            file_id: Some("sales".into()),
            peer: Some("beta".into()),
            ..Default::default()
        };
        assert_eq!(all(sales_beta).await, ["04", "03"]);
        let window = HistoryFilter {
            since: Some("2026-01-02".into()),
            until: Some("2026-01-04".into()),
            ..Default::default()
        };
        assert_eq!(all(window).await, ["03", "02"]);
        let status = HistoryFilter {
            status: vec!["received".into(), "receiving".into()],
            ..Default::default()
        };
        assert_eq!(all(status).await, ["03", "01"]);
        let page = store
            .search(HistoryFilter {
                limit: 2,
                offset: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(page.len(), 2);
        assert_eq!(store.count(failed).await.unwrap(), 2);
    }
}
