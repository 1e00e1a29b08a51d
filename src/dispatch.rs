//! Dispatch: what arrives on this node's queue, decoded and routed. A broker
//! message is one chunk, one receipt, one request or request reply, or a
//! batch of them (each part settling its share of the delivery); chunks go
//! to the receiver as one batch, receipts, requests and replies to the
//! sender side by side; what cannot be decoded goes to the dead-letter queue.

use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;

use tokio::sync::mpsc;
use tracing::warn;

use crate::broker::Delivery;
use crate::receiver::{Commits, Receiver};
use crate::sender::Sender;
use crate::wire::{DecodeError, Message};

/// Most messages one batch takes: what arrived together shares one fsync
/// per partial file and one ledger commit.
const BATCH: usize = 64;

/// Routes deliveries to the two sides of one agent.
pub struct Dispatch {
    pub receiver: Arc<Receiver>,
    pub commits: Commits,
    pub sender: Arc<Sender>,
}

impl Dispatch {
    /// Handles `first` and whatever else has already arrived: chunks as one
    /// batch (written here, made durable and acked by the commit stage while
    /// the next deliveries arrive), receipts side by side (their ledger
    /// writes share a flush).
    pub async fn handle(&self, first: Delivery, more: &mut mpsc::Receiver<Delivery>) {
        let mut chunks = Vec::new();
        let mut receipts: Vec<BoxFuture<'_, ()>> = Vec::new();
        let mut next = Some(first);
        while let Some(mut d) = next.take() {
            // The delivery keeps only what settles it: a chunk's body is
            // freed as soon as it is written, while its ack waits for the
            // commit.
            let payload = std::mem::take(&mut d.payload);
            let bytes = payload.len();
            match Message::decode(payload) {
                Ok(Message::Batch(parts)) => {
                    // Each part settles its share; the message settles with the last.
                    let n = parts.len();
                    for (part, d) in parts.into_iter().zip(d.split(n)) {
                        match part {
                            Message::Chunk(h, body) => chunks.push((h, body, d)),
                            other @ (Message::Receipt(_)
                            | Message::Request(_)
                            | Message::RequestReply(_)) => receipts.push(self.control(other, d)),
                            // The decoder refuses nested batches.
                            Message::Batch(_) => {
                                let _ = d.dead_letter().await;
                            }
                        }
                    }
                }
                Ok(Message::Chunk(h, body)) => chunks.push((h, body, d)),
                Ok(other) => receipts.push(self.control(other, d)),
                Err(e @ DecodeError::Version(_)) => {
                    // Dead-lettered, not requeued: a redelivery would meet
                    // the same decoder. The sender hears nothing (its frame
                    // cannot be read), so the log says who must act.
                    warn!(message = "Dead-lettering a message from a newer hakobu; upgrade this agent, then have the sender resend.", error_code = %e.code(), error = %e, from = d.user_id.as_deref().unwrap_or(""), bytes);
                    let _ = d.dead_letter().await;
                }
                Err(e) => {
                    warn!(message = "Dead-lettering a message that cannot be parsed.", error_code = %e.code(), error = %e, bytes);
                    let _ = d.dead_letter().await;
                }
            }
            if chunks.len() + receipts.len() < BATCH {
                next = more.try_recv().ok();
            }
        }
        let chunks = async {
            if !chunks.is_empty() {
                self.receiver.on_chunks(chunks, &self.commits).await;
            }
        };
        futures::future::join(chunks, futures::future::join_all(receipts)).await;
    }

    /// A receipt, request or request reply, for the sender side.
    fn control(&self, msg: Message, d: Delivery) -> BoxFuture<'_, ()> {
        match msg {
            Message::Receipt(r) => self.sender.on_receipt(r, d).boxed(),
            Message::Request(r) => self.sender.on_request(r, d).boxed(),
            Message::RequestReply(r) => self.sender.on_request_reply(r, d).boxed(),
            // Chunks and batches are taken apart before this.
            Message::Chunk(..) | Message::Batch(_) => async move {
                let _ = d.dead_letter().await;
            }
            .boxed(),
        }
    }
}
