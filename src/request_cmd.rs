//! `hakobu request` (HULFT's `utlrecv`): ask another node for the file of a
//! send profile that lists this node in `requests_from`; and `hakobu send
//! --file-id ID` without a path, which sends the profile's `source`.
//!
//! Both only record a request in this node's state database; the agent on
//! it publishes the request (or serves its own), records the reply, and
//! receives the files like any other. `--wait` follows the database:
//! exit 0 when every file sent for the request is placed and its success
//! hook succeeded, 1 with a stable code otherwise, 2 on usage errors.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use crate::agent::StateLock;
use crate::config::{Config, parse_duration};
use crate::domain::{FileId, NodeName, TransferId};
use crate::error_code::ErrorCode;
use crate::store::{
    ReceiveRow, RequestDir, RequestLedger, RequestRow, RequestStatus, Status, Store,
};

#[derive(Args)]
pub struct RequestArgs {
    #[arg(short, long)]
    config: PathBuf,
    /// The file id: a receive profile here, a send profile on the other node.
    #[arg(long)]
    file_id: String,
    /// The node asked to send the file.
    #[arg(long)]
    from: String,
    /// Wait until every file sent for the request is placed and its success
    /// hook succeeded; exit 1 with the code otherwise.
    #[arg(long)]
    wait: bool,
    /// With --wait, give up after this long (`request_timeout`), e.g. 10m.
    #[arg(long, requires = "wait")]
    timeout: Option<String>,
}

/// A failure with its exit code: 1 for the transfer, 2 for usage.
pub type Exit = (u8, anyhow::Error);

fn usage(msg: String) -> Exit {
    (2, anyhow::anyhow!(msg))
}

fn failed(code: &str, msg: &str) -> Exit {
    println!("{code}");
    (1, anyhow::anyhow!("{code}: {msg}"))
}

/// `hakobu request`.
pub async fn run(args: RequestArgs) -> Result<(), Exit> {
    let cfg = Config::load(&args.config).map_err(|e| (2, e.into()))?;
    let file_id = FileId::parse(&args.file_id).map_err(|e| usage(format!("--file-id: {e}")))?;
    let from = NodeName::parse(&args.from).map_err(|e| usage(format!("--from: {e}")))?;
    let timeout = args
        .timeout
        .as_deref()
        .map(|t| parse_duration(t).map_err(|e| usage(format!("--timeout: {e}"))))
        .transpose()?;
    if from == cfg.node {
        return Err(usage(format!("--from {from} is this node")));
    }
    let accepts = cfg
        .receive_profile(&file_id)
        .is_some_and(|p| p.from.contains(&from));
    if !accepts {
        return Err(usage(format!(
            "{} has no receive profile for file id `{file_id}` that accepts it from {from}: add one (file_id: {file_id}, from: [ {from} ]) so that the file can arrive",
            cfg.file.display()
        )));
    }
    let store = open(&cfg, args.wait)?;
    let id = TransferId::new();
    let row = RequestRow::new(id.clone(), RequestDir::Out, from.clone(), file_id);
    record(&store.requests(), row).await?;
    println!("{id}");
    if !args.wait {
        return Ok(());
    }
    let mut waiter = Waiter::new(&cfg, timeout.map(|t| Instant::now() + t));
    let ledger = store.requests();
    let tids = answered(&ledger, RequestDir::Out, &id, &mut waiter).await?;
    loop {
        let rows = ledger
            .received(&from, &tids)
            .await
            .map_err(|e| (1, e.into()))?;
        if let Some(done) = settled(&tids, &rows) {
            return done;
        }
        waiter
            .tick("the files did not arrive")
            .await
            .map_err(Stopped::printed)?;
    }
}

/// Opens the state database of an agent; with `wait`, one must run on it.
fn open(cfg: &Config, wait: bool) -> Result<Store, Exit> {
    let running = StateLock::held(cfg);
    if wait && !running {
        return Err(usage(format!(
            "--wait needs the agent: none runs on {}; start it with `hakobu run -c {}`",
            cfg.state_dir.display(),
            cfg.file.display()
        )));
    }
    if !running {
        eprintln!(
            "note: no agent runs on {}; the request goes when `hakobu run -c {}` starts",
            cfg.state_dir.display(),
            cfg.file.display()
        );
    }
    crate::agent::prepare_state_dir(cfg).map_err(|e| (2, e))?;
    Store::open(&cfg.db_path()).map_err(|e| (1, e.into()))
}

async fn record(ledger: &RequestLedger, row: RequestRow) -> Result<(), Exit> {
    match ledger.insert(row).await {
        Ok(true) => Ok(()),
        Ok(false) => Err((1, anyhow::anyhow!("a request with this id exists already"))),
        Err(e) => Err((1, e.into())),
    }
}

/// With `--wait`: when to give up (`--timeout`), `None` for never.
pub type Deadline = Option<Instant>;

/// How long `--wait` goes on with no agent on its state directory: long
/// enough for a service manager to restart one (systemd: 2 s).
pub const AGENT_GONE_AFTER: Duration = Duration::from_secs(10);

/// Why a `--wait` stopped waiting: its stable code and a sentence.
pub struct Stopped {
    pub code: ErrorCode,
    pub sentence: String,
}

impl Stopped {
    /// `request`'s form: the code alone on stdout, the sentence in the error.
    fn printed(self) -> Exit {
        failed(self.code.as_str(), &self.sentence)
    }
}

/// The pace of a `--wait`: one wait between two looks at the database,
/// `request_timeout` once the deadline (`--timeout`) has passed,
/// `agent_stopped` once no agent has held the state directory for
/// `AGENT_GONE_AFTER` (nothing would settle the transfer then, and the
/// command would wait for good). A lock it cannot look at (no permission
/// to open it) counts as neither.
pub struct Waiter<'a> {
    cfg: &'a Config,
    deadline: Option<Instant>,
    gone_since: Option<Instant>,
}

impl<'a> Waiter<'a> {
    pub fn new(cfg: &'a Config, deadline: Deadline) -> Waiter<'a> {
        Waiter {
            cfg,
            deadline,
            gone_since: None,
        }
    }

    /// Waits before the next look; `what` says what did not come.
    pub async fn tick(&mut self, what: &str) -> Result<(), Stopped> {
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now >= d) {
            return Err(Stopped {
                code: ErrorCode::RequestTimeout,
                sentence: format!(
                    "{what} before --timeout; the transfer goes on: `hakobu history` shows what came later"
                ),
            });
        }
        match StateLock::probe(self.cfg) {
            Some(false) => {
                if now - *self.gone_since.get_or_insert(now) >= AGENT_GONE_AFTER {
                    return Err(Stopped {
                        code: ErrorCode::AgentStopped,
                        sentence: format!(
                            "{what}, and no agent has run on {} for {} s: nothing is lost, the transfer goes on when `hakobu run -c {}` starts again; `hakobu history` shows it",
                            self.cfg.state_dir.display(),
                            AGENT_GONE_AFTER.as_secs(),
                            self.cfg.file.display()
                        ),
                    });
                }
            }
            _ => self.gone_since = None,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }
}

/// Waits for the request's answer: the transfers it started, or its code.
async fn answered(
    ledger: &RequestLedger,
    dir: RequestDir,
    id: &TransferId,
    waiter: &mut Waiter<'_>,
) -> Result<Vec<TransferId>, Exit> {
    loop {
        let row = ledger.get(dir, id).await.map_err(|e| (1, e.into()))?;
        if let Some(row) = row.filter(|r| r.status == RequestStatus::Answered) {
            return match (row.ok, row.error_code) {
                (Some(true), _) => Ok(row.transfer_ids),
                (_, code) => Err(failed(
                    code.as_deref().unwrap_or("malformed_message"),
                    row.error.as_deref().unwrap_or("the request failed"),
                )),
            };
        }
        waiter
            .tick("no reply came")
            .await
            .map_err(Stopped::printed)?;
    }
}

/// `Some` once every transfer of the request is settled on this node:
/// `Ok` when each was placed and its success hook succeeded.
fn settled(tids: &[TransferId], rows: &[ReceiveRow]) -> Option<Result<(), Exit>> {
    if rows.len() < tids.len() || !rows.iter().all(|r| r.status.is_final()) {
        return None;
    }
    for r in rows {
        println!(
            "{} {} {}",
            r.transfer_id,
            r.status.as_str(),
            r.path
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    Some(match rows.iter().find(|r| r.status != Status::Received) {
        None => Ok(()),
        Some(bad) => Err(failed(
            bad.error_code.as_deref().unwrap_or("receive_failed"),
            bad.error.as_deref().unwrap_or("the transfer failed"),
        )),
    })
}

/// `hakobu send -c F --file-id ID` without a path: the profile's `source`,
/// through the agent (its `before_send` job, then a copy into the spool),
/// to `to` or the profile's `to`. Prints the transfer id once the agent
/// has taken it; `--wait` then waits like `hakobu send --wait`.
pub async fn send_source(
    cfg: &Config,
    file_id: &str,
    (to, parent): (Option<NodeName>, Option<TransferId>),
    wait: Option<Deadline>,
) -> Result<Vec<TransferId>, Exit> {
    let profile = cfg.send_profile(file_id).ok_or_else(|| {
        usage(format!(
            "no send profile for file id `{file_id}` in {}",
            cfg.file.display()
        ))
    })?;
    if profile.source.is_none() {
        return Err(usage(format!(
            "the send profile `{file_id}` has no `source`: give the file to send (`hakobu send -c {} --file-id {file_id} PATH`)",
            cfg.file.display()
        )));
    }
    if to.is_none() && profile.to.is_empty() {
        return Err(usage(format!(
            "the send profile `{file_id}` has no `to`: give --to NODE"
        )));
    }
    let store = open(cfg, wait.is_some())?;
    let id = TransferId::new();
    let peer = to.unwrap_or_else(|| cfg.node.clone());
    let mut row = RequestRow::new(id.clone(), RequestDir::Local, peer, profile.file_id.clone());
    row.parent_id = parent;
    record(&store.requests(), row).await?;
    let Some(deadline) = wait else {
        eprintln!("queued request {id}: the agent sends the source; `hakobu history` shows it");
        return Ok(Vec::new());
    };
    let mut waiter = Waiter::new(cfg, deadline);
    answered(&store.requests(), RequestDir::Local, &id, &mut waiter).await
}
