//! The web console at `/`: server-rendered pages with a little JavaScript.

use axum::Router;
use axum::response::Html;
use axum::routing::get;

use super::HttpState;

/// The console's routes.
pub fn router() -> Router<HttpState> {
    Router::new().route("/", get(index))
}

async fn index() -> Html<&'static str> {
    Html(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>hakobu</title></head><body><h1>hakobu</h1></body></html>",
    )
}
