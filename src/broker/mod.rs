//! The broker seen by the sender and the receiver: one trait, two backends
//! (`rabbitmq.rs`, the replicated cluster; the embedded broker is the second).
//! Nothing outside `broker/` knows a wire protocol of a broker.
//!
//! # Guarantees every backend gives
//! - **Confirm means durable.** The future returned by [`Broker::publish`]
//!   resolves `Ok` only once the broker has the message on disk (on a quorum
//!   of nodes for RabbitMQ). An error means *unknown*, not *lost*: publish again.
//! - **Ack means done.** A delivery not acked is delivered again, to this or
//!   another consumer, after the consumer or its connection goes away.
//! - **Redelivery may reorder and duplicate.** Consumers must be idempotent.
//! - **Messages for a node queue up while it is away.** Each node has one
//!   long-lived queue; publishing to a node declares its queue if needed.
//! - **What cannot be processed goes to the dead-letter queue**, by
//!   [`Delivery::dead_letter`] or after too many deliveries.

pub mod embedded;
pub mod rabbitmq;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "no broker reachable ({0}); check that the broker nodes run and the URLs and credentials are right"
    )]
    Unavailable(String),
    #[error(
        "the broker refused the message (nack); it may be out of disk or memory, or lost its quorum"
    )]
    Nack,
    #[error("the broker did not confirm within {0:?}; the cluster may have lost its quorum")]
    ConfirmTimeout(Duration),
    #[error("the broker connection failed: {0}")]
    Connection(String),
}

impl BrokerError {
    pub const fn code(&self) -> crate::error_code::ErrorCode {
        use crate::error_code::ErrorCode;
        match self {
            BrokerError::Unavailable(_) => ErrorCode::BrokerUnavailable,
            BrokerError::Nack => ErrorCode::BrokerNack,
            BrokerError::ConfirmTimeout(_) => ErrorCode::BrokerConfirmTimeout,
            BrokerError::Connection(_) => ErrorCode::BrokerConnectionLost,
        }
    }
}

/// Resolves when a published message is durable (see the module docs).
pub type Confirm = BoxFuture<'static, Result<(), BrokerError>>;

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes `payload` to the queue of `node`. Returns once the message is
    /// handed to the broker; the returned [`Confirm`] says when it is durable.
    /// Cancel-safe: dropping the call leaves at most an unconfirmed message.
    async fn publish(&self, node: &str, payload: Bytes) -> Result<Confirm, BrokerError>;

    /// Consumes the queue of `node` for as long as the receiver is held,
    /// reconnecting (with a fresh subscription) whenever the connection fails.
    async fn subscribe(&self, node: &str) -> Result<mpsc::Receiver<Delivery>, BrokerError>;
}

/// Settles one delivery with the broker.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), BrokerError>;
    /// Refuses the message for good: it goes to the dead-letter queue.
    async fn dead_letter(&self) -> Result<(), BrokerError>;
    /// Gives the message back, to be delivered again (a local failure).
    async fn requeue(&self) -> Result<(), BrokerError>;
}

pub struct Delivery {
    pub payload: Bytes,
    /// The broker has delivered this message before.
    pub redelivered: bool,
    /// The broker-authenticated user that published it, where the backend knows.
    pub user_id: Option<String>,
    pub acker: Box<dyn Acker>,
}

impl Delivery {
    pub async fn ack(&self) -> Result<(), BrokerError> {
        self.acker.ack().await
    }

    pub async fn dead_letter(&self) -> Result<(), BrokerError> {
        self.acker.dead_letter().await
    }

    pub async fn requeue(&self) -> Result<(), BrokerError> {
        self.acker.requeue().await
    }

    /// Splits a delivery that carries `n` messages (a batch) into `n`
    /// deliveries that settle it together, once the last of them settles:
    /// the broker message is requeued if any part asked for that,
    /// dead-lettered if any part refused its message, acked otherwise.
    /// Parts settled earlier return `Ok` at once.
    pub fn split(self, n: usize) -> Vec<Delivery> {
        let shared = Arc::new(SharedAcker {
            acker: self.acker,
            state: Mutex::new((n, Settle::Ack)),
        });
        (0..n)
            .map(|_| Delivery {
                payload: Bytes::new(),
                redelivered: self.redelivered,
                user_id: self.user_id.clone(),
                acker: Box::new(PartAcker {
                    shared: shared.clone(),
                    done: AtomicBool::new(false),
                }),
            })
            .collect()
    }
}

/// How a delivery is settled, in increasing precedence.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Settle {
    Ack,
    DeadLetter,
    Requeue,
}

struct SharedAcker {
    acker: Box<dyn Acker>,
    /// Parts not yet settled, and the strongest outcome asked for so far.
    state: Mutex<(usize, Settle)>,
}

struct PartAcker {
    shared: Arc<SharedAcker>,
    /// This part has settled: settling it again changes nothing.
    done: AtomicBool,
}

impl PartAcker {
    async fn settle(&self, how: Settle) -> Result<(), BrokerError> {
        if self.done.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let last = {
            let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            st.1 = st.1.max(how);
            st.0 = st.0.saturating_sub(1);
            (st.0 == 0).then_some(st.1)
        };
        match last {
            None => Ok(()),
            Some(Settle::Ack) => self.shared.acker.ack().await,
            Some(Settle::DeadLetter) => self.shared.acker.dead_letter().await,
            Some(Settle::Requeue) => self.shared.acker.requeue().await,
        }
    }
}

#[async_trait]
impl Acker for PartAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.settle(Settle::Ack).await
    }
    async fn dead_letter(&self) -> Result<(), BrokerError> {
        self.settle(Settle::DeadLetter).await
    }
    async fn requeue(&self) -> Result<(), BrokerError> {
        self.settle(Settle::Requeue).await
    }
}

/// The name of a node's queue.
pub fn queue_name(node: &str) -> String {
    format!("hakobu.node.{node}")
}

/// Where messages that cannot be processed end up.
pub const DEAD_LETTER_QUEUE: &str = "hakobu.dead-letter";
