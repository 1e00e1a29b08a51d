//! A send profile's `retry: { attempts: N, backoff: 30s }`: a transfer whose
//! receipt carries a transient code (`disk_full`, `io_error`,
//! `transfer_expired`) is sent again, as the next try of the same transfer
//! (same id, `attempt` + 1 in its row, its chunks and its receipt). The row
//! goes back to `queued` with a due time (`backoff`, doubled after each
//! try); the queue poller publishes it once due, so the wait blocks nothing
//! and survives a restart. The spooled file stays (the row is not final),
//! and the failure hook runs only when the last try fails. Any other code
//! fails the transfer at once.
//!
//! The receiver restarts a transfer it failed when a chunk of a later try
//! arrives, and ignores chunks of an earlier one (`receiver/ingest.rs`); a
//! receipt settles only the try it names (`SendLedger::record_receipt`).

use tracing::{error, info};

use super::Sender;
use crate::error_code::ErrorCode;
use crate::wire::Receipt;

/// A failure the same file may get past when sent again later.
pub fn is_transient(code: Option<&str>) -> bool {
    matches!(
        code.and_then(ErrorCode::parse),
        Some(ErrorCode::DiskFull | ErrorCode::IoError | ErrorCode::TransferExpired)
    )
}

impl Sender {
    /// Takes a failure receipt as the end of one try when the profile's
    /// `retry:` leaves another and its code is transient: the row is queued
    /// again for after the backoff. True when it was (the receipt is then
    /// acked, and no hook runs); false when the receipt settles the
    /// transfer as usual. An error leaves the receipt unacked.
    pub(super) async fn retry_later(&self, r: &Receipt) -> Result<bool, ()> {
        if r.ok || !is_transient(r.error_code.as_deref()) {
            return Ok(false);
        }
        let Some(retry) = self.cfg.send_profile(&r.file_id).map(|p| p.retry) else {
            return Ok(false);
        };
        if r.attempt >= retry.attempts {
            return Ok(false);
        }
        let delay = retry.delay(r.attempt);
        match self.ledger.retry(r, retry.attempts, delay).await {
            Ok(true) => {
                info!(message = "Transient failure; the transfer is sent again after the backoff.",
                    transfer_id = %r.transfer_id, to = %r.from, error_code = ?r.error_code,
                    attempt = r.attempt, next = r.attempt + 1, attempts = retry.attempts,
                    backoff_ms = delay.as_millis() as u64);
                Ok(true)
            }
            // Not waiting for this try's receipt: the usual path says why.
            Ok(false) => Ok(false),
            Err(e) => {
                error!(message = "State database failed while queueing a retry.", error = %e, error_code = %e.code());
                Err(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_codes_are_retried() {
        for code in ["disk_full", "io_error", "transfer_expired"] {
            assert!(is_transient(Some(code)), "{code}");
        }
        for code in [
            "sha256_mismatch",
            "sender_not_allowed",
            "hook_failed",
            "nope",
        ] {
            assert!(!is_transient(Some(code)), "{code}");
        }
        assert!(!is_transient(None));
    }
}
