//! The sentence and the advice for each error code, in one table: what the
//! web console (and later the REST API) shows beside a code. README's
//! "Error codes" tables say the same in more words; a test holds every code
//! to having both texts here.

use crate::error_code::ErrorCode;

impl ErrorCode {
    /// What happened, in one sentence.
    pub fn sentence(self) -> &'static str {
        help(self).0
    }

    /// What the operator should do about it.
    pub fn what_to_do(self) -> &'static str {
        help(self).1
    }
}

fn help(code: ErrorCode) -> (&'static str, &'static str) {
    use ErrorCode::*;
    match code {
        UnknownFileId => (
            "The receiving node has no receive profile for this file id.",
            "Add a receive profile for the file id on the receiving node (or fix the sender's file id), then resend.",
        ),
        SenderNotAllowed => (
            "The sending node is not in the receive profile's `from` list.",
            "Add the sender to the profile's `from` if it may send this file id, then resend.",
        ),
        SenderMismatch => (
            "A message named another node than the broker user that published it.",
            "Look at who holds that node's broker credentials; the message was dead-lettered untouched.",
        ),
        BadFileName => (
            "The file name is not a plain base name (a separator, `..`, a leading dot or dash, a control or format character).",
            "Rename the file at the sender to a plain name, then send it again.",
        ),
        BadMetadata => (
            "The transfer's metadata breaks the rules of `--meta`.",
            "Fix the keys and values the sender gives (letters, digits and _, one line each), then send again.",
        ),
        FileTooLarge => (
            "The declared size is over the receive profile's `max_size`.",
            "Raise `max_size` on the receiving node if the file is expected, then resend.",
        ),
        ChunkOutOfRange => (
            "A chunk lay outside the declared size of its transfer.",
            "Look at who can publish to the broker, then resend the file.",
        ),
        InconsistentChunk => (
            "A chunk disagreed with its transfer (or its compressed content did not inflate to its length).",
            "Look at who can publish to the broker, then resend the file.",
        ),
        SizeMismatch => (
            "The assembled file does not have the size the sender declared.",
            "Resend the file; if it happens again, check the sender's disk and the broker.",
        ),
        Sha256Mismatch => (
            "The assembled file's SHA-256 is not the one the sender declared.",
            "Resend the file; if it happens again, check the sender's disk and the broker.",
        ),
        FileExists => (
            "The receive profile's mode is `new` and the inbox already has a file of that name.",
            "Move the existing file away (or change the profile's mode), then resend.",
        ),
        DiskFull => (
            "The receiving node's inbox filesystem is full.",
            "Free space on the receiving node; a send profile's `retry:` sends the file again, or resend it.",
        ),
        IoError => (
            "The file could not be read or written.",
            "Read the agent's log for the path and the system's message, fix it, then resend.",
        ),
        HookFailed => (
            "The success hook exited with a non-zero status.",
            "Read the hook's output (on the transfer's page; its log is in state_dir/logs), fix the job, then rerun it.",
        ),
        HookTimeout => (
            "The success hook ran longer than its timeout and was stopped.",
            "Make the job faster or raise the hook's `timeout`, then rerun it.",
        ),
        HookInterrupted => (
            "The agent stopped while the hook ran, so its outcome is unknown.",
            "Check whether the job's work was done; rerun it if not.",
        ),
        TransferExpired => (
            "No chunk arrived for the profile's `partial_ttl`: the sender stopped and the partial file was removed.",
            "Check the sending agent; a send profile's `retry:` sends the file again, or resend it.",
        ),
        ReceiptTimeout => (
            "No receipt came back within the send profile's `receipt_timeout`; the file stays in the spool and the transfer still waits for it.",
            "Check the receiving agent and its broker connection; once it runs again its receipt settles the transfer (success hook and `after_send` as usual).",
        ),
        SpoolUnreadable => (
            "The sender's spooled copy of the file disappeared.",
            "Send the file again with `hakobu send` (or drop it into the outbox again).",
        ),
        UnsafeInbox => (
            "The receiver found a link or a foreign file where it keeps or places files; nothing was written through it.",
            "Remove the link or file named in the error, then resend.",
        ),
        UnsafeSource => (
            "The claimed file was not the regular file the watcher saw; nothing of it was sent.",
            "Copy the file into the outbox; do not link it.",
        ),
        DecryptFailed => (
            "An encrypted chunk did not open with this node's private key.",
            "Give the sender the public key `hakobu keygen` printed for this node, then resend; otherwise look at who can publish to the broker.",
        ),
        EncryptionRequired => (
            "The receive profile requires encryption and an unencrypted chunk arrived.",
            "Set `encrypt: true` on the sender's profile, then resend.",
        ),
        PeerKeyMissing => (
            "The encrypting send profile has no public key for the receiving node.",
            "Add the receiving node's public key under `keys.peers`, then resend.",
        ),
        BeforeSendFailed => (
            "The send profile's `before_send` job failed or timed out; nothing was sent.",
            "Fix the job (its log is state_dir/logs/<transfer_id>.before_send.log), then resend.",
        ),
        RequestDenied => (
            "The asked node's send profile does not list the requesting node in `requests_from`.",
            "Add the requesting node to `requests_from` on the sending node, then ask again.",
        ),
        NothingToSend => (
            "The request found no ready file in the outbox and no `source` to send.",
            "Let the export finish (or add a `before_send` job that writes it), then ask again.",
        ),
        RequestInterrupted => (
            "The asked node's agent stopped while it served the request.",
            "Ask again once that agent runs.",
        ),
        ConversionFailed => (
            "Code conversion (`convert:`) met a byte it cannot decode or a character it cannot encode.",
            "Fix the file at the offset the error names (or set `on_error: replace`), then resend.",
        ),
        BadReceiveName => (
            "The receive profile's `name:` template made a name that is not a plain base name.",
            "Fix the template or the sender's `--meta`, then resend.",
        ),
        MalformedMessage => (
            "A message could not be parsed or names no usable transfer; it was dead-lettered.",
            "Look at who publishes to the broker; nothing else is needed.",
        ),
        UnsupportedVersion => (
            "A message came in a wire version this agent does not know: a newer hakobu sent it; it was dead-lettered.",
            "Upgrade this agent (upgrade receivers before senders), then have the sender resend the transfer.",
        ),
        ClaimFailed => (
            "A ready file could not be renamed into the spool.",
            "Put the spool on the outbox's filesystem and check the agent's rights on both.",
        ),
        StateDbError => (
            "The state database failed a statement.",
            "The step is retried; if it keeps failing, check the disk of state_dir.",
        ),
        StateDbFlushFailed => (
            "The state database could not be flushed to disk; the agent stopped.",
            "Fix the disk of state_dir, then start the agent again.",
        ),
        StateDbTooNew => (
            "The state database was written by a newer hakobu.",
            "Run the newer hakobu (or restore the database it wrote over).",
        ),
        BrokerUnavailable => (
            "No broker node could be reached.",
            "Start the broker or fix the network; the agent reconnects by itself.",
        ),
        BrokerNack => (
            "The broker refused a publish.",
            "Nothing: it is published again; check the broker's log if it repeats.",
        ),
        BrokerConfirmTimeout => (
            "The broker did not confirm a publish in time.",
            "Nothing: it is published again; check the broker's load if it repeats.",
        ),
        BrokerConnectionLost => (
            "The connection to the broker was lost.",
            "Nothing: the agent reconnects and retries; check the broker if it repeats.",
        ),
        BrokerUnresponsive => (
            "The embedded broker has confirmed nothing for a while; the agent waits for it.",
            "Check that the `hakobu broker` process runs (not stopped: kill -CONT) and its disk answers, or that the receiver drains a full queue; the transfer resumes by itself.",
        ),
        BrokerBlocked => (
            "RabbitMQ blocks publishing: a node of the cluster is short of disk or memory (a resource alarm). Files are received and placed meanwhile; sending and receipts wait.",
            "Free disk space or memory on the RabbitMQ node in alarm (`rabbitmq-diagnostics alarms`), or drain its queues; publishing resumes by itself when the alarm clears.",
        ),
        AlertsSuppressed => (
            "Refused transfers came faster than 10 a minute; their failure hooks were not run.",
            "Look at the refused transfers in history and at who sends them.",
        ),
        UnexpectedReceipt => (
            "A receipt came from a node the transfer was not sent to; it changed nothing.",
            "Nothing; look at who publishes to the broker if it repeats.",
        ),
        RequestTimeout => (
            "`hakobu request --wait --timeout` gave up before the reply or the files came (`hakobu send --wait --timeout`: before the receipt).",
            "Check that the other node's agent runs; `hakobu history` shows what arrived later.",
        ),
        AgentStopped => (
            "`hakobu send --wait` or `hakobu request --wait` stopped waiting: no agent has run on its state directory for 10 s. Nothing is lost; the transfer goes on when the agent runs again.",
            "Start the agent (`hakobu run -c FILE`, or its service), then follow the transfer with `hakobu history`.",
        ),
        Unauthorized => (
            "The request had no valid token or session (or a console change lacked its header).",
            "Sign in with the token of http.token_file, or send it as `Authorization: Bearer TOKEN`.",
        ),
        BadRequest => (
            "The API call's path, query string or body breaks its rules.",
            "Read the message: it names the part; /api/openapi.json describes every call.",
        ),
        NotFound => (
            "The API call names a request, profile or path this node does not have.",
            "Check the id or file id, and the node you asked; /api/openapi.json lists the paths.",
        ),
        BadParentId => (
            "A parent (--parent, HAKOBU_TRANSFER_ID, a done marker's parent=) is not a transfer id.",
            "Give a transfer id as `hakobu history` shows it, or `--parent none`.",
        ),
        UnknownTransfer => (
            "No transfer with this id is in this node's history.",
            "Check the transfer id (`hakobu history` lists them) and the node you asked.",
        ),
        ActionRefused => (
            "The action does not apply to the transfer as it stands now.",
            "Wait until the transfer has settled (or pick one this node sent), then try again.",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_sentence_and_advice() {
        for c in ErrorCode::ALL {
            for text in [c.sentence(), c.what_to_do()] {
                assert!(text.len() > 15, "{c}: {text:?}");
                assert!(text.ends_with('.'), "{c}: a sentence ends with a full stop");
            }
        }
    }
}
