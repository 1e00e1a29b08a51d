//! The failure hooks of refused transfers, rate-limited. A transfer refused
//! at admission (a sender not in `from`, an unknown file id, a bad name or
//! metadata, a declared size over `max_size`) costs its sender one small
//! message, and its failure hook is an alert, often a mail or a page: a
//! flood of forged transfers must not become a flood of alerts, nor of hook
//! processes. At most [`PER_WINDOW`] such hooks run per [`WINDOW`]; the
//! rest are recorded as refused (history, receipt) without their hook, and
//! the log says how many were suppressed when the window ends.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::error_code::ErrorCode;

/// Failure hooks of refused transfers that run in one window.
pub const PER_WINDOW: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// True for the codes of a transfer refused before any of its data was
/// accepted: the ones a sender can produce at will, one message each.
pub fn is_refusal(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::SenderNotAllowed
            | ErrorCode::UnknownFileId
            | ErrorCode::BadFileName
            | ErrorCode::BadMetadata
            | ErrorCode::FileTooLarge
    )
}

pub struct AlertLimit {
    state: Arc<Mutex<State>>,
    per_window: u32,
    window: Duration,
}

impl Default for AlertLimit {
    fn default() -> Self {
        AlertLimit::new(PER_WINDOW, WINDOW)
    }
}

#[derive(Default)]
struct State {
    /// Start of the current window; `None` before the first refusal.
    started: Option<Instant>,
    ran: u32,
    /// Suppressed since the last report.
    unreported: u64,
}

impl AlertLimit {
    pub fn new(per_window: u32, window: Duration) -> Self {
        AlertLimit {
            state: Default::default(),
            per_window,
            window,
        }
    }

    /// Whether the failure hook of one more refused transfer may run now.
    /// The first suppression of a window schedules the report of how many
    /// were suppressed, logged when the window ends.
    pub fn admit(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let started = match s.started {
            Some(t) if now.duration_since(t) < self.window => t,
            _ => {
                s.started = Some(now);
                s.ran = 0;
                now
            }
        };
        if s.ran < self.per_window {
            s.ran += 1;
            return true;
        }
        s.unreported += 1;
        if s.unreported == 1 {
            warn!(
                message = "Refused transfers are arriving fast: their failure hooks are suppressed until the window ends. Find the sender in history (status receive_failed).",
                per_window = self.per_window,
                window_s = self.window.as_secs(),
                error_code = %ErrorCode::AlertsSuppressed
            );
            let (state, end) = (self.state.clone(), started + self.window);
            tokio::spawn(async move {
                tokio::time::sleep_until(end).await;
                let n =
                    std::mem::take(&mut state.lock().unwrap_or_else(|p| p.into_inner()).unreported);
                warn!(
                    message = "Failure hooks of refused transfers suppressed in the last window; each is in history.",
                    suppressed = n,
                    error_code = %ErrorCode::AlertsSuppressed
                );
            });
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_window_runs_a_bounded_number_then_resets() {
        let window = Duration::from_millis(300);
        let limit = AlertLimit::new(3, window);
        let ran = (0..100).filter(|_| limit.admit()).count();
        assert_eq!(ran, 3);
        assert_eq!(limit.state.lock().unwrap().unreported, 97);
        tokio::time::sleep(window + Duration::from_millis(100)).await;
        assert_eq!(limit.state.lock().unwrap().unreported, 0, "reported");
        assert!(limit.admit(), "a new window runs hooks again");
    }
}
