//! The REST API under `/api/` (JSON), described by the OpenAPI document at
//! `/api/openapi.json` (`openapi.json`, served as written; a test holds
//! its paths and this router in step).
//!
//! - `GET /api/transfers`: history with filters, a page at a time.
//! - `GET /api/transfers/{id}`: one transfer's rows (digests, hook output
//!   tail) and its status timeline.
//! - `GET /api/transfers/{id}/chain`: its job flow across nodes, as far as
//!   this node knows it (`hakobu history --chain`).
//! - `actions.rs`: rerun a transfer's hook, resend its spooled copy.
//! - `send.rs`: send a file (the profile's source, or uploaded), request a
//!   file from another node; each at once (202) or waiting (`wait=`).
//!
//! Every failure is `{"code": "...", "message": "..."}` with a code of
//! README's tables.

mod actions;
mod send;

pub use send::clear_uploads;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, HttpState};
use crate::domain::TransferId;
use crate::error_code::ErrorCode;
use crate::store::{Direction, HistoryFilter, MAX_PAGE, StoreError};

/// The OpenAPI document.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Rows in a page when `limit` is not given.
const DEFAULT_PAGE: usize = 50;

/// The API's routes.
pub fn router() -> Router<HttpState> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/transfers", get(list))
        .route("/api/transfers/{id}", get(detail))
        .route("/api/transfers/{id}/chain", get(chain))
        .route("/api/transfers/{id}/rerun", post(actions::rerun))
        .route("/api/transfers/{id}/resend", post(actions::resend))
        .route("/api/send", post(send::source))
        .route("/api/send/{file_id}", post(send::upload))
        .route("/api/requests", post(send::request))
        .route("/api/requests/{id}", get(send::request_status))
        .route("/api/{*rest}", axum::routing::any(unknown))
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

async fn unknown() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such API path or method; /api/openapi.json lists them",
    )
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), e.to_string())
    }
}

/// A 400 with `bad_request`.
pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}

/// The query string, or a 400 that says what is wrong with it.
pub(super) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| bad_request(format!("the query string: {}", e.body_text())))
}

/// A transfer id from the path, or a 400.
pub(super) fn transfer_id(text: &str) -> Result<TransferId, ApiError> {
    TransferId::parse(text).map_err(|e| bad_request(format!("{text:?}: {e}")))
}

/// `GET /api/transfers`'s query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Statuses, comma-separated.
    status: Option<String>,
    failed: Option<bool>,
    file_id: Option<String>,
    peer: Option<String>,
    direction: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

/// An RFC 3339 time, normalised to the form rows keep (UTC, milliseconds).
fn time(name: &str, text: Option<String>) -> Result<Option<String>, ApiError> {
    text.map(|t| {
        humantime::parse_rfc3339_weak(&t)
            .map(|at| humantime::format_rfc3339_millis(at).to_string())
            .map_err(|e| {
                bad_request(format!(
                    "{name}={t:?}: {e}; give an RFC 3339 time such as 2026-12-01T00:00:00Z"
                ))
            })
    })
    .transpose()
}

impl ListQuery {
    fn filter(self) -> Result<HistoryFilter, ApiError> {
        let mut status = Vec::new();
        for s in self.status.iter().flat_map(|s| s.split(',')) {
            let s = s.trim();
            crate::store::Status::parse(s).map_err(|e| bad_request(format!("status: {e}")))?;
            status.push(s.to_string());
        }
        let direction = match self.direction.as_deref() {
            None => None,
            Some("send") => Some(Direction::Send),
            Some("receive") => Some(Direction::Receive),
            Some(d) => return Err(bad_request(format!("direction={d:?}: send or receive"))),
        };
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(bad_request(format!("limit={limit}: 1 to {MAX_PAGE}")));
        }
        Ok(HistoryFilter {
            status,
            failed: self.failed.unwrap_or(false),
            file_id: self.file_id,
            peer: self.peer,
            direction,
            since: time("since", self.since)?,
            until: time("until", self.until)?,
            limit,
            offset: self.offset.unwrap_or(0),
        })
    }
}

/// `GET /api/transfers`: `{total, limit, offset, transfers: [...]}`, newest first.
async fn list(
    State(st): State<HttpState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let filter = query(q)?.filter()?;
    let (limit, offset) = (filter.limit, filter.offset);
    let total = st.store.count(filter.clone()).await?;
    let rows = st.store.search(filter).await?;
    Ok(Json(json!({
        "total": total,
        "limit": limit,
        "offset": offset,
        "transfers": rows,
    })))
}

/// A 404 for a transfer this node has no row of.
fn unknown_transfer(tid: &TransferId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownTransfer,
        format!("no transfer {tid} in this node's history; ask a node it went through"),
    )
}

/// `GET /api/transfers/{id}`: `{transfer_id, rows, timeline}`.
async fn detail(
    State(st): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tid = transfer_id(&id)?;
    let rows = st.store.find(&tid).await?;
    if rows.is_empty() {
        return Err(unknown_transfer(&tid));
    }
    let timeline = st.store.timeline(&tid).await?;
    Ok(Json(json!({
        "transfer_id": tid,
        "rows": rows,
        "timeline": timeline,
    })))
}

/// `GET /api/transfers/{id}/chain`: the flow, as `hakobu history --chain --json`.
async fn chain(
    State(st): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<crate::store::Chain>, ApiError> {
    let tid = transfer_id(&id)?;
    match st.store.chain(&st.cfg.node, &tid).await? {
        Some(chain) => Ok(Json(chain)),
        None => Err(unknown_transfer(&tid)),
    }
}
