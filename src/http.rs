//! The agent's HTTP endpoint (`http:` in the configuration, off unless set):
//! the web console at `/`, the REST API under `/api/`, and `/metrics`.
//! Every request needs the token (`auth.rs`); beyond loopback the endpoint
//! serves TLS only (the configuration refuses it otherwise).
//!
//! # Parts, one file each
//! - `auth.rs`: the token, the login page and its session cookie, the
//!   check in front of every route.
//! - `api.rs`: the REST API and its OpenAPI document.
//! - `console.rs`: the web console's pages.
//! - `crate::metrics`: what `/metrics` exposes.

mod api;
mod auth;
mod console;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use auth::Auth;

use crate::broker::embedded::tls::Stream;
use crate::config::{Config, HttpConfig};
use crate::error_code::ErrorCode;
use crate::sender::Sender;
use crate::store::Store;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every handler may reach: the agent's configuration, its state
/// database and its sender (for the actions), and the token check.
#[derive(Clone)]
pub struct HttpState {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub sender: Arc<Sender>,
    pub auth: Arc<Auth>,
}

/// An API failure: the HTTP status and a JSON object with a stable code
/// (`{"code": "...", "message": "..."}`), as README's tables list them.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The HTTP status of an action refused with `code` (rerun, resend): 404
/// for a transfer not here, 500 for the state database or the disk, 409
/// for the rest (the action does not apply as the transfer stands).
pub fn refusal_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::UnknownTransfer => StatusCode::NOT_FOUND,
        ErrorCode::StateDbError | ErrorCode::StateDbTooNew | ErrorCode::IoError => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::CONFLICT,
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.as_str(),
            message: message.into(),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code,
            message: &self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Every route, behind the token check.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .merge(api::router())
        .merge(console::router())
        .route("/metrics", axum::routing::get(metrics))
        .merge(auth::router())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .with_state(state)
}

async fn metrics(axum::extract::State(st): axum::extract::State<HttpState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&st).await,
    )
        .into_response()
}

/// Starts the endpoint for `http` and serves until `stop` is cancelled;
/// returns the address it listens on.
pub async fn start(
    http: &HttpConfig,
    state: HttpState,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let tls = match &http.tls {
        Some((cert, key)) => Some(crate::broker::embedded::tls::acceptor(cert, key)?),
        None => None,
    };
    let listener = TcpListener::bind(http.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (http.listen); is another program using it?",
            http.listen
        )
    })?;
    let addr = listener.local_addr()?;
    // An upload cut short by the last stop left its part file.
    api::clear_uploads(&state.cfg.state_dir);
    // `/metrics`' start time: when the agent's endpoint came up.
    crate::metrics::registry::global().start_time();
    info!(message = "HTTP endpoint listening.", addr = %addr, tls = tls.is_some());
    let app = router(state);
    let seats = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let seat = tokio::select! {
                _ = stop.cancelled() => return,
                seat = seats.clone().acquire_owned() => match seat {
                    Ok(s) => s,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(message = "The HTTP endpoint could not accept a connection.", error = %e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (app, tls, stop) = (app.clone(), tls.clone(), stop.clone());
            tokio::spawn(async move {
                let _seat = seat;
                let io: Stream = match tls {
                    None => Box::new(tcp),
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => Box::new(s),
                            _ => return,
                        }
                    }
                };
                serve_connection(io, app, peer, stop).await;
            });
        }
    });
    Ok(addr)
}

/// One connection, HTTP/1.1 or HTTP/2, until it closes or the agent stops.
async fn serve_connection(io: Stream, app: Router, peer: SocketAddr, stop: CancellationToken) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower::ServiceExt;
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(message = "HTTP connection ended with an error.", peer = %peer, error = %e);
            }
        }
        _ = stop.cancelled() => {}
    }
}
