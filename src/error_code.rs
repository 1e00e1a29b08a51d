//! The one table of error codes. Every failure a user can see carries one of
//! these stable snake_case codes: in history (`error_code`), in a failure
//! receipt, as a hook's `HAKOBU_ERROR_CODE`, or in the log (`error_code=`).
//! README.md lists them in two tables, and a test holds the two in step.

use std::fmt;

/// Defines the enum, its list and its text in one place.
macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = $text:literal, $where:ident;)+) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)+
        }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $text,)+
                }
            }

            /// Where a user meets the code: a transfer's history, hooks and
            /// receipt, or only the agent's log.
            pub const fn seen_in(self) -> SeenIn {
                match self {
                    $(ErrorCode::$variant => SeenIn::$where,)+
                }
            }
        }
    };
}

/// Where an error code reaches the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeenIn {
    /// A transfer's history row, its failure hook and its receipt.
    History,
    /// The agent's log (and, for the command line, its message).
    Log,
}

codes! {
    /// No receive profile for the file id.
    UnknownFileId = "unknown_file_id", History;
    /// The sender is not in the profile's `from`.
    SenderNotAllowed = "sender_not_allowed", History;
    /// The broker authenticated another user than the node a message names.
    SenderMismatch = "sender_mismatch", Log;
    BadFileName = "bad_file_name", History;
    /// The transfer's metadata breaks the rules of `--meta`.
    BadMetadata = "bad_metadata", History;
    FileTooLarge = "file_too_large", History;
    ChunkOutOfRange = "chunk_out_of_range", History;
    InconsistentChunk = "inconsistent_chunk", History;
    SizeMismatch = "size_mismatch", History;
    Sha256Mismatch = "sha256_mismatch", History;
    FileExists = "file_exists", History;
    DiskFull = "disk_full", History;
    IoError = "io_error", History;
    HookFailed = "hook_failed", History;
    HookTimeout = "hook_timeout", History;
    HookInterrupted = "hook_interrupted", History;
    TransferExpired = "transfer_expired", History;
    SpoolUnreadable = "spool_unreadable", History;
    /// A link, a foreign directory or a non-regular file where the receiver
    /// keeps its partial files or places one.
    UnsafeInbox = "unsafe_inbox", History;
    /// The claimed file was swapped (a link, another inode, more links).
    UnsafeSource = "unsafe_source", History;
    /// A sealed chunk did not open: no or another private key, or changed on the way.
    DecryptFailed = "decrypt_failed", History;
    /// A plain chunk for a profile with `require_encryption`.
    EncryptionRequired = "encryption_required", History;
    /// An encrypting send profile has no public key for the receiving node.
    PeerKeyMissing = "peer_key_missing", History;
    /// A send profile's `before_send` job failed or timed out; nothing was sent.
    BeforeSendFailed = "before_send_failed", History;
    /// No receipt within the send profile's `receipt_timeout`: the failure
    /// hook ran once; the transfer still waits and completes if one comes.
    ReceiptTimeout = "receipt_timeout", History;
    /// A request from a node not in the send profile's `requests_from`.
    RequestDenied = "request_denied", History;
    /// A request found nothing to send (no ready file, no source).
    NothingToSend = "nothing_to_send", History;
    /// The asked node's agent stopped while it served the request.
    RequestInterrupted = "request_interrupted", History;
    /// Code conversion (`convert:`) met a byte it cannot decode or a
    /// character it cannot encode.
    ConversionFailed = "conversion_failed", History;
    /// A receive profile's `name:` template made a name that is not a plain base name.
    BadReceiveName = "bad_receive_name", History;
    /// A message that cannot be parsed, or names no usable transfer.
    MalformedMessage = "malformed_message", Log;
    /// A message framed by a newer hakobu (a wire version this one does
    /// not know): dead-lettered, never guessed at.
    UnsupportedVersion = "unsupported_version", Log;
    ClaimFailed = "claim_failed", Log;
    StateDbError = "state_db_error", Log;
    StateDbFlushFailed = "state_db_flush_failed", Log;
    /// The state database was written by a newer hakobu.
    StateDbTooNew = "state_db_too_new", Log;
    BrokerUnavailable = "broker_unavailable", Log;
    BrokerNack = "broker_nack", Log;
    BrokerConfirmTimeout = "broker_confirm_timeout", Log;
    BrokerConnectionLost = "broker_connection_lost", Log;
    /// The embedded broker confirms nothing for a while: hung, stopped or held back.
    BrokerUnresponsive = "broker_unresponsive", Log;
    /// RabbitMQ blocks publishing (a node's disk or memory alarm).
    BrokerBlocked = "broker_blocked", Log;
    /// Failure hooks of refused transfers suppressed by the rate limit.
    AlertsSuppressed = "alerts_suppressed", Log;
    /// A receipt from a node the transfer was not sent to: acked away, no effect.
    UnexpectedReceipt = "unexpected_receipt", Log;
    /// `hakobu request --wait` gave up: no reply, or the files not settled,
    /// in time (`hakobu send --wait --timeout`: no receipt in time).
    RequestTimeout = "request_timeout", Log;
    /// `hakobu send --wait` or `request --wait` saw no agent on its state
    /// directory for `AGENT_GONE_AFTER`: it stops waiting.
    AgentStopped = "agent_stopped", Log;
    /// An HTTP request without the token (or a session), or a console
    /// change without its header.
    Unauthorized = "unauthorized", Log;
    /// An API call whose path, query string or body breaks its rules.
    BadRequest = "bad_request", Log;
    /// An API call names a request, profile or path that is not here.
    NotFound = "not_found", Log;
    /// A parent id (`hakobu send --parent`, `HAKOBU_TRANSFER_ID`, a done
    /// marker's `parent=`) that is not a transfer id.
    BadParentId = "bad_parent_id", Log;
    /// A transfer this node has no row of: `hakobu history --chain`, the
    /// API's and the console's transfer pages and actions.
    UnknownTransfer = "unknown_transfer", Log;
    /// A rerun or resend that does not apply to the transfer as it stands
    /// (not settled, its receipt not yet sent, no spooled copy to resend).
    ActionRefused = "action_refused", Log;
}

impl ErrorCode {
    pub fn parse(text: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == text)
    }

    /// The code of a failed read or write: `disk_full` when the disk or
    /// the user's quota is full (ENOSPC, EDQUOT), `io_error` otherwise.
    pub fn of_io(e: &std::io::Error) -> ErrorCode {
        match e.raw_os_error() {
            Some(nix::libc::ENOSPC | nix::libc::EDQUOT) => ErrorCode::DiskFull,
            _ => ErrorCode::IoError,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The codes of the README table under `heading`: the first column of
    /// each row, where a cell may list several codes in backticks.
    fn readme_codes(heading: &str) -> BTreeSet<String> {
        let readme = include_str!("../README.md");
        let start = readme
            .find(heading)
            .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"));
        let mut codes = BTreeSet::new();
        let mut in_table = false;
        for line in readme[start..].lines().skip(1) {
            if line.starts_with("## ") || line.starts_with("### ") {
                break;
            }
            if !line.starts_with('|') {
                if in_table {
                    break;
                }
                continue;
            }
            in_table = true;
            let first = line.split('|').nth(1).unwrap_or_default();
            for (i, part) in first.split('`').enumerate() {
                if i % 2 == 1 {
                    codes.insert(part.to_string());
                }
            }
        }
        assert!(!codes.is_empty(), "no codes under {heading:?}");
        codes
    }

    fn ours(seen: SeenIn) -> BTreeSet<String> {
        ErrorCode::ALL
            .iter()
            .filter(|c| c.seen_in() == seen)
            .map(|c| c.as_str().to_string())
            .collect()
    }

    #[test]
    fn the_readme_lists_every_code_and_no_other() {
        assert_eq!(
            readme_codes("## Error codes"),
            ours(SeenIn::History),
            "README's table of error codes and ErrorCode disagree"
        );
        assert_eq!(
            readme_codes("### In the log"),
            ours(SeenIn::Log),
            "README's table of log-only error codes and ErrorCode disagree"
        );
    }

    #[test]
    fn codes_are_unique_snake_case_and_parse_back() {
        let mut seen = BTreeSet::new();
        for c in ErrorCode::ALL {
            let s = c.as_str();
            assert!(seen.insert(s), "{s} twice");
            assert!(
                s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{s}"
            );
            assert_eq!(ErrorCode::parse(s), Some(*c));
        }
        assert_eq!(ErrorCode::parse("no_such_code"), None);
    }
}
