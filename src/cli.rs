//! The command line: parsed arguments, then one function per command. Exit
//! codes: 0 success, 1 transfer or hook failure, 2 usage or configuration error.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{CommandFactory, Parser, Subcommand};

use crate::actions::Rerun;
use crate::agent::{self, StateLock};
use crate::config::Config;
use crate::domain::{FileName, NodeName, TransferId};
use crate::progress::Progress;
use crate::request_cmd::Deadline;
use crate::store::{Entry, Store};

#[derive(Parser)]
#[command(
    name = "hakobu",
    version,
    about = "File-transfer integration hub: outboxes, a replicated broker, verified delivery, hooks."
)]
struct Cli {
    /// Log lines as text, or as one JSON object per line.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "HAKOBU_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: crate::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: its send and receive profiles.
    Run {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate the configuration without starting anything.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Show transfer history from the state database.
    History {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// The whole job flow of a transfer, as far as this node knows it.
        #[arg(long, value_name = "ID")]
        chain: Option<String>,
    },
    /// Send one file now through a send profile (the agent must be running);
    /// without PATH, the profile's `source`.
    Send {
        #[arg(short, long)]
        config: PathBuf,
        #[arg(long)]
        file_id: String,
        path: Option<PathBuf>,
        /// Send to this node instead of the profile's `to` list.
        #[arg(long)]
        to: Option<String>,
        /// Metadata for the receiver's hooks, as HAKOBU_META_K.
        #[arg(long, value_name = "K=V")]
        meta: Vec<String>,
        /// Wait for the receipt; exit 0 only on success.
        #[arg(long)]
        wait: bool,
        /// With --wait, give up after this long (`request_timeout`), e.g. 10m.
        #[arg(long, requires = "wait")]
        timeout: Option<String>,
        /// The transfer that started this one (default: $HAKOBU_TRANSFER_ID, set for hooks); `none` for no parent.
        #[arg(long, value_name = "ID|none")]
        parent: Option<String>,
    },
    /// Ask another node to send a file (HULFT's send request): its send
    /// profile must list this node in `requests_from`.
    Request(crate::request_cmd::RequestArgs),
    /// Run a transfer's hook again.
    Rerun {
        #[arg(short, long)]
        config: PathBuf,
        transfer_id: String,
    },
    /// Send a spooled file again, as a new transfer.
    Resend {
        #[arg(short, long)]
        config: PathBuf,
        transfer_id: String,
    },
    /// What the agent is doing now: transfers in flight, waiting for a
    /// receipt, failed in the last 24 hours; on RabbitMQ, the queues' depth.
    Status(crate::status_cmd::StatusArgs),
    /// Run the embedded broker alone; `add-node` and `status` administer it.
    Broker(crate::broker_cmd::BrokerArgs),
    /// Make this node's key pair for end-to-end encryption: the private key
    /// file (mode 0600; an existing one is kept) and its public key, printed.
    Keygen {
        /// Write the file the configuration names in keys.private_key_file.
        #[arg(short, long, conflicts_with = "out", required_unless_present = "out")]
        config: Option<PathBuf>,
        /// Write this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Shell completions and man pages, for packaging.
    #[command(hide = true)]
    Generate(crate::generate_cmd::GenerateArgs),
}

/// A failure with the exit code it maps to.
struct Exit(u8, anyhow::Error);

fn usage(e: impl Into<anyhow::Error>) -> Exit {
    Exit(2, e.into())
}

fn failure(e: impl Into<anyhow::Error>) -> Exit {
    Exit(1, e.into())
}

/// Threads for blocking work (file reads and writes, fsyncs, renames): each
/// is a short disk operation, so more than this wait their turn rather than
/// start a thread. With tokio's default, 512, 256 publishers of small files
/// started hundreds of threads, and a sender peaked at 60 MiB with 100,000
/// files dropped at once; 40 MiB with this (benches/run.sh, backlog).
const BLOCKING_THREADS: usize = 64;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit(code, e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn load(path: &Path) -> Result<Config, Exit> {
    Config::load(path).map_err(usage)
}

async fn dispatch(command: Command) -> Result<(), Exit> {
    match command {
        Command::Run { config } => agent::run(load(&config)?).await.map_err(failure),
        Command::Check { config } => {
            let cfg = load(&config)?;
            cfg.keys.check().map_err(usage)?;
            println!(
                "{}: ok (node {}, {} send and {} receive profiles)",
                config.display(),
                cfg.node,
                cfg.send.len(),
                cfg.receive.len()
            );
            Ok(())
        }
        Command::History {
            config,
            json,
            chain: Some(id),
            ..
        } => {
            let cfg = load(&config)?;
            crate::chain_cmd::run(&cfg, &open_store(&cfg)?, &id, json)
                .await
                .map_err(|(code, e)| Exit(code, e))
        }
        Command::History {
            config,
            limit,
            json,
            chain: None,
        } => history(&load(&config)?, limit, json).await,
        Command::Send {
            config,
            file_id,
            path,
            to,
            meta,
            wait,
            timeout,
            parent,
        } => {
            let parent = crate::chain_cmd::parent(parent.as_deref()).map_err(usage)?;
            let wait = wait.then(|| waiting(timeout.as_deref())).transpose()?;
            let cfg = load(&config)?;
            match path {
                Some(path) => send(&cfg, &file_id, (&path, parent), to, &meta, wait).await,
                None => send_source(&cfg, &file_id, (to, parent), &meta, wait).await,
            }
        }
        Command::Request(args) => crate::request_cmd::run(args)
            .await
            .map_err(|(code, e)| Exit(code, e)),
        Command::Rerun {
            config,
            transfer_id,
        } => rerun(&load(&config)?, &transfer_id).await,
        Command::Resend {
            config,
            transfer_id,
        } => resend(&load(&config)?, &transfer_id).await,
        Command::Status(args) => crate::status_cmd::run(args)
            .await
            .map_err(|(code, e)| Exit(code, e)),
        Command::Broker(args) => crate::broker_cmd::run(args)
            .await
            .map_err(|(code, e)| Exit(code, e)),
        Command::Keygen { config, out } => keygen(config.as_deref(), out.as_deref()),
        Command::Generate(args) => {
            crate::generate_cmd::run(args, Cli::command()).map_err(|(code, e)| Exit(code, e))
        }
    }
}

/// `hakobu keygen`: writes a new private key file with mode 0600 (never over
/// an existing file: that one is kept) and prints the public key, for the
/// `keys.peers` of the nodes that send here.
fn keygen(config: Option<&Path>, out: Option<&Path>) -> Result<(), Exit> {
    let (path, node) = match (config, out) {
        (Some(c), _) => {
            let cfg = load(c)?;
            let path = cfg.keys.private_key_file().map(Path::to_path_buf).ok_or_else(|| {
                usage(anyhow::anyhow!(
                    "{}: keys.private_key_file is not set; add it, or use `hakobu keygen --out PATH`",
                    c.display()
                ))
            })?;
            (path, cfg.node.to_string())
        }
        (None, Some(o)) => (o.to_path_buf(), "this node".to_string()),
        (None, None) => return Err(usage(anyhow::anyhow!("give -c FILE or --out PATH"))),
    };
    // Absolute, so that the directory synced after the write is the right one.
    let path = std::path::absolute(&path).map_err(usage)?;
    if std::fs::symlink_metadata(&path).is_ok() {
        let identity = crate::keys::read_identity(&path).map_err(usage)?;
        eprintln!(
            "{} exists: kept (remove it first to make a new key; senders then need the new public key)",
            path.display()
        );
        println!("{}", identity.to_public());
        return Ok(());
    }
    let (text, public) = crate::keys::generate(&format!("hakobu private key of {node}"));
    crate::secret::create(&path, &text).map_err(failure)?;
    eprintln!(
        "wrote {} (mode 0600); give the public key below to the nodes that send here, under keys.peers",
        path.display()
    );
    println!("{public}");
    Ok(())
}

fn open_store(cfg: &Config) -> Result<Store, Exit> {
    agent::prepare_state_dir(cfg).map_err(usage)?;
    Store::open(&cfg.db_path()).map_err(failure)
}

fn transfer_id(text: &str) -> Result<TransferId, Exit> {
    TransferId::parse(text).map_err(|e| usage(anyhow::anyhow!("{e}")))
}

async fn history(cfg: &Config, limit: usize, json: bool) -> Result<(), Exit> {
    let rows = open_store(cfg)?.history(limit).await.map_err(failure)?;
    let mut out = std::io::stdout().lock();
    // A reader that stops early (`| head`) is not an error.
    let _ = write_history(&mut out, &rows, json);
    Ok(())
}

fn write_history(out: &mut impl Write, rows: &[Entry], json: bool) -> std::io::Result<()> {
    if json {
        for r in rows {
            writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default())?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<24} {:<7} {:<36} {:<12} {:<16} {:<24} {:>12} {:>12} {:<17} {:<20} {:>4} {:>3} {:>4}",
        "STARTED",
        "DIR",
        "TRANSFER",
        "PEER",
        "FILE_ID",
        "FILE",
        "SIZE",
        "WIRE",
        "STATUS",
        "ERROR",
        "HOOK",
        "TRY",
        "RUNS"
    )?;
    // Text that came from the network (a sender's clock, a name recorded
    // by an older release) is escaped: it cannot drive the terminal.
    let safe = crate::domain::escape_text;
    let now = crate::clock::unix_now();
    for e in rows {
        let r = e.transfer();
        write!(
            out,
            "{:<24} {:<7} {:<36} {:<12} {:<16} {:<24} {:>12} {:>12} {:<17} {:<20} {:>4} {:>3} {:>4}",
            safe(&r.started_at),
            e.direction().as_str(),
            r.transfer_id,
            r.peer,
            r.file_id,
            safe(&r.file_name),
            r.size,
            r.wire_bytes,
            r.status.as_str(),
            r.error_code.as_deref().unwrap_or("-"),
            r.hook_exit
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            r.attempt,
            r.hook_attempts
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
        )?;
        match e.awaiting_note(now) {
            Some(note) => writeln!(out, "  {note}")?,
            None => writeln!(out)?,
        }
    }
    Ok(())
}

fn parse_meta(items: &[String]) -> Result<BTreeMap<String, String>, Exit> {
    let mut meta = BTreeMap::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            return Err(usage(anyhow::anyhow!(
                "--meta {item:?}: write it as KEY=VALUE"
            )));
        };
        meta.insert(k.to_string(), v.to_string());
    }
    crate::domain::check_meta(&meta).map_err(|e| usage(anyhow::anyhow!("--meta: {e}")))?;
    Ok(meta)
}

/// Copies a file into the spool as a queued transfer (`actions.rs`).
async fn queue_copy(
    cfg: &Config,
    store: &Store,
    file_id: &str,
    src: (&Path, &str),
    to: (Option<NodeName>, bool),
    meta: (&BTreeMap<String, String>, Option<&TransferId>),
) -> Result<TransferId, Exit> {
    crate::actions::queue_copy(cfg, store, file_id, src, to, meta)
        .await
        .map_err(action_exit)
}

async fn send(
    cfg: &Config,
    file_id: &str,
    (path, parent): (&Path, Option<TransferId>),
    to: Option<String>,
    meta: &[String],
    wait: Option<Deadline>,
) -> Result<(), Exit> {
    let meta = parse_meta(meta)?;
    let to = to
        .map(|n| NodeName::parse(&n).map_err(|e| usage(anyhow::anyhow!("--to: {e}"))))
        .transpose()?;
    if !path.is_file() {
        return Err(usage(anyhow::anyhow!(
            "{} is not a readable file",
            path.display()
        )));
    }
    let agent_running = StateLock::held(cfg);
    if wait.is_some() && !agent_running {
        return Err(usage(anyhow::anyhow!(
            "--wait needs the agent: none runs on {}; start it with `hakobu run -c {}`, or send without --wait to queue the file",
            cfg.state_dir.display(),
            cfg.file.display()
        )));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| FileName::parse(n).ok())
        .ok_or_else(|| usage(anyhow::anyhow!("{} has no plain file name", path.display())))?;
    let store = open_store(cfg)?;
    let src = (path, name.as_str());
    let tid = queue_copy(
        cfg,
        &store,
        file_id,
        src,
        (to, false),
        (&meta, parent.as_ref()),
    )
    .await?;
    if !agent_running {
        eprintln!(
            "note: no agent runs on {}; the file is queued and goes when `hakobu run -c {}` starts",
            cfg.state_dir.display(),
            cfg.file.display()
        );
    }
    println!("{tid}");
    match wait {
        Some(deadline) => wait_for(cfg, &store, &tid, deadline).await,
        None => Ok(()),
    }
}

/// `hakobu send` without a path: the profile's `source` (`request_cmd.rs`).
async fn send_source(
    cfg: &Config,
    file_id: &str,
    (to, parent): (Option<String>, Option<TransferId>),
    meta: &[String],
    wait: Option<Deadline>,
) -> Result<(), Exit> {
    if !meta.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "--meta is not yet taken with a profile's source; give the file's path"
        )));
    }
    let to = to
        .map(|n| NodeName::parse(&n).map_err(|e| usage(anyhow::anyhow!("--to: {e}"))))
        .transpose()?;
    let tids = crate::request_cmd::send_source(cfg, file_id, (to, parent), wait)
        .await
        .map_err(|(code, e)| Exit(code, e))?;
    let store = open_store(cfg)?;
    for tid in &tids {
        println!("{tid}");
        wait_for(cfg, &store, tid, wait.flatten()).await?;
    }
    Ok(())
}

/// `--wait [--timeout DUR]` as a deadline.
fn waiting(timeout: Option<&str>) -> Result<Deadline, Exit> {
    let timeout = timeout
        .map(|t| {
            crate::config::parse_duration(t).map_err(|e| usage(anyhow::anyhow!("--timeout: {e}")))
        })
        .transpose()?;
    Ok(timeout.map(|t| Instant::now() + t))
}

/// Polls the state database until every receiver of `tid` has settled it;
/// or stops at `deadline` (`request_timeout`) or once the agent has gone
/// (`agent_stopped`), each row then printed with that code.
async fn wait_for(
    cfg: &Config,
    store: &Store,
    tid: &TransferId,
    deadline: Deadline,
) -> Result<(), Exit> {
    let bar = Progress::new();
    let mut waiter = crate::request_cmd::Waiter::new(cfg, deadline);
    loop {
        let rows = store.sending().rows_of(tid).await.map_err(failure)?;
        bar.show(&rows);
        let settled = !rows.is_empty() && rows.iter().all(|r| r.status.is_final());
        let stopped = match settled {
            true => None,
            false => waiter.tick("the receipt did not come").await.err(),
        };
        if !settled && stopped.is_none() {
            continue;
        }
        bar.finish();
        for r in &rows {
            let code = match &stopped {
                Some(s) if !r.status.is_final() => Some(s.code.as_str()),
                _ => r.error_code.as_deref(),
            };
            println!("{} {} {}", r.peer, r.status.as_str(), code.unwrap_or(""));
        }
        if let Some(s) = stopped {
            return Err(failure(anyhow::anyhow!("{}: {}", s.code, s.sentence)));
        }
        let Some(failed) = rows.iter().find(|r| !r.delivered) else {
            return Ok(());
        };
        return Err(failure(anyhow::anyhow!(
            "{}: {}",
            failed.error_code.as_deref().unwrap_or("send_failed"),
            failed.error.as_deref().unwrap_or("the transfer failed")
        )));
    }
}

/// An action's refusal or failure, with its code, as an exit.
fn action_exit(e: crate::actions::ActionError) -> Exit {
    let usage = e.is_usage();
    let err = anyhow::anyhow!("{e} (error_code={})", e.code());
    if usage { Exit(2, err) } else { Exit(1, err) }
}

async fn rerun(cfg: &Config, tid: &str) -> Result<(), Exit> {
    let tid = transfer_id(tid)?;
    let store = open_store(cfg)?;
    let done = crate::actions::rerun(cfg, &store, &tid, StateLock::held(cfg)).await;
    let (event, outcome, recorded) = match done.map_err(action_exit)? {
        Rerun::NoHook(event) => {
            println!("no {} hook configured for transfer {tid}", event.as_str());
            return Ok(());
        }
        Rerun::Ran {
            event,
            outcome,
            recorded,
        } => (event, outcome, recorded),
    };
    if !recorded {
        eprintln!(
            "note: an agent took transfer {tid} over while the hook ran; `hakobu history` shows what it recorded"
        );
    }
    if outcome.ok() {
        println!("{} hook ran: exit 0", event.as_str());
        Ok(())
    } else {
        let (code, sentence) = outcome.failure();
        Err(failure(anyhow::anyhow!("{code}: {sentence}")))
    }
}

async fn resend(cfg: &Config, tid: &str) -> Result<(), Exit> {
    let tid = transfer_id(tid)?;
    let store = open_store(cfg)?;
    let new_ids = crate::actions::resend(cfg, &store, &tid)
        .await
        .map_err(action_exit)?;
    for id in new_ids {
        println!("{id}");
    }
    if !StateLock::held(cfg) {
        eprintln!(
            "note: no agent runs on {}; the file goes when the agent starts",
            cfg.state_dir.display()
        );
    }
    Ok(())
}
