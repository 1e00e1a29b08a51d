//! The embedded broker: a single-node durable broker inside the binary.
//!
//! One core thread owns the storage and every queue; connection tasks talk to
//! it through a command channel. The core takes whatever commands are waiting,
//! appends all their messages, fsyncs once (group commit), and only then
//! confirms them and makes them deliverable. Payloads stay on disk until a
//! delivery reads them, so memory does not grow with queue depth.
//!
//! Backpressure: a queue holding more than its limit (`max_queue`) parks new
//! publishes unconfirmed, and each connection has at most
//! [`CONNECTION_IN_FLIGHT`] bytes of unconfirmed publishes before the broker
//! stops reading from it: a slow receiver makes senders wait.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tracing::{debug, error, info, warn};

use super::frame::{Frame, MAX_FRAME, PROTOCOL_VERSION};
use super::log::{Dirty, Loc, Log};
use crate::broker::DEAD_LETTER_QUEUE;

/// A queue over this many stored bytes makes its publishers wait, by default.
pub const DEFAULT_MAX_QUEUE: u64 = 1 << 30;
/// Unconfirmed publish bytes one connection may have in the broker.
pub const CONNECTION_IN_FLIGHT: usize = 32 << 20;
/// Deliveries of one message before it is dead-lettered.
const DELIVERY_LIMIT: u32 = 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("cannot open the broker's data directory {0}: {1}")]
    Data(PathBuf, std::io::Error),
    #[error("another broker uses the data directory {0}; stop it or give this one its own --data")]
    Locked(PathBuf),
    #[error(
        "listening on {0} without a token would let any host connect; give a token file or listen on 127.0.0.1"
    )]
    NoToken(String),
}

impl ServerError {
    pub const fn code(&self) -> &'static str {
        "broker_start_failed"
    }
}

/// A running broker: its address, and a handle that stops it when dropped.
pub struct Running {
    pub addr: SocketAddr,
    _lock: nix::fcntl::Flock<std::fs::File>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Binds `listen`, replays `data`, and serves in the background.
pub async fn start(
    listen: &str,
    data: &Path,
    token: Option<String>,
    max_queue: u64,
) -> Result<Running, ServerError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| ServerError::Listen(listen.to_string(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Listen(listen.to_string(), e))?;
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(ServerError::NoToken(listen.to_string()));
    }
    std::fs::create_dir_all(data).map_err(|e| ServerError::Data(data.to_path_buf(), e))?;
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data.join("broker.lock"))
        .map_err(|e| ServerError::Data(data.to_path_buf(), e))?;
    let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| ServerError::Locked(data.to_path_buf()))?;
    let (log, stored, next_id) =
        Log::open(&data.join("segments")).map_err(|e| ServerError::Data(data.to_path_buf(), e))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut core = Core::new(log, next_id, max_queue);
    let restored = stored.len();
    for s in stored {
        core.queue(&s.queue).push_ready(Msg {
            id: s.id,
            loc: s.loc,
            deliveries: 0,
        });
    }
    let flusher =
        Flusher::start(tx.downgrade()).map_err(|e| ServerError::Data(data.to_path_buf(), e))?;
    std::thread::Builder::new()
        .name("hakobu-broker".into())
        .spawn(move || core.run(rx, flusher))
        .map_err(|e| ServerError::Data(data.to_path_buf(), e))?;
    info!(message = "Embedded broker listening.", %addr, data = %data.display(), restored_messages = restored);
    let token = token.map(Arc::new);
    let accept = tokio::spawn(async move {
        let mut next_conn = 0u64;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(message = "Accept failed.", error = %e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if token.is_none() && !peer.ip().is_loopback() {
                debug!(message = "Refusing a non-loopback peer: no token configured.", %peer);
                continue;
            }
            next_conn += 1;
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve_connection(
                stream,
                peer,
                next_conn,
                tx.clone(),
                token.clone(),
            ));
        }
    });
    Ok(Running {
        addr,
        _lock: lock,
        accept,
    })
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn valid_queue(q: &str) -> bool {
    !q.is_empty() && q.len() <= 255 && !q.chars().any(|c| c.is_control())
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    conn: u64,
    core: mpsc::UnboundedSender<Cmd>,
    token: Option<Arc<String>>,
) {
    let mut framed = Framed::new(stream, codec());
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(bytes))) => Frame::decode(bytes.freeze()),
        _ => return,
    };
    let refusal = match hello {
        Ok(Frame::Hello { version, .. }) if version != PROTOCOL_VERSION => Some(format!(
            "protocol version {version} is not supported (this broker speaks {PROTOCOL_VERSION}); run the same hakobu version"
        )),
        Ok(Frame::Hello { token: given, .. }) => match &token {
            Some(t) if !same_secret(t, &given) => {
                Some("wrong token; check the token file on both sides".to_string())
            }
            _ => None,
        },
        Ok(_) => Some("expected a hello frame first".to_string()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(message) = refusal {
        warn!(message = "Refusing a connection.", %peer, reason = %message);
        let _ = framed.send(Frame::Error { message }.encode()).await;
        return;
    }
    if framed
        .send(
            Frame::Welcome {
                version: PROTOCOL_VERSION,
            }
            .encode(),
        )
        .await
        .is_err()
    {
        return;
    }
    let (mut sink, mut frames) = framed.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            if sink.send(f.encode()).await.is_err() {
                break;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(CONNECTION_IN_FLIGHT));
    while let Some(item) = frames.next().await {
        let frame = match item
            .map_err(|e| e.to_string())
            .and_then(|b| Frame::decode(b.freeze()).map_err(|e| e.to_string()))
        {
            Ok(f) => f,
            Err(message) => {
                warn!(message = "Closing a connection after a bad frame.", %peer, error = %message);
                let _ = out.send(Frame::Error { message });
                break;
            }
        };
        match frame {
            Frame::Publish {
                seq,
                queue,
                payload,
            } => {
                if !valid_queue(&queue) {
                    let _ = out.send(Frame::Nack {
                        seq,
                        reason: "invalid queue name".into(),
                    });
                    continue;
                }
                let need = payload.len().clamp(1, CONNECTION_IN_FLIGHT) as u32;
                let Ok(permit) = in_flight.clone().acquire_many_owned(need).await else {
                    break;
                };
                let (reply, confirmed) = oneshot::channel();
                if core
                    .send(Cmd::Publish {
                        queue,
                        payload,
                        reply,
                    })
                    .is_err()
                {
                    break;
                }
                let out = out.clone();
                tokio::spawn(async move {
                    let frame = match confirmed.await {
                        Ok(Ok(())) => Frame::Confirm { seq },
                        Ok(Err(reason)) => Frame::Nack { seq, reason },
                        Err(_) => Frame::Nack {
                            seq,
                            reason: "broker stopping".into(),
                        },
                    };
                    drop(permit);
                    let _ = out.send(frame);
                });
            }
            Frame::Subscribe { queue, prefetch } if valid_queue(&queue) => {
                let _ = core.send(Cmd::Subscribe {
                    conn,
                    queue,
                    prefetch: prefetch.clamp(1, 1024),
                    out: out.clone(),
                });
            }
            Frame::Ack { tag } => {
                let _ = core.send(Cmd::Settle {
                    conn,
                    tag,
                    outcome: Outcome::Ack,
                });
            }
            Frame::Reject { tag } => {
                let _ = core.send(Cmd::Settle {
                    conn,
                    tag,
                    outcome: Outcome::DeadLetter,
                });
            }
            Frame::Requeue { tag } => {
                let _ = core.send(Cmd::Settle {
                    conn,
                    tag,
                    outcome: Outcome::Requeue,
                });
            }
            other => {
                let message = format!("unexpected frame from a client: {other:?}");
                warn!(message = "Closing a connection after a protocol error.", %peer, error = %message);
                let _ = out.send(Frame::Error { message });
                break;
            }
        }
    }
    let _ = core.send(Cmd::Gone { conn });
    drop(out);
    let _ = writer.await;
}

enum Cmd {
    Publish {
        queue: String,
        payload: Bytes,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Subscribe {
        conn: u64,
        queue: String,
        prefetch: u32,
        out: mpsc::UnboundedSender<Frame>,
    },
    Settle {
        conn: u64,
        tag: u64,
        outcome: Outcome,
    },
    Gone {
        conn: u64,
    },
    /// From the flusher: a batch is durable (or its fsync failed).
    Synced {
        result: Result<(), String>,
        confirms: Confirms,
    },
}

/// How a consumer settles a delivery.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ack,
    DeadLetter,
    Requeue,
}

#[derive(Clone, Copy)]
struct Msg {
    id: u64,
    loc: Loc,
    deliveries: u32,
}

struct Consumer {
    conn: u64,
    prefetch: u32,
    in_flight: u32,
    out: mpsc::UnboundedSender<Frame>,
}

struct Parked {
    payload: Bytes,
    reply: oneshot::Sender<Result<(), String>>,
}

#[derive(Default)]
struct Queue {
    ready: BTreeMap<u64, Msg>,
    /// Delivered, not yet settled: message and the consumer holding it.
    unacked: HashMap<u64, (Msg, usize)>,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    bytes: u64,
    parked: VecDeque<Parked>,
}

impl Queue {
    fn push_ready(&mut self, m: Msg) {
        self.bytes += m.loc.len as u64;
        self.ready.insert(m.id, m);
    }

    fn full(&self, extra: u64, max: u64) -> bool {
        self.bytes > 0 && self.bytes + extra > max
    }
}

/// The thread that fsyncs for the core: it takes one batch at a time and
/// reports back through the core's own command channel (holding it weakly,
/// so that it never keeps a stopped broker's channel open).
struct Flusher(std::sync::mpsc::Sender<(Dirty, Confirms)>);

impl Flusher {
    fn start(core: mpsc::WeakUnboundedSender<Cmd>) -> std::io::Result<Flusher> {
        let (tx, rx) = std::sync::mpsc::channel::<(Dirty, Confirms)>();
        std::thread::Builder::new()
            .name("hakobu-broker-sync".into())
            .spawn(move || {
                while let Ok((dirty, confirms)) = rx.recv() {
                    let result = dirty.sync().map_err(|e| e.to_string());
                    let Some(core) = core.upgrade() else { return };
                    if core.send(Cmd::Synced { result, confirms }).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Flusher(tx))
    }
}

struct Core {
    log: Log,
    /// A batch is with the flusher now.
    flushing: bool,
    /// Messages appended and not yet confirmed, per segment: they are in no
    /// queue yet, so compaction must leave their segments alone.
    unconfirmed: HashMap<u64, usize>,
    next_id: u64,
    queues: HashMap<String, Queue>,
    /// Where each delivered message is: tag → queue.
    tags: HashMap<u64, String>,
    max_queue: u64,
}

/// Replies to send once the batch is durable.
type Confirms = Vec<(oneshot::Sender<Result<(), String>>, Option<(String, Msg)>)>;

impl Core {
    fn new(log: Log, next_id: u64, max_queue: u64) -> Self {
        Core {
            log,
            flushing: false,
            unconfirmed: HashMap::new(),
            next_id,
            queues: HashMap::new(),
            tags: HashMap::new(),
            max_queue,
        }
    }

    fn queue(&mut self, name: &str) -> &mut Queue {
        self.queues.entry(name.to_string()).or_default()
    }

    /// Group commit, pipelined: appends wait in `waiting` while the flusher
    /// syncs the previous batch; when it reports back, that batch is
    /// confirmed and made deliverable, and everything appended meanwhile
    /// goes to the flusher as the next batch. Appends, acks and deliveries
    /// never wait for the disk's flush.
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, flusher: Flusher) {
        let mut waiting: Confirms = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut pending_dead: Vec<(String, Msg)> = Vec::new();
            self.handle(first, &mut waiting, &mut pending_dead);
            while waiting.len() < 4096 {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd, &mut waiting, &mut pending_dead),
                    Err(_) => break,
                }
            }
            for (queue, msg) in pending_dead {
                self.dead_letter(&queue, msg, &mut waiting);
            }
            self.unpark(&mut waiting);
            if !self.flushing && !waiting.is_empty() {
                let batch = (self.log.take_dirty(), std::mem::take(&mut waiting));
                match flusher.0.send(batch) {
                    Ok(()) => self.flushing = true,
                    // The flusher thread is gone (short of a panic it cannot
                    // be): flush here instead.
                    Err(std::sync::mpsc::SendError((dirty, confirms))) => {
                        let result = dirty.sync().map_err(|e| e.to_string());
                        self.synced(result, confirms);
                    }
                }
            }
            self.compact();
            self.dispatch_all();
        }
    }

    /// A batch is durable (or failed to be): confirm it, and make its
    /// messages deliverable.
    fn synced(&mut self, result: Result<(), String>, confirms: Confirms) {
        self.flushing = false;
        if let Err(e) = &result {
            error!(message = "Broker fsync failed; refusing the batch.", error = %e);
        }
        for (reply, visible) in confirms {
            if let Some((_, msg)) = &visible {
                if let Some(n) = self.unconfirmed.get_mut(&msg.loc.segment) {
                    *n -= 1;
                    if *n == 0 {
                        self.unconfirmed.remove(&msg.loc.segment);
                    }
                }
            }
            match &result {
                Ok(()) => {
                    if let Some((queue, msg)) = visible {
                        self.queue(&queue).push_ready(msg);
                    }
                    let _ = reply.send(Ok(()));
                }
                Err(e) => {
                    let _ = reply.send(Err(format!("broker disk error: {e}")));
                }
            }
        }
    }

    fn handle(&mut self, cmd: Cmd, confirms: &mut Confirms, dead: &mut Vec<(String, Msg)>) {
        match cmd {
            Cmd::Synced { result, confirms } => self.synced(result, confirms),
            Cmd::Publish {
                queue,
                payload,
                reply,
            } => {
                let max = self.max_queue;
                let q = self.queue(&queue);
                if q.full(payload.len() as u64, max) || !q.parked.is_empty() {
                    q.parked.push_back(Parked { payload, reply });
                    return;
                }
                self.append(&queue, &payload, reply, confirms);
            }
            Cmd::Subscribe {
                conn,
                queue,
                prefetch,
                out,
            } => {
                self.queue(&queue).consumers.push(Consumer {
                    conn,
                    prefetch,
                    in_flight: 0,
                    out,
                });
                debug!(message = "Consumer subscribed.", conn, queue);
            }
            Cmd::Settle { conn, tag, outcome } => {
                let Some(queue) = self.tags.get(&tag).cloned() else {
                    return;
                };
                let q = self.queue(&queue);
                let Some((msg, ci)) = q.unacked.get(&tag).copied() else {
                    return;
                };
                if q.consumers.get(ci).map(|c| c.conn) != Some(conn) {
                    return; // not this connection's delivery
                }
                q.unacked.remove(&tag);
                q.consumers[ci].in_flight -= 1;
                self.tags.remove(&tag);
                match outcome {
                    Outcome::Ack => self.settle(&queue, msg),
                    Outcome::DeadLetter => dead.push((queue, msg)),
                    Outcome::Requeue if msg.deliveries >= DELIVERY_LIMIT => dead.push((queue, msg)),
                    Outcome::Requeue => {
                        self.queue(&queue).ready.insert(msg.id, msg);
                    }
                }
            }
            Cmd::Gone { conn } => self.drop_connection(conn, dead),
        }
    }

    fn append(
        &mut self,
        queue: &str,
        payload: &[u8],
        reply: oneshot::Sender<Result<(), String>>,
        confirms: &mut Confirms,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        match self.log.append(id, queue, payload) {
            Ok(loc) => {
                *self.unconfirmed.entry(loc.segment).or_default() += 1;
                let msg = Msg {
                    id,
                    loc,
                    deliveries: 0,
                };
                confirms.push((reply, Some((queue.to_string(), msg))));
            }
            Err(e) => {
                error!(message = "Broker append failed.", error = %e);
                let _ = reply.send(Err(format!("broker disk error: {e}")));
            }
        }
    }

    /// Removes a settled message from its queue and the disk.
    fn settle(&mut self, queue: &str, msg: Msg) {
        self.queue(queue).bytes -= msg.loc.len as u64;
        if let Err(e) = self.log.ack(msg.id, msg.loc) {
            error!(message = "Broker could not record an ack; the message may be delivered again.", error = %e);
        }
    }

    /// Moves a message to the dead-letter queue (copy, then ack the original).
    fn dead_letter(&mut self, queue: &str, msg: Msg, confirms: &mut Confirms) {
        match self.log.read(msg.loc) {
            Ok(payload) => {
                let (reply, _) = oneshot::channel();
                self.append(DEAD_LETTER_QUEUE, &payload, reply, confirms);
                warn!(
                    message = "Message dead-lettered.",
                    queue,
                    id = msg.id,
                    deliveries = msg.deliveries
                );
            }
            Err(e) => {
                error!(message = "Cannot read a message to dead-letter it; dropping it.", error = %e)
            }
        }
        self.settle(queue, msg);
    }

    /// Requeues what a closed connection held; drops its consumers.
    fn drop_connection(&mut self, conn: u64, dead: &mut Vec<(String, Msg)>) {
        for (name, q) in self.queues.iter_mut() {
            let gone: Vec<usize> = q
                .consumers
                .iter()
                .enumerate()
                .filter(|(_, c)| c.conn == conn)
                .map(|(i, _)| i)
                .collect();
            if gone.is_empty() {
                continue;
            }
            let returned: Vec<u64> = q
                .unacked
                .iter()
                .filter(|(_, (_, ci))| gone.contains(ci))
                .map(|(t, _)| *t)
                .collect();
            for tag in returned {
                if let Some((msg, _)) = q.unacked.remove(&tag) {
                    self.tags.remove(&tag);
                    if msg.deliveries >= DELIVERY_LIMIT {
                        dead.push((name.clone(), msg));
                    } else {
                        q.ready.insert(msg.id, msg);
                    }
                }
            }
            // Consumer indexes shift: remap the unacked entries that stay.
            let keep: Vec<usize> = (0..q.consumers.len())
                .filter(|i| !gone.contains(i))
                .collect();
            for (_, ci) in q.unacked.values_mut() {
                *ci = keep.iter().position(|k| k == ci).unwrap_or(0);
            }
            let mut i = 0;
            q.consumers.retain(|_| {
                i += 1;
                !gone.contains(&(i - 1))
            });
            q.next_consumer = 0;
        }
    }

    /// Writes parked publishes of queues that have room again.
    fn unpark(&mut self, confirms: &mut Confirms) {
        let names: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.parked.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        let max = self.max_queue;
        for name in names {
            loop {
                let q = self.queue(&name);
                let Some(front) = q.parked.front() else { break };
                // Count what this batch already appended for the queue.
                let pending: u64 = confirms
                    .iter()
                    .filter_map(|(_, v)| v.as_ref())
                    .filter(|(n, _)| *n == name)
                    .map(|(_, m)| m.loc.len as u64)
                    .sum();
                if q.bytes + pending > 0 && q.bytes + pending + front.payload.len() as u64 > max {
                    break;
                }
                let Some(p) = q.parked.pop_front() else { break };
                self.append(&name, &p.payload, p.reply, confirms);
            }
        }
    }

    /// Moves the live messages of a mostly-dead segment forward, then drops it.
    fn compact(&mut self) {
        let unconfirmed = &self.unconfirmed;
        let Some(seg) = self
            .log
            .compaction_candidate(|seg| !unconfirmed.contains_key(&seg))
        else {
            return;
        };
        let mut moved = 0;
        for (name, q) in self.queues.iter_mut() {
            let msgs = q
                .ready
                .values_mut()
                .chain(q.unacked.values_mut().map(|(m, _)| m));
            for m in msgs.filter(|m| m.loc.segment == seg) {
                match self
                    .log
                    .read(m.loc)
                    .and_then(|p| self.log.append(m.id, name, &p))
                {
                    Ok(loc) => {
                        m.loc = loc;
                        moved += 1;
                    }
                    Err(e) => {
                        error!(message = "Compaction failed; keeping the segment.", error = %e);
                        return;
                    }
                }
            }
        }
        if let Err(e) = self.log.sync().and_then(|()| self.log.drop_segment(seg)) {
            error!(message = "Compaction could not finish; keeping the segment.", error = %e);
        } else {
            debug!(message = "Compacted a segment.", segment = seg, moved);
        }
    }

    fn dispatch_all(&mut self) {
        let names: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.ready.is_empty() && !q.consumers.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.dispatch(&name);
        }
    }

    /// Delivers ready messages, round-robin, to consumers with credit left.
    fn dispatch(&mut self, name: &str) {
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        while !q.ready.is_empty() && !q.consumers.is_empty() {
            let n = q.consumers.len();
            let Some(ci) = (0..n)
                .map(|k| (q.next_consumer + k) % n)
                .find(|&i| q.consumers[i].in_flight < q.consumers[i].prefetch)
            else {
                break;
            };
            q.next_consumer = (ci + 1) % n;
            let Some((&id, &msg)) = q.ready.iter().next() else {
                break;
            };
            let payload = match self.log.read(msg.loc) {
                Ok(p) => p,
                Err(e) => {
                    error!(message = "Cannot read a stored message; it stays queued.", error = %e, id);
                    break;
                }
            };
            q.ready.remove(&id);
            let frame = Frame::Deliver {
                tag: id,
                redelivered: msg.deliveries > 0,
                payload,
            };
            if q.consumers[ci].out.send(frame).is_err() {
                // The connection is closing; its Gone command will follow.
                q.ready.insert(id, msg);
                q.consumers[ci].in_flight = q.consumers[ci].prefetch;
                continue;
            }
            q.consumers[ci].in_flight += 1;
            q.unacked.insert(
                id,
                (
                    Msg {
                        deliveries: msg.deliveries + 1,
                        ..msg
                    },
                    ci,
                ),
            );
            self.tags.insert(id, name.to_string());
        }
    }
}
