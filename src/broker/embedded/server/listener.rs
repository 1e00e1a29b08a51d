//! The listener: accepts connections (from loopback only when no token is
//! set), checks each one's hello (protocol version, token), then turns the
//! connection's frames into commands for the core and the core's replies
//! into frames. It holds no broker state of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::Framed;
use tracing::{debug, warn};

use super::core::{Cmd, Outcome};
use super::{CONNECTION_IN_FLIGHT, codec};
use crate::broker::embedded::frame::{Frame, PROTOCOL_VERSION};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until the broker is dropped (the task is aborted).
pub(super) async fn accept(
    listener: TcpListener,
    core: mpsc::UnboundedSender<Cmd>,
    token: Option<String>,
) {
    let token = token.map(Arc::new);
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
            core.clone(),
            token.clone(),
        ));
    }
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
