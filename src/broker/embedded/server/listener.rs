//! The listener: accepts connections, checks each one's hello (protocol
//! version, node and secret) in small frames, then turns the connection's
//! frames into commands for the core, stamped with the node it
//! authenticated, and the core's replies into frames. It enforces what a
//! node may do (consume its own queue, publish to node queues) and the
//! connection limits. It holds no broker state of its own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::codec::Framed;
use tracing::{debug, info, warn};

use super::core::{Cmd, Outcome};
use super::{CONNECTION_IN_FLIGHT, HANDSHAKE_SLOTS, Limits, hello_codec};
use crate::broker::embedded::credentials::UsersCache;
use crate::broker::embedded::frame::{Frame, MAX_FRAME, PROTOCOL_VERSION};
use crate::broker::embedded::tls::Stream;
use crate::broker::queue_name;
use crate::domain::NodeName;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections refused since the last log line about them: a flood is
/// logged once a second, not once a connection.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Accepts connections until the broker is dropped (the task is aborted).
pub(super) async fn accept(
    listener: TcpListener,
    core: mpsc::UnboundedSender<Cmd>,
    users: Arc<UsersCache>,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let strangers = Arc::new(Semaphore::new(HANDSHAKE_SLOTS));
    let members = Arc::new(Seats::new(&limits));
    let mut next_conn = 0u64;
    let mut last_report = tokio::time::Instant::now();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(message = "Accept failed.", error = %e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(hello_slot) = strangers.clone().try_acquire_owned() else {
            // Closed at once: a flood costs a socket for a moment, no task.
            refused(&mut last_report, "too many connections in their handshake");
            continue;
        };
        next_conn += 1;
        let _ = stream.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(serve_connection(
            (stream, tls),
            peer,
            next_conn,
            core.clone(),
            (
                users.clone(),
                hello_slot,
                members.clone(),
                limits.idle_timeout,
            ),
        ));
    }
}

/// The seats of authenticated connections: `max_connections` in all, and
/// at most `max_connections_per_node` for any one node, so that one node's
/// credentials (stolen, or a runaway script) cannot take every seat.
pub(super) struct Seats {
    all: Arc<Semaphore>,
    per_node: usize,
    taken: Mutex<HashMap<NodeName, usize>>,
}

/// A connection's seat, given back when the connection ends.
pub(super) struct Seat {
    seats: Arc<Seats>,
    node: NodeName,
    _all: OwnedSemaphorePermit,
}

impl Seats {
    pub(super) fn new(limits: &Limits) -> Seats {
        Seats {
            all: Arc::new(Semaphore::new(limits.max_connections)),
            per_node: limits.max_connections_per_node,
            taken: Mutex::new(HashMap::new()),
        }
    }

    /// A seat for `node`, or the sentence that refuses it.
    pub(super) fn take(seats: &Arc<Seats>, node: &NodeName) -> Result<Seat, &'static str> {
        let Ok(all) = seats.all.clone().try_acquire_owned() else {
            return Err(
                "the broker has as many connections as it accepts (max_connections); try again later",
            );
        };
        let mut taken = seats.taken.lock().unwrap_or_else(|e| e.into_inner());
        let n = taken.entry(node.clone()).or_insert(0);
        if *n >= seats.per_node {
            return Err(
                "this node has as many connections as the broker accepts for one node (max_connections_per_node); close the others or try again later",
            );
        }
        *n += 1;
        Ok(Seat {
            seats: seats.clone(),
            node: node.clone(),
            _all: all,
        })
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut taken = self.seats.taken.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = taken.get_mut(&self.node) {
            *n -= 1;
            if *n == 0 {
                taken.remove(&self.node);
            }
        }
    }
}

fn refused(last_report: &mut tokio::time::Instant, why: &str) {
    let n = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    if last_report.elapsed() >= Duration::from_secs(1) {
        *last_report = tokio::time::Instant::now();
        REFUSED.store(0, Ordering::Relaxed);
        warn!(
            message = "Refusing connections: the broker's connection limit is reached; check for a runaway or hostile client.",
            reason = why,
            refused = n
        );
    }
}

/// A frame's name, for messages about it (never its fields).
fn kind(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "hello",
        Frame::Welcome { .. } => "welcome",
        Frame::Confirm { .. } => "confirm",
        Frame::Nack { .. } => "nack",
        Frame::Deliver { .. } => "deliver",
        Frame::Error { .. } => "error",
        _ => "frame",
    }
}

/// The node a queue name belongs to, when it is `hakobu.node.<valid node name>`.
fn node_of_queue(q: &str) -> Option<NodeName> {
    NodeName::parse(q.strip_prefix("hakobu.node.")?).ok()
}

/// Reads and checks the hello: the node the connection speaks for, or the
/// sentence that refuses it.
async fn handshake(
    framed: &mut Framed<Stream, tokio_util::codec::LengthDelimitedCodec>,
    users: &UsersCache,
) -> Option<Result<NodeName, String>> {
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(bytes))) => Frame::decode(bytes.freeze()),
        Ok(Some(Err(e))) => return Some(Err(format!("bad hello: {e}"))),
        _ => return None,
    };
    Some(match hello {
        Ok(Frame::Hello { version, .. }) if version != PROTOCOL_VERSION => Err(format!(
            "protocol version {version} is not supported (this broker speaks {PROTOCOL_VERSION}); run the same hakobu version"
        )),
        Ok(Frame::Hello { node, secret, .. }) => {
            let known = match users.current() {
                Ok(u) => u.check(&node, &secret),
                Err(e) => {
                    warn!(message = "The broker cannot read its users file; refusing every connection.", error = %e);
                    false
                }
            };
            match NodeName::parse(&node) {
                Ok(n) if known => Ok(n),
                _ => Err(format!(
                    "node `{}` is unknown to this broker or its secret is wrong; check embedded.secret_file, or run `hakobu broker add-node` on the broker's host",
                    node.escape_debug()
                )),
            }
        }
        Ok(_) => Err("expected a hello frame first".to_string()),
        Err(e) => Err(e.to_string()),
    })
}

async fn serve_connection(
    (stream, tls): (tokio::net::TcpStream, Option<tokio_rustls::TlsAcceptor>),
    peer: SocketAddr,
    conn: u64,
    core: mpsc::UnboundedSender<Cmd>,
    (users, hello_slot, members, idle): (
        Arc<UsersCache>,
        OwnedSemaphorePermit,
        Arc<Seats>,
        Duration,
    ),
) {
    // The TLS handshake counts against the hello's time and slot: a
    // stranger that never finishes it holds nothing for long.
    let stream: Stream = match tls {
        None => Box::new(stream),
        Some(acceptor) => {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => {
                    warn!(message = "Refusing a connection: its TLS handshake failed (a plain-text client, or one that does not trust this broker's certificate).", %peer, error = %e);
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let mut framed = Framed::new(stream, hello_codec());
    let node = match handshake(&mut framed, &users).await {
        None => return,
        Some(Ok(node)) => node,
        Some(Err(message)) => {
            warn!(message = "Refusing a connection.", %peer, reason = %message);
            let _ = framed.send(Frame::Error { message }.encode()).await;
            return;
        }
    };
    let _member = match Seats::take(&members, &node) {
        Ok(seat) => seat,
        Err(message) => {
            warn!(message = "Refusing a connection: a connection limit is reached.", %peer, node = %node, reason = message);
            let _ = framed
                .send(
                    Frame::Error {
                        message: message.to_string(),
                    }
                    .encode(),
                )
                .await;
            return;
        }
    };
    drop(hello_slot);
    framed.codec_mut().set_max_frame_length(MAX_FRAME);
    let own_queue = queue_name(&node);
    debug!(message = "Connection authenticated.", %peer, conn, node = %node);
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
    loop {
        let item = match tokio::time::timeout(idle, frames.next()).await {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(_) => {
                info!(message = "Closing a connection that sent nothing (not even a ping) for the idle timeout.", %peer, node = %node, ?idle);
                let _ = out.send(Frame::Error {
                    message: "idle for too long".into(),
                });
                break;
            }
        };
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
                if node_of_queue(&queue).is_none() {
                    let _ = out.send(Frame::Nack {
                        seq,
                        reason: "a node may publish only to hakobu.node.<node>".into(),
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
                        from: node.to_string(),
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
            Frame::Subscribe { queue, .. } if queue != own_queue => {
                let message = format!("node {node} may consume only its own queue, {own_queue}");
                warn!(message = "Refusing a subscription to another node's queue.", %peer, node = %node, queue = %queue.escape_debug());
                let _ = out.send(Frame::Error { message });
                break;
            }
            Frame::Subscribe { queue, prefetch } => {
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
            Frame::Ping => {}
            other => {
                // Never a frame's fields: a second hello carries a secret.
                let message = format!("unexpected frame from a client: {}", kind(&other));
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
