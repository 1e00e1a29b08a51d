//! Claim: a ready file leaves the outbox by an atomic rename into the spool,
//! under a new transfer id, and gets one ledger row per receiving node. The
//! rename is the one effect that comes before its row: a crash between the
//! two leaves a spooled file without rows, which recovery records
//! (`recovery.rs`). From the rename on, the file is never lost.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::Sender;
use super::spool::{Spool, Spooled};
use super::watch::ReadyFile;
use crate::clock::now_rfc3339;
use crate::config::{Ready, SendProfile};
use crate::domain::TransferId;
use crate::durable;
use crate::error_code::ErrorCode;
use crate::store::{SendLedger, SendRow, Status, StoreError, Transfer};

/// What a claim started: the transfers, and the first `before_send`
/// failure among them (for a request's reply).
#[derive(Default)]
pub(super) struct Started {
    pub tids: Vec<TransferId>,
    pub failed: Option<(ErrorCode, String)>,
}

impl Sender {
    /// Claims the ready files `names` from the profile's outbox, together:
    /// each is renamed into the spool (atomic), then the directories are
    /// flushed once for all of them, then each passes the profile's
    /// `before_send` job, then one row per file and receiving node is
    /// recorded in one transaction, then they are published. `request`
    /// marks files sent because a node asked for them.
    pub(super) async fn claim(
        self: &Arc<Self>,
        profile: &SendProfile,
        names: Vec<ReadyFile>,
        request: Option<&TransferId>,
    ) -> Started {
        self.claim_child(profile, names, (request, None)).await
    }

    /// [`Self::claim`] for `hakobu send` without a path (a `local` request)
    /// with a `parent`: the files' parent unless a done marker names one.
    pub(super) async fn claim_child(
        self: &Arc<Self>,
        profile: &SendProfile,
        names: Vec<ReadyFile>,
        (request, parent): (Option<&TransferId>, Option<&TransferId>),
    ) -> Started {
        let (p, spool) = (profile.clone(), self.spool.clone());
        let ((claimed, refused), parents) =
            tokio::task::spawn_blocking(move || claim_files(&p, &spool, &names))
                .await
                .unwrap_or_default();
        crate::failpoint::hit("sender.claim.renamed");
        let mut refused: Vec<(Spooled, ErrorCode, String)> = refused
            .into_iter()
            .map(|(file, why)| {
                warn!(message = "Refusing a claimed file that is not the file the watcher saw.",
                    transfer_id = %file.tid, error_code = %ErrorCode::UnsafeSource, error = %why);
                (file, ErrorCode::UnsafeSource, unsafe_source_message(&why))
            })
            .collect();
        let mut ready = Vec::new();
        for file in claimed {
            let job = (&file.tid, file.name.as_str(), file.path.as_path());
            match self.before_send(profile, job, &profile.to).await {
                Ok(()) => ready.push(file),
                Err(why) => refused.push((file, ErrorCode::BeforeSendFailed, why)),
            }
        }
        // Converted after the job, which may have rewritten the file.
        let (ready, pending) = convert_claimed(profile, ready, &mut refused).await;
        let mut rows: Vec<SendRow> = ready
            .iter()
            .zip(&pending)
            .flat_map(|(file, conv)| {
                let converted = conv.as_ref().map(|p| &p.converted);
                let status = Status::Sending;
                sized_rows(
                    profile,
                    file,
                    &BTreeMap::new(),
                    (status, request),
                    converted,
                )
            })
            .collect();
        for (file, code, why) in &refused {
            rows.extend(self.failed_rows(profile, file, request, (*code, why)));
        }
        let started = Started {
            tids: ready
                .iter()
                .chain(refused.iter().map(|r| &r.0))
                .map(|f| f.tid.clone())
                .collect(),
            failed: refused.first().map(|r| (r.1, r.2.clone())),
        };
        if rows.is_empty() {
            return started;
        }
        for row in &mut rows {
            let marked = parents.get(&row.transfer_id);
            row.transfer.parent_id = marked.or(parent).cloned();
        }
        if !self.record_claimed(&rows).await {
            pending
                .iter()
                .flatten()
                .for_each(super::convert::Pending::discard);
            return Started::default();
        }
        // The rows record the converted files: they take their names now.
        let mut unplaced = HashSet::new();
        for (file, conv) in ready.iter().zip(&pending) {
            if let Some(Err(e)) = conv.as_ref().map(super::convert::Pending::commit) {
                error!(message = "Cannot put a converted file in place in the spool; it is put there at the next start.",
                    transfer_id = %file.tid, error = %e);
                unplaced.insert(file.tid.clone());
            }
        }
        rows.retain(|r| !unplaced.contains(&r.transfer_id));
        for file in &ready {
            info!(message = "Claimed.", transfer_id = %file.tid, file_id = %profile.file_id, file_name = %file.name);
        }
        self.start_rows(&rows);
        started
    }

    /// Records the rows of claimed files. While the state database cannot
    /// (its disk is full, say) the files wait in the spool and recording is
    /// tried again, backing off up to [`RECORD_RETRY_MAX`]; the caller (an
    /// outbox's watcher, a request) waits with them, so nothing more is
    /// claimed meanwhile. False only when the agent stops first: the files
    /// are recorded at its next start (`recovery.rs`).
    async fn record_claimed(&self, rows: &[SendRow]) -> bool {
        let since = Instant::now();
        let mut wait = Duration::from_secs(1);
        let mut told: Option<Instant> = None;
        loop {
            match self.ledger.insert_all(rows.to_vec()).await {
                Ok(()) => {
                    if told.is_some() {
                        info!(
                            message = "Recorded the claimed files that were waiting.",
                            files = rows.len(),
                            waited_s = since.elapsed().as_secs()
                        );
                    }
                    return true;
                }
                // Said once a minute, not at every try.
                Err(e) if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) => {
                    error!(message = "Cannot record claimed files; they wait in the spool, nothing more is claimed, and recording is tried again. Free space in the state directory (or mend what the error says).",
                        files = rows.len(), error = %e, error_code = %e.code(),
                        transfer_ids = ?rows.iter().map(|r| r.transfer_id.as_str()).collect::<Vec<_>>());
                    told = Some(Instant::now());
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = self.stop.cancelled() => {
                    warn!(message = "Stopping with claimed files not recorded; they are recorded at the next start.", files = rows.len());
                    return false;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RECORD_RETRY_MAX);
        }
    }

    /// The rows of a file that fails before it is sent (`unsafe_source`,
    /// `before_send_failed`), recorded failed from the start: no crash can
    /// leave one `sending`, to be published at the next start. With a
    /// failure hook they wait in `hook_running` for it.
    pub(super) fn failed_rows(
        &self,
        profile: &SendProfile,
        file: &Spooled,
        request: Option<&TransferId>,
        (code, why): (ErrorCode, &str),
    ) -> Vec<SendRow> {
        let hook = profile.on_failure.is_some();
        let status = if hook {
            Status::HookRunning
        } else {
            Status::SendFailed
        };
        let mut rows = claim_rows(profile, file, &BTreeMap::new(), status, request);
        for row in &mut rows {
            row.transfer.error_code = Some(code.as_str().to_string());
            row.transfer.error = Some(why.to_string());
            row.transfer.finished_at = (!hook).then(now_rfc3339);
        }
        rows
    }

    /// Starts recorded rows: those `sending` are published, those waiting
    /// for their failure hook get it (off the caller's loop, like a
    /// receipt's hook).
    pub(super) fn start_rows(self: &Arc<Self>, rows: &[SendRow]) {
        for row in rows {
            if row.status == Status::Sending {
                self.enqueue(row);
            } else if row.status == Status::HookRunning {
                let (this, key) = (self.clone(), (row.transfer_id.clone(), row.peer.clone()));
                self.tasks.spawn(async move {
                    if let Err(e) = this.run_hook(&key.0, &key.1).await {
                        error!(message = "State database failed while running a sender hook.", error = %e, error_code = %e.code());
                    }
                });
            }
        }
    }

    /// Fails a transfer whose claimed file is not the regular file the
    /// watcher saw (`unsafe_source`), then runs the profile's failure hook.
    /// Nothing of the file is sent.
    pub(super) async fn refuse_source(&self, row: &SendRow, why: &str) {
        let key = (&row.transfer_id, &row.peer);
        let hook = self
            .cfg
            .send_profile(&row.file_id)
            .is_some_and(|p| p.on_failure.is_some());
        let status = if hook {
            Status::HookRunning
        } else {
            Status::SendFailed
        };
        let code = ErrorCode::UnsafeSource;
        let msg = unsafe_source_message(why);
        warn!(message = "Refusing a spooled file that is not the file the watcher saw.",
            transfer_id = %row.transfer_id, to = %row.peer, error_code = %code, error = %msg);
        if let Err(e) = self.ledger.fail(key, status, (code, &msg)).await {
            error!(message = "State database failed while refusing a claimed file.", error = %e, error_code = %e.code());
            return;
        }
        if hook {
            if let Err(e) = self.run_hook(&row.transfer_id, &row.peer).await {
                error!(message = "State database failed while running a sender hook.", error = %e, error_code = %e.code());
            }
        }
    }
}

fn unsafe_source_message(why: &str) -> String {
    format!(
        "{why}; nothing of it was sent: put a regular file of its own into the outbox (copy it, do not link it), then send it again"
    )
}

/// Checks what the claim's rename brought into the spool (where nobody else
/// can change it): the regular file, with one link, whose inode the watcher
/// saw. Otherwise the outbox's name was swapped between the watcher's look
/// and the rename (a link to a file only the agent may read, a hard link, a
/// device): what came in is removed when it is only a name (a link, a
/// second hard link, a special file) and kept when it is a file of its own,
/// and the transfer is refused.
fn check_claimed(path: &Path, seen_ino: u64) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| format!("the claimed file cannot be read back: {e}"))?;
    let why = if meta.file_type().is_symlink() {
        "the outbox's name was a link when it was claimed"
    } else if !meta.is_file() {
        "the outbox's name was not a regular file when it was claimed"
    } else if meta.nlink() != 1 {
        "the claimed file has other hard links"
    } else if meta.ino() != seen_ino {
        "the outbox's name was swapped for another file between the check and the claim"
    } else {
        return Ok(());
    };
    let only_a_name = !meta.is_dir() && (!meta.is_file() || meta.nlink() != 1);
    if only_a_name {
        let _ = durable::remove_if_exists(path);
    }
    Err(why.to_string())
}

/// The longest wait between two tries to record claimed files.
const RECORD_RETRY_MAX: Duration = Duration::from_secs(10);

/// Claimed files, and those refused with why (see [`check_claimed`]).
type Claims = (Vec<Spooled>, Vec<(Spooled, String)>);

/// The parents their done markers named (`marker.rs`), by transfer id.
type Parents = HashMap<TransferId, TransferId>;

/// Moves ready files from the outbox into the spool, each under a new
/// transfer id. The renames are made durable together (one flush per
/// directory, not per file). A done marker's `parent=` is read before the
/// marker goes (`marker.rs`).
fn claim_files(profile: &SendProfile, spool: &Spool, names: &[ReadyFile]) -> (Claims, Parents) {
    let file_dir = spool.dir_of(&profile.file_id);
    if let Err(e) = std::fs::create_dir_all(&file_dir) {
        error!(message = "Cannot create the spool directory; check the state directory's permissions and space.",
            dir = %file_dir.display(), error = %e, error_code = %ErrorCode::ClaimFailed);
        return Default::default();
    }
    let mut parents = Parents::new();
    let mut claimed = Vec::new();
    let mut refused = Vec::new();
    // Directories whose entries changed, flushed once each at the end: the
    // profile's spool directory, the outbox, and the directory of each file
    // whose name is too long for the flat layout.
    let Some(outbox) = profile.outbox.as_deref() else {
        return Default::default();
    };
    let mut changed: Vec<PathBuf> = vec![file_dir.clone(), outbox.to_path_buf()];
    for (name, seen_ino) in names {
        // The marker goes first: a crash after it leaves the file in the
        // outbox waiting for a new marker, never a stale marker that would
        // let the next file of that name be claimed half-written.
        let tid = TransferId::new();
        if let Ready::DoneMarker(marker) = &profile.ready {
            let marker = outbox.join(format!("{name}{marker}"));
            if let Some(parent) = super::marker::parent_of(&marker) {
                parents.insert(tid.clone(), parent);
            }
            let _ = durable::remove_if_exists(&marker);
        }
        let from = outbox.join(name);
        let to = spool.path_of(&profile.file_id, &tid, name);
        let own_dir = to.parent().filter(|d| *d != file_dir);
        let moved = own_dir
            .map_or(Ok(()), std::fs::create_dir)
            .and_then(|()| std::fs::rename(&from, &to));
        match moved {
            Ok(()) => {
                changed.extend(own_dir.map(Path::to_path_buf));
                let checked = check_claimed(&to, *seen_ino);
                let file = Spooled {
                    tid,
                    name: name.clone(),
                    path: to,
                };
                match checked {
                    Ok(()) => claimed.push(file),
                    Err(why) => refused.push((file, why)),
                }
            }
            Err(e) => {
                let _ = own_dir.map(std::fs::remove_dir);
                if e.kind() != std::io::ErrorKind::NotFound {
                    error!(message = "Cannot claim file into the spool; the spool must be on the outbox's filesystem.",
                        file = %from.display(), spool = %to.display(), error = %e, error_code = %ErrorCode::ClaimFailed);
                }
            }
        }
    }
    if claimed.is_empty() && refused.is_empty() {
        return ((claimed, refused), parents);
    }
    // On a journalling filesystem the first flush commits the journal for
    // all the renames and the rest find nothing left to write; without a
    // journal each directory is still flushed once per batch, not per file.
    for dir in changed {
        if let Err(e) = durable::fsync_dir(&dir) {
            // Not durable yet, but claimed: recorded and sent all the same.
            warn!(message = "Cannot flush a spool directory.", dir = %dir.display(), error = %e);
        }
    }
    ((claimed, refused), parents)
}

/// One row per receiving node for a file already in the spool.
pub(super) fn claim_rows(
    profile: &SendProfile,
    file: &Spooled,
    meta: &BTreeMap<String, String>,
    status: Status,
    request: Option<&TransferId>,
) -> Vec<SendRow> {
    let size = std::fs::symlink_metadata(&file.path)
        .map(|m| m.len())
        .unwrap_or(0);
    let started_at = now_rfc3339();
    profile
        .to
        .iter()
        .map(|peer| {
            let mut t = Transfer::begin(
                file.tid.clone(),
                peer.clone(),
                profile.file_id.clone(),
                &file.name,
                (size, profile.chunk_size),
                status,
            );
            t.meta = meta.clone();
            t.started_at = started_at.clone();
            t.request_id = request.cloned();
            SendRow::new(t, file.path.clone())
        })
        .collect()
}

/// Converts the claimed files of a converting profile (`convert.rs`): the
/// files that convert, each with its pending conversion (`None` when the
/// profile does not convert); those that do not go to `refused` with
/// `conversion_failed`, kept in the spool as they came.
pub(super) async fn convert_claimed(
    profile: &SendProfile,
    claimed: Vec<Spooled>,
    refused: &mut Vec<(Spooled, ErrorCode, String)>,
) -> (Vec<Spooled>, Vec<Option<super::convert::Pending>>) {
    let Some(spec) = profile.convert else {
        let none = claimed.iter().map(|_| None).collect();
        return (claimed, none);
    };
    let converted = tokio::task::spawn_blocking(move || {
        claimed
            .into_iter()
            .map(|f| {
                let r = super::convert::prepare(&spec, &f);
                (f, r)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let (mut ok, mut pending) = (Vec::new(), Vec::new());
    for (file, r) in converted {
        match r {
            Ok(p) => {
                ok.push(file);
                pending.push(Some(p));
            }
            Err(msg) => refused.push((file, ErrorCode::ConversionFailed, msg)),
        }
    }
    (ok, pending)
}

/// [`claim_rows`] for a file whose conversion is pending: the size and
/// line count of the converted file.
pub(super) fn sized_rows(
    profile: &SendProfile,
    file: &Spooled,
    meta: &BTreeMap<String, String>,
    (status, request): (Status, Option<&TransferId>),
    converted: Option<&crate::transform::convert::Converted>,
) -> Vec<SendRow> {
    let mut rows = claim_rows(profile, file, meta, status, request);
    if let Some(c) = converted {
        for row in &mut rows {
            row.transfer.size = c.size;
            row.transfer.records = Some(c.records);
        }
    }
    rows
}

/// `hakobu send` and `hakobu resend`: copies `src` into the spool as a new
/// transfer that arrives as `name`, queued (one row per node of the
/// profile's `to`) for the agent on this state directory to pick up.
pub async fn queue(
    ledger: &SendLedger,
    spool: &Spool,
    profile: &SendProfile,
    (src, name): (&Path, &str),
    meta: &BTreeMap<String, String>,
) -> Result<TransferId, QueueError> {
    queue_child(ledger, spool, profile, (src, name), meta, None).await
}

/// [`queue`] of a transfer started by `parent` (the job flow: a hook's
/// `hakobu send`, `--parent`), recorded on its rows and carried by its chunks.
pub async fn queue_child(
    ledger: &SendLedger,
    spool: &Spool,
    profile: &SendProfile,
    (src, name): (&Path, &str),
    meta: &BTreeMap<String, String>,
    parent: Option<&TransferId>,
) -> Result<TransferId, QueueError> {
    let file = spool
        .copy_in(&profile.file_id, src, name)
        .map_err(|e| QueueError::Copy(src.to_path_buf(), e))?;
    let pending = match profile.convert {
        None => None,
        Some(spec) => {
            let f = Spooled {
                tid: file.tid.clone(),
                name: file.name.clone(),
                path: file.path.clone(),
            };
            let p = tokio::task::spawn_blocking(move || super::convert::prepare(&spec, &f))
                .await
                .map_err(|e| QueueError::Convert(e.to_string()));
            match p.and_then(|r| r.map_err(QueueError::Convert)) {
                Ok(p) => Some(p),
                Err(e) => {
                    // Nothing recorded: the copy goes, the source stays.
                    let _ = crate::durable::remove_if_exists(&file.path);
                    let _ = spool.remove_transfer_dir(&file.path);
                    return Err(e);
                }
            }
        }
    };
    let converted = pending.as_ref().map(|p| &p.converted);
    let mut rows = sized_rows(profile, &file, meta, (Status::Queued, None), converted);
    for row in &mut rows {
        row.transfer.parent_id = parent.cloned();
    }
    ledger.insert_all(rows).await?;
    if let Some(p) = &pending {
        // On failure the publisher puts it in place before reading it.
        let _ = p.commit();
    }
    Ok(file.tid)
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot copy {0} into the spool: {1}")]
    Copy(PathBuf, std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `convert:` failed (`conversion_failed`): nothing was queued.
    #[error("conversion_failed: {0}")]
    Convert(String),
}

impl QueueError {
    /// The stable code a user sees beside the message (`hakobu send`,
    /// resend, the API's upload).
    pub fn code(&self) -> ErrorCode {
        match self {
            QueueError::Copy(_, e) => ErrorCode::of_io(e),
            QueueError::Store(e) => e.code(),
            QueueError::Convert(_) => ErrorCode::ConversionFailed,
        }
    }
}
