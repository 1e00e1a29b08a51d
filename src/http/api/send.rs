//! Sending and requesting through the API, as `hakobu send` and `hakobu
//! request` do from the command line:
//!
//! - `POST /api/send` `{file_id, to?, wait?}`: the send profile's `source`
//!   (through its `before_send` job), recorded as a local request.
//! - `POST /api/send/{file_id}?name=N&to=NODE&wait=D`, the file as the body:
//!   streamed into `state_dir/uploads/` (mode 0600), then queued in the spool
//!   like `hakobu send PATH`. Nothing but these two can be sent: the API
//!   never reads a path a caller names.
//! - `POST /api/requests` `{file_id, from, wait?}`: ask another node for a
//!   file (pull); `GET /api/requests/{id}` its state.
//!
//! Without `wait` the answer is 202 with the id at once; with `wait` (a
//! duration, at most [`MAX_WAIT`]) 200 once every transfer has settled, 502
//! with the transfer's code if one failed, 504 `request_timeout` if time
//! ran out (the transfer goes on).

use std::path::{Path as FsPath, PathBuf};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use super::{bad_request, query, transfer_id};
use crate::domain::{FileName, NodeName, TransferId};
use crate::error_code::ErrorCode;
use crate::http::{ApiError, HttpState};
use crate::store::{Entry, RequestDir, RequestRow, RequestStatus, Status, Store};

/// The longest a call may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// How often a waiting call looks at the state database.
const POLL: Duration = Duration::from_millis(200);

fn not_found(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
}

fn json_body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t)
        .map_err(|e| bad_request(format!("the JSON body: {}", e.body_text())))
}

fn wait_for(text: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(text) = text else { return Ok(None) };
    let d = crate::config::parse_duration(text)
        .map_err(|e| bad_request(format!("wait={text:?}: {e}")))?;
    if d > MAX_WAIT {
        return Err(bad_request(format!(
            "wait={text:?}: at most 1h; follow a longer transfer with GET /api/transfers/{{id}}"
        )));
    }
    Ok(Some(d))
}

fn node(what: &str, text: &str) -> Result<NodeName, ApiError> {
    NodeName::parse(text).map_err(|e| bad_request(format!("{what}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceBody {
    file_id: String,
    to: Option<String>,
    wait: Option<String>,
}

/// `POST /api/send`: the profile's source.
pub async fn source(
    State(st): State<HttpState>,
    body: Result<Json<SourceBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let b = json_body(body)?;
    let wait = wait_for(b.wait.as_deref())?;
    let profile = st
        .cfg
        .send_profile(&b.file_id)
        .ok_or_else(|| not_found(format!("no send profile for file id `{}`", b.file_id)))?;
    if profile.source.is_none() {
        return Err(bad_request(format!(
            "the send profile `{}` has no `source`: upload the file with POST /api/send/{}?name=NAME",
            b.file_id, b.file_id
        )));
    }
    let to = b.to.as_deref().map(|t| node("to", t)).transpose()?;
    if to.is_none() && profile.to.is_empty() {
        return Err(bad_request(format!(
            "the send profile `{}` has no `to`: give \"to\"",
            b.file_id
        )));
    }
    let id = TransferId::new();
    let peer = to.unwrap_or_else(|| st.cfg.node.clone());
    let row = RequestRow::new(id.clone(), RequestDir::Local, peer, profile.file_id.clone());
    record(&st.store, row).await?;
    let Some(wait) = wait else {
        return Ok(accepted(json!({ "request_id": id })));
    };
    let deadline = Instant::now() + wait;
    let tids = answered(&st.store, RequestDir::Local, &id, deadline).await?;
    let head = json!({ "request_id": id });
    settle(&st.store, Side::Sent, head, &tids, deadline).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    name: String,
    to: Option<String>,
    wait: Option<String>,
}

/// `POST /api/send/{file_id}?name=N`: the body is the file.
pub async fn upload(
    State(st): State<HttpState>,
    Path(file_id): Path<String>,
    q: Result<Query<UploadQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let wait = wait_for(q.wait.as_deref())?;
    let mut profile = st
        .cfg
        .send_profile(&file_id)
        .cloned()
        .ok_or_else(|| not_found(format!("no send profile for file id `{file_id}`")))?;
    let name = FileName::parse(&q.name).map_err(|e| bad_request(format!("name: {e}")))?;
    if let Some(to) = &q.to {
        let to = node("to", to)?;
        if profile.encrypt && st.cfg.keys.peer(&to).is_none() {
            return Err(bad_request(format!(
                "file id `{file_id}` is sent encrypted and keys.peers has no public key for `{to}`"
            )));
        }
        profile.to = vec![to];
    }
    if profile.to.is_empty() {
        return Err(bad_request(format!(
            "the send profile `{file_id}` has no `to`: give to=NODE"
        )));
    }
    let part = receive_body(&st.cfg.state_dir, body).await?;
    let spool = crate::sender::Spool::new(st.cfg.spool_dir());
    let meta = Default::default();
    let ledger = st.store.sending();
    let queued = crate::sender::queue(&ledger, &spool, &profile, (&part, &name), &meta).await;
    let _ = std::fs::remove_file(&part);
    let tid = queued.map_err(|e| ApiError::new(status_of(e.code()), e.code(), e.to_string()))?;
    let Some(wait) = wait else {
        return Ok(accepted(json!({ "transfer_id": tid })));
    };
    let deadline = Instant::now() + wait;
    let head = json!({ "transfer_id": tid });
    settle(&st.store, Side::Sent, head, &[tid], deadline).await
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
        ErrorCode::ConversionFailed => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Streams the body into a new file under `state_dir/uploads/` (mode 0600);
/// removed again if the body does not arrive whole.
async fn receive_body(state_dir: &FsPath, body: Body) -> Result<PathBuf, ApiError> {
    let dir = state_dir.join("uploads");
    let path = dir.join(format!("{}.part", TransferId::new()));
    let failed = |e: std::io::Error| {
        let code = ErrorCode::of_io(&e);
        ApiError::new(
            status_of(code),
            code,
            format!("cannot keep the upload in {}: {e}", dir.display()),
        )
    };
    std::fs::create_dir_all(&dir).map_err(failed)?;
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .await
        .map_err(failed)?;
    let mut stream = body.into_data_stream();
    let written: Result<(), ApiError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| bad_request(format!("the body did not arrive whole: {e}")))?;
            f.write_all(&chunk).await.map_err(failed)?;
        }
        f.flush().await.map_err(failed)
    }
    .await;
    drop(f);
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(e);
    }
    Ok(path)
}

/// Removes what a stopped agent left in `state_dir/uploads/`.
pub fn clear_uploads(state_dir: &FsPath) {
    if let Ok(entries) = std::fs::read_dir(state_dir.join("uploads")) {
        for e in entries.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestBody {
    file_id: String,
    from: String,
    wait: Option<String>,
}

/// `POST /api/requests`: ask `from` for the file (it arrives here).
pub async fn request(
    State(st): State<HttpState>,
    body: Result<Json<RequestBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let b = json_body(body)?;
    let wait = wait_for(b.wait.as_deref())?;
    let from = node("from", &b.from)?;
    if from == st.cfg.node {
        return Err(bad_request(format!("from: {from} is this node")));
    }
    let profile = st
        .cfg
        .receive_profile(&b.file_id)
        .filter(|p| p.from.contains(&from))
        .ok_or_else(|| {
            not_found(format!(
                "no receive profile for file id `{}` accepts it from {from}: add one so that the file can arrive",
                b.file_id
            ))
        })?;
    let id = TransferId::new();
    let row = RequestRow::new(id.clone(), RequestDir::Out, from, profile.file_id.clone());
    record(&st.store, row).await?;
    let Some(wait) = wait else {
        return Ok(accepted(json!({ "request_id": id })));
    };
    let deadline = Instant::now() + wait;
    let tids = answered(&st.store, RequestDir::Out, &id, deadline).await?;
    let head = json!({ "request_id": id });
    settle(&st.store, Side::Received, head, &tids, deadline).await
}

/// `GET /api/requests/{id}`.
pub async fn request_status(
    State(st): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = transfer_id(&id)?;
    for dir in [RequestDir::Out, RequestDir::Local, RequestDir::In] {
        if let Some(r) = st.store.requests().get(dir, &id).await? {
            return Ok(Json(json!({
                "request_id": r.request_id,
                "direction": r.dir.as_str(),
                "peer": r.peer,
                "file_id": r.file_id,
                "status": r.status.as_str(),
                "ok": r.ok,
                "error_code": r.error_code,
                "error": r.error,
                "transfer_ids": r.transfer_ids,
                "created_at": r.created_at,
            })));
        }
    }
    Err(not_found(format!("no request {id} in this node's history")))
}

fn accepted(body: Value) -> Response {
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

async fn record(store: &Store, row: RequestRow) -> Result<(), ApiError> {
    match store.requests().insert(row).await? {
        true => Ok(()),
        false => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::StateDbError,
            "a request with this id exists already; send the call again",
        )),
    }
}

fn timed_out(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::RequestTimeout,
        format!("{what} within `wait`; it goes on: GET /api/transfers or /api/requests shows it"),
    )
}

/// The transfers a request started, once it is answered.
async fn answered(
    store: &Store,
    dir: RequestDir,
    id: &TransferId,
    deadline: Instant,
) -> Result<Vec<TransferId>, ApiError> {
    loop {
        if let Some(r) = store.requests().get(dir, id).await? {
            if r.status == RequestStatus::Answered {
                return match r.ok {
                    Some(true) => Ok(r.transfer_ids),
                    _ => Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        r.error_code
                            .as_deref()
                            .and_then(ErrorCode::parse)
                            .unwrap_or(ErrorCode::MalformedMessage),
                        r.error.unwrap_or_else(|| "the request failed".into()),
                    )),
                };
            }
        }
        if Instant::now() >= deadline {
            return Err(timed_out("no answer came"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Which side's rows a call waits for.
#[derive(Clone, Copy)]
enum Side {
    Sent,
    Received,
}

/// Waits until every row of `tids` on `side` is final: 200 with the rows
/// when each succeeded, 502 with the first failure's code otherwise.
async fn settle(
    store: &Store,
    side: Side,
    mut head: Value,
    tids: &[TransferId],
    deadline: Instant,
) -> Result<Response, ApiError> {
    loop {
        let mut rows: Vec<Entry> = Vec::new();
        for tid in tids {
            rows.extend(store.find(tid).await?.into_iter().filter(|e| {
                matches!(
                    (side, e),
                    (Side::Sent, Entry::Send(_)) | (Side::Received, Entry::Receive(_))
                )
            }));
        }
        let settled =
            rows.len() >= tids.len() && rows.iter().all(|e| e.transfer().status.is_final());
        if settled {
            let failed = rows.iter().find(|e| match e {
                Entry::Send(r) => !r.delivered,
                Entry::Receive(r) => r.transfer.status != Status::Received,
            });
            let status = match failed.map(Entry::transfer) {
                None => StatusCode::OK,
                Some(t) => {
                    head["code"] = json!(t.error_code.as_deref().unwrap_or(t.status.as_str()));
                    head["message"] = json!(t.error.as_deref().unwrap_or("the transfer failed"));
                    StatusCode::BAD_GATEWAY
                }
            };
            head["transfer_ids"] = json!(tids);
            head["transfers"] = json!(rows);
            return Ok((status, Json(head)).into_response());
        }
        if Instant::now() >= deadline {
            return Err(timed_out("the transfer did not settle"));
        }
        tokio::time::sleep(POLL).await;
    }
}
