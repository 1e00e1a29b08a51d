//! `/metrics`: the agent's figures in the Prometheus text format (0.0.4),
//! rendered at each scrape: transfers and bytes from the state database
//! (so counters survive restarts), what this process counts in memory
//! (hooks, the broker connection), a bounded scan of the spool, and the
//! dead-letter queue's depth as last known. A scrape never waits on the
//! broker.
//!
//! # Parts
//! - `registry.rs`: the in-process counters, one global registry.
//! - `text.rs`: the exposition format's writer.
//! - `spool.rs`: the bounded spool scan.
//! - `dead_letters.rs`: the dead-letter depth, cached.
//! - `crate::store::Store::figures` (`store/figures.rs`): the SQL.

pub mod dead_letters;
pub mod registry;
pub mod spool;
pub mod text;

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::http::HttpState;
use crate::store::{Figures, Status};
use registry::HOOK_BUCKETS;
use text::{Kind, Text};

/// Every metric family `/metrics` exposes.
pub const FAMILIES: &[&str] = &[
    "hakobu_build_info",
    "hakobu_start_time_seconds",
    "hakobu_transfers_total",
    "hakobu_sent_bytes_total",
    "hakobu_received_bytes_total",
    "hakobu_transfers_in_flight",
    "hakobu_in_flight_bytes",
    "hakobu_in_flight_progress_bytes",
    "hakobu_hook_duration_seconds",
    "hakobu_hook_runs_total",
    "hakobu_broker_connected",
    "hakobu_broker_failovers_total",
    "hakobu_spool_files",
    "hakobu_spool_bytes",
    "hakobu_spool_scan_truncated",
    "hakobu_oldest_awaiting_receipt_age_seconds",
    "hakobu_dead_letters",
];

/// The statuses in which a settled transfer's file crossed to the
/// receiver (placed there): its bytes count as sent or received.
fn file_crossed(status: &str) -> bool {
    matches!(
        status,
        "sent" | "received" | "hook_failed" | "hook_interrupted"
    )
}

/// What a scrape gathered before writing.
pub struct Scrape {
    pub figures: Figures,
    pub spool: spool::SpoolFigures,
    pub dead_letters: Option<u64>,
    pub now: SystemTime,
}

/// The exposition, rendered at each scrape. A database that cannot answer
/// leaves its families out (the agent logs why); the rest is still served.
pub async fn render(st: &HttpState) -> String {
    let figures = match st.store.figures().await {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(message = "A /metrics scrape could not read the state database; its figures are left out of this scrape.", error = %e);
            None
        }
    };
    let dir = st.cfg.spool_dir();
    let spool = tokio::task::spawn_blocking(move || spool::scan(&dir, spool::MAX_ENTRIES))
        .await
        .unwrap_or(spool::SpoolFigures {
            truncated: true,
            ..Default::default()
        });
    let dead_letters = dead_letters::current(&st.cfg);
    write(figures.as_ref(), &spool, dead_letters, SystemTime::now())
}

/// Writes every family from what was gathered.
pub fn write(
    figures: Option<&Figures>,
    spool: &spool::SpoolFigures,
    dead_letters: Option<u64>,
    now: SystemTime,
) -> String {
    let reg = registry::global();
    let mut t = Text::default();
    t.family(
        "hakobu_build_info",
        Kind::Gauge,
        "The running hakobu's version; always 1.",
    );
    t.sample(
        "hakobu_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    t.family(
        "hakobu_start_time_seconds",
        Kind::Gauge,
        "When the agent started, in seconds since the Unix epoch.",
    );
    t.sample("hakobu_start_time_seconds", &[], reg.start_time());
    if let Some(f) = figures {
        transfers(&mut t, f, now);
    }
    hooks(&mut t);
    t.family(
        "hakobu_broker_connected",
        Kind::Gauge,
        "1 while the agent's subscription to its broker is connected, else 0.",
    );
    t.sample(
        "hakobu_broker_connected",
        &[],
        if reg.connected() { 1.0 } else { 0.0 },
    );
    t.family(
        "hakobu_broker_failovers_total",
        Kind::Counter,
        "Times the agent connected to its broker again after losing the connection.",
    );
    t.sample("hakobu_broker_failovers_total", &[], reg.failovers() as f64);
    t.family(
        "hakobu_spool_files",
        Kind::Gauge,
        "Files in the spool (claimed, not yet settled by every receiver).",
    );
    t.sample("hakobu_spool_files", &[], spool.files as f64);
    t.family(
        "hakobu_spool_bytes",
        Kind::Gauge,
        "Bytes of the files in the spool.",
    );
    t.sample("hakobu_spool_bytes", &[], spool.bytes as f64);
    t.family(
        "hakobu_spool_scan_truncated",
        Kind::Gauge,
        "1 when the spool held more entries than one scrape scans: the spool figures are a lower bound.",
    );
    t.sample(
        "hakobu_spool_scan_truncated",
        &[],
        if spool.truncated { 1.0 } else { 0.0 },
    );
    if let Some(n) = dead_letters {
        t.family(
            "hakobu_dead_letters",
            Kind::Gauge,
            "Messages in the broker's dead-letter queue, as last asked (absent when unknown).",
        );
        t.sample("hakobu_dead_letters", &[], n as f64);
    }
    t.finish()
}

/// The families read from the state database.
fn transfers(t: &mut Text, f: &Figures, now: SystemTime) {
    t.family(
        "hakobu_transfers_total",
        Kind::Counter,
        "Settled transfers by direction, file id and final status, from the state database.",
    );
    let mut sent: BTreeMap<&str, u64> = BTreeMap::new();
    let mut received: BTreeMap<&str, u64> = BTreeMap::new();
    for row in &f.totals {
        t.sample(
            "hakobu_transfers_total",
            &[
                ("direction", &row.direction),
                ("file_id", &row.file_id),
                ("status", &row.status),
            ],
            row.count as f64,
        );
        let bytes = match row.direction.as_str() {
            "send" => sent.entry(&row.file_id).or_default(),
            _ => received.entry(&row.file_id).or_default(),
        };
        if file_crossed(&row.status) {
            *bytes += row.bytes;
        }
    }
    for (name, help, by_file) in [
        (
            "hakobu_sent_bytes_total",
            "Bytes of the files sent and placed by their receiver, by file id.",
            &sent,
        ),
        (
            "hakobu_received_bytes_total",
            "Bytes of the files received and placed, by file id.",
            &received,
        ),
    ] {
        t.family(name, Kind::Counter, help);
        for (file_id, bytes) in by_file {
            t.sample(name, &[("file_id", file_id)], *bytes as f64);
        }
    }

    t.family(
        "hakobu_transfers_in_flight",
        Kind::Gauge,
        "Transfers under way by direction and status.",
    );
    let mut bytes: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for dir in ["send", "receive"] {
        bytes.insert(dir, (0, 0));
        for status in in_flight_statuses(dir) {
            let n = f
                .in_flight
                .iter()
                .filter(|r| r.direction == dir && r.status == status)
                .map(|r| r.count)
                .sum::<u64>();
            t.sample(
                "hakobu_transfers_in_flight",
                &[("direction", dir), ("status", status)],
                n as f64,
            );
        }
    }
    for r in &f.in_flight {
        if let Some(b) = bytes.get_mut(r.direction.as_str()) {
            b.0 += r.bytes;
            b.1 += r.progress;
        }
    }
    t.family(
        "hakobu_in_flight_bytes",
        Kind::Gauge,
        "Bytes of the files of the transfers under way, by direction.",
    );
    for (dir, (total, _)) in &bytes {
        t.sample(
            "hakobu_in_flight_bytes",
            &[("direction", dir)],
            *total as f64,
        );
    }
    t.family(
        "hakobu_in_flight_progress_bytes",
        Kind::Gauge,
        "Bytes of the transfers under way sent or received so far, by direction.",
    );
    for (dir, (_, done)) in &bytes {
        t.sample(
            "hakobu_in_flight_progress_bytes",
            &[("direction", dir)],
            *done as f64,
        );
    }

    t.family(
        "hakobu_oldest_awaiting_receipt_age_seconds",
        Kind::Gauge,
        "Seconds since the oldest sent file still waiting for its receipt started; 0 when none waits.",
    );
    let age = f
        .oldest_awaiting_receipt
        .as_deref()
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
        .and_then(|t0| now.duration_since(t0).ok())
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    t.sample("hakobu_oldest_awaiting_receipt_age_seconds", &[], age);
}

/// The statuses a transfer of `direction` passes through before it settles.
fn in_flight_statuses(direction: &str) -> Vec<&'static str> {
    let sending = [
        Status::Queued,
        Status::Sending,
        Status::AwaitingReceipt,
        Status::HookRunning,
    ];
    let receiving = [Status::Receiving, Status::Placing, Status::HookRunning];
    let list: &[Status] = if direction == "send" {
        &sending
    } else {
        &receiving
    };
    list.iter().map(|s| s.as_str()).collect()
}

/// The hook histogram and run counter.
fn hooks(t: &mut Text) {
    let hooks = registry::global().hooks();
    t.family(
        "hakobu_hook_duration_seconds",
        Kind::Histogram,
        "How long hook runs took, by event and outcome (ok, failed, timeout), since the agent started.",
    );
    for ((event, outcome), h) in &hooks {
        let labels = [("event", *event), ("outcome", *outcome)];
        for (le, n) in HOOK_BUCKETS.iter().zip(h.cumulative()) {
            let le = text::number(*le);
            t.sample(
                "hakobu_hook_duration_seconds_bucket",
                &[("event", event), ("outcome", outcome), ("le", &le)],
                n as f64,
            );
        }
        t.sample(
            "hakobu_hook_duration_seconds_bucket",
            &[("event", event), ("outcome", outcome), ("le", "+Inf")],
            h.count as f64,
        );
        t.sample("hakobu_hook_duration_seconds_sum", &labels, h.sum);
        t.sample(
            "hakobu_hook_duration_seconds_count",
            &labels,
            h.count as f64,
        );
    }
    t.family(
        "hakobu_hook_runs_total",
        Kind::Counter,
        "Hook runs by event and outcome (ok, failed, timeout), since the agent started.",
    );
    for ((event, outcome), h) in &hooks {
        t.sample(
            "hakobu_hook_runs_total",
            &[("event", event), ("outcome", outcome)],
            h.count as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{InFlight, Total};

    /// Every family in FAMILIES is written (dead letters when known), and
    /// no family is written that FAMILIES lacks.
    #[test]
    fn every_family_is_listed_and_written() {
        let f = Figures {
            totals: vec![Total {
                direction: "send".into(),
                file_id: "DATA".into(),
                status: "sent".into(),
                count: 2,
                bytes: 10,
            }],
            in_flight: vec![InFlight {
                direction: "receive".into(),
                status: "receiving".into(),
                count: 1,
                bytes: 100,
                progress: 40,
            }],
            oldest_awaiting_receipt: None,
        };
        registry::global().hook_ran("received", "ok", std::time::Duration::from_millis(3));
        let text = write(
            Some(&f),
            &spool::SpoolFigures::default(),
            Some(0),
            SystemTime::now(),
        );
        let mut typed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        typed.sort_unstable();
        let mut listed = FAMILIES.to_vec();
        listed.sort_unstable();
        assert_eq!(typed, listed);
        assert!(text.contains("hakobu_sent_bytes_total{file_id=\"DATA\"} 10\n"));
        assert!(text.contains(
            "hakobu_transfers_in_flight{direction=\"receive\",status=\"receiving\"} 1\n"
        ));
        assert!(text.contains("hakobu_in_flight_progress_bytes{direction=\"receive\"} 40\n"));
        assert!(text.contains("hakobu_oldest_awaiting_receipt_age_seconds 0\n"));
    }
}
