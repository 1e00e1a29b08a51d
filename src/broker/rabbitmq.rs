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
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Mutex, mpsc};
use tracing::{debug, info, warn};

use super::{Acker, Broker, BrokerError, Confirm, DEAD_LETTER_QUEUE, Delivery, queue_name};
use crate::config::RabbitmqConfig;
use crate::config::amqp_url::{redact_text, redact_url, url_user};
use blocked::Blocked;
use tls::connect_url;

mod blocked;
mod tls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RabbitMq {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RabbitmqConfig,
    /// Index of the URL to try first on the next connect.
    next_url: AtomicUsize,
    publisher: Mutex<PublisherState>,
    /// Whether RabbitMQ holds the publishing connection back (an alarm).
    blocked: Arc<Blocked>,
}

#[derive(Default)]
struct PublisherState {
    /// Bumped on every new connection, so that an error seen on an old one
    /// does not tear down its successor.
    generation: u64,
    live: Option<Live>,
    declared: HashSet<String>,
}

struct Live {
    conn: Connection,
    ch: Channel,
    /// The login, sent as `user_id`: the broker checks it.
    user: Option<String>,
    /// Ends the watch of its blocked state with the connection.
    _blocked: tokio_util::sync::DropGuard,
}

async fn publishing_channel(conn: &Connection) -> Result<Channel, BrokerError> {
    let ch = conn.create_channel().await.map_err(conn_err)?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(conn_err)?;
    Ok(ch)
}

impl RabbitMq {
    pub fn new(cfg: RabbitmqConfig) -> Self {
        RabbitMq {
            inner: Arc::new(Inner {
                cfg,
                next_url: AtomicUsize::new(0),
                publisher: Mutex::new(PublisherState::default()),
                blocked: Arc::default(),
            }),
        }
    }
}

impl Inner {
    /// Connects to the first URL that answers, starting after the last one used.
    async fn connect(&self) -> Result<(Connection, String, Option<String>), BrokerError> {
        let n = self.cfg.urls.len();
        let start = self.next_url.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let url = &self.cfg.urls[idx];
            let attempt = connect_url(url, &self.cfg);
            match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                Ok(Ok(conn)) => {
                    // The next connection (after a failure) starts at the next node.
                    self.next_url.store(idx + 1, Ordering::Relaxed);
                    return Ok((conn, redact_url(url), url_user(url)));
                }
                // lapin's errors may quote the URL: no password in the log.
                Ok(Err(e)) => errors.push(format!("{}: {}", redact_url(url), redact_text(&e))),
                Err(_) => errors.push(format!("{}: timed out", redact_url(url))),
            }
        }
        self.next_url.store(start + 1, Ordering::Relaxed);
        Err(BrokerError::Unavailable(errors.join("; ")))
    }

    /// The publishing channel and its login, connecting when there is none.
    async fn channel(&self, node: &str) -> Result<(u64, Channel, Option<String>), BrokerError> {
        let mut st = self.publisher.lock().await;
        if st.live.is_none() {
            let (conn, url, user) = self.connect().await?;
            let ch = publishing_channel(&conn).await?;
            let ch = declare_dead_letter(&conn, &ch, &self.cfg)
                .await?
                .unwrap_or(ch);
            st.generation += 1;
            let watch = self.blocked.watch(&conn, st.generation, url.clone());
            info!(message = "Connected to RabbitMQ for publishing.", url);
            st.declared.clear();
            st.live = Some(Live {
                conn,
                ch,
                user,
                _blocked: watch,
            });
        }
        let generation = st.generation;
        let state = &mut *st;
        let Some(live) = state.live.as_mut() else {
            return Err(BrokerError::Connection("no publishing connection".into()));
        };
        if !state.declared.contains(node) {
            match ensure_peer_queue(&live.conn, &live.ch, node, &self.cfg).await {
                Ok(Some(ch)) => live.ch = ch,
                Ok(None) => {}
                Err(e) => {
                    drop(st);
                    self.invalidate(generation).await;
                    return Err(e);
                }
            }
            state.declared.insert(node.to_string());
        }
        Ok((generation, live.ch.clone(), live.user.clone()))
    }

    /// Drops the publishing connection if it is still `generation`.
    async fn invalidate(&self, generation: u64) {
        let mut st = self.publisher.lock().await;
        if st.generation == generation {
            if let Some(live) = st.live.take() {
                tokio::spawn(async move {
                    let closing = live.conn.close(320, "hakobu fail-over".into());
                    let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
                });
            }
        }
    }
}

fn conn_err(e: lapin::Error) -> BrokerError {
    BrokerError::Connection(e.to_string())
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

/// Declares the dead-letter queue, bounded in bytes (`dead_letter_max`;
/// the oldest dead letters are dropped first). A user without configure
/// rights on it, or a queue declared by an older hakobu without the bound,
/// makes RabbitMQ refuse the declaration: the queue is then checked
/// passively and used as it is (bound it with a policy, see the README).
async fn declare_dead_letter(
    conn: &Connection,
    ch: &Channel,
    cfg: &RabbitmqConfig,
) -> Result<Option<Channel>, BrokerError> {
    let args = quorum_args(&[(
        "x-max-length-bytes",
        AMQPValue::LongLongInt(cfg.dead_letter_max.min(i64::MAX as u64) as i64),
    )]);
    declare_or_check(conn, ch, DEAD_LETTER_QUEUE, args).await
}

/// Declares `name` with `args`. When RabbitMQ refuses (PRECONDITION_FAILED:
/// it exists with other arguments; ACCESS_REFUSED: this user may not
/// configure it), the channel is closed: the queue is then checked
/// passively, which needs no permission, on a new channel, returned.
async fn declare_or_check(
    conn: &Connection,
    ch: &Channel,
    name: &str,
    args: FieldTable,
) -> Result<Option<Channel>, BrokerError> {
    let err = match ch
        .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
    {
        Ok(_) => return Ok(None),
        Err(e) => e.to_string(),
    };
    if err.contains("PRECONDITION_FAILED") {
        if name == DEAD_LETTER_QUEUE {
            warn!(message = "The dead-letter queue exists with other arguments (an older hakobu declared it without a bound); using it as it is. Bound it with a policy: rabbitmqctl set_policy hakobu-dead-letter '^hakobu\\.dead-letter$' '{\"max-length-bytes\":1073741824}' --apply-to queues", queue = %name);
        } else {
            warn!(message = "Queue exists with other arguments; using it as it is. Give every agent the same delivery_limit and max_queue.", queue = %name);
        }
    } else if err.contains("ACCESS_REFUSED") {
        debug!(message = "This broker user may not declare the queue; checking that it exists.", queue = %name);
    } else {
        return Err(BrokerError::Connection(err));
    }
    let (fresh, _) = check_queue(conn, name).await?;
    Ok(Some(fresh))
}

/// A passive declaration on a new channel (no permission needed): the
/// channel and the queue's message count, or an error if it does not exist.
async fn check_queue(conn: &Connection, name: &str) -> Result<(Channel, u32), BrokerError> {
    let fresh = publishing_channel(conn).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let q = fresh
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
        .map_err(|e| {
            if e.to_string().contains("NOT_FOUND") {
                BrokerError::Connection(format!(
                    "the queue {name} does not exist, and this broker user may not create it: a node's queue is made when its agent first starts, the dead-letter queue by the first agent whose user may configure it"
                ))
            } else {
                conn_err(e)
            }
        })?;
    Ok((fresh, q.message_count()))
}

/// Declares a node's own queue (its user may configure it). When it exists
/// with other arguments (another agent configured a different delivery
/// limit or max_queue), it is used as it is, on the channel returned.
async fn declare_node_queue(
    conn: &Connection,
    ch: &Channel,
    node: &str,
    cfg: &RabbitmqConfig,
) -> Result<Option<Channel>, BrokerError> {
    let mut args = quorum_args(&[
        (
            "x-delivery-limit",
            AMQPValue::LongInt(cfg.delivery_limit.min(i32::MAX as u32) as i32),
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
    if let Some(max) = cfg.max_queue {
        // Backpressure: a full queue refuses publishes, and senders retry.
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(max.min(i64::MAX as u64) as i64),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
    }
    declare_or_check(conn, ch, queue_name(node).as_str(), args).await
}

/// Makes sure the queue a publish goes to exists. A node may publish to
/// another's queue without the right to configure it: a passive check
/// first, which needs no permission; only a missing queue is declared
/// (which a user with configure rights may do, so that messages wait for a
/// node that never ran; a narrower user gets an error and publishes again
/// later). A queue deleted after the check makes the mandatory publish
/// come back, never vanish.
async fn ensure_peer_queue(
    conn: &Connection,
    ch: &Channel,
    node: &str,
    cfg: &RabbitmqConfig,
) -> Result<Option<Channel>, BrokerError> {
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match ch
        .queue_declare(
            queue_name(node).as_str().into(),
            passive,
            FieldTable::default(),
        )
        .await
    {
        Ok(_) => Ok(None),
        Err(e) if e.to_string().contains("NOT_FOUND") => {
            let fresh = publishing_channel(conn).await?;
            Ok(Some(
                declare_node_queue(conn, &fresh, node, cfg)
                    .await?
                    .unwrap_or(fresh),
            ))
        }
        Err(e) => Err(conn_err(e)),
    }
}

/// Messages waiting in a node's queue and in the dead-letter queue, asked
/// of the broker with passive declarations (`hakobu status`).
pub async fn queue_depths(
    cfg: &RabbitmqConfig,
    node: &str,
) -> Result<Vec<(String, Option<u32>)>, BrokerError> {
    let inner = Inner {
        cfg: cfg.clone(),
        next_url: AtomicUsize::new(0),
        publisher: Mutex::new(PublisherState::default()),
        blocked: Arc::default(),
    };
    let (conn, _, _) = inner.connect().await?;
    let mut out = Vec::new();
    for name in [
        queue_name(node).as_str().to_string(),
        DEAD_LETTER_QUEUE.to_string(),
    ] {
        let depth = match check_queue(&conn, &name).await {
            Ok((_, n)) => Some(n),
            Err(BrokerError::Connection(e)) if e.contains("does not exist") => None,
            Err(e) => return Err(e),
        };
        out.push((name, depth));
    }
    close(&conn).await;
    Ok(out)
}

#[async_trait]
impl Broker for RabbitMq {
    async fn publish(&self, node: &str, payload: Bytes) -> Result<Confirm, BrokerError> {
        // Bounded like the confirm (a hung node of the cluster can hold up
        // declarations); the connection is then dropped for the next URL.
        // Every wait here leaves out the time RabbitMQ blocks the connection
        // (a resource alarm, `blocked.rs`): that is no reason to fail over.
        let timeout = self.inner.cfg.confirm_timeout;
        let blocked = self.inner.blocked.clone();
        let (generation, ch, user) = match blocked.bounded(timeout, self.inner.channel(node)).await
        {
            Ok(r) => r?,
            Err(_) => {
                let current = self.inner.publisher.lock().await.generation;
                self.inner.invalidate(current).await;
                return Err(BrokerError::ConfirmTimeout(timeout));
            }
        };
        let mut props = BasicProperties::default().with_delivery_mode(2);
        // The broker refuses a user_id that is not the connection's login, so a
        // receiver can trust it as the sender's identity.
        if let Some(user) = user {
            props = props.with_user_id(ShortString::from(user));
        }
        let routing: ShortString = queue_name(node).as_str().into();
        // Bounded like the confirm: a channel of a connection that died
        // half-way (quorum lost, nodes going) has been seen to leave the
        // frame's send pending for good, and the transfer with it.
        let sending = ch.basic_publish(
            "".into(),
            routing,
            // Mandatory: a message no queue takes comes back instead of vanishing.
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &payload,
            props,
        );
        let confirm = match blocked.bounded(timeout, sending).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.inner.invalidate(generation).await;
                return Err(conn_err(e));
            }
            Err(_) => {
                self.inner.invalidate(generation).await;
                return Err(BrokerError::ConfirmTimeout(timeout));
            }
        };
        let inner = self.inner.clone();
        Ok(Box::pin(async move {
            let outcome = match blocked.bounded(timeout, confirm).await {
                Ok(Ok(c)) if c.is_ack() => match c.take_message() {
                    None => return Ok(()),
                    // Unroutable (the queue is gone): redeclare on a new connection.
                    Some(_) => BrokerError::Connection(format!(
                        "no queue took the message for {}",
                        "the node"
                    )),
                },
                // A nack: a full queue (x-overflow reject-publish), or a
                // quorum-queue client on this channel stuck on a dead leader
                // (RabbitMQ 3.10 nacks every later publish on that channel
                // until the old leader returns). A new connection, on the
                // next node, recovers from both; the caller backs off.
                Ok(Ok(_)) => BrokerError::Nack,
                Ok(Err(e)) => conn_err(e),
                Err(_) => BrokerError::ConfirmTimeout(timeout),
            };
            // The connection is suspect: the next publish goes through a new one.
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
            // Connected before: the next connection is a fail-over (`/metrics`).
            let mut was_connected = false;
            while !tx.is_closed() {
                match consume_once(&inner, &node, &tx, &mut was_connected).await {
                    Ok(()) => return, // the receiver was dropped
                    Err(e) => {
                        crate::metrics::registry::global().broker_lost();
                        warn!(message = "Consumer lost its broker connection; reconnecting.", error = %e, error_code = %e.code(), ?backoff);
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
    was_connected: &mut bool,
) -> Result<(), BrokerError> {
    let (conn, url, _) = inner.connect().await?;
    let result = async {
        // Bounded: a node of the cluster hung (SIGSTOP, a frozen VM) holds up
        // declarations and consumes on the others until the cluster counts it
        // out (its net_ticktime); meanwhile the next URL is tried.
        let setting_up = tokio::time::timeout(
            inner.cfg.confirm_timeout,
            start_consumer(&conn, inner, node),
        );
        let mut consumer = match setting_up.await {
            Ok(c) => c?,
            Err(_) => {
                return Err(BrokerError::Connection(format!(
                    "the broker did not set up the consumer within {:?}; trying the next node",
                    inner.cfg.confirm_timeout
                )));
            }
        };
        info!(message = "Consuming.", queue = %queue_name(node), url, tag = %consumer.tag());
        crate::metrics::registry::global().broker_connected(*was_connected);
        *was_connected = true;
        loop {
            // Stop consuming as soon as nobody listens: the broker then
            // requeues what this consumer held.
            let item = tokio::select! {
                item = consumer.next() => item,
                _ = tx.closed() => return Ok(()),
            };
            let Some(item) = item else { break };
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
    close(&conn).await;
    result
}

/// Declares the queues on a new channel of `conn` and consumes `node`'s.
async fn start_consumer(
    conn: &Connection,
    inner: &Inner,
    node: &str,
) -> Result<lapin::Consumer, BrokerError> {
    let ch = conn.create_channel().await.map_err(conn_err)?;
    ch.basic_qos(inner.cfg.prefetch, BasicQosOptions::default())
        .await
        .map_err(conn_err)?;
    let ch = declare_dead_letter(conn, &ch, &inner.cfg)
        .await?
        .unwrap_or(ch);
    let ch = declare_node_queue(conn, &ch, node, &inner.cfg)
        .await?
        .unwrap_or(ch);
    ch.basic_qos(inner.cfg.prefetch, BasicQosOptions::default())
        .await
        .map_err(conn_err)?;
    // A fresh tag on every subscribe: RabbitMQ 3.10 can strand messages
    // when a consumer tag is reused.
    let tag = format!("hakobu-{node}-{}", uuid::Uuid::now_v7());
    ch.basic_consume(
        queue_name(node).as_str().into(),
        tag.as_str().into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(conn_err)
}

/// Closes `conn`, waiting a moment at most: a hung node never answers
/// the close, and the fail-over must not wait for it.
async fn close(conn: &Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
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

    async fn requeue(&self) -> Result<(), BrokerError> {
        self.0
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .map(|_| ())
            .map_err(conn_err)
    }

    async fn dead_letter(&self) -> Result<(), BrokerError> {
        self.0
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map(|_| ())
            .map_err(conn_err)
    }
}
