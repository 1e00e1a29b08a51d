//! Throttle: the sender's rate caps (`bandwidth:` on a send profile, and at
//! the top of the configuration for the whole agent), and its priorities
//! (`priority: 1..9` on a send profile).
//!
//! A cap is a token bucket: it fills at the rate, holds at most a burst of
//! [`BURST`] of a second's worth, and a publisher takes a chunk's bytes (as
//! they travel: compressed, sealed) before it publishes the chunk. A chunk
//! larger than what the bucket holds is let through and leaves it in debt,
//! which the next one waits out, so the rate over any stretch longer than a
//! chunk stays at the cap (plus the burst).
//!
//! Priority: every transfer being published registers its profile's
//! priority with [`Priorities`]; before each chunk a publisher waits while
//! a transfer of a higher priority is registered. A large priority-1 file
//! thus pauses, between two chunks, for as long as priority-9 work is
//! published, and resumes after it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The burst a bucket holds, as a fraction of one second at its rate.
pub const BURST: f64 = 0.25;

/// A token bucket of bytes.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    /// A bucket for `rate` bytes a second, full.
    pub fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        let burst = rate * BURST;
        Bucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `bytes`: returns how long to wait before using them (zero
    /// when the bucket held them).
    pub fn take(&self, bytes: u64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last) = *s;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
        let left = tokens - bytes as f64;
        *s = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-left / self.rate)
        }
    }
}

/// Waits until every bucket in `buckets` has let `bytes` through.
pub async fn pace(buckets: &[&Bucket], bytes: u64) {
    let wait = buckets
        .iter()
        .map(|b| b.take(bytes))
        .max()
        .unwrap_or_default();
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// What a publisher goes through before each chunk: it yields to more
/// urgent transfers, then waits for the caps (its profile's, the agent's).
pub struct Pace<'a> {
    pub priorities: &'a Priorities,
    pub priority: u8,
    pub caps: Vec<&'a Bucket>,
}

impl Pace<'_> {
    /// Before publishing a chunk of `bytes` (as they travel).
    pub async fn before(&self, bytes: u64) {
        self.priorities.yield_to_higher(self.priority).await;
        pace(&self.caps, bytes).await;
    }
}

/// Lowest and highest `priority:`; the default is 5.
pub const MIN_PRIORITY: u8 = 1;
pub const MAX_PRIORITY: u8 = 9;

/// How many transfers of each priority are being published now.
#[derive(Debug)]
pub struct Priorities {
    counts: watch::Sender<[u32; MAX_PRIORITY as usize + 1]>,
}

impl Default for Priorities {
    fn default() -> Self {
        Priorities {
            counts: watch::Sender::new([0; MAX_PRIORITY as usize + 1]),
        }
    }
}

/// A transfer's registration; dropping it ends it.
pub struct Active<'a> {
    of: &'a Priorities,
    priority: u8,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        let p = self.priority as usize;
        self.of
            .counts
            .send_modify(|c| c[p] = c[p].saturating_sub(1));
    }
}

impl Priorities {
    /// Registers a transfer of `priority` for as long as the guard lives.
    pub fn register(&self, priority: u8) -> Active<'_> {
        let priority = priority.clamp(MIN_PRIORITY, MAX_PRIORITY);
        self.counts.send_modify(|c| c[priority as usize] += 1);
        Active { of: self, priority }
    }

    /// Waits while a transfer of a higher priority than `priority` is
    /// registered. Returns at once when none is.
    pub async fn yield_to_higher(&self, priority: u8) {
        let above = priority as usize + 1;
        let mut rx = self.counts.subscribe();
        let _ = rx
            .wait_for(|c| c.get(above..).is_none_or(|h| h.iter().all(|n| *n == 0)))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_its_burst_through_then_charges_the_rate() {
        let b = Bucket::new(1000);
        assert_eq!(b.take(250), Duration::ZERO);
        // Empty now: 500 more bytes are half a second at 1000 B/s.
        let w = b.take(500);
        assert!(
            w >= Duration::from_millis(450) && w <= Duration::from_millis(500),
            "{w:?}"
        );
    }

    #[tokio::test]
    async fn a_lower_priority_waits_while_a_higher_one_is_registered() {
        let p = Priorities::default();
        p.yield_to_higher(1).await;
        let high = p.register(9);
        let waiting = p.yield_to_higher(1);
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut waiting)
                .await
                .is_err()
        );
        // The same or a higher priority does not wait.
        p.yield_to_higher(9).await;
        drop(high);
        waiting.await;
    }
}
