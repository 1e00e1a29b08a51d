//! The RabbitMQ backend: quorum queues on a cluster, publisher confirms,
//! manual acks, fail-over across the configured URLs. The only module that
//! knows AMQP (imports lapin).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::{Mutex, mpsc};
use tracing::{debug, info, warn};

use super::{Acker, Broker, BrokerError, Confirm, DEAD_LETTER_QUEUE, Delivery, queue_name};
use crate::config::RabbitmqConfig;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RabbitMq {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RabbitmqConfig,
    /// Index of the URL to try first on the next connect.
    next_url: AtomicUsize,
    publisher: Mutex<PublisherState>,
}

#[derive(Default)]
struct PublisherState {
    /// Bumped on every new connection, so that an error seen on an old one
    /// does not tear down its successor.
    generation: u64,
    live: Option<(Connection, Channel)>,
    declared: HashSet<String>,
}

impl RabbitMq {
    pub fn new(cfg: RabbitmqConfig) -> Self {
        RabbitMq {
            inner: Arc::new(Inner {
                cfg,
                next_url: AtomicUsize::new(0),
                publisher: Mutex::new(PublisherState::default()),
            }),
        }
    }
}

impl Inner {
    /// Connects to the first URL that answers, starting after the last one used.
    async fn connect(&self) -> Result<(Connection, String), BrokerError> {
        let n = self.cfg.urls.len();
        let start = self.next_url.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let url = &self.cfg.urls[idx];
            let attempt = Connection::connect(url, ConnectionProperties::default());
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(conn)) => {
                    // The next connection (after a failure) starts at the next node.
                    self.next_url.store(idx + 1, Ordering::Relaxed);
                    return Ok((conn, redact(url)));
                }
                Ok(Err(e)) => errors.push(format!("{}: {e}", redact(url))),
                Err(_) => errors.push(format!("{}: timed out", redact(url))),
            }
        }
        self.next_url.store(start + 1, Ordering::Relaxed);
        Err(BrokerError::Unavailable(errors.join("; ")))
    }

    /// The publishing channel, connecting when there is none.
    async fn channel(&self, node: &str) -> Result<(u64, Channel), BrokerError> {
        let mut st = self.publisher.lock().await;
        if st.live.is_none() {
            let (conn, url) = self.connect().await?;
            let ch = conn.create_channel().await.map_err(conn_err)?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(conn_err)?;
            declare_dead_letter(&ch).await?;
            info!(message = "Connected to RabbitMQ for publishing.", url);
            st.generation += 1;
            st.declared.clear();
            st.live = Some((conn, ch));
        }
        let generation = st.generation;
        let ch = st
            .live
            .as_ref()
            .map(|(_, ch)| ch.clone())
            .expect("set above");
        if !st.declared.contains(node) {
            if let Err(e) = declare_node_queue(&ch, node, self.cfg.delivery_limit).await {
                drop(st);
                self.invalidate(generation).await;
                return Err(e);
            }
            st.declared.insert(node.to_string());
        }
        Ok((generation, ch))
    }

    /// Drops the publishing connection if it is still `generation`.
    async fn invalidate(&self, generation: u64) {
        let mut st = self.publisher.lock().await;
        if st.generation == generation {
            if let Some((conn, _)) = st.live.take() {
                tokio::spawn(async move {
                    let _ = conn.close(320, "hakobu fail-over".into()).await;
                });
            }
        }
    }
}

fn conn_err(e: lapin::Error) -> BrokerError {
    BrokerError::Connection(e.to_string())
}

/// `amqp://user:secret@host` → `amqp://user@host`, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..s + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// The user name in an AMQP URL, which the broker checks `user_id` against.
fn url_user(url: &str) -> Option<String> {
    let s = url.find("://")? + 3;
    let at = url.rfind('@')?;
    let user = url.get(s..at)?.split(':').next()?;
    (!user.is_empty()).then(|| user.to_string())
}

fn quorum_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    t
}

async fn declare_dead_letter(ch: &Channel) -> Result<(), BrokerError> {
    ch.queue_declare(
        DEAD_LETTER_QUEUE.into(),
        QueueDeclareOptions::durable(),
        quorum_args(&[]),
    )
    .await
    .map_err(conn_err)?;
    Ok(())
}

async fn declare_node_queue(
    ch: &Channel,
    node: &str,
    delivery_limit: u32,
) -> Result<(), BrokerError> {
    let args = quorum_args(&[
        (
            "x-delivery-limit",
            AMQPValue::LongInt(delivery_limit.min(i32::MAX as u32) as i32),
        ),
        (
            "x-dead-letter-exchange",
            AMQPValue::LongString(LongString::from("")),
        ),
        (
            "x-dead-letter-routing-key",
            AMQPValue::LongString(LongString::from(DEAD_LETTER_QUEUE)),
        ),
    ]);
    ch.queue_declare(
        queue_name(node).as_str().into(),
        QueueDeclareOptions::durable(),
        args,
    )
    .await
    .map_err(conn_err)?;
    Ok(())
}

#[async_trait]
impl Broker for RabbitMq {
    async fn publish(&self, node: &str, payload: Bytes) -> Result<Confirm, BrokerError> {
        let (generation, ch) = self.inner.channel(node).await?;
        let mut props = BasicProperties::default().with_delivery_mode(2);
        // The broker refuses a user_id that is not the connection's login, so a
        // receiver can trust it as the sender's identity.
        if let Some(user) = self.inner.cfg.urls.first().and_then(|u| url_user(u)) {
            props = props.with_user_id(ShortString::from(user));
        }
        let routing: ShortString = queue_name(node).as_str().into();
        let sent = ch
            .basic_publish(
                "".into(),
                routing,
                BasicPublishOptions::default(),
                &payload,
                props,
            )
            .await;
        let confirm = match sent {
            Ok(c) => c,
            Err(e) => {
                self.inner.invalidate(generation).await;
                return Err(conn_err(e));
            }
        };
        let inner = self.inner.clone();
        let timeout = inner.cfg.confirm_timeout;
        Ok(Box::pin(async move {
            let outcome = match tokio::time::timeout(timeout, confirm).await {
                Ok(Ok(c)) if c.is_ack() => return Ok(()),
                Ok(Ok(_)) => BrokerError::Nack,
                Ok(Err(e)) => conn_err(e),
                Err(_) => BrokerError::ConfirmTimeout(timeout),
            };
            // Whatever went wrong, the next publish goes through a new connection.
            inner.invalidate(generation).await;
            Err(outcome)
        }))
    }

    async fn subscribe(&self, node: &str) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        let prefetch = self.inner.cfg.prefetch;
        let (tx, rx) = mpsc::channel(prefetch as usize);
        let inner = self.inner.clone();
        let node = node.to_string();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match consume_once(&inner, &node, &tx).await {
                    Ok(()) => return, // the receiver was dropped
                    Err(e) => {
                        warn!(message = "Consumer lost its broker connection; reconnecting.", error = %e, ?backoff);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Consumes on one connection until it fails (`Err`) or nobody listens (`Ok`).
async fn consume_once(
    inner: &Inner,
    node: &str,
    tx: &mpsc::Sender<Delivery>,
) -> Result<(), BrokerError> {
    let (conn, url) = inner.connect().await?;
    let result = async {
        let ch = conn.create_channel().await.map_err(conn_err)?;
        ch.basic_qos(inner.cfg.prefetch, BasicQosOptions::default())
            .await
            .map_err(conn_err)?;
        declare_dead_letter(&ch).await?;
        declare_node_queue(&ch, node, inner.cfg.delivery_limit).await?;
        // A fresh tag on every subscribe: RabbitMQ 3.10 can strand messages
        // when a consumer tag is reused.
        let tag = format!("hakobu-{node}-{}", uuid::Uuid::now_v7());
        let mut consumer = ch
            .basic_consume(
                queue_name(node).as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(conn_err)?;
        info!(message = "Consuming.", queue = %queue_name(node), url, tag);
        while let Some(item) = consumer.next().await {
            let d = item.map_err(conn_err)?;
            let delivery = Delivery {
                payload: Bytes::from(d.data),
                redelivered: d.redelivered,
                user_id: d.properties.user_id().as_ref().map(|u| u.to_string()),
                acker: Box::new(RabbitAcker(d.acker)),
            };
            if tx.send(delivery).await.is_err() {
                return Ok(());
            }
        }
        Err(BrokerError::Connection(
            "the consumer was cancelled by the broker".into(),
        ))
    }
    .await;
    let _ = conn.close(200, "bye".into()).await;
    result
}

struct RabbitAcker(lapin::Acker);

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(&self) -> Result<(), BrokerError> {
        self.0
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| {
                // The channel is gone; the broker will deliver the message again.
                debug!(message = "Ack failed.", error = %e);
                conn_err(e)
            })
    }

    async fn dead_letter(&self) -> Result<(), BrokerError> {
        self.0
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map(|_| ())
            .map_err(conn_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_and_users_found() {
        assert_eq!(
            redact("amqp://hakobu:secret@127.0.0.1:5672/%2f"),
            "amqp://hakobu@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            url_user("amqp://hakobu:secret@127.0.0.1:5672/%2f").as_deref(),
            Some("hakobu")
        );
        assert_eq!(url_user("amqp://127.0.0.1:5672"), None);
    }
}
