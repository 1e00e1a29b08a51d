//! After send: once every receiver has settled a transfer, the spooled file
//! is deleted, kept, or moved (`after_send`). A file any receiver failed
//! stays in the spool, for `hakobu resend`.

use std::path::{Path, PathBuf};

use tracing::error;

use super::Sender;
use crate::config::AfterSend;
use crate::domain::TransferId;
use crate::durable;

impl Sender {
    /// Applies `after_send` to a transfer's spooled file once all its rows
    /// are final and delivered. One at a time: the receipts of a multicast
    /// transfer settle side by side, and only one may move the file.
    pub(super) async fn settle_spool(&self, tid: &TransferId) {
        let _one_at_a_time = self.settling.lock().await;
        // Every status read here was written by a call that waited.
        let Ok(rows) = self.ledger.deferred().rows_of(tid).await else {
            return;
        };
        if rows.is_empty()
            || !rows.iter().all(|r| r.status.is_final())
            || !rows.iter().all(|r| r.delivered)
        {
            return;
        }
        let path = rows[0].path.clone();
        // Settled before (by the other receipt of a multicast transfer):
        // the path now says where the file went.
        if !self.spool.holds(&path) {
            return;
        }
        let Some(profile) = self.cfg.send_profile(&rows[0].file_id) else {
            return;
        };
        let done = match &profile.after_send {
            AfterSend::Keep => Ok(()),
            AfterSend::Delete => durable::remove_if_exists(&path)
                .and_then(|()| self.spool.remove_transfer_dir(&path)),
            AfterSend::MoveTo(dir) => match move_to(&path, dir, &rows[0].file_name, tid) {
                Ok(target) => {
                    // History shows where the sent file went.
                    if let Some(target) = target {
                        let _ = self.ledger.moved(tid, &target).await;
                    }
                    self.spool.remove_transfer_dir(&path)
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = done {
            error!(message = "after_send failed; the file stays in the spool.", transfer_id = %tid, path = %path.display(), error = %e);
        }
    }
}

/// Moves a sent file into `dir` under its own name `name` (not the spool
/// entry's, which starts with the transfer id); a taken name gets the
/// transfer id appended. Returns where it went (`None` when it was moved
/// before).
fn move_to(
    path: &Path,
    dir: &Path,
    name: &str,
    tid: &TransferId,
) -> std::io::Result<Option<PathBuf>> {
    if !path.exists() {
        return Ok(None);
    }
    std::fs::create_dir_all(dir)?;
    let mut target = dir.join(name);
    if target.exists() {
        target = dir.join(format!("{name}.{tid}"));
    }
    match durable::rename_durable(path, &target) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            std::fs::copy(path, &target)?;
            std::fs::File::open(&target)?.sync_all()?;
            durable::fsync_dir(dir)?;
            std::fs::remove_file(path)?;
        }
        other => other?,
    }
    Ok(Some(target))
}
