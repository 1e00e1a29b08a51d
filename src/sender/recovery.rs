//! Recovery: at start-up, resume the last run's work from the ledger and the
//! spool: files claimed but not recorded, transfers mid-publish, hooks
//! interrupted, and spooled files whose transfer is settled.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

use super::Sender;
use super::claim::{claim_rows, convert_claimed, sized_rows};
use super::convert;
use super::spool::Spooled;
use crate::config::SendProfile;
use crate::domain::TransferId;
use crate::error_code::ErrorCode;
use crate::store::{Status, StoreError};

impl Sender {
    pub(super) async fn resume(self: &Arc<Self>) -> Result<(), StoreError> {
        // A crash between the last receipt and `after_send` left the file.
        for tid in self.adopt_spool_orphans().await? {
            self.settle_spool(&tid).await;
        }
        // Transfers mid-publish: the refiller takes them from the ledger,
        // a window at a time (`backlog.rs`), however many there are.
        self.publishing.all_waiting();
        for row in self.ledger.in_status(Status::HookRunning).await? {
            warn!(message = "A sender hook was running when the agent stopped; not re-running it.", transfer_id = %row.transfer_id);
            let why =
                "the agent stopped while the hook ran; run `hakobu rerun` if it should run again";
            self.ledger
                .fail(
                    (&row.transfer_id, &row.peer),
                    Status::HookInterrupted,
                    (ErrorCode::HookInterrupted, why),
                )
                .await?;
            self.settle_spool(&row.transfer_id).await;
        }
        Ok(())
    }

    /// A crash between claiming (the rename into the spool) and recording
    /// leaves a spooled file without rows: record it now. Returns the
    /// transfers that have rows, for `after_send` to look at.
    async fn adopt_spool_orphans(&self) -> Result<Vec<TransferId>, StoreError> {
        let mut settled = Vec::new();
        for profile in &self.cfg.send {
            for file in self.spool.entries(&profile.file_id) {
                let recorded = !self.ledger.rows_of(&file.tid).await?.is_empty();
                // A conversion cut short (`convert.rs`): finished or dropped.
                if profile.convert.is_some() && convert::has_leftover(&file) {
                    convert::finish_leftover(&file, recorded);
                }
                if recorded {
                    settled.push(file.tid);
                    continue;
                }
                info!(message = "Recording a file claimed before a crash.", transfer_id = %file.tid, file_name = %file.name);
                self.adopt(profile, file).await?;
            }
        }
        Ok(settled)
    }

    /// Records the rows of a spooled file that has none, converted first
    /// when its profile converts (as a claim does).
    async fn adopt(&self, profile: &SendProfile, file: Spooled) -> Result<(), StoreError> {
        if profile.to.is_empty() {
            // Claimed for a request: a profile without `to` claims for no
            // one else, and which node asked is in no row. Undone instead.
            put_back(profile, &file, &self.spool);
            return Ok(());
        }
        let mut refused = Vec::new();
        let (ok, pending) = if profile.before_send.is_some() {
            // Its before_send job may not have finished: not sent as it stands.
            let why = format!(
                "the agent stopped before the before_send job finished; nothing was sent: `hakobu resend {}`",
                file.tid
            );
            refused.push((file, ErrorCode::BeforeSendFailed, why));
            (Vec::new(), Vec::new())
        } else {
            convert_claimed(profile, vec![file], &mut refused).await
        };
        let hook = profile.on_failure.is_some();
        for (file, code, msg) in refused {
            let status = if hook {
                Status::HookRunning
            } else {
                Status::SendFailed
            };
            let mut rows = claim_rows(profile, &file, &BTreeMap::new(), status, None);
            for row in &mut rows {
                row.transfer.error_code = Some(code.as_str().to_string());
                row.transfer.error = Some(msg.clone());
                row.transfer.finished_at = (!hook).then(crate::clock::now_rfc3339);
            }
            self.ledger.insert_all(rows.clone()).await?;
            if hook {
                for row in rows {
                    self.run_hook(&row.transfer_id, &row.peer).await?;
                }
            }
        }
        for (file, conv) in ok.iter().zip(pending) {
            let converted = conv.as_ref().map(|p| &p.converted);
            let rows = sized_rows(
                profile,
                file,
                &BTreeMap::new(),
                (Status::Sending, None),
                converted,
            );
            self.ledger.insert_all(rows.clone()).await?;
            if let Some(Err(e)) = conv.as_ref().map(convert::Pending::commit) {
                // Never sent unconverted: failed, the original kept for `hakobu resend`.
                let code = ErrorCode::ConversionFailed;
                let msg = format!(
                    "cannot put the converted file in place in the spool: {e}; check the state directory, then resend"
                );
                warn!(message = "Cannot put a converted file in place in the spool.", transfer_id = %file.tid, error = %e);
                for row in rows {
                    let key = (&row.transfer_id, &row.peer);
                    self.ledger
                        .fail(key, Status::SendFailed, (code, &msg))
                        .await?;
                }
            }
        }
        Ok(())
    }
}

/// Undoes the claim of `file`, spooled for a request and not recorded: an
/// outbox file goes back to the outbox (with its done marker), ready for
/// the next request; a source's copy is dropped (the source stays). A file
/// of that name already back in the outbox keeps the spooled one where it
/// is, for the operator (logged).
fn put_back(profile: &SendProfile, file: &Spooled, spool: &super::spool::Spool) {
    let Some(outbox) = profile.outbox.as_deref() else {
        info!(message = "Dropping the copy of a source claimed for a request before a crash; the source stays.", transfer_id = %file.tid);
        let _ = crate::durable::remove_if_exists(&file.path);
        let _ = spool.remove_transfer_dir(&file.path);
        return;
    };
    let back = outbox.join(&file.name);
    if back.exists() {
        warn!(message = "A file claimed for a request before a crash cannot go back to the outbox: a file of its name is there. It stays in the spool.",
            transfer_id = %file.tid, path = %file.path.display());
        return;
    }
    match crate::durable::rename_durable(&file.path, &back) {
        Ok(()) => {
            if let crate::config::Ready::DoneMarker(marker) = &profile.ready {
                let _ = std::fs::write(outbox.join(format!("{}{marker}", file.name)), b"");
            }
            let _ = spool.remove_transfer_dir(&file.path);
            info!(message = "A file claimed for a request before a crash is back in the outbox, for the next request.", transfer_id = %file.tid, path = %back.display());
        }
        Err(e) => {
            warn!(message = "Cannot put a file claimed for a request back in the outbox; it stays in the spool.",
            transfer_id = %file.tid, path = %file.path.display(), error = %e)
        }
    }
}
