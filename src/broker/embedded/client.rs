//! The client: the `Broker` trait over the embedded broker's protocol. One
//! connection publishes (pipelined, each publish matched to its confirm by
//! sequence number); each subscription has a connection of its own, which
//! reconnects with a fresh subscription whenever it fails. Every connection
//! says which node it speaks for and proves it with the node's secret, and
//! pings while it has nothing else to send (the broker closes silent
//! connections). A delivery carries the node the broker authenticated as its
//! publisher, as `Delivery::user_id`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::Framed;
use tracing::{info, warn};

use super::frame::{Frame, PROTOCOL_VERSION};
use super::server;
use super::tls;
use crate::broker::{Acker, Broker, BrokerError, Confirm, Delivery, queue_name};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A full queue parks publishes on purpose (backpressure), so a confirm may
/// take as long as the receiver needs; only a lost connection fails it early.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(3600);
/// A confirm awaited this long is said in the log (`broker_unresponsive`):
/// the broker is stopped, hung or held back by a full queue; the agent waits.
const STALL_WARNING: Duration = Duration::from_secs(10);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<(), BrokerError>>>>>;

/// A node's name and secret, as the broker's users file knows them.
#[derive(Clone)]
pub struct Credentials {
    pub node: String,
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <secret>)", self.node)
    }
}

pub struct Embedded {
    addr: String,
    creds: Credentials,
    tls: Option<tls::Client>,
    prefetch: u32,
    publisher: tokio::sync::Mutex<Option<PubConn>>,
    /// A confirm waited past [`STALL_WARNING`] and none came since: said
    /// once, and once more when the broker answers again.
    stalled: Arc<AtomicBool>,
}

struct PubConn {
    out: mpsc::UnboundedSender<Frame>,
    pending: Pending,
    next_seq: AtomicU64,
    dead: Arc<AtomicBool>,
}

impl Embedded {
    /// A plain-text client of the broker at `addr` ([`Embedded::with_tls`]
    /// for TLS).
    pub fn new(addr: &str, creds: Credentials, prefetch: u32) -> Self {
        Embedded {
            addr: addr.to_string(),
            creds,
            tls: None,
            prefetch,
            publisher: tokio::sync::Mutex::new(None),
            stalled: Arc::default(),
        }
    }

    /// The same client, speaking TLS (when `tls` is given) to the broker.
    pub fn with_tls(mut self, tls: Option<tls::Client>) -> Self {
        self.tls = tls;
        self
    }
}

/// Connects and shakes hands; returns the framed stream ready for use.
async fn connect(
    addr: &str,
    creds: &Credentials,
    tls: Option<&tls::Client>,
) -> Result<Framed<tls::Stream, tokio_util::codec::LengthDelimitedCodec>, BrokerError> {
    let unavailable =
        |what: String| BrokerError::Unavailable(format!("embedded broker at {addr}: {what}"));
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| unavailable("connect timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let stream: tls::Stream = match tls {
        None => Box::new(stream),
        Some(t) => tokio::time::timeout(CONNECT_TIMEOUT, t.connect(stream))
            .await
            .map_err(|_| unavailable("TLS handshake timed out".into()))?
            .map_err(unavailable)?,
    };
    let mut framed = Framed::new(stream, server::codec());
    framed
        .send(
            Frame::Hello {
                version: PROTOCOL_VERSION,
                node: creds.node.clone(),
                secret: creds.secret.clone(),
            }
            .encode(),
        )
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(b))) => match Frame::decode(b.freeze()) {
            Ok(Frame::Welcome { .. }) => Ok(framed),
            Ok(Frame::Error { message }) => Err(unavailable(refusal(message))),
            other => Err(unavailable(format!("unexpected handshake reply {other:?}"))),
        },
        _ => Err(unavailable("no handshake reply".into())),
    }
}

/// The broker's refusal of the hello, with what to do when the broker could
/// not even read it: a broker of this release reads its hello whatever it
/// holds, so that one is of another release (release 0.1 says only that the
/// frame is malformed; later brokers name the versions themselves).
fn refusal(message: String) -> String {
    if message.starts_with("malformed embedded-broker frame") {
        format!(
            "{message}: the broker runs another hakobu release (this agent speaks protocol version {PROTOCOL_VERSION}); run the same release on the broker and its agents"
        )
    } else {
        message
    }
}

impl Embedded {
    async fn publisher(
        &self,
    ) -> Result<(mpsc::UnboundedSender<Frame>, Pending, u64, Arc<AtomicBool>), BrokerError> {
        let mut slot = self.publisher.lock().await;
        if slot.as_ref().is_none_or(|c| c.dead.load(Ordering::Relaxed)) {
            let framed = connect(&self.addr, &self.creds, self.tls.as_ref()).await?;
            let (mut sink, mut frames) = framed.split();
            let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
            let pending: Pending = Arc::default();
            let dead = Arc::new(AtomicBool::new(false));
            let dead_w = dead.clone();
            tokio::spawn(async move {
                while let Some(f) = next_or_ping(&mut out_rx).await {
                    if sink.send(f.encode()).await.is_err() {
                        break;
                    }
                }
                dead_w.store(true, Ordering::Relaxed);
            });
            let (pending_r, dead_r) = (pending.clone(), dead.clone());
            tokio::spawn(async move {
                while let Some(Ok(b)) = frames.next().await {
                    let (seq, outcome) = match Frame::decode(b.freeze()) {
                        Ok(Frame::Confirm { seq }) => (seq, Ok(())),
                        Ok(Frame::Nack { seq, reason }) => {
                            warn!(message = "The embedded broker refused a message.", reason);
                            (seq, Err(BrokerError::Nack))
                        }
                        Ok(Frame::Error { message }) => {
                            warn!(
                                message = "The embedded broker closed the connection.",
                                reason = message
                            );
                            break;
                        }
                        _ => break,
                    };
                    if let Some(tx) = pending_r
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&seq)
                    {
                        let _ = tx.send(outcome);
                    }
                }
                dead_r.store(true, Ordering::Relaxed);
                // Every unconfirmed publish is now unknown: fail it, to be republished.
                pending_r.lock().unwrap_or_else(|p| p.into_inner()).clear();
            });
            *slot = Some(PubConn {
                out,
                pending,
                next_seq: AtomicU64::new(1),
                dead,
            });
        }
        let c = slot.as_ref().expect("set above");
        Ok((
            c.out.clone(),
            c.pending.clone(),
            c.next_seq.fetch_add(1, Ordering::Relaxed),
            c.dead.clone(),
        ))
    }
}

#[async_trait]
impl Broker for Embedded {
    async fn publish(&self, node: &str, payload: Bytes) -> Result<Confirm, BrokerError> {
        let (out, pending, seq, dead) = self.publisher().await?;
        let (tx, rx) = oneshot::channel();
        pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq, tx);
        if out
            .send(Frame::Publish {
                seq,
                queue: queue_name(node),
                payload,
            })
            .is_err()
        {
            dead.store(true, Ordering::Relaxed);
            return Err(BrokerError::Connection(
                "the embedded broker connection closed".into(),
            ));
        }
        let (stalled, addr) = (self.stalled.clone(), self.addr.clone());
        Ok(Box::pin(async move {
            let mut rx = rx;
            let waited = tokio::time::timeout(STALL_WARNING, &mut rx).await;
            let answered = match waited {
                Ok(r) => Ok(r),
                Err(_) => {
                    if !stalled.swap(true, Ordering::Relaxed) {
                        warn!(message = "The embedded broker has confirmed nothing for a while; waiting for it. Is the `hakobu broker` process stopped or hung, its disk stalled, or the receiver's queue full (max_queue)?", broker = %addr, waited = ?STALL_WARNING, error_code = %crate::error_code::ErrorCode::BrokerUnresponsive);
                    }
                    tokio::time::timeout(CONFIRM_TIMEOUT - STALL_WARNING, rx).await
                }
            };
            if answered.is_ok() && stalled.swap(false, Ordering::Relaxed) {
                info!(message = "The embedded broker answers again.", broker = %addr);
            }
            match answered {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(_)) => Err(BrokerError::Connection(
                    "the embedded broker connection closed before confirming".into(),
                )),
                Err(_) => {
                    dead.store(true, Ordering::Relaxed);
                    Err(BrokerError::ConfirmTimeout(CONFIRM_TIMEOUT))
                }
            }
        }))
    }

    async fn subscribe(&self, node: &str) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        let (tx, rx) = mpsc::channel(self.prefetch as usize);
        let (addr, creds, tls, prefetch, queue) = (
            self.addr.clone(),
            self.creds.clone(),
            self.tls.clone(),
            self.prefetch,
            queue_name(node),
        );
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            // Connected before: the next connection is a fail-over (`/metrics`).
            let mut was_connected = false;
            while !tx.is_closed() {
                let link = (addr.as_str(), &creds, tls.as_ref(), &mut was_connected);
                match consume_once(link, &queue, prefetch, &tx).await {
                    Ok(()) => return,
                    Err(e) => {
                        crate::metrics::registry::global().broker_lost();
                        warn!(message = "Consumer lost the embedded broker; reconnecting.", error = %e, error_code = %e.code(), ?backoff);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// The next frame to send, or a ping when there was none for a while.
async fn next_or_ping(rx: &mut mpsc::UnboundedReceiver<Frame>) -> Option<Frame> {
    match tokio::time::timeout(server::PING_EVERY, rx.recv()).await {
        Ok(f) => f,
        Err(_) => Some(Frame::Ping),
    }
}

/// Where to connect, and whether a connection was made before.
type Link<'a> = (
    &'a str,
    &'a Credentials,
    Option<&'a tls::Client>,
    &'a mut bool,
);

async fn consume_once(
    (addr, creds, tls, was_connected): Link<'_>,
    queue: &str,
    prefetch: u32,
    tx: &mpsc::Sender<Delivery>,
) -> Result<(), BrokerError> {
    let framed = connect(addr, creds, tls).await?;
    crate::metrics::registry::global().broker_connected(*was_connected);
    *was_connected = true;
    let (mut sink, mut frames) = framed.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    out.send(Frame::Subscribe {
        queue: queue.to_string(),
        prefetch,
    })
    .map_err(|_| BrokerError::Connection("closed".into()))?;
    let closing = tokio_util::sync::CancellationToken::new();
    let mut writer = {
        let closing = closing.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = next_or_ping(&mut out_rx) => f,
                    // Closing: what is queued (the last acks) still goes, so
                    // that an ack that returned Ok is never lost; then EOF.
                    () = closing.cancelled() => {
                        while let Ok(f) = out_rx.try_recv() {
                            if sink.send(f.encode()).await.is_err() {
                                return;
                            }
                        }
                        let _ = sink.close().await;
                        return;
                    }
                };
                match frame {
                    Some(f) if sink.send(f.encode()).await.is_ok() => {}
                    _ => return,
                }
            }
        })
    };
    info!(message = "Consuming.", queue, broker = addr);
    let result = loop {
        let next = tokio::select! {
            next = frames.next() => next,
            // Nobody listens: close, and the broker requeues what we held.
            _ = tx.closed() => break Ok(()),
        };
        match next {
            Some(Ok(b)) => match Frame::decode(b.freeze()) {
                Ok(Frame::Deliver {
                    tag,
                    redelivered,
                    from,
                    payload,
                }) => {
                    let acker = Box::new(EmbeddedAcker {
                        out: out.clone(),
                        tag,
                    });
                    if tx
                        .send(Delivery {
                            payload,
                            redelivered,
                            // Stored before the broker knew publishers: none.
                            user_id: (!from.is_empty()).then_some(from),
                            acker,
                        })
                        .await
                        .is_err()
                    {
                        break Ok(());
                    }
                }
                Ok(Frame::Error { message }) => break Err(BrokerError::Connection(message)),
                other => {
                    break Err(BrokerError::Connection(format!(
                        "unexpected frame {other:?}"
                    )));
                }
            },
            Some(Err(e)) => break Err(BrokerError::Connection(e.to_string())),
            None => {
                break Err(BrokerError::Connection(
                    "the embedded broker closed the connection".into(),
                ));
            }
        }
    };
    if result.is_ok() {
        closing.cancel();
        if tokio::time::timeout(Duration::from_secs(5), &mut writer)
            .await
            .is_ok()
        {
            return result;
        }
    }
    writer.abort();
    result
}

struct EmbeddedAcker {
    out: mpsc::UnboundedSender<Frame>,
    tag: u64,
}

#[async_trait]
impl Acker for EmbeddedAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.out.send(Frame::Ack { tag: self.tag }).map_err(|_| {
            BrokerError::Connection(
                "the embedded broker connection closed; the message comes again".into(),
            )
        })
    }

    async fn requeue(&self) -> Result<(), BrokerError> {
        self.out
            .send(Frame::Requeue { tag: self.tag })
            .map_err(|_| {
                BrokerError::Connection(
                    "the embedded broker connection closed; the message comes again".into(),
                )
            })
    }

    async fn dead_letter(&self) -> Result<(), BrokerError> {
        self.out
            .send(Frame::Reject { tag: self.tag })
            .map_err(|_| BrokerError::Connection("the embedded broker connection closed".into()))
    }
}
