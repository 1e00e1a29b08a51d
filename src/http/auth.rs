//! Who may use the HTTP endpoint: whoever holds the token (`http.token_file`,
//! mode 0600, created on the first start when missing). A script sends it as
//! `Authorization: Bearer TOKEN`; a browser gives it once on `/login` and
//! keeps a session cookie (HttpOnly, SameSite=Strict, Secure under TLS).
//! A request that changes something and comes with the cookie must also
//! carry `X-Hakobu-Csrf: 1`, which a page of another site cannot add.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use subtle::ConstantTimeEq;
use tracing::info;

use super::{ApiError, HttpState};
use crate::config::HttpConfig;
use crate::error_code::ErrorCode;

/// The session cookie's name.
pub const COOKIE: &str = "hakobu_session";
/// The header a cookie-authenticated change must carry.
pub const CSRF_HEADER: &str = "x-hakobu-csrf";
/// How long a console session lasts.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest goes first.
const MAX_SESSIONS: usize = 256;

/// The token and the console's sessions.
pub struct Auth {
    token: String,
    metrics_open: bool,
    secure_cookie: bool,
    sessions: Mutex<HashMap<String, Instant>>,
}

impl Auth {
    /// Reads the token from `http.token_file`, creating it (32 random bytes,
    /// hex, mode 0600) when it does not exist.
    pub fn load(http: &HttpConfig) -> anyhow::Result<Auth> {
        let path = &http.token_file;
        let missing = matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        if missing {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            crate::secret::create(path, &random_hex()?)?;
            info!(message = "Created the HTTP endpoint's token; give it to the console's users and scripts.", file = %path.display());
        }
        let token = crate::secret::read(path)?;
        if token.len() < 16 {
            anyhow::bail!(
                "the token in {} is shorter than 16 characters; put a long random one there (or remove the file and the agent makes one)",
                path.display()
            );
        }
        Ok(Auth {
            token,
            metrics_open: http.metrics_open,
            secure_cookie: http.tls.is_some(),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn token_matches(&self, given: &str) -> bool {
        given.len() == self.token.len() && bool::from(given.as_bytes().ct_eq(self.token.as_bytes()))
    }

    fn new_session(&self) -> anyhow::Result<String> {
        let id = random_hex()?;
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        s.retain(|_, expires| *expires > now);
        if s.len() >= MAX_SESSIONS
            && let Some(oldest) = s.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone())
        {
            s.remove(&oldest);
        }
        s.insert(id.clone(), now + SESSION_TTL);
        Ok(id)
    }

    fn session_valid(&self, id: &str) -> bool {
        let s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        // The map's lookup is not constant-time, but the ids are 256-bit
        // random values: guessing one is not a timing game.
        s.get(id).is_some_and(|e| *e > Instant::now())
    }

    fn end_session(&self, id: &str) {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(id);
    }
}

fn random_hex() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)
        .map_err(|e| anyhow::anyhow!("the operating system gave no random bytes: {e}"))?;
    Ok(hex::encode(b))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// How a request proved itself.
enum Proof {
    Bearer,
    Cookie,
}

fn proof(auth: &Auth, headers: &HeaderMap) -> Option<Proof> {
    if bearer(headers).is_some_and(|t| auth.token_matches(t)) {
        return Some(Proof::Bearer);
    }
    if cookie(headers, COOKIE).is_some_and(|id| auth.session_valid(id)) {
        return Some(Proof::Cookie);
    }
    None
}

/// In front of every route: `/login` is open, `/metrics` when
/// `metrics_open`; everything else needs the token or a session. A page
/// asked without one goes to the login page; an API call gets a 401.
pub async fn require(State(st): State<HttpState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/login" || path == "/logout" || (path == "/metrics" && st.auth.metrics_open) {
        return next.run(req).await;
    }
    let is_api = path.starts_with("/api/") || path == "/metrics";
    match proof(&st.auth, req.headers()) {
        Some(Proof::Bearer) => next.run(req).await,
        Some(Proof::Cookie) => {
            let safe = matches!(*req.method(), Method::GET | Method::HEAD);
            if safe || req.headers().get(CSRF_HEADER).is_some() {
                next.run(req).await
            } else {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Unauthorized,
                    "a change made with the console's session must carry the header X-Hakobu-Csrf: 1 (the console's buttons add it)",
                )
                .into_response()
            }
        }
        None if is_api => {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "give the token of http.token_file as `Authorization: Bearer TOKEN`",
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
        None => Redirect::to("/login").into_response(),
    }
}

/// `/login` (the form, and the token posted from it) and `/logout`.
pub fn router() -> Router<HttpState> {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
}

const LOGIN_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hakobu: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;max-width:28rem;margin:4rem auto;padding:0 1rem}
input{width:100%;padding:.5rem;margin:.5rem 0;box-sizing:border-box}.err{color:#b00020}</style></head>
<body><h1>hakobu</h1><p>Give the token of this agent's <code>http.token_file</code>.</p>
{{error}}<form method="post" action="/login">
<label for="token">Token</label><input id="token" name="token" type="password" autocomplete="current-password" autofocus>
<button type="submit">Sign in</button></form></body></html>"#;

async fn login_page() -> Html<String> {
    Html(LOGIN_PAGE.replace("{{error}}", ""))
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(st): State<HttpState>, form: axum::Form<LoginForm>) -> Response {
    if !st.auth.token_matches(form.token.trim()) {
        let page = LOGIN_PAGE.replace(
            "{{error}}",
            r#"<p class="err" id="error">That is not the token. Copy it from the file http.token_file names.</p>"#,
        );
        return (StatusCode::UNAUTHORIZED, Html(page)).into_response();
    }
    let id = match st.auth.new_session() {
        Ok(id) => id,
        Err(e) => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::IoError,
                e.to_string(),
            )
            .into_response();
        }
    };
    let secure = if st.auth.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn logout(State(st): State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        st.auth.end_session(id);
    }
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; hakobu_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
