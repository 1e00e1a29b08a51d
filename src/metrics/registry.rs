//! The figures only the running process knows, kept in memory: when it
//! started, the broker connection's state and fail-overs, hook runs and
//! their durations, the hosted embedded broker's dead letters. One global
//! registry per process (an agent is one process); every update is an
//! atomic or a short lock, never I/O.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Upper bounds (seconds) of the hook duration histogram's buckets.
pub const HOOK_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];

/// One `(event, outcome)` series of the hook histogram.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Runs at most each bound of [`HOOK_BUCKETS`] (not cumulative).
    pub buckets: [u64; HOOK_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if let Some(i) = HOOK_BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }

    /// The cumulative count of each bucket, then `+Inf` (= `count`).
    pub fn cumulative(&self) -> Vec<u64> {
        let mut acc = 0;
        self.buckets
            .iter()
            .map(|n| {
                acc += n;
                acc
            })
            .collect()
    }
}

pub struct Registry {
    start: Mutex<Option<f64>>,
    connected: AtomicBool,
    failovers: AtomicU64,
    /// Messages in the hosted embedded broker's dead-letter queue; -1 while
    /// this process hosts no broker.
    hosted_dead_letters: AtomicI64,
    hooks: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
}

static REGISTRY: Registry = Registry {
    start: Mutex::new(None),
    connected: AtomicBool::new(false),
    failovers: AtomicU64::new(0),
    hosted_dead_letters: AtomicI64::new(-1),
    hooks: Mutex::new(BTreeMap::new()),
};

/// The process's registry.
pub fn global() -> &'static Registry {
    &REGISTRY
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Registry {
    /// When the process started (the first time anyone asked; the agent
    /// asks as it starts its endpoint).
    pub fn start_time(&self) -> f64 {
        let mut s = self.start.lock().unwrap_or_else(|p| p.into_inner());
        *s.get_or_insert_with(|| unix_seconds(SystemTime::now()))
    }

    /// The broker subscription connected: after a lost connection, one
    /// fail-over more.
    pub fn broker_connected(&self, after_loss: bool) {
        if after_loss {
            self.failovers.fetch_add(1, Ordering::Relaxed);
        }
        self.connected.store(true, Ordering::Relaxed);
    }

    /// The broker subscription's connection is lost (or could not be made).
    pub fn broker_lost(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }

    /// The hosted embedded broker's dead-letter queue holds `n` messages.
    pub fn set_hosted_dead_letters(&self, n: u64) {
        self.hosted_dead_letters
            .store(n.min(i64::MAX as u64) as i64, Ordering::Relaxed);
    }

    /// The hosted embedded broker's dead letters, if this process hosts one.
    pub fn hosted_dead_letters(&self) -> Option<u64> {
        u64::try_from(self.hosted_dead_letters.load(Ordering::Relaxed)).ok()
    }

    /// One hook run of `event` ended with `outcome` after `took`.
    pub fn hook_ran(&self, event: &'static str, outcome: &'static str, took: Duration) {
        self.hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((event, outcome))
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// Every hook series so far, by `(event, outcome)`.
    pub fn hooks(&self) -> BTreeMap<(&'static str, &'static str), Histogram> {
        self.hooks.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_run_in_its_bucket_and_cumulates() {
        let mut h = Histogram::default();
        for s in [0.001, 0.3, 0.3, 1000.0] {
            h.observe(s);
        }
        let c = h.cumulative();
        assert_eq!(c[0], 1);
        assert_eq!(c[6], 3, "0.5 s bucket holds the first three");
        assert_eq!(*c.last().unwrap(), 3, "1000 s is above every bound");
        assert_eq!(h.count, 4);
        assert!((h.sum - 1000.601).abs() < 1e-9);
    }
}
