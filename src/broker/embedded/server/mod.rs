//! The embedded broker: a single-node durable broker inside the binary.
//!
//! One core thread owns the storage and every queue; connection tasks talk to
//! it through a command channel. The core takes whatever commands are waiting,
//! appends all their messages, and hands the batch to the flusher thread,
//! which fsyncs it (group commit) while the core appends the next; only then
//! are the messages confirmed and made deliverable. Payloads stay on disk
//! until a delivery reads them, so memory does not grow with queue depth.
//!
//! Backpressure: a queue holding more than its limit (`max_queue`) parks new
//! publishes unconfirmed, and each connection has at most
//! [`CONNECTION_IN_FLIGHT`] bytes of unconfirmed publishes before the broker
//! stops reading from it: a slow receiver makes senders wait.
//!
//! Identity: every connection names a node and proves it with that node's
//! secret (`credentials.rs`, the users file in the data directory). A node
//! consumes only its own queue, publishes only to node queues, and every
//! message it publishes is stored and delivered with its name.
//!
//! Abuse limits ([`Limits`]): small frames until the hello succeeds, a
//! connection cap (strangers still in their handshake have a smaller one of
//! their own), an idle timeout (clients ping), delivery credit in bytes, a
//! broker-wide disk quota, and a bounded dead-letter queue.
//!
//! # Layout
//! - here: starting the broker (listen, lock and replay the data directory).
//! - `listener.rs`: accepting connections (TLS sessions when the broker
//!   has a certificate, `../tls.rs`), the handshake, one task per
//!   connection turning frames into commands for the core.
//! - `core.rs`: the core thread: queues, delivery, acks, dead-lettering,
//!   backpressure, compaction.
//! - `flusher.rs`: the thread that fsyncs what the core appended.
//! - `status.rs`: `hakobu broker status`, the queues' depth read from disk.

mod core;
mod flusher;
mod listener;
pub mod status;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::LengthDelimitedCodec;
use tracing::info;

use super::credentials::{CredentialError, UsersCache};
use super::frame::HELLO_MAX_FRAME;
use super::log::Log;
use core::{Core, Msg};
use flusher::Flusher;

/// A queue over this many stored bytes makes its publishers wait, by default.
pub const DEFAULT_MAX_QUEUE: u64 = 1 << 30;
/// Unconfirmed publish bytes one connection may have in the broker.
pub const CONNECTION_IN_FLIGHT: usize = 32 << 20;
/// Deliveries of one message before it is dead-lettered.
pub(super) const DELIVERY_LIMIT: u32 = 20;
/// Payload bytes all queues may hold together, by default.
pub const DEFAULT_MAX_DISK: u64 = 8 << 30;
/// Bytes the dead-letter queue keeps, by default; the oldest go first.
pub const DEFAULT_MAX_DEAD_LETTER: u64 = 256 << 20;
/// Authenticated connections at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Authenticated connections of one node at once, by default: an agent uses
/// two (publisher, consumer), commands such as `hakobu send` one more each
/// while they run.
pub const DEFAULT_MAX_CONNECTIONS_PER_NODE: usize = 32;
/// Connections still in their handshake at once (each has
/// `HANDSHAKE_TIMEOUT` to finish it): a flood of strangers takes these
/// slots, never those of authenticated nodes.
pub const HANDSHAKE_SLOTS: usize = 64;
/// A connection that sends nothing for this long is closed; clients ping
/// every [`PING_EVERY`].
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
pub const PING_EVERY: Duration = Duration::from_secs(20);

/// The broker's limits; `Limits::default()` gives the documented defaults.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A queue over this many stored bytes makes its publishers wait.
    pub max_queue: u64,
    /// Stored bytes of all queues together beyond which publishes are refused.
    pub max_disk: u64,
    /// Bytes the dead-letter queue keeps.
    pub max_dead_letter: u64,
    /// Authenticated connections at once.
    pub max_connections: usize,
    /// Authenticated connections of one node at once.
    pub max_connections_per_node: usize,
    /// A connection silent this long is closed (more than [`PING_EVERY`]).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queue: DEFAULT_MAX_QUEUE,
            max_disk: DEFAULT_MAX_DISK,
            max_dead_letter: DEFAULT_MAX_DEAD_LETTER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_node: DEFAULT_MAX_CONNECTIONS_PER_NODE,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// The codec of an authenticated connection's frames; a connection starts
/// with [`HELLO_MAX_FRAME`] and the listener raises it after the hello.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(super::frame::MAX_FRAME)
        .new_codec()
}

fn hello_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(HELLO_MAX_FRAME)
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
        "listening on {0} sends node secrets and files in plain text over the network; listen on 127.0.0.1, give the broker a certificate (`tls: {{ cert_file, key_file }}`, `--tls-cert`/`--tls-key`), or accept plain text with `insecure: true` (`--insecure`)"
    )]
    Plain(String),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
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

/// The broker's certificate (PEM chain) and its private key (mode 0600).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Binds `listen`, replays `data`, and serves plain text in the
/// background. Only nodes in `data`'s users file may connect; `insecure`
/// allows listening beyond loopback.
pub async fn start(
    listen: &str,
    data: &Path,
    limits: Limits,
    insecure: bool,
) -> Result<Running, ServerError> {
    start_tls(listen, data, limits, insecure, None).await
}

/// [`start`], and with `tls` every connection is a TLS session, and any
/// address is allowed.
pub async fn start_tls(
    listen: &str,
    data: &Path,
    limits: Limits,
    insecure: bool,
    tls: Option<&ServerTls>,
) -> Result<Running, ServerError> {
    let acceptor = match tls {
        Some(t) => Some(super::tls::acceptor(&t.cert_file, &t.key_file)?),
        None => None,
    };
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| ServerError::Listen(listen.to_string(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Listen(listen.to_string(), e))?;
    if !insecure && acceptor.is_none() && !addr.ip().is_loopback() {
        return Err(ServerError::Plain(listen.to_string()));
    }
    crate::durable::private_dir(data).map_err(|e| ServerError::Data(data.to_path_buf(), e))?;
    let users = Arc::new(UsersCache::new(data)?);
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
    let mut core = Core::new(log, next_id, limits);
    let restored = stored.len();
    for s in stored {
        core.push_ready(
            &s.queue,
            Msg {
                id: s.id,
                loc: s.loc,
                deliveries: 0,
            },
        );
    }
    let flusher =
        Flusher::start(tx.downgrade()).map_err(|e| ServerError::Data(data.to_path_buf(), e))?;
    std::thread::Builder::new()
        .name("hakobu-broker".into())
        .spawn(move || core.run(rx, flusher))
        .map_err(|e| ServerError::Data(data.to_path_buf(), e))?;
    info!(message = "Embedded broker listening.", %addr, tls = acceptor.is_some(), data = %data.display(), restored_messages = restored,
        nodes = users.current().map(|u| u.nodes().count()).unwrap_or(0));
    let accept = tokio::spawn(listener::accept(listener, tx, users, limits, acceptor));
    Ok(Running {
        addr,
        _lock: lock,
        accept,
    })
}
