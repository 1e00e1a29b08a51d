//! `POST /api/transfers/{id}/rerun` and `/resend`: the actions of `hakobu
//! rerun` and `hakobu resend` (one implementation: `crate::actions`), each
//! in a task of its own so that a caller that goes away does not cut a hook
//! off half-way.
//!
//! - rerun: 200 `{transfer_id, event, ran, ok}` when the hook ran and
//!   succeeded (or none is configured: `ran: false`); 502 with the hook's
//!   code when it ran and failed.
//! - resend: 202 `{transfer_ids}`, the new transfers queued.
//! - refused: 404 `unknown_transfer`, 409 with the refusal's code
//!   (`action_refused`, `spool_unreadable`, ...), 500 for the state database.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::transfer_id;
use crate::actions::{self, ActionError, Rerun};
use crate::error_code::ErrorCode;
use crate::http::{ApiError, HttpState, refusal_status};

fn refused(e: ActionError) -> ApiError {
    ApiError::new(refusal_status(e.code()), e.code(), e.to_string())
}

fn cut_short(code: ErrorCode, what: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        code,
        format!(
            "the {what} stopped before it ended; GET /api/transfers/{{id}} shows what it recorded"
        ),
    )
}

/// `POST /api/transfers/{id}/rerun`.
pub async fn rerun(
    State(st): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tid = transfer_id(&id)?;
    let (cfg, store, t) = (st.cfg.clone(), st.store.clone(), tid.clone());
    // The agent runs this endpoint: it holds the state directory.
    let task = tokio::spawn(async move { actions::rerun(&cfg, &store, &t, true).await });
    let result = task
        .await
        .map_err(|_| cut_short(ErrorCode::HookInterrupted, "rerun"))?;
    Ok(match result.map_err(refused)? {
        Rerun::NoHook(event) => Json(json!({
            "transfer_id": tid,
            "event": event.as_str(),
            "ran": false,
            "ok": true,
            "message": format!("no {} hook is configured for this transfer; nothing ran", event.as_str()),
        }))
        .into_response(),
        Rerun::Ran { event, outcome, .. } if outcome.ok() => Json(json!({
            "transfer_id": tid,
            "event": event.as_str(),
            "ran": true,
            "ok": true,
        }))
        .into_response(),
        Rerun::Ran { event, outcome, .. } => {
            let (code, sentence) = outcome.failure();
            let body = json!({
                "transfer_id": tid,
                "event": event.as_str(),
                "ran": true,
                "ok": false,
                "code": code.as_str(),
                "message": sentence,
            });
            (StatusCode::BAD_GATEWAY, Json(body)).into_response()
        }
    })
}

/// `POST /api/transfers/{id}/resend`.
pub async fn resend(
    State(st): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let tid = transfer_id(&id)?;
    let (cfg, store) = (st.cfg.clone(), st.store.clone());
    let task = tokio::spawn(async move { actions::resend(&cfg, &store, &tid).await });
    let ids = task
        .await
        .map_err(|_| cut_short(ErrorCode::IoError, "resend"))?
        .map_err(refused)?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "transfer_ids": ids }))).into_response())
}
