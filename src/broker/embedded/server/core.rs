//! The core: one thread that owns the storage and every queue. It takes
//! whatever commands are waiting, appends their messages, hands the batch to
//! the flusher, and confirms (and makes deliverable) a batch only once the
//! flusher reports it durable. Deliveries go round-robin to consumers with
//! credit left (in messages and in bytes: a consumer that never reads holds
//! at most [`CONSUMER_BYTES`] of the broker's memory); a message delivered
//! too often, or refused, goes to the dead-letter queue, which keeps at most
//! `max_dead_letter` bytes (the oldest go first); a publish beyond the
//! broker-wide `max_disk` is refused; mostly-acked segments are compacted.
//! Every message is stored with the node that published it, as the listener
//! authenticated it, and delivered with it.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use super::flusher::Flusher;
use super::{DELIVERY_LIMIT, Limits};
use crate::broker::DEAD_LETTER_QUEUE;
use crate::broker::embedded::frame::Frame;
use crate::broker::embedded::log::{Loc, Log};

pub(super) enum Cmd {
    Publish {
        queue: String,
        /// The node the connection authenticated as.
        from: String,
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
pub(super) enum Outcome {
    Ack,
    DeadLetter,
    Requeue,
}

#[derive(Clone, Copy)]
pub(super) struct Msg {
    pub(super) id: u64,
    pub(super) loc: Loc,
    pub(super) deliveries: u32,
}

struct Consumer {
    conn: u64,
    prefetch: u32,
    in_flight: u32,
    out: mpsc::UnboundedSender<Frame>,
}

struct Parked {
    from: String,
    payload: Bytes,
    reply: oneshot::Sender<Result<(), String>>,
}

/// Bytes delivered to a queue's consumers and not yet settled, at most
/// (one message may exceed it alone): what a consumer that stops reading
/// can make the broker hold in memory.
pub(super) const CONSUMER_BYTES: u64 = 32 << 20;

#[derive(Default)]
pub(super) struct Queue {
    ready: BTreeMap<u64, Msg>,
    /// Delivered, not yet settled: message and the consumer holding it.
    unacked: HashMap<u64, (Msg, usize)>,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    bytes: u64,
    /// Payload bytes appended for it and not yet confirmed (in the batch
    /// being appended or the one with the flusher): counted against
    /// `max_queue` with `bytes`, or publishes arriving together overshoot.
    pending: u64,
    /// Payload bytes of `unacked`.
    unacked_bytes: u64,
    parked: VecDeque<Parked>,
}

impl Queue {
    fn push_ready(&mut self, m: Msg) {
        self.bytes += m.loc.len as u64;
        self.ready.insert(m.id, m);
    }

    /// Whether `extra` more bytes would take it past `max` (an empty queue
    /// takes one message of any size).
    fn full(&self, extra: u64, max: u64) -> bool {
        let held = self.bytes + self.pending;
        held > 0 && held + extra > max
    }
}

pub(super) struct Core {
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
    limits: Limits,
    /// Payload bytes of every stored message not yet settled.
    stored: u64,
}

/// Replies to send once the batch is durable.
pub(super) type Confirms = Vec<(oneshot::Sender<Result<(), String>>, Option<(String, Msg)>)>;

impl Core {
    pub(super) fn new(log: Log, next_id: u64, limits: Limits) -> Self {
        Core {
            log,
            flushing: false,
            unconfirmed: HashMap::new(),
            next_id,
            queues: HashMap::new(),
            tags: HashMap::new(),
            limits,
            stored: 0,
        }
    }

    pub(super) fn queue(&mut self, name: &str) -> &mut Queue {
        self.queues.entry(name.to_string()).or_default()
    }

    /// Makes a stored message deliverable (a confirmed publish, or one
    /// found on replay).
    pub(super) fn push_ready(&mut self, queue: &str, msg: Msg) {
        self.stored += msg.loc.len as u64;
        self.queue(queue).push_ready(msg);
        if queue == DEAD_LETTER_QUEUE {
            self.trim_dead_letters();
        }
    }

    /// Drops the oldest dead letters while the queue holds more than
    /// `max_dead_letter` bytes (the newest always stays).
    fn trim_dead_letters(&mut self) {
        let max = self.limits.max_dead_letter;
        loop {
            let q = self.queue(DEAD_LETTER_QUEUE);
            if q.bytes <= max || q.ready.len() < 2 {
                return;
            }
            let Some((_, msg)) = q.ready.pop_first() else {
                return;
            };
            self.settle(DEAD_LETTER_QUEUE, msg);
            let q = self.queue(DEAD_LETTER_QUEUE);
            warn!(
                message = "Dead-letter queue full (max_dead_letter); dropped its oldest message.",
                id = msg.id,
                bytes = msg.loc.len,
                dead_letters = q.ready.len() + q.unacked.len(),
                dead_letter_bytes = q.bytes
            );
        }
    }

    /// Group commit, pipelined: appends wait in `waiting` while the flusher
    /// syncs the previous batch; when it reports back, that batch is
    /// confirmed and made deliverable, and everything appended meanwhile
    /// goes to the flusher as the next batch. Appends, acks and deliveries
    /// never wait for the disk's flush.
    pub(super) fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, flusher: Flusher) {
        let mut waiting: Confirms = Vec::new();
        self.report_dead_letters();
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
            self.report_dead_letters();
        }
    }

    /// The dead-letter queue's depth, for `/metrics` of an agent hosting
    /// this broker.
    fn report_dead_letters(&self) {
        let n = self
            .queues
            .get(DEAD_LETTER_QUEUE)
            .map_or(0, |q| q.ready.len() + q.unacked.len());
        crate::metrics::registry::global().set_hosted_dead_letters(n as u64);
    }

    /// A batch is durable (or failed to be): confirm it, and make its
    /// messages deliverable.
    fn synced(&mut self, result: Result<(), String>, confirms: Confirms) {
        self.flushing = false;
        if let Err(e) = &result {
            error!(message = "Broker fsync failed; refusing the batch.", error = %e);
        }
        for (reply, visible) in confirms {
            if let Some((queue, msg)) = &visible {
                let q = self.queue(queue);
                q.pending = q.pending.saturating_sub(msg.loc.len as u64);
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
                        self.push_ready(&queue, msg);
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
                from,
                payload,
                reply,
            } => {
                let pending: u64 = self.queues.values().map(|q| q.pending).sum();
                if self.stored + pending + payload.len() as u64 > self.limits.max_disk {
                    warn!(
                        message = "Broker disk quota (max_disk) reached; refusing a publish, which its sender retries.",
                        queue,
                        from,
                        stored_bytes = self.stored,
                        max_disk = self.limits.max_disk
                    );
                    let _ = reply.send(Err(
                        "the broker's disk quota (max_disk) is reached; publish again later".into(),
                    ));
                    return;
                }
                let max = self.limits.max_queue;
                let q = self.queue(&queue);
                if q.full(payload.len() as u64, max) || !q.parked.is_empty() {
                    q.parked.push_back(Parked {
                        from,
                        payload,
                        reply,
                    });
                    return;
                }
                self.append(&queue, &from, &payload, reply, confirms);
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
                q.unacked_bytes -= msg.loc.len as u64;
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
        from: &str,
        payload: &[u8],
        reply: oneshot::Sender<Result<(), String>>,
        confirms: &mut Confirms,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        match self.log.append(id, queue, from, payload) {
            Ok(loc) => {
                *self.unconfirmed.entry(loc.segment).or_default() += 1;
                self.queue(queue).pending += loc.len as u64;
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
        self.stored -= msg.loc.len as u64;
        if let Err(e) = self.log.ack(msg.id, msg.loc) {
            error!(message = "Broker could not record an ack; the message may be delivered again.", error = %e);
        }
    }

    /// Moves a message to the dead-letter queue (copy, then ack the original).
    fn dead_letter(&mut self, queue: &str, msg: Msg, confirms: &mut Confirms) {
        match self.log.read_with_from(msg.loc) {
            Ok((from, payload)) => {
                let (reply, _) = oneshot::channel();
                self.append(DEAD_LETTER_QUEUE, &from, &payload, reply, confirms);
                let dlq = self.queue(DEAD_LETTER_QUEUE);
                warn!(
                    message = "Message dead-lettered.",
                    queue,
                    id = msg.id,
                    from,
                    deliveries = msg.deliveries,
                    dead_letters = dlq.ready.len() + dlq.unacked.len() + 1
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
                    q.unacked_bytes -= msg.loc.len as u64;
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
        let max = self.limits.max_queue;
        for name in names {
            loop {
                let q = self.queue(&name);
                let Some(front) = q.parked.front() else { break };
                if q.full(front.payload.len() as u64, max) {
                    break;
                }
                let Some(p) = q.parked.pop_front() else { break };
                self.append(&name, &p.from, &p.payload, p.reply, confirms);
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
                    .read_with_from(m.loc)
                    .and_then(|(from, p)| self.log.append(m.id, name, &from, &p))
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
            let len = msg.loc.len as u64;
            if q.unacked_bytes > 0 && q.unacked_bytes + len > CONSUMER_BYTES {
                break; // the consumers hold enough; more when they settle
            }
            let (from, payload) = match self.log.read_with_from(msg.loc) {
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
                from,
                payload,
            };
            if q.consumers[ci].out.send(frame).is_err() {
                // The connection is closing; its Gone command will follow.
                q.ready.insert(id, msg);
                q.consumers[ci].in_flight = q.consumers[ci].prefetch;
                continue;
            }
            q.consumers[ci].in_flight += 1;
            q.unacked_bytes += len;
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
