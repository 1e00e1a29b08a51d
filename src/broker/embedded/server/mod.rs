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
//! # Layout
//! - here: starting the broker (listen, lock and replay the data directory).
//! - `listener.rs`: accepting connections, the handshake, one task per
//!   connection turning frames into commands for the core.
//! - `core.rs`: the core thread: queues, delivery, acks, dead-lettering,
//!   backpressure, compaction.
//! - `flusher.rs`: the thread that fsyncs what the core appended.

mod core;
mod flusher;
mod listener;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::LengthDelimitedCodec;
use tracing::info;

use super::frame::MAX_FRAME;
use super::log::Log;
use core::{Core, Msg};
use flusher::Flusher;

/// A queue over this many stored bytes makes its publishers wait, by default.
pub const DEFAULT_MAX_QUEUE: u64 = 1 << 30;
/// Unconfirmed publish bytes one connection may have in the broker.
pub const CONNECTION_IN_FLIGHT: usize = 32 << 20;
/// Deliveries of one message before it is dead-lettered.
pub(super) const DELIVERY_LIMIT: u32 = 20;

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
    crate::durable::private_dir(data).map_err(|e| ServerError::Data(data.to_path_buf(), e))?;
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
    let accept = tokio::spawn(listener::accept(listener, tx, token));
    Ok(Running {
        addr,
        _lock: lock,
        accept,
    })
}
