//! Resource alarms: a RabbitMQ node short of disk or memory blocks every
//! publishing connection of the cluster (`connection.blocked`, which lapin
//! asks for in its client capabilities) until the alarm clears
//! (`connection.unblocked`). Owns the publishing connection's blocked
//! state, says once when it is blocked and when it is not any more, and
//! stretches the publish and confirm deadlines while it lasts: a block is
//! the broker asking to wait, not a dead node, and must not start a
//! fail-over across the cluster (every node blocks publishers alike) nor
//! publish again what is only held back.
//! Consuming connections publish nothing and are never blocked.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::{Connection, Event};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

use crate::error_code::ErrorCode;

/// The blocked state of the current publishing connection.
#[derive(Default)]
pub(super) struct Blocked {
    /// The connection whose events count: an older one's are ignored.
    generation: AtomicU64,
    blocked: AtomicBool,
    /// Bumped on every block and unblock: a wait that saw it change was
    /// held back for part of its time.
    changes: AtomicU64,
}

impl Blocked {
    /// Watches `conn`, publishing connection number `generation`, until it
    /// is dropped or the returned guard is. A new connection starts unblocked.
    pub(super) fn watch(
        self: &Arc<Self>,
        conn: &Connection,
        generation: u64,
        url: String,
    ) -> DropGuard {
        self.generation.store(generation, Ordering::SeqCst);
        self.blocked.store(false, Ordering::SeqCst);
        let mut events = conn.events_listener();
        let stop = CancellationToken::new();
        let (this, stopped) = (self.clone(), stop.clone());
        tokio::spawn(async move {
            let mut since: Option<Instant> = None;
            loop {
                let event = tokio::select! {
                    e = events.next() => e,
                    _ = stopped.cancelled() => None,
                };
                let Some(event) = event else { break };
                if this.generation.load(Ordering::SeqCst) != generation {
                    break;
                }
                match event {
                    Event::ConnectionBlocked(reason) => {
                        if since.is_none() {
                            since = Some(Instant::now());
                            warn!(message = "RabbitMQ blocked the publishing connection: a node of the cluster is short of disk or memory (a resource alarm). Publishing waits until the alarm clears; consuming goes on.",
                                reason, url, error_code = %ErrorCode::BrokerBlocked);
                        }
                        this.set(true);
                    }
                    Event::ConnectionUnblocked => {
                        this.set(false);
                        if let Some(t) = since.take() {
                            info!(message = "RabbitMQ unblocked the connection; publishing resumes.",
                                url, blocked_for = ?t.elapsed());
                        }
                    }
                    _ => {}
                }
            }
            if let Some(t) = since {
                info!(message = "A blocked publishing connection was closed.", url, blocked_for = ?t.elapsed());
            }
        });
        stop.drop_guard()
    }

    fn set(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::SeqCst);
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    pub(super) fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::SeqCst)
    }

    /// Awaits `fut` for `limit`, not counting the time the connection is
    /// blocked: a deadline that passes while it is (or was, since the last
    /// deadline) blocked starts over. `Err(())` once `limit` passed without
    /// a block.
    pub(super) async fn bounded<F: Future>(
        &self,
        limit: Duration,
        fut: F,
    ) -> Result<F::Output, ()> {
        tokio::pin!(fut);
        loop {
            let seen = self.changes.load(Ordering::SeqCst);
            match tokio::time::timeout(limit, &mut fut).await {
                Ok(v) => return Ok(v),
                Err(_) if self.is_blocked() || self.changes.load(Ordering::SeqCst) != seen => {}
                Err(_) => return Err(()),
            }
        }
    }
}
