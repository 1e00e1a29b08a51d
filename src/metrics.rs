//! `/metrics`: the agent's figures in the Prometheus text format.

use crate::http::HttpState;

/// The exposition, rendered at each scrape.
pub async fn render(_st: &HttpState) -> String {
    String::new()
}
