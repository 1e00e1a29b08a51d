//! The operator's actions on a transfer, shared by the command line
//! (`hakobu rerun`, `hakobu resend`, `hakobu send`) and the web console's
//! buttons (the REST API will use them too): each returns a typed error
//! that carries a stable [`ErrorCode`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::domain::{NodeName, TransferId};
use crate::error_code::ErrorCode;
use crate::rerun::RerunError;
use crate::sender::QueueError;
use crate::sender::Spool;
use crate::store::{Store, StoreError};

pub use crate::rerun::Rerun;

/// Why an action was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Rerun(#[from] RerunError),
    #[error("no sent transfer {0} in the history of this state directory")]
    NotSent(TransferId),
    #[error(
        "the spooled copy {} is gone (after_send removed or moved it); send the file again with `hakobu send`",
        .0.display()
    )]
    SpoolGone(PathBuf),
    #[error("no send profile for file id `{file_id}` in {}", .config.display())]
    NoSendProfile { file_id: String, config: PathBuf },
    #[error(
        "file id `{0}` is sent encrypted and keys.peers has no public key for `{1}`; run `hakobu keygen` on {1} and add the key it prints"
    )]
    PeerKeyMissing(String, NodeName),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ActionError {
    /// The stable code a user sees beside the message.
    pub fn code(&self) -> ErrorCode {
        match self {
            ActionError::Rerun(RerunError::NotFound(_)) | ActionError::NotSent(_) => {
                ErrorCode::UnknownTransfer
            }
            ActionError::Rerun(
                RerunError::NotSettled(..)
                | RerunError::ReceiptPending(_)
                | RerunError::Changed(..),
            ) => ErrorCode::ActionRefused,
            ActionError::Rerun(RerunError::NoProfile(..)) | ActionError::NoSendProfile { .. } => {
                ErrorCode::UnknownFileId
            }
            ActionError::Rerun(RerunError::Store(e)) | ActionError::Store(e) => e.code(),
            ActionError::Queue(e) => e.code(),
            ActionError::SpoolGone(_) => ErrorCode::SpoolUnreadable,
            ActionError::PeerKeyMissing(..) => ErrorCode::PeerKeyMissing,
        }
    }

    /// The request was wrong (a usage error, exit 2 on the command line)
    /// rather than the work failing (exit 1).
    pub fn is_usage(&self) -> bool {
        match self {
            ActionError::Rerun(RerunError::Store(_)) => false,
            ActionError::Rerun(_) => true,
            ActionError::NotSent(_)
            | ActionError::NoSendProfile { .. }
            | ActionError::PeerKeyMissing(..) => true,
            ActionError::SpoolGone(_) | ActionError::Queue(_) | ActionError::Store(_) => false,
        }
    }
}

/// Runs transfer `tid`'s hook again (`rerun.rs` does the work).
/// `agent_running`: an agent holds this state directory now (always true
/// from the console, which runs inside the agent).
pub async fn rerun(
    cfg: &Config,
    store: &Store,
    tid: &TransferId,
    agent_running: bool,
) -> Result<Rerun, ActionError> {
    Ok(crate::rerun::rerun(cfg, store, tid, agent_running).await?)
}

/// Sends the spooled copy of sent transfer `tid` again, as a new transfer
/// to each node it went to; returns the new transfers' ids.
pub async fn resend(
    cfg: &Config,
    store: &Store,
    tid: &TransferId,
) -> Result<Vec<TransferId>, ActionError> {
    let rows = store.sending().rows_of(tid).await?;
    let Some(row) = rows.first() else {
        return Err(ActionError::NotSent(tid.clone()));
    };
    if !row.path.is_file() {
        return Err(ActionError::SpoolGone(row.path.clone()));
    }
    let mut new_ids = Vec::new();
    for peer in rows.iter().map(|r| r.peer.clone()) {
        let src = (row.path.as_path(), row.file_name.as_str());
        new_ids.push(
            queue_copy(
                cfg,
                store,
                &row.file_id,
                src,
                (Some(peer), row.records.is_some()),
                (&row.meta, row.parent_id.as_ref()),
            )
            .await?,
        );
    }
    Ok(new_ids)
}

/// Copies a file into the spool as a queued transfer for the agent on this
/// state directory, to arrive as `name`; `to` replaces the profile's
/// receivers, `converted` says `convert:` already ran on it; `parent` is
/// the transfer that started this one (the job flow), if any.
pub async fn queue_copy(
    cfg: &Config,
    store: &Store,
    file_id: &str,
    (src, name): (&Path, &str),
    (to, converted): (Option<NodeName>, bool),
    (meta, parent): (&BTreeMap<String, String>, Option<&TransferId>),
) -> Result<TransferId, ActionError> {
    let mut profile =
        cfg.send_profile(file_id)
            .cloned()
            .ok_or_else(|| ActionError::NoSendProfile {
                file_id: file_id.to_string(),
                config: cfg.file.clone(),
            })?;
    if let Some(node) = to {
        if profile.encrypt && cfg.keys.peer(&node).is_none() {
            return Err(ActionError::PeerKeyMissing(file_id.to_string(), node));
        }
        profile.to = vec![node];
    }
    if converted {
        // A spooled file `convert:` already converted is sent as it is.
        profile.convert = None;
    }
    let spool = Spool::new(cfg.spool_dir());
    let ledger = store.sending();
    let queued = crate::sender::queue_child(&ledger, &spool, &profile, (src, name), meta, parent);
    Ok(queued.await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_their_codes() {
        let tid = TransferId::new();
        let cases = [
            (
                ActionError::Rerun(RerunError::NotFound(tid.clone())),
                ErrorCode::UnknownTransfer,
                true,
            ),
            (
                ActionError::Rerun(RerunError::NotSettled(tid.clone(), "receiving")),
                ErrorCode::ActionRefused,
                true,
            ),
            (
                ActionError::NotSent(tid.clone()),
                ErrorCode::UnknownTransfer,
                true,
            ),
            (
                ActionError::SpoolGone("/x".into()),
                ErrorCode::SpoolUnreadable,
                false,
            ),
            (
                ActionError::Queue(QueueError::Copy(
                    "/x".into(),
                    std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
                )),
                ErrorCode::DiskFull,
                false,
            ),
            (
                ActionError::Queue(QueueError::Copy(
                    "/x".into(),
                    std::io::Error::from_raw_os_error(nix::libc::EDQUOT),
                )),
                ErrorCode::DiskFull,
                false,
            ),
            (
                ActionError::Queue(QueueError::Copy(
                    "/x".into(),
                    std::io::Error::from_raw_os_error(nix::libc::EACCES),
                )),
                ErrorCode::IoError,
                false,
            ),
        ];
        for (e, code, usage) in cases {
            assert_eq!(e.code(), code, "{e}");
            assert_eq!(e.is_usage(), usage, "{e}");
        }
    }
}
