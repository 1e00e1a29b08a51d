//! The console's layout and the pieces its pages share: a transfers table,
//! an error code with its sentence and what to do, sizes, progress.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use crate::error_code::ErrorCode;
use crate::store::{Entry, Status};

/// A whole page: the navigation, then `body`.
pub fn layout(title: &str, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { "hakobu: " (title) }
                    link rel="stylesheet" href="/console/app.css";
                    script src="/console/app.js" defer {}
                }
                body {
                    nav {
                        a.brand href="/" { "hakobu" }
                        a href="/" { "Overview" }
                        a href="/history" { "History" }
                        form.logout method="post" action="/logout" {
                            button type="submit" { "Sign out" }
                        }
                    }
                    main { h1 { (title) } (body) }
                }
            }
        }
        .into_string(),
    )
}

/// A page that says what went wrong, with a status.
pub fn problem(status: StatusCode, title: &str, code: ErrorCode, message: &str) -> Response {
    let body = html! {
        div.refused #problem {
            p { code.code { (code.as_str()) } ": " (message) }
            p.sentence { (code.sentence()) }
            p.todo { (code.what_to_do()) }
        }
    };
    (status, layout(title, body)).into_response()
}

/// Bytes as people read them (1.5 MiB).
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A transfer still moving: waiting to go, going, arriving, being placed,
/// or its hook running.
pub fn in_flight(s: Status) -> bool {
    matches!(
        s,
        Status::Queued
            | Status::Sending
            | Status::Receiving
            | Status::Placing
            | Status::HookRunning
    )
}

/// Bytes done and in all: what the broker confirmed (sending), the chunks
/// recorded (receiving), all of it past those stages.
pub fn progress(e: &Entry) -> (u64, u64) {
    match e {
        Entry::Send(r) if matches!(r.status, Status::Queued | Status::Sending) => {
            (r.progress.min(r.size), r.size)
        }
        Entry::Receive(r) if r.status == Status::Receiving => (
            r.chunks_have.saturating_mul(r.chunk_size).min(r.size),
            r.size,
        ),
        _ => (e.transfer().size, e.transfer().size),
    }
}

/// The key of one row in `/console/inflight.json` and on the page.
pub fn row_key(e: &Entry) -> String {
    let t = e.transfer();
    format!("{}/{}/{}", t.transfer_id, e.direction().as_str(), t.peer)
}

/// The bar and its figures for one row.
pub fn progress_bar(e: &Entry) -> Markup {
    let (done, total) = progress(e);
    html! {
        div.progress data-key=(row_key(e)) {
            progress value=(done) max=(total.max(1)) {}
            span.bytes data-done=(done) data-total=(total) {
                (size(done)) " / " (size(total))
            }
        }
    }
}

/// How long a sending row has waited for its receipt, and whether its
/// `receipt_timeout` ran out (the same words as `hakobu status`).
pub fn waiting(e: &Entry) -> Markup {
    let note = e.awaiting_note(crate::clock::unix_now());
    html! { span.waiting { (note.as_deref().unwrap_or("-")) } }
}

/// An error code from history with its sentence and what to do (a code
/// this version does not know is shown as it is).
pub fn error_cells(code: Option<&str>) -> Markup {
    let known = code.and_then(ErrorCode::parse);
    html! {
        td.code { @if let Some(c) = code { code { (c) } } @else { "-" } }
        td.sentence { @if let Some(k) = known { (k.sentence()) } }
        td.todo { @if let Some(k) = known { (k.what_to_do()) } }
    }
}

/// The status as a badge.
pub fn status(s: Status) -> Markup {
    let class = if s.is_final() && !matches!(s, Status::Sent | Status::Received) {
        "status failed"
    } else if s.is_final() {
        "status ok"
    } else {
        "status busy"
    };
    html! { span class=(class) { (s.as_str()) } }
}

/// A link to a transfer's page.
pub fn transfer_link(e: &Entry) -> Markup {
    let id = e.transfer().transfer_id.to_string();
    html! { a.tid href={ "/transfers/" (id) } { (id) } }
}

/// One more column of a list: its heading and its cell for a row.
pub type Extra = (&'static str, fn(&Entry) -> Markup);

/// The columns every list has, then `extra` per row.
pub fn table(rows: &[Entry], with_errors: bool, extra: Option<Extra>) -> Markup {
    html! {
        @if rows.is_empty() {
            p.empty { "None." }
        } @else {
            table {
                thead { tr {
                    th { "Time" } th { "Dir" } th { "Peer" } th { "File id" }
                    th { "Name" } th { "Size" } th { "Status" } th { "Transfer" }
                    @if with_errors { th { "Error" } th { "What happened" } th { "What to do" } }
                    @if let Some((heading, _)) = extra { th { (heading) } }
                } }
                tbody {
                    @for e in rows {
                        @let t = e.transfer();
                        tr data-transfer=(t.transfer_id.to_string()) data-status=(t.status.as_str()) {
                            td.time { (t.finished_at.as_deref().unwrap_or(&t.started_at)) }
                            td { (e.direction().as_str()) }
                            td { (t.peer.as_str()) }
                            td { (t.file_id.as_str()) }
                            td.name { (t.file_name) }
                            td.num { (size(t.size)) }
                            td { (status(t.status)) }
                            td { (transfer_link(e)) }
                            @if with_errors { (error_cells(t.error_code.as_deref())) }
                            @if let Some((_, cell)) = extra { td { (cell(e)) } }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(10), "10 B");
        assert_eq!(size(5 * 1024 * 1024), "5.0 MiB");
    }

    #[test]
    fn text_from_the_database_is_escaped() {
        let name = "<img src=x onerror=alert(1)>.csv";
        let out = html! { td.name { (name) } }.into_string();
        assert!(!out.contains("<img"), "{out}");
        assert!(
            out.contains("&lt;img src=x onerror=alert(1)&gt;.csv"),
            "{out}"
        );
    }
}
