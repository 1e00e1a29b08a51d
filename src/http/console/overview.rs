//! `/`: failures of the last 24 hours first (each with its code, sentence
//! and what to do), then transfers in flight with live progress, then those
//! waiting for a receipt, then recent history. `/console/inflight.json` is
//! what `app.js` polls to move the bars.

use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Serialize;

use super::view;
use crate::http::HttpState;
use crate::store::{Entry, HistoryFilter, Status, StoreError};

/// Rows at most in each section of the overview.
const SECTION: usize = 50;

/// The statuses of a transfer in flight.
fn moving() -> Vec<String> {
    Status::ALL
        .into_iter()
        .filter(|s| view::in_flight(*s))
        .map(|s| s.as_str().to_string())
        .collect()
}

async fn in_flight(st: &HttpState) -> Result<Vec<Entry>, StoreError> {
    st.store
        .search(HistoryFilter {
            status: moving(),
            limit: crate::store::MAX_PAGE,
            ..Default::default()
        })
        .await
}

pub async fn page(State(st): State<HttpState>) -> Response {
    match sections(&st).await {
        Ok(r) => r,
        Err(e) => view::problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Overview",
            e.code(),
            &e.to_string(),
        ),
    }
}

async fn sections(st: &HttpState) -> Result<Response, StoreError> {
    let day_ago = SystemTime::now() - Duration::from_secs(24 * 3600);
    let since = humantime::format_rfc3339_millis(day_ago).to_string();
    let failed = st
        .store
        .search(HistoryFilter {
            failed: true,
            since: Some(since),
            limit: SECTION,
            ..Default::default()
        })
        .await?;
    let moving = in_flight(st).await?;
    let awaiting = st
        .store
        .search(HistoryFilter {
            status: vec![Status::AwaitingReceipt.as_str().into()],
            limit: SECTION,
            ..Default::default()
        })
        .await?;
    let recent = st
        .store
        .search(HistoryFilter {
            limit: SECTION,
            ..Default::default()
        })
        .await?;
    let body = html! {
        p.node { "Node " strong { (st.cfg.node.as_str()) } }
        section #failures {
            h2 { "Failed in the last 24 hours (" (failed.len()) ")" }
            (view::table(&failed, true, None))
        }
        section #inflight data-poll="/console/inflight.json" {
            h2 { "In flight (" (moving.len()) ")" }
            (view::table(&moving, false, Some(("Progress", view::progress_bar))))
        }
        section #awaiting {
            h2 { "Waiting for a receipt (" (awaiting.len()) ")" }
            (view::table(&awaiting, true, Some(("Waiting", view::waiting))))
        }
        section #recent {
            h2 { "Recent" }
            (view::table(&recent, true, None))
            p { a href="/history" { "All history, filtered" } }
        }
    };
    Ok(view::layout("Overview", body).into_response())
}

/// One row in flight, as `app.js` reads it.
#[derive(Serialize)]
struct Moving {
    key: String,
    transfer_id: String,
    status: &'static str,
    done: u64,
    total: u64,
}

pub async fn inflight_json(State(st): State<HttpState>) -> Response {
    match in_flight(&st).await {
        Ok(rows) => {
            let out: Vec<Moving> = rows
                .iter()
                .map(|e| {
                    let (done, total) = view::progress(e);
                    Moving {
                        key: view::row_key(e),
                        transfer_id: e.transfer().transfer_id.to_string(),
                        status: e.transfer().status.as_str(),
                        done,
                        total,
                    }
                })
                .collect();
            Json(out).into_response()
        }
        Err(e) => {
            crate::http::ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), e.to_string())
                .into_response()
        }
    }
}
