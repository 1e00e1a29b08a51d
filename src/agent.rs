//! `hakobu run`: wires the configuration, the state database, the broker, the
//! sender and the receiver together, and dispatches what arrives on this
//! node's queue.

use std::sync::Arc;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::embedded::{Embedded, server};
use crate::broker::{Broker, Delivery};
use crate::coalesce::Coalescer;
use crate::config::{BrokerConfig, Config};
use crate::receiver::{Commits, Receiver};
use crate::sender::Sender;
use crate::store::Store;
use crate::wire::Message;

/// How long a stopping agent waits for hooks and receipts under way.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Holds the state directory for one agent at a time.
pub struct StateLock(#[allow(dead_code)] Flock<std::fs::File>);

impl StateLock {
    pub fn lock_path(cfg: &Config) -> std::path::PathBuf {
        cfg.state_dir.join("agent.lock")
    }

    /// Takes the lock, or says which state directory is taken.
    pub fn acquire(cfg: &Config) -> anyhow::Result<StateLock> {
        let path = Self::lock_path(cfg);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            anyhow::anyhow!("another agent is running on {} ({e}); stop it first or give this one its own state_dir", cfg.state_dir.display())
        })?;
        Ok(StateLock(lock))
    }

    /// True when an agent holds the state directory now.
    pub fn held(cfg: &Config) -> bool {
        let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .open(Self::lock_path(cfg))
        else {
            return false;
        };
        Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err()
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
            let token = read_token(e.token_file.as_deref())?;
            let (addr, hosted) = match (&e.listen, &e.connect) {
                (Some(listen), _) => {
                    let running =
                        server::start(listen, &cfg.broker_data_dir(), token.clone(), e.max_queue)
                            .await?;
                    (running.addr.to_string(), Some(running))
                }
                (None, Some(connect)) => (connect.clone(), None),
                (None, None) => anyhow::bail!("broker.embedded needs listen or connect"),
            };
            Ok((
                Arc::new(Embedded::new(&addr, token, EMBEDDED_PREFETCH)),
                EMBEDDED_WINDOW,
                hosted,
            ))
        }
    }
}

/// Reads a shared-secret token file (surrounding white space ignored).
pub fn read_token(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = token.trim().to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "the token file {} is empty",
        path.display()
    );
    Ok(Some(token))
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

/// Creates the state directory and its parts.
pub fn prepare_state_dir(cfg: &Config) -> anyhow::Result<()> {
    for dir in [cfg.state_dir.clone(), cfg.spool_dir(), cfg.log_dir()] {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    prepare_state_dir(&cfg)?;
    let _lock = StateLock::acquire(&cfg)?;
    let store = Store::open(&cfg.db_path())?;
    let (broker, window, _hosted) = open_broker(&cfg).await?;
    let tasks = TaskTracker::new();
    let out = Coalescer::new(broker.clone());
    let receiver = Receiver::new(cfg.clone(), store.clone(), out.clone(), tasks.clone());
    let sender = Sender::new(cfg.clone(), store.clone(), out, window, tasks.clone());
    receiver.recover().await?;
    sender.recover().await?;
    let mut deliveries = broker.subscribe(&cfg.node).await?;
    let commits = receiver.start_commits();
    sender.start_watchers();
    tokio::spawn(sender.clone().poll_queued());
    tokio::spawn(receiver.clone().expire_stale());
    info!(message = "Agent running.", node = %cfg.node, send_profiles = cfg.send.len(), receive_profiles = cfg.receive.len());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            d = deliveries.recv() => match d {
                Some(d) => dispatch(&receiver, &commits, &sender, d, &mut deliveries).await,
                None => anyhow::bail!("the broker subscription ended"),
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    // Stop taking deliveries; let placements, hooks and receipts under way
    // finish. What does not finish in time resumes from the ledger at the
    // next start (a hook cut off is recorded as interrupted, not re-run).
    drop(deliveries);
    drop(commits);
    tasks.close();
    info!(
        message = "Agent stopping; waiting for work under way.",
        tasks = tasks.len()
    );
    if tokio::time::timeout(STOP_GRACE, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            message = "Stopping with work still under way; it resumes at the next start.",
            tasks = tasks.len()
        );
    }
    Ok(())
}

/// Most chunks one batch takes: what arrived together shares one fsync per
/// partial file and one ledger commit.
const BATCH: usize = 64;

/// Handles `first` and whatever else has already arrived: chunks as one
/// batch (written here, made durable and acked by the commit stage while the
/// next deliveries arrive), receipts side by side (their ledger writes share
/// a flush).
async fn dispatch(
    receiver: &Arc<Receiver>,
    commits: &Commits,
    sender: &Arc<Sender>,
    first: Delivery,
    more: &mut tokio::sync::mpsc::Receiver<Delivery>,
) {
    let mut chunks = Vec::new();
    let mut receipts = Vec::new();
    let mut next = Some(first);
    while let Some(mut d) = next.take() {
        // The delivery keeps only what settles it: a chunk's body is freed
        // as soon as it is written, while its ack waits for the commit.
        let payload = std::mem::take(&mut d.payload);
        let bytes = payload.len();
        match Message::decode(payload) {
            Ok(Message::Batch(parts)) => {
                // Each part settles its share; the message settles with the last.
                let n = parts.len();
                for (part, d) in parts.into_iter().zip(d.split(n)) {
                    match part {
                        Message::Chunk(h, body) => chunks.push((h, body, d)),
                        Message::Receipt(r) => receipts.push(sender.on_receipt(r, d)),
                        // The decoder refuses nested batches.
                        Message::Batch(_) => {
                            let _ = d.dead_letter().await;
                        }
                    }
                }
            }
            Ok(Message::Chunk(h, body)) => chunks.push((h, body, d)),
            Ok(Message::Receipt(r)) => receipts.push(sender.on_receipt(r, d)),
            Err(e) => {
                warn!(message = "Dead-lettering a message that cannot be parsed.", error_code = e.code(), error = %e, bytes);
                let _ = d.dead_letter().await;
            }
        }
        if chunks.len() + receipts.len() < BATCH {
            next = more.try_recv().ok();
        }
    }
    let chunks = async {
        if !chunks.is_empty() {
            receiver.on_chunks(chunks, commits).await;
        }
    };
    futures::future::join(chunks, futures::future::join_all(receipts)).await;
}
