//! The log subscriber: human-readable text on stderr (the default), or one
//! JSON object per line (`--log-format json`, `HAKOBU_LOG_FORMAT=json`) whose
//! event fields sit at the top level, so a line about a transfer carries
//! `transfer_id` there. `HAKOBU_LOG` filters (tracing's env-filter syntax).

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00Z  INFO hakobu::...: Placed. transfer_id=...`
    #[default]
    Text,
    /// `{"timestamp":...,"level":"INFO","message":"Placed.","transfer_id":...}`
    Json,
}

/// Installs the subscriber for this process; call once, first thing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("HAKOBU_LOG").unwrap_or_else(|_| "info,lapin=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}
