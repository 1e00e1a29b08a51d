//! Backlog: how many transfers publish at once. Each priority has at most
//! [`PUBLISHING_MAX`] publishers (a task each); the other transfers wait in
//! the ledger as `sending` rows, and the refiller takes them, oldest first,
//! as publishers finish. An outbox's watcher claims nothing more while its
//! priority has rows waiting there (`wait_for_room`). So what waits stays on
//! disk (the outbox, the spool, the ledger), not in memory, whatever the
//! number of files: a million dropped at once cost what a few hundred do.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::warn;

use super::Sender;
use super::throttle::MAX_PRIORITY;
use crate::domain::{NodeName, TransferId};
use crate::store::SendRow;

/// Publishers at once, per priority. Each costs about 53 KiB of the
/// sender's memory while it runs (benches/run.sh, backlog, 100,000 files
/// dropped at once, blocking threads capped at 64: peak RSS 81 MiB with
/// 1,024, 40 MiB with 256), so 1,024 broke the 64 MiB bound that 256
/// keeps; with the cap (`cli.rs`) small files go as fast as with 1,024.
pub(super) const PUBLISHING_MAX: usize = 256;
const LEVELS: usize = MAX_PRIORITY as usize + 1;

type Key = (TransferId, NodeName);

/// The transfers being published now, by priority, and which priorities
/// have more waiting in the ledger.
#[derive(Default)]
pub(super) struct Publishing {
    state: Mutex<State>,
    /// Wakes the refiller: a publisher finished where rows wait.
    freed: Notify,
    /// Wakes the watchers: a priority has nothing waiting any more.
    drained: Notify,
}

#[derive(Default)]
struct State {
    keys: HashSet<Key>,
    count: [usize; LEVELS],
    /// Rows of this priority wait in the ledger without a publisher.
    waiting: [bool; LEVELS],
}

enum Slot {
    Taken,
    AlreadyPublishing,
    Full,
}

impl Publishing {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, key: &Key, p: usize) -> Slot {
        let mut s = self.state();
        if s.keys.contains(key) {
            Slot::AlreadyPublishing
        } else if s.count[p] >= PUBLISHING_MAX {
            s.waiting[p] = true;
            Slot::Full
        } else {
            s.keys.insert(key.clone());
            s.count[p] += 1;
            Slot::Taken
        }
    }

    fn release(&self, key: &Key, p: usize) {
        let mut s = self.state();
        if s.keys.remove(key) {
            s.count[p] -= 1;
        }
        if s.waiting[p] {
            self.freed.notify_one();
        }
    }

    pub(super) fn contains(&self, key: &Key) -> bool {
        self.state().keys.contains(key)
    }

    fn waiting(&self, p: usize) -> bool {
        self.state().waiting[p]
    }

    /// Marks every priority as having rows waiting (at start-up: the
    /// ledger's `sending` rows are all waiting) and wakes the refiller.
    pub(super) fn all_waiting(&self) {
        self.state().waiting = [true; LEVELS];
        self.freed.notify_one();
    }
}

impl Sender {
    /// Publishes a transfer to one peer in the background, retrying until
    /// the broker confirms it (or the agent stops: the ledger still says
    /// `sending`, and the next start publishes it again). With
    /// [`PUBLISHING_MAX`] publishers of its priority already, the row waits
    /// in the ledger for the refiller.
    pub(super) fn enqueue(self: &Arc<Self>, row: &SendRow) {
        let key = (row.transfer_id.clone(), row.peer.clone());
        let (size, priority) = (row.size, self.priority_of(&row.file_id));
        let p = usize::from(priority).min(LEVELS - 1);
        if !matches!(self.publishing.take(&key, p), Slot::Taken) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = this.stop.cancelled() => {}
                _ = this.publish_until_confirmed(&key.0, &key.1, size, priority) => {}
            }
            this.publishing.release(&key, p);
        });
    }

    /// Gives rows waiting in the ledger a publisher as others finish, most
    /// urgent priority first, until the agent stops.
    pub async fn refill(self: Arc<Self>) {
        while !self.stop.is_cancelled() {
            for p in (0..LEVELS).rev() {
                if let Err(e) = self.refill_level(p).await {
                    warn!(message = "Cannot read the transfers waiting to be published; retrying.", error = %e, error_code = %e.code());
                    self.publishing.state().waiting[p] = true;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => {}
                _ = self.publishing.freed.notified() => {}
            }
        }
    }

    async fn refill_level(self: &Arc<Self>, p: usize) -> Result<(), crate::store::StoreError> {
        {
            let mut s = self.publishing.state();
            if !s.waiting[p] || s.count[p] >= PUBLISHING_MAX {
                return Ok(());
            }
            s.waiting[p] = false;
        }
        // The profiles of this priority, then (at the default priority)
        // rows of a file id no longer configured.
        let profiles = self
            .cfg
            .send
            .iter()
            .filter(|f| usize::from(f.priority) == p);
        let mut groups: Vec<Option<_>> = profiles.map(|f| Some(f.file_id.clone())).collect();
        if p == usize::from(crate::config::DEFAULT_PRIORITY) {
            groups.push(None);
        }
        let known: Vec<_> = self.cfg.send.iter().map(|f| f.file_id.clone()).collect();
        for group in groups {
            let (busy, room) = {
                let s = self.publishing.state();
                (s.count[p], PUBLISHING_MAX.saturating_sub(s.count[p]))
            };
            if room == 0 {
                self.publishing.state().waiting[p] = true;
                return Ok(());
            }
            // The rows being published are `sending` too: read past them.
            let limit = room + busy;
            let rows = self.ledger.to_publish(group, known.clone(), limit).await?;
            let more = rows.len() == limit;
            for row in &rows {
                self.enqueue(row);
            }
            if more {
                self.publishing.state().waiting[p] = true;
            }
        }
        if !self.publishing.waiting(p) {
            self.publishing.drained.notify_waiters();
        }
        Ok(())
    }

    /// Returns once `priority` has no rows waiting for a publisher (or the
    /// agent stops): an outbox's watcher claims nothing more meanwhile.
    pub(super) async fn wait_for_room(&self, priority: u8) {
        let p = usize::from(priority).min(LEVELS - 1);
        loop {
            let drained = self.publishing.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if !self.publishing.waiting(p) || self.stop.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = drained => {}
            }
        }
    }
}
