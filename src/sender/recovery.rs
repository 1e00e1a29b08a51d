//! Recovery: at start-up, resume the last run's work from the ledger and the
//! spool: files claimed but not recorded, transfers mid-publish, hooks
//! interrupted, and spooled files whose transfer is settled.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{info, warn};

use super::Sender;
use super::claim::claim_rows;
use crate::domain::TransferId;
use crate::error_code::ErrorCode;
use crate::store::{Status, StoreError};

impl Sender {
    pub(super) async fn resume(self: &Arc<Self>) -> Result<(), StoreError> {
        // A crash between the last receipt and `after_send` left the file.
        for tid in self.adopt_spool_orphans().await? {
            self.settle_spool(&tid).await;
        }
        for row in self.ledger.unfinished().await? {
            match row.status {
                Status::Sending => self.enqueue(&row),
                Status::HookRunning => {
                    warn!(message = "A sender hook was running when the agent stopped; not re-running it.", transfer_id = %row.transfer_id);
                    let why = "the agent stopped while the hook ran; run `hakobu rerun` if it should run again";
                    self.ledger
                        .fail(
                            (&row.transfer_id, &row.peer),
                            Status::HookInterrupted,
                            (ErrorCode::HookInterrupted, why),
                        )
                        .await?;
                    self.settle_spool(&row.transfer_id).await;
                }
                _ => {}
            }
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
                if !self.ledger.rows_of(&file.tid).await?.is_empty() {
                    settled.push(file.tid);
                    continue;
                }
                info!(message = "Recording a file claimed before a crash.", transfer_id = %file.tid, file_name = %file.name);
                let mut rows = claim_rows(profile, &file, &BTreeMap::new(), Status::Sending, None);
                if profile.before_send.is_some() {
                    // Its before_send job may not have finished: not sent as it stands.
                    let why = format!(
                        "the agent stopped before the before_send job finished; nothing was sent: `hakobu resend {}`",
                        file.tid
                    );
                    for row in &mut rows {
                        row.transfer.status = Status::SendFailed;
                        row.transfer.error_code =
                            Some(ErrorCode::BeforeSendFailed.as_str().to_string());
                        row.transfer.error = Some(why.clone());
                        row.transfer.finished_at = Some(crate::clock::now_rfc3339());
                    }
                }
                self.ledger.insert_all(rows).await?;
            }
        }
        Ok(settled)
    }
}
