//! `hakobu status -c FILE`: what the agent is doing now, from its state
//! database (transfers in flight with progress bars, transfers waiting for a
//! receipt and for how long, failures of the last 24 hours with their code
//! and sentence) and, on RabbitMQ, the depth of this node's queues.
//! `--watch` refreshes; `--json` prints one object (per refresh).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use crate::config::{BrokerConfig, Config};
use crate::domain::escape_text;
use crate::store::{Activities, Activity, Direction, Store};

/// Failures shown: those of the last day.
const FAILED_WITHIN: Duration = Duration::from_secs(24 * 3600);
/// Rows at most in each list.
const LIMIT: usize = 200;

#[derive(Args)]
pub struct StatusArgs {
    #[arg(short, long)]
    config: PathBuf,
    /// Refresh every --interval until interrupted.
    #[arg(long)]
    watch: bool,
    /// How often --watch refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// One JSON object (per refresh) instead of text.
    #[arg(long)]
    json: bool,
}

/// A failure and its exit code (2 usage or configuration, 1 otherwise).
type Failure = (u8, anyhow::Error);

/// What one refresh shows.
#[derive(Serialize)]
struct Report {
    node: String,
    #[serde(flatten)]
    activities: Activities,
    /// RabbitMQ: each queue's messages (null: the queue does not exist yet);
    /// absent on the embedded broker (`hakobu broker status` shows its queues).
    #[serde(skip_serializing_if = "Option::is_none")]
    queues: Option<Vec<Queue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queues_error: Option<String>,
    /// RabbitMQ: bytes the dead-letter queue keeps (`dead_letter_max`).
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter_max: Option<u64>,
}

#[derive(Serialize)]
struct Queue {
    name: String,
    messages: Option<u32>,
}

pub async fn run(args: StatusArgs) -> Result<(), Failure> {
    let cfg = Config::load(&args.config).map_err(|e| (2, e.into()))?;
    crate::agent::prepare_state_dir(&cfg).map_err(|e| (2, e))?;
    let store = Store::open(&cfg.db_path()).map_err(|e| (1, e.into()))?;
    let clear = args.watch && !args.json && std::io::stdout().is_terminal();
    loop {
        let report = report(&cfg, &store).await?;
        let mut out = std::io::stdout().lock();
        if clear {
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        // A reader that stops early (`| head`) is not an error.
        let written = if args.json {
            serde_json::to_string(&report)
                .map_err(std::io::Error::other)
                .and_then(|j| writeln!(out, "{j}"))
        } else {
            show(&mut out, &report)
        };
        drop(out);
        if written.is_err() {
            return Ok(());
        }
        if !args.watch {
            return match &report.queues_error {
                Some(e) => Err((1, anyhow::anyhow!("{e}"))),
                None => Ok(()),
            };
        }
        tokio::time::sleep(args.interval).await;
    }
}

async fn report(cfg: &Config, store: &Store) -> Result<Report, Failure> {
    let activities = store
        .activities(FAILED_WITHIN, LIMIT)
        .await
        .map_err(|e| (1, e.into()))?;
    let dead_letter_max = match &cfg.broker {
        BrokerConfig::Rabbitmq(r) => Some(r.dead_letter_max),
        _ => None,
    };
    let (queues, queues_error) = match &cfg.broker {
        BrokerConfig::Rabbitmq(r) => {
            match crate::broker::rabbitmq::queue_depths(r, cfg.node.as_str()).await {
                Ok(depths) => (
                    Some(
                        depths
                            .into_iter()
                            .map(|(name, messages)| Queue { name, messages })
                            .collect(),
                    ),
                    None,
                ),
                Err(e) => (None, Some(format!("{e} (error_code={})", e.code()))),
            }
        }
        _ => (None, None),
    };
    Ok(Report {
        node: cfg.node.to_string(),
        activities,
        queues,
        queues_error,
        dead_letter_max,
    })
}

fn show(out: &mut impl Write, r: &Report) -> std::io::Result<()> {
    let a = &r.activities;
    writeln!(out, "node {} at {}", r.node, crate::clock::now_rfc3339())?;
    writeln!(out, "\nIn flight ({}):", a.in_flight.len())?;
    for t in &a.in_flight {
        out.flush()?;
        in_flight(out, t)?;
    }
    writeln!(
        out,
        "\nWaiting for a receipt ({}):",
        a.awaiting_receipt.len()
    )?;
    for t in &a.awaiting_receipt {
        writeln!(
            out,
            "  {}  for {}{}",
            describe(t),
            humantime::format_duration(Duration::from_secs(t.idle_secs)),
            if t.receipt_timeout_at.is_some() {
                crate::store::PAST_RECEIPT_TIMEOUT
            } else {
                ""
            }
        )?;
    }
    writeln!(out, "\nFailed in the last 24 h ({}):", a.failed.len())?;
    for t in &a.failed {
        writeln!(
            out,
            "  {}  {}  {}: {}",
            describe(t),
            escape_text(t.finished_at.as_deref().unwrap_or(&t.started_at)),
            t.error_code.as_deref().unwrap_or("-"),
            escape_text(t.error.as_deref().unwrap_or("(no sentence recorded)"))
        )?;
    }
    if let Some(queues) = &r.queues {
        writeln!(out, "\nRabbitMQ queues:")?;
        for q in queues {
            match q.messages {
                Some(n) => writeln!(out, "  {}: {n} messages", q.name)?,
                None => writeln!(out, "  {}: does not exist yet", q.name)?,
            }
        }
    }
    if let Some(max) = r.dead_letter_max {
        writeln!(
            out,
            "  dead letters are kept up to {max} bytes (dead_letter_max), the oldest dropped first"
        )?;
    }
    if let Some(e) = &r.queues_error {
        writeln!(out, "\nRabbitMQ queues: cannot ask the broker: {e}")?;
    }
    Ok(())
}

/// `send  TID  to beta  DAILY_SALES  a.csv  sending`
fn describe(t: &Activity) -> String {
    let (dir, towards) = match t.direction {
        Direction::Send => ("send", "to"),
        Direction::Receive => ("receive", "from"),
    };
    format!(
        "{dir:<7}  {}  {towards} {}  {}  {}  {}",
        t.transfer_id,
        t.peer,
        t.file_id,
        escape_text(&t.file_name),
        t.status
    )
}

/// A transfer in flight: an indicatif bar on a terminal, a line with the
/// percentage otherwise.
fn in_flight(out: &mut impl Write, t: &Activity) -> std::io::Result<()> {
    let percent = (t.done * 100).checked_div(t.size).unwrap_or(100);
    if std::io::stdout().is_terminal() {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(t.size),
            indicatif::ProgressDrawTarget::stdout(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "  {prefix}\n    {bar:40} {bytes}/{total_bytes} {percent}%",
        ) {
            bar.set_style(style);
        }
        bar.set_prefix(describe(t));
        bar.set_position(t.done.min(t.size));
        bar.abandon();
        Ok(())
    } else {
        writeln!(
            out,
            "  {}  {}/{} bytes ({percent}%)",
            describe(t),
            t.done.min(t.size),
            t.size
        )
    }
}
