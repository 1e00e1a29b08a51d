//! `/history`: the history searched with the filters of `HistoryFilter`
//! (status, file id, peer, direction, time range) as a GET form, a page at
//! a time, newest first.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use super::view;
use crate::error_code::ErrorCode;
use crate::http::HttpState;
use crate::store::{Direction, HistoryFilter, Status};

/// Rows in one page.
const PAGE: usize = 50;
/// The highest page number an address may ask for (a larger one is read as it).
const MAX_PAGES: usize = 1_000_000;

/// The form's fields; an empty field filters nothing.
#[derive(Debug, Default, Deserialize)]
pub struct Form {
    #[serde(default)]
    status: String,
    #[serde(default)]
    file_id: String,
    #[serde(default)]
    peer: String,
    #[serde(default)]
    direction: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    page: usize,
}

fn set(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

impl Form {
    /// The filter the form asks for; an unknown status or direction is a
    /// mistake in the address, said so.
    fn filter(&self) -> Result<HistoryFilter, String> {
        let mut f = HistoryFilter {
            file_id: set(&self.file_id),
            peer: set(&self.peer),
            since: set(&self.since),
            until: set(&self.until),
            limit: PAGE,
            offset: self.page.min(MAX_PAGES) * PAGE,
            ..Default::default()
        };
        match self.status.trim() {
            "" => {}
            "failed" => f.failed = true,
            s => match Status::parse(s) {
                Ok(s) => f.status = vec![s.as_str().to_string()],
                Err(e) => return Err(e.to_string()),
            },
        }
        f.direction = match self.direction.trim() {
            "" => None,
            "send" => Some(Direction::Send),
            "receive" => Some(Direction::Receive),
            d => return Err(format!("unknown direction {d:?}: send or receive")),
        };
        Ok(f)
    }

    /// The address of page `page` with the same filters.
    fn page_link(&self, page: usize) -> String {
        let mut q = String::from("/history?");
        for (k, v) in [
            ("status", &self.status),
            ("file_id", &self.file_id),
            ("peer", &self.peer),
            ("direction", &self.direction),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if !v.is_empty() {
                q.push_str(k);
                q.push('=');
                q.push_str(&encode(v));
                q.push('&');
            }
        }
        q.push_str(&format!("page={page}"));
        q
    }
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub async fn page(
    State(st): State<HttpState>,
    form: Result<Query<Form>, QueryRejection>,
) -> Response {
    let Ok(Query(mut form)) = form else {
        return view::problem(
            StatusCode::BAD_REQUEST,
            "History",
            ErrorCode::ActionRefused,
            "the address's filters could not be read; use the form",
        );
    };
    form.page = form.page.min(MAX_PAGES);
    let filter = match form.filter() {
        Ok(f) => f,
        Err(e) => {
            return view::problem(
                StatusCode::BAD_REQUEST,
                "History",
                ErrorCode::ActionRefused,
                &e,
            );
        }
    };
    let rows = match st.store.search(filter.clone()).await {
        Ok(r) => r,
        Err(e) => {
            return view::problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "History",
                e.code(),
                &e.to_string(),
            );
        }
    };
    let total = st.store.count(filter).await.unwrap_or(rows.len() as u64);
    let first = form.page * PAGE;
    let more = (first + rows.len()) < total as usize;
    let statuses: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
    let body = html! {
        form #filter method="get" action="/history" {
            label { "Status "
                select name="status" {
                    option value="" selected[form.status.is_empty()] { "any" }
                    option value="failed" selected[form.status == "failed"] { "failed (any)" }
                    @for s in &statuses {
                        option value=(s) selected[form.status == *s] { (s) }
                    }
                }
            }
            label { "File id " input name="file_id" value=(form.file_id) size="12"; }
            label { "Peer " input name="peer" value=(form.peer) size="12"; }
            label { "Direction "
                select name="direction" {
                    option value="" selected[form.direction.is_empty()] { "both" }
                    option value="send" selected[form.direction == "send"] { "send" }
                    option value="receive" selected[form.direction == "receive"] { "receive" }
                }
            }
            label { "Since (UTC) " input name="since" value=(form.since) placeholder="2026-01-31T00:00" size="18"; }
            label { "Until (UTC) " input name="until" value=(form.until) placeholder="2026-02-01" size="18"; }
            button #apply type="submit" { "Filter" }
        }
        p #count {
            @if total == 0 { "No transfer matches." }
            @else { "Transfers " (first + 1) "–" (first + rows.len()) " of " (total) "." }
        }
        section #results { (view::table(&rows, true, None)) }
        nav.pages {
            @if form.page > 0 { a #prev href=(form.page_link(form.page - 1)) { "← Newer" } }
            @if more { a #next href=(form.page_link(form.page + 1)) { "Older →" } }
        }
    };
    view::layout("History", body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_becomes_a_filter_and_pages_keep_it() {
        let form = Form {
            status: "failed".into(),
            peer: "alpha".into(),
            since: "2026-01-01T00:00".into(),
            page: 2,
            ..Default::default()
        };
        let f = form.filter().unwrap();
        assert!(f.failed);
        assert_eq!(f.peer.as_deref(), Some("alpha"));
        assert_eq!(f.file_id, None);
        assert_eq!(f.offset, 2 * PAGE);
        assert_eq!(
            form.page_link(3),
            "/history?status=failed&peer=alpha&since=2026-01-01T00%3A00&page=3"
        );
        let bad = Form {
            status: "nope".into(),
            ..Default::default()
        };
        assert!(bad.filter().is_err());
    }
}
