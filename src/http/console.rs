//! The web console: server-rendered pages (maud escapes everything it
//! prints) and one small script, under a strict Content-Security-Policy (no
//! inline script or style: `/console/app.js` and `/console/app.css` come
//! from the binary). Every page needs the token (`auth.rs` stands in front).
//!
//! # Pages, one file each
//! - `overview.rs`: `/`, failures first, then in flight (live progress from
//!   `/console/inflight.json`), waiting for a receipt, recent history.
//! - `history.rs`: `/history`, the filters of `HistoryFilter`, paged.
//! - `transfer.rs`: `/transfers/{id}`, one transfer's rows, and the Rerun
//!   and Resend buttons (`/console/transfers/{id}/rerun|resend`).
//! - `flow.rs`: on that page, the transfer's job flow across nodes and its
//!   status timeline.
//! - `view.rs`: the layout and the pieces every page shares.

mod flow;
mod history;
mod overview;
mod transfer;
mod view;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::HttpState;

/// What the console's responses allow a browser to load: its own script,
/// style sheet and requests, nothing inline, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// The console's routes.
pub fn router() -> Router<HttpState> {
    Router::new()
        .route("/", get(overview::page))
        .route("/console/inflight.json", get(overview::inflight_json))
        .route("/history", get(history::page))
        .route("/transfers/{id}", get(transfer::page))
        .route("/console/transfers/{id}/rerun", post(transfer::rerun))
        .route("/console/transfers/{id}/resend", post(transfer::resend))
        .route("/console/app.js", get(app_js))
        .route("/console/app.css", get(app_css))
        .layer(axum::middleware::map_response(secure_headers))
}

async fn secure_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn app_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], APP_CSS).into_response()
}
