//! The REST API under `/api/` (JSON), described by the OpenAPI document at
//! `/api/openapi.json`.

use axum::Router;

use super::HttpState;

/// The API's routes.
pub fn router() -> Router<HttpState> {
    Router::new()
}
