//! `hakobu run`: wires the configuration, the state database, the broker, the
//! sender and the receiver together, and owns their lifecycle. Starting:
//! recovery from the ledger, then the subscription, then intake (watchers,
//! the queue poller, expiry). Stopping: intake first (one stop token for
//! the watchers, poller, publishers, expiry and the consumer loop), then
//! the commits, completions and hooks under way are drained, then the
//! coalescing publisher, then the state database.

use std::sync::Arc;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::broker::embedded::{Credentials, Embedded, credentials, server};
use crate::coalesce::Coalescer;
use crate::config::{BrokerConfig, Config};
use crate::dispatch::Dispatch;
use crate::receiver::Receiver;
use crate::sender::Sender;
use crate::store::{Store, StoreError};

/// How long a stopping agent waits for hooks and receipts under way.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Holds the state directory for one agent at a time.
pub struct StateLock(#[allow(dead_code)] Flock<std::fs::File>);

impl StateLock {
    pub fn lock_path(cfg: &Config) -> std::path::PathBuf {
        cfg.state_dir.join("agent.lock")
    }

    /// Takes the lock, or says which state directory is taken. A lock held
    /// for less than a second is waited out: [`probe`](Self::probe) takes
    /// it for an instant (a `--wait` command looking for its agent).
    pub async fn acquire(cfg: &Config) -> anyhow::Result<StateLock> {
        let path = Self::lock_path(cfg);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let lock = lock_waiting(f, LOCK_PATIENCE).await.map_err(|e| {
            anyhow::anyhow!("another agent is running on {} ({e}); stop it first or give this one its own state_dir", cfg.state_dir.display())
        })?;
        Ok(StateLock(lock))
    }

    /// True when an agent holds the state directory now (false also when
    /// this user cannot tell).
    pub fn held(cfg: &Config) -> bool {
        Self::probe(cfg) == Some(true)
    }

    /// Whether an agent holds the state directory now: `None` when this
    /// user cannot tell (the lock file not readable, locks not supported).
    /// Takes the lock for an instant when no agent holds it
    /// ([`acquire`](Self::acquire) waits that out).
    pub fn probe(cfg: &Config) -> Option<bool> {
        let f = match std::fs::File::open(Self::lock_path(cfg)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
            Err(_) => return None,
        };
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(_) => Some(false),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Some(true),
            Err(_) => None,
        }
    }
}

/// How long [`StateLock::acquire`] waits out a lock held by someone else.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// An exclusive lock on `f`, tried every 50 ms for `patience` while
/// another holds it; any other error at once.
async fn lock_waiting(
    mut f: std::fs::File,
    patience: std::time::Duration,
) -> Result<Flock<std::fs::File>, nix::errno::Errno> {
    let until = std::time::Instant::now() + patience;
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < until => {
                f = back;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err((_, e)) => return Err(e),
        }
    }
}

/// The broker client for `cfg`, and the embedded broker itself when this
/// agent hosts it (kept alive by holding the returned handle).
pub async fn open_broker(
    cfg: &Config,
) -> anyhow::Result<(Arc<dyn Broker>, u64, Option<server::Running>)> {
    match &cfg.broker {
        BrokerConfig::Rabbitmq(r) => Ok((
            Arc::new(crate::broker::rabbitmq::RabbitMq::new(r.clone())),
            r.window,
            None,
        )),
        BrokerConfig::Embedded(e) => {
            let creds = embedded_credentials(cfg, e.listen.is_some())?;
            let (addr, hosted) = match (&e.listen, &e.connect) {
                (Some(listen), _) => {
                    let data = cfg.broker_data_dir();
                    credentials::ensure(&data, &cfg.node, &creds.secret)?;
                    let running = server::start_tls(
                        listen,
                        &data,
                        e.limits,
                        e.insecure,
                        e.server_tls.as_ref(),
                    )
                    .await?;
                    (running.addr.to_string(), Some(running))
                }
                (None, Some(connect)) => (connect.clone(), None),
                (None, None) => anyhow::bail!("broker.embedded needs listen or connect"),
            };
            let tls = match &e.client_tls {
                Some((ca, name)) => Some(crate::broker::embedded::tls::Client::new(ca, name)?),
                None => None,
            };
            Ok((
                Arc::new(Embedded::new(&addr, creds, EMBEDDED_PREFETCH).with_tls(tls)),
                EMBEDDED_WINDOW,
                hosted,
            ))
        }
    }
}

/// Whether this process runs as root (its effective uid, as /proc shows it).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// This node's credentials for the embedded broker, from its secret file
/// (`embedded.secret_file`, default `state_dir/broker.secret`), which must be
/// private to its owner. An agent hosting the broker creates its own secret
/// on its first start; any other node gets one from `hakobu broker add-node`.
pub fn embedded_credentials(cfg: &Config, hosting: bool) -> anyhow::Result<Credentials> {
    let path = cfg.embedded_secret_file();
    let missing = matches!(std::fs::symlink_metadata(&path), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
    if hosting && missing {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        crate::secret::create(&path, &credentials::new_secret()?)?;
        info!(message = "Created this node's secret for the embedded broker.", node = %cfg.node, file = %path.display());
    } else if missing {
        anyhow::bail!(
            "node {node} has no credentials for the embedded broker at {file}: on the broker's host run `hakobu broker add-node --data DIR {node} -o {file}` (or `-c HOST.yaml` for a broker an agent hosts), or name the secret file in broker.embedded.secret_file",
            node = cfg.node,
            file = path.display()
        );
    }
    Ok(Credentials {
        node: cfg.node.to_string(),
        secret: crate::secret::read(&path)?,
    })
}

/// Deliveries a receiver holds unacked from the embedded broker: 32 chunks
/// of 512 KiB at most, 16 MiB, and less in memory (a body is freed once
/// written; what waits for its commit holds none). The receiver acks only
/// after its commit, so the broker needs some of it ahead. On a slow disk
/// (~400 MiB/s) 64 gave 131-133 MiB/s against 106-113 for 32; on a faster
/// one (cp + sync ~1.1 GiB/s, benches/run.sh, alternating builds) 32 gave
/// 215-225 MiB/s and 64 228-232, but the receiver's peak RSS went 31-37 MiB
/// with 32 and 34-54 MiB with 64, growing with the file size (1 GiB against
/// 4 GiB), which the memory bound forbids.
const EMBEDDED_PREFETCH: u32 = 32;
/// Unconfirmed bytes a sender keeps in flight to the embedded broker. 16 MiB
/// spans about two of the broker's group-commit fsyncs: measured on 1 GiB,
/// 8 MiB gave 80-87 MiB/s, 16 MiB 93-95; 32 and 64 MiB gained nothing once
/// the broker flushed in the background (64 MiB doubled the sender's memory).
const EMBEDDED_WINDOW: u64 = 16 << 20;

/// Creates the state directory and its parts; the state directory and the
/// spool are private (0700, an existing one tightened).
pub fn prepare_state_dir(cfg: &Config) -> anyhow::Result<()> {
    for dir in [cfg.state_dir.clone(), cfg.spool_dir()] {
        crate::durable::private_dir(&dir)
            .with_context(|| format!("cannot create {} private (mode 0700)", dir.display()))?;
    }
    let logs = cfg.log_dir();
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    Ok(())
}

/// `hakobu run`: the agent until SIGINT or SIGTERM (or until its broker
/// subscription ends, which is an error).
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let mut agent = Agent::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let ended = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        ended = &mut agent.intake => Some(ended),
    };
    agent.stop().await;
    match ended {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(anyhow::anyhow!("the agent's intake stopped: {e}")),
        None => Ok(()),
    }
}

/// A running agent.
pub struct Agent {
    /// Cancelled to stop intake.
    stop: CancellationToken,
    /// The consumer loop; ends with an error if the subscription ends.
    intake: JoinHandle<anyhow::Result<()>>,
    /// The commit stage, completions and receipt hooks.
    tasks: TaskTracker,
    out: Arc<Coalescer>,
    _hosted: Option<server::Running>,
    _lock: StateLock,
}

impl Agent {
    /// Starts an agent for `cfg` on this runtime: recovery, subscription,
    /// intake.
    pub async fn start(cfg: Config) -> anyhow::Result<Agent> {
        let cfg = Arc::new(cfg);
        if running_as_root() && !cfg.run_as_root {
            warn!(
                message = "The agent runs as root: its hooks run as root and it can write wherever a profile points. Run it as its own user (README, Security), or set `run_as_root: true` if this is meant."
            );
        }
        cfg.keys.check()?;
        prepare_state_dir(&cfg)?;
        let lock = StateLock::acquire(&cfg).await?;
        let http_auth = match &cfg.http {
            Some(h) => Some(Arc::new(crate::http::Auth::load(h)?)),
            None => None,
        };
        // Opening migrates the schema: a blocking task, not an async worker.
        let db = cfg.db_path();
        let store = tokio::task::spawn_blocking(move || Store::open(&db)).await??;
        let (broker, window, hosted) = open_broker(&cfg).await?;
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        let out = Coalescer::new(broker.clone());
        let receiver = Receiver::new(
            cfg.clone(),
            store.receiving(),
            out.clone(),
            (tasks.clone(), stop.clone()),
        );
        let sender = Sender::new(
            cfg.clone(),
            store.sending(),
            out.clone(),
            (window, tasks.clone(), stop.clone()),
        );
        until_space(|| receiver.recover()).await?;
        until_space(|| sender.recover()).await?;
        let mut deliveries = broker.subscribe(&cfg.node).await?;
        let dispatch = Dispatch {
            commits: receiver.start_commits(),
            receiver: receiver.clone(),
            sender: sender.clone(),
        };
        if let (Some(http), Some(auth)) = (&cfg.http, http_auth) {
            let state = crate::http::HttpState {
                cfg: cfg.clone(),
                store: store.clone(),
                sender: sender.clone(),
                auth,
            };
            crate::http::start(http, state, stop.child_token()).await?;
        }
        tokio::spawn(sender.clone().refill());
        sender.start_watchers();
        tokio::spawn(sender.clone().check_receipt_timeouts());
        tokio::spawn(sender.poll_queued());
        tokio::spawn(receiver.clone().complete_waiting());
        tokio::spawn(receiver.expire_stale(stop.child_token()));
        info!(message = "Agent running.", node = %cfg.node, send_profiles = cfg.send.len(), receive_profiles = cfg.receive.len());
        let intake_stop = stop.clone();
        let intake = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = intake_stop.cancelled() => return Ok(()),
                    d = deliveries.recv() => match d {
                        Some(d) => dispatch.handle(d, &mut deliveries).await,
                        None => anyhow::bail!("the broker subscription ended"),
                    },
                }
            }
            // Dropping `deliveries` ends the subscription; dropping
            // `dispatch` ends the commit stage once it has committed what
            // it holds.
        });
        Ok(Agent {
            stop,
            intake,
            tasks,
            out,
            _hosted: hosted,
            _lock: lock,
        })
    }

    /// Stops intake, then waits (up to [`STOP_GRACE`]) for the commits,
    /// completions and hooks under way. What does not finish in time
    /// resumes from the ledger at the next start (a hook cut off is recorded
    /// as interrupted, not re-run).
    pub async fn stop(self) {
        self.stop.cancel();
        if !self.intake.is_finished() {
            let _ = self.intake.await;
        }
        self.tasks.close();
        info!(
            message = "Agent stopping; waiting for work under way.",
            tasks = self.tasks.len()
        );
        if tokio::time::timeout(STOP_GRACE, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                message = "Stopping with work still under way; it resumes at the next start.",
                tasks = self.tasks.len()
            );
        }
        self.out.close();
    }
}

/// How often start-up recovery tries again on a full disk.
const SPACE_RETRY: std::time::Duration = if cfg!(test) {
    std::time::Duration::from_millis(10)
} else {
    std::time::Duration::from_secs(5)
};

/// Runs a recovery step until the state directory's disk has room for it:
/// on a full disk (`disk_full`, said once) it is tried again every few
/// seconds rather than the agent exiting. Recovery resumes from the ledger
/// alone, so a step cut short by the full disk is safe to run again.
async fn until_space<F, Fut>(mut step: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let mut said = false;
    loop {
        match step().await {
            Err(e) if e.code() == crate::error_code::ErrorCode::DiskFull => {
                if !said {
                    warn!(message = "The state directory's disk is full: start-up recovery waits for space and tries again every 5 s. Free space on it.",
                        error = %e, error_code = %e.code());
                    said = true;
                }
                tokio::time::sleep(SPACE_RETRY).await;
            }
            done => {
                if said {
                    info!(
                        message =
                            "The state directory's disk has room again; start-up recovery done."
                    );
                }
                return done;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> StoreError {
        let e = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL);
        StoreError::Sql(rusqlite::Error::SqliteFailure(e, None))
    }

    #[tokio::test]
    async fn the_state_lock_waits_out_a_brief_holder_not_a_long_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.lock");
        let open = || std::fs::File::create(&path).unwrap();
        // Held for 300 ms (a `--wait` probing takes it for far less).
        let held = Flock::lock(open(), FlockArg::LockExclusiveNonblock).unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        assert!(lock_waiting(open(), LOCK_PATIENCE).await.is_ok());
        release.join().unwrap();
        // Held by another for good: refused once the patience is out.
        let _other = Flock::lock(open(), FlockArg::LockExclusiveNonblock).unwrap();
        let started = std::time::Instant::now();
        let r = lock_waiting(open(), LOCK_PATIENCE).await;
        assert_eq!(r.err(), Some(nix::errno::Errno::EWOULDBLOCK));
        assert!(started.elapsed() >= LOCK_PATIENCE);
    }

    #[tokio::test]
    async fn recovery_waits_out_a_full_disk_and_stops_at_another_error() {
        let mut tries = 0;
        let r = until_space(|| {
            tries += 1;
            let r = if tries < 3 { Err(full()) } else { Ok(()) };
            async move { r }
        })
        .await;
        assert!(r.is_ok() && tries == 3, "tried {tries} times: {r:?}");
        let mut tries = 0;
        let r = until_space(|| {
            tries += 1;
            async { Err(StoreError::Stopped) }
        })
        .await;
        assert!(r.is_err() && tries == 1, "another error is not waited out");
    }
}
