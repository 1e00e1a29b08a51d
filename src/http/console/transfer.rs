//! `/transfers/{id}`: one transfer's rows (the sending and/or the receiving
//! side), statuses and times, size and digests, its error with the code's
//! sentence and what to do, the tail of its hook's output, and the Rerun
//! and Resend buttons where they apply. The buttons POST (from `app.js`,
//! with the `X-Hakobu-Csrf` header) to `/console/transfers/{id}/rerun` and
//! `/resend`, which do the work through `crate::actions`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Serialize;

use super::view;
use crate::actions::{self, ActionError, Rerun};
use crate::domain::TransferId;
use crate::error_code::ErrorCode;
use crate::http::HttpState;
use crate::store::Entry;

pub async fn page(State(st): State<HttpState>, Path(id): Path<String>) -> Response {
    let title = "Transfer";
    let Ok(tid) = TransferId::parse(&id) else {
        return view::problem(
            StatusCode::NOT_FOUND,
            title,
            ErrorCode::UnknownTransfer,
            "that is not a transfer id",
        );
    };
    let rows = match st.store.find(&tid).await {
        Ok(r) => r,
        Err(e) => {
            return view::problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                title,
                e.code(),
                &e.to_string(),
            );
        }
    };
    if rows.is_empty() {
        return view::problem(
            StatusCode::NOT_FOUND,
            title,
            ErrorCode::UnknownTransfer,
            &format!("no transfer {tid} in this node's history"),
        );
    }
    // The flow and the timeline are extras: a failure to read them shows
    // as a note, not as the page failing.
    let chain = st.store.chain(&st.cfg.node, &tid).await.ok().flatten();
    let events = st.store.timeline(&tid).await.unwrap_or_default();
    let settled = rows.iter().all(|e| e.transfer().status.is_final());
    let sent_here = rows.iter().any(|e| matches!(e, Entry::Send(_)));
    let body = html! {
        p.tid #transfer-id { (tid.to_string()) }
        div.actions {
            @if settled {
                button #rerun data-action="rerun" data-id=(tid.to_string()) { "Rerun the hook" }
            }
            @if settled && sent_here {
                button #resend data-action="resend" data-id=(tid.to_string()) { "Resend" }
            }
            @if !settled { p.note { "The actions come once the transfer has settled." } }
            div #action-result role="status" {}
        }
        @for e in &rows { (row(e)) }
        @match &chain {
            Some(c) => (super::flow::section(c)),
            None => p.note { "The job flow could not be read." },
        }
        (super::flow::timeline(&events))
    };
    view::layout(&format!("Transfer {}", rows[0].transfer().file_name), body).into_response()
}

/// One side of the transfer.
fn row(e: &Entry) -> Markup {
    let t = e.transfer();
    let known = t.error_code.as_deref().and_then(ErrorCode::parse);
    html! {
        section.row data-direction=(e.direction().as_str()) data-status=(t.status.as_str()) {
            h2 { (e.direction().as_str()) " · " (t.peer.as_str()) " · " (view::status(t.status)) }
            @if view::in_flight(t.status) { (view::progress_bar(e)) }
            dl {
                dt { "File id" } dd { (t.file_id.as_str()) }
                dt { "Name" } dd.name { (t.file_name) }
                dt { "Size" } dd { (view::size(t.size)) " (" (t.size) " bytes; " (t.wire_bytes) " on the wire)" }
                dt { "SHA-256" } dd.digest { (t.sha256.as_deref().unwrap_or("-")) }
                @if let Some(p) = &t.placed_sha256 { dt { "Placed SHA-256" } dd.digest { (p) } }
                dt { "Started" } dd { (t.started_at) }
                dt { "Finished" } dd { (t.finished_at.as_deref().unwrap_or("-")) }
                dt { "Attempt" } dd { (t.attempt) }
                @match e {
                    Entry::Send(s) => {
                        dt { "Spooled copy" } dd { (s.path.display().to_string()) }
                        dt { "Placed at" } dd { (s.remote_path.as_deref().unwrap_or("-")) }
                        @if let Some(x) = s.remote_hook_exit { dt { "Receiver's hook exit" } dd { (x) } }
                        @if let Some(note) = e.awaiting_note(crate::clock::unix_now()) { dt { "Waiting" } dd.waiting { (note) } }
                    }
                    Entry::Receive(r) => {
                        dt { "Placed at" } dd { (r.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into())) }
                        dt { "Receipt sent" } dd { (if r.receipt_sent { "yes" } else { "no" }) }
                    }
                }
                @for (k, v) in &t.meta { dt { "meta " (k) } dd { (v) } }
            }
            @if let Some(code) = &t.error_code {
                div.error {
                    p { "Error " code.code { (code) } }
                    @if let Some(m) = &t.error { p.message { (m) } }
                    @if let Some(k) = known {
                        p.sentence { (k.sentence()) }
                        p.todo { "What to do: " (k.what_to_do()) }
                    }
                }
            }
            @if t.hook_exit.is_some() || t.hook_tail.is_some() {
                div.hook {
                    h3 { "Hook" }
                    p {
                        "exit " (t.hook_exit.map(|x| x.to_string()).unwrap_or_else(|| "-".into()))
                        @if let Some(ms) = t.hook_ms { ", " (ms) " ms" }
                        @if let Some(n) = t.hook_attempts { ", " (n) " run(s)" }
                    }
                    @if let Some(tail) = &t.hook_tail { pre.tail { (tail) } }
                }
            }
        }
    }
}

/// What a button's POST answers: what was done, or the refusal's code with
/// its sentence and what to do.
#[derive(Serialize)]
struct Outcome {
    ok: bool,
    message: String,
    code: Option<&'static str>,
    sentence: Option<&'static str>,
    what_to_do: Option<&'static str>,
}

fn done(message: String) -> Response {
    Json(Outcome {
        ok: true,
        message,
        code: None,
        sentence: None,
        what_to_do: None,
    })
    .into_response()
}

fn refused(status: StatusCode, code: ErrorCode, message: String) -> Response {
    let body = Outcome {
        ok: false,
        message,
        code: Some(code.as_str()),
        sentence: Some(code.sentence()),
        what_to_do: Some(code.what_to_do()),
    };
    (status, Json(body)).into_response()
}

fn action_refused(e: ActionError) -> Response {
    let status = crate::http::refusal_status(e.code());
    refused(status, e.code(), e.to_string())
}

/// The transfer id of the address, or the refusal to answer with.
fn parse_id(id: &str) -> Option<TransferId> {
    TransferId::parse(id).ok()
}

fn not_an_id() -> Response {
    refused(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownTransfer,
        "that is not a transfer id".into(),
    )
}

pub async fn rerun(State(st): State<HttpState>, Path(id): Path<String>) -> Response {
    let Some(tid) = parse_id(&id) else {
        return not_an_id();
    };
    // The console runs inside the agent: an agent holds the state directory.
    // Its own task, so that a browser that goes away does not cut the hook
    // off half-way (its row would stay `hook_running` until a restart).
    let (cfg, store) = (st.cfg.clone(), st.store.clone());
    let task = tokio::spawn(async move { actions::rerun(&cfg, &store, &tid, true).await });
    let Ok(result) = task.await else {
        return refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::HookInterrupted,
            "the rerun stopped before it ended; look at the transfer's history".into(),
        );
    };
    match result {
        Ok(Rerun::NoHook(event)) => done(format!(
            "No {} hook is configured for this transfer; nothing ran.",
            event.as_str()
        )),
        Ok(Rerun::Ran { event, outcome, .. }) if outcome.ok() => {
            done(format!("The {} hook ran again: exit 0.", event.as_str()))
        }
        Ok(Rerun::Ran { event, outcome, .. }) => {
            let (code, sentence) = outcome.failure();
            refused(
                StatusCode::OK,
                code,
                format!(
                    "The {} hook ran again and failed: {sentence}",
                    event.as_str()
                ),
            )
        }
        Err(e) => action_refused(e),
    }
}

pub async fn resend(State(st): State<HttpState>, Path(id): Path<String>) -> Response {
    let Some(tid) = parse_id(&id) else {
        return not_an_id();
    };
    let (cfg, store) = (st.cfg.clone(), st.store.clone());
    let task = tokio::spawn(async move { actions::resend(&cfg, &store, &tid).await });
    let Ok(result) = task.await else {
        return refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::IoError,
            "the resend stopped before it ended; look at the history".into(),
        );
    };
    match result {
        Ok(ids) => {
            let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            done(format!("Queued again as {}.", ids.join(", ")))
        }
        Err(e) => action_refused(e),
    }
}
