//! `hakobu rerun`: runs a settled transfer's hook again, recorded the way
//! the agent records a hook: `hook_running` before the hook starts (so that
//! a rerun cut off shows as `hook_interrupted` once an agent starts), and
//! the outcome only if the row is still the rerun's when the hook ends.

use crate::config::{Config, HookSpec};
use crate::domain::TransferId;
use crate::error_code::ErrorCode;
use crate::hooks::{self, Event, HookContext, HookOutcome};
use crate::store::{Entry, Status, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RerunError {
    #[error("no transfer {0} in the history of this state directory")]
    NotFound(TransferId),
    #[error(
        "transfer {0} is still {1} and the agent is working on it; rerun it once it has settled"
    )]
    NotSettled(TransferId, &'static str),
    #[error(
        "the running agent has not yet sent the receipt of transfer {0}; rerun it once `hakobu history` shows it sent"
    )]
    ReceiptPending(TransferId),
    #[error("no {0} profile for file id {1} in the configuration")]
    NoProfile(&'static str, String),
    #[error(
        "transfer {0} changed while the rerun started (its status is no longer {1}); look at `hakobu history` and try again"
    )]
    Changed(TransferId, &'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a rerun did.
pub enum Rerun {
    /// The profile has no hook for the transfer's outcome.
    NoHook(Event),
    /// The hook ran; `recorded` is false when the agent took the transfer
    /// over meanwhile (its history says what happened).
    Ran {
        event: Event,
        outcome: HookOutcome,
        recorded: bool,
    },
}

/// Reruns the hook of transfer `tid` (its first row: the receiving side's
/// when this node both sent and received it). `agent_running`: an agent
/// holds this state directory now.
pub async fn rerun(
    cfg: &Config,
    store: &Store,
    tid: &TransferId,
    agent_running: bool,
) -> Result<Rerun, RerunError> {
    let rows = store.find(tid).await?;
    let Some(entry) = rows.into_iter().next() else {
        return Err(RerunError::NotFound(tid.clone()));
    };
    let t = entry.transfer();
    let was = t.status;
    if !was.is_final() {
        return Err(RerunError::NotSettled(tid.clone(), was.as_str()));
    }
    if agent_running {
        // The agent must have nothing left to do with the transfer while
        // its row says `hook_running`: the receiver its receipt, the sender
        // the receipts of the other nodes (then `after_send`).
        match &entry {
            Entry::Receive(r) if !r.receipt_sent => {
                return Err(RerunError::ReceiptPending(tid.clone()));
            }
            Entry::Send(_) => {
                let rows = store.sending().rows_of(tid).await?;
                if let Some(r) = rows.iter().find(|r| !r.status.is_final()) {
                    return Err(RerunError::NotSettled(tid.clone(), r.status.as_str()));
                }
            }
            Entry::Receive(_) => {}
        }
    }
    let (event, spec) = hook_of(cfg, &entry)?;
    let Some(spec) = spec else {
        return Ok(Rerun::NoHook(event));
    };
    let key = (&t.transfer_id, &t.peer);
    let side = store.side(entry.direction());
    if !side.advance(key, was, Status::HookRunning).await? {
        return Err(RerunError::Changed(tid.clone(), was.as_str()));
    }
    let ctx = match &entry {
        Entry::Send(s) => HookContext::for_sent(s, &cfg.node, event),
        Entry::Receive(r) => HookContext::for_received(r, &cfg.node, event),
    };
    let log = hooks::log_path(&cfg.log_dir(), tid, event);
    // The hook's `retry:` holds here too; nothing stops the waits but the
    // command's end (a rerun cut off shows as `hook_interrupted`).
    let never = tokio_util::sync::CancellationToken::new();
    let Some(outcome) = hooks::run_retrying(spec, &ctx, &log, &never, Some((&side, key))).await
    else {
        return Err(RerunError::Changed(
            tid.clone(),
            Status::HookRunning.as_str(),
        ));
    };
    let (status, error) = after_rerun(event, was, &outcome);
    let recorded = side
        .finish_hook(key, outcome.record(), status, error)
        .await?;
    Ok(Rerun::Ran {
        event,
        outcome,
        recorded,
    })
}

/// The event a rerun repeats and its hook: the success hook of a transfer
/// that was placed or delivered (whatever became of its hook), the failure
/// hook otherwise.
fn hook_of<'c>(
    cfg: &'c Config,
    entry: &Entry,
) -> Result<(Event, Option<&'c HookSpec>), RerunError> {
    let file_id = &entry.transfer().file_id;
    Ok(match entry {
        Entry::Receive(r) => {
            let p = cfg
                .receive_profile(file_id)
                .ok_or_else(|| RerunError::NoProfile("receive", file_id.to_string()))?;
            if r.status == Status::ReceiveFailed {
                (Event::ReceiveFailed, p.on_failure.as_ref())
            } else {
                (Event::Received, p.on_success.as_ref())
            }
        }
        Entry::Send(s) => {
            let p = cfg
                .send_profile(file_id)
                .ok_or_else(|| RerunError::NoProfile("send", file_id.to_string()))?;
            if s.delivered {
                (Event::Sent, p.on_success.as_ref())
            } else {
                (Event::SendFailed, p.on_failure.as_ref())
            }
        }
    })
}

/// The status a rerun leaves: a success hook decides between success and
/// `hook_failed`; a failure hook leaves the transfer as it was.
fn after_rerun(
    event: Event,
    was: Status,
    outcome: &HookOutcome,
) -> (Status, Option<(ErrorCode, String)>) {
    match (event, outcome.ok()) {
        (Event::Received, true) => (Status::Received, None),
        (Event::Sent, true) => (Status::Sent, None),
        (Event::Received | Event::Sent, false) => (Status::HookFailed, Some(outcome.failure())),
        (Event::ReceiveFailed | Event::SendFailed | Event::BeforeSend, _) => (was, None),
    }
}
