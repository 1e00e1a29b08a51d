//! The pre-send job (HULFT's 配信前ジョブ): a send profile's `before_send`
//! hook, run before the file is read for sending, with `HAKOBU_PATH` naming
//! the file that will be read: the spooled copy of an outbox file, or the
//! profile's `source` before it is copied into the spool. The job may create
//! or rewrite that file. A non-zero exit (or a timeout) fails the transfer
//! with `before_send_failed`: nothing is sent, the sender's failure hook
//! runs, and the file (when there is one) stays in the spool for `hakobu
//! resend`.

use std::path::Path;

use tracing::{info, warn};

use super::Sender;
use crate::clock::now_rfc3339;
use crate::config::SendProfile;
use crate::domain::{NodeName, TransferId};
use crate::error_code::ErrorCode;
use crate::hooks::{self, Event, HookContext};

impl Sender {
    /// Runs `profile`'s `before_send` (if it has one) for the transfer `tid`
    /// of `path`, to arrive as `name` at `peers`. `Err` holds the sentence
    /// of a `before_send_failed`.
    pub(super) async fn before_send(
        &self,
        profile: &SendProfile,
        (tid, name, path): (&TransferId, &str, &Path),
        peers: &[NodeName],
    ) -> Result<(), String> {
        let Some(spec) = &profile.before_send else {
            return Ok(());
        };
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let ctx = HookContext {
            event: Event::BeforeSend,
            node: self.cfg.node.to_string(),
            peer: peers
                .iter()
                .map(NodeName::as_str)
                .collect::<Vec<_>>()
                .join(","),
            file_id: profile.file_id.to_string(),
            transfer_id: tid.to_string(),
            file_name: name.to_string(),
            path: path.to_string_lossy().into_owned(),
            size,
            sha256: String::new(),
            started_at: now_rfc3339(),
            finished_at: String::new(),
            error_code: None,
            error: None,
            meta: Default::default(),
            attempt: 1,
            placed_sha256: None,
            records: None,
        };
        let log = hooks::log_path(&self.cfg.log_dir(), tid, Event::BeforeSend);
        // With the job's own `retry:`, a failing run is run again first.
        let Some(outcome) = hooks::run_retrying(spec, &ctx, &log, &self.stop, None).await else {
            return Err(format!(
                "the agent stopped while the before_send job waited to run again; nothing was sent: `hakobu resend {tid}`"
            ));
        };
        if outcome.ok() {
            info!(message = "before_send ran.", transfer_id = %tid, file_id = %profile.file_id, ms = outcome.duration.as_millis() as u64);
            return Ok(());
        }
        let why = format!(
            "the before_send job failed ({}); nothing was sent: fix the job, then `hakobu resend {tid}` (or ask again)",
            outcome.describe()
        );
        warn!(message = "before_send failed; not sending.", transfer_id = %tid, file_id = %profile.file_id,
            error_code = %ErrorCode::BeforeSendFailed, error = %why);
        Err(why)
    }
}
