//! Retries said once, not at every try: a broker that refuses publishes
//! for minutes (its disk full, a queue at `max_queue`, a lost quorum) is
//! retried by every transfer under way, each at its own pace; the log says
//! the first failure of each kind, then once a minute how many followed,
//! and once when a try succeeds again. Owns only that bookkeeping: the
//! callers log, with their own fields.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error_code::ErrorCode;

/// How often a failure that goes on is said again.
const REPEAT: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct RetryLog {
    /// By error code: since when it fails, when it was last said, and the
    /// failures since.
    failing: Mutex<HashMap<ErrorCode, Failing>>,
}

struct Failing {
    since: Instant,
    said: Instant,
    unsaid: u64,
    total: u64,
}

/// What the caller should log for a failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Say {
    /// The first of its kind: say it in full.
    First,
    /// It goes on: say it again, with the failures since the last time.
    Again { since_last: u64 },
    /// Said lately: log it at debug level only.
    Quiet,
}

/// A success after failures that were said: how many and for how long.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovered {
    pub code: ErrorCode,
    pub failures: u64,
    pub failed_for: Duration,
}

impl RetryLog {
    pub fn failed(&self, code: ErrorCode) -> Say {
        self.failed_at(code, Instant::now())
    }

    fn failed_at(&self, code: ErrorCode, now: Instant) -> Say {
        let mut m = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match m.get_mut(&code) {
            None => {
                m.insert(
                    code,
                    Failing {
                        since: now,
                        said: now,
                        unsaid: 0,
                        total: 1,
                    },
                );
                Say::First
            }
            Some(f) => {
                f.total += 1;
                if now.duration_since(f.said) >= REPEAT {
                    let since_last = f.unsaid + 1;
                    f.said = now;
                    f.unsaid = 0;
                    Say::Again { since_last }
                } else {
                    f.unsaid += 1;
                    Say::Quiet
                }
            }
        }
    }

    /// A try succeeded: the failures said before it, to be told as over
    /// (only when more than one: a lone failure needs no all-clear).
    pub fn succeeded(&self) -> Vec<Recovered> {
        let mut m = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if m.is_empty() {
            return Vec::new();
        }
        m.drain()
            .filter(|(_, f)| f.total > 1)
            .map(|(code, f)| Recovered {
                code,
                failures: f.total,
                failed_for: f.since.elapsed(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn said_once_then_once_a_minute_then_over() {
        let log = RetryLog::default();
        let t0 = Instant::now();
        let nack = ErrorCode::BrokerNack;
        assert_eq!(log.failed_at(nack, t0), Say::First);
        for i in 1..50 {
            let at = t0 + Duration::from_millis(200 * i);
            assert_eq!(log.failed_at(nack, at), Say::Quiet);
        }
        // Another kind is said at once.
        assert_eq!(
            log.failed_at(ErrorCode::BrokerConnectionLost, t0),
            Say::First
        );
        assert_eq!(
            log.failed_at(nack, t0 + REPEAT),
            Say::Again { since_last: 50 }
        );
        let over = log.succeeded();
        assert_eq!(over.len(), 1, "{over:?}");
        assert_eq!((over[0].code, over[0].failures), (nack, 51));
        assert!(log.succeeded().is_empty());
        assert_eq!(log.failed_at(nack, t0 + REPEAT), Say::First);
    }
}
