//! The sending side: watch → claim → chunk/publish → await receipt → hooks →
//! `after_send`. A claimed file lives in the spool until a receipt settles it;
//! the ledger's status says which step comes next after a restart.

mod publish;
mod watch;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use publish::parse_spooled;
pub use publish::spool_path;
pub use watch::ignored;

use crate::broker::Delivery;
use crate::clock::now_rfc3339;
use crate::coalesce::Coalescer;
use crate::config::{AfterSend, Config, Ready, SendProfile};
use crate::durable;
use crate::hooks::{self, Event, HookContext};
use crate::store::{Direction, Row, Status, Store, StoreError};
use crate::wire::Receipt;

const TX: Direction = Direction::Send;
/// Bytes in flight to the broker, as this many windows: four large files
/// publish at once, or many small ones (each weighs its size, rounded up to
/// [`PERMIT_UNIT`]); more wait their turn.
const PARALLEL_WINDOWS: u64 = 4;
const PERMIT_UNIT: u64 = 64 << 10;

/// The permits a transfer of `bytes` holds while it publishes.
fn permits_for(bytes: u64, window: u64) -> u32 {
    bytes
        .min(window)
        .div_ceil(PERMIT_UNIT)
        .clamp(1, u64::from(u32::MAX)) as u32
}

pub struct Sender {
    cfg: Arc<Config>,
    store: Store,
    /// Publishes to the broker, coalescing what waits for the same node.
    out: Arc<Coalescer>,
    window: u64,
    permits: Semaphore,
    /// (transfer id, peer) pairs being published now.
    publishing: Mutex<HashSet<(String, String)>>,
    /// Receipt hook tasks, awaited on a graceful stop.
    tasks: TaskTracker,
    /// Held while `after_send` runs: the receipts of a multicast transfer
    /// settle side by side, and only one may move the spooled file.
    settling: tokio::sync::Mutex<()>,
}

impl Sender {
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        out: Arc<Coalescer>,
        window: u64,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Sender {
            cfg,
            store,
            out,
            window,
            permits: Semaphore::new(
                permits_for(window, window) as usize * PARALLEL_WINDOWS as usize,
            ),
            publishing: Mutex::new(HashSet::new()),
            tasks,
            settling: tokio::sync::Mutex::new(()),
        })
    }

    /// Starts one watcher per send profile.
    pub fn start_watchers(self: &Arc<Self>) {
        for profile in &self.cfg.send {
            tokio::spawn(watch::watch(self.clone(), profile.clone()));
        }
    }

    /// Resumes the last run's work: files claimed but not recorded, transfers
    /// mid-publish, hooks interrupted, spool files whose transfer is settled.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StoreError> {
        // A crash between the last receipt and `after_send` left the file.
        for tid in self.adopt_spool_orphans()? {
            self.settle_spool(&tid).await;
        }
        for row in self.store.unfinished()? {
            if row.direction != TX {
                continue;
            }
            match row.status {
                Status::Sending => self.enqueue(&row),
                Status::HookRunning => {
                    warn!(message = "A sender hook was running when the agent stopped; not re-running it.", transfer_id = %row.transfer_id);
                    self.store.fail(TX, &row.transfer_id, &row.peer, Status::HookInterrupted, "hook_interrupted",
                        "the agent stopped while the hook ran; run `hakobu rerun` if it should run again")?;
                    self.settle_spool(&row.transfer_id).await;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A crash between claiming (the rename into the spool) and recording
    /// leaves a spooled file without rows: record it now.
    /// Returns the transfers that have rows, for `after_send` to look at.
    fn adopt_spool_orphans(&self) -> Result<Vec<String>, StoreError> {
        let spool = self.cfg.spool_dir();
        let mut settled = Vec::new();
        for profile in &self.cfg.send {
            let Ok(entries) = std::fs::read_dir(spool.join(&profile.file_id)) else {
                continue;
            };
            for entry in entries.flatten() {
                let Some(file) = spooled_entry(&entry) else {
                    continue;
                };
                if !self.store.rows_of(TX, &file.tid)?.is_empty() {
                    settled.push(file.tid);
                    continue;
                }
                info!(message = "Recording a file claimed before a crash.", transfer_id = %file.tid, file_name = %file.name);
                record_claim(
                    &self.store,
                    profile,
                    &file,
                    &Default::default(),
                    Status::Sending,
                )?;
            }
        }
        Ok(settled)
    }

    /// Claims the ready files `names` from the profile's outbox, together:
    /// each is renamed into the spool (atomic), then the directories are
    /// flushed once for all of them, then one row per file and receiving
    /// node is recorded in one transaction, then they are published.
    pub async fn claim(self: &Arc<Self>, profile: &SendProfile, names: Vec<String>) {
        let spool = self.cfg.spool_dir();
        let p = profile.clone();
        let claimed = tokio::task::spawn_blocking(move || claim_files(&p, &spool, &names))
            .await
            .unwrap_or_default();
        if claimed.is_empty() {
            return;
        }
        let mut rows = Vec::new();
        for file in &claimed {
            rows.extend(claim_rows(
                profile,
                file,
                &Default::default(),
                Status::Sending,
            ));
        }
        // On failure the spool directories are adopted at the next start.
        if let Err(e) = self.store.insert_all(&rows) {
            error!(message = "Cannot record claimed files; they are recorded at the next start.", files = claimed.len(), error = %e);
            return;
        }
        for file in claimed {
            info!(message = "Claimed.", transfer_id = %file.tid, file_id = %profile.file_id, file_name = %file.name);
        }
        for row in &rows {
            self.enqueue(row);
        }
    }

    /// Picks up transfers queued by `hakobu send` and `hakobu resend`.
    pub async fn poll_queued(self: Arc<Self>) {
        loop {
            match self.store.in_status(TX, Status::Queued) {
                Ok(rows) => {
                    for row in rows {
                        if let Ok(true) = self.store.advance(
                            TX,
                            &row.transfer_id,
                            &row.peer,
                            Status::Queued,
                            Status::Sending,
                        ) {
                            self.enqueue(&row);
                        }
                    }
                }
                Err(e) => warn!(message = "Cannot read queued transfers.", error = %e),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Publishes `row`'s transfer to its peer in the background, retrying
    /// until confirmed.
    fn enqueue(self: &Arc<Self>, row: &Row) {
        let key = (row.transfer_id.clone(), row.peer.clone());
        let size = row.size;
        if !self
            .publishing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.publish_until_confirmed(&key.0, &key.1, size).await;
            this.publishing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }

    async fn publish_until_confirmed(&self, tid: &str, peer: &str, size: u64) {
        let Ok(_permit) = self
            .permits
            .acquire_many(permits_for(size, self.window))
            .await
        else {
            return;
        };
        let mut resume = publish::Resume::default();
        let mut backoff = Duration::from_millis(200);
        loop {
            // `sending` was recorded by a call that waited (claim, recovery,
            // poll_queued): the read need not wait for a flush.
            let row = match self.store.deferred().get(TX, tid, peer) {
                Ok(Some(r)) if r.status == Status::Sending => r,
                Ok(_) => return,
                Err(e) => {
                    error!(message = "State database failed; retrying.", error = %e);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            // Progress for `hakobu send --wait`, written at most twice a
            // second; the end is recorded with the digest (set_published).
            let last = std::sync::Mutex::new(std::time::Instant::now());
            let record = |bytes: u64| {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if bytes < row.size && last.elapsed() >= Duration::from_millis(500) {
                    *last = std::time::Instant::now();
                    let _ = self.store.set_progress(tid, peer, bytes);
                }
            };
            match publish::publish(
                &self.out,
                &self.cfg.node,
                &row,
                self.window,
                &mut resume,
                &record,
            )
            .await
            {
                Ok(sha) => {
                    // Not waited for: a crash that loses it publishes the
                    // file again, and the receiver ignores the duplicate.
                    let _ = self.store.deferred().set_published(tid, peer, &sha);
                    info!(message = "Published; awaiting the receipt.", transfer_id = %tid, to = %peer, size = row.size);
                    return;
                }
                Err(publish::PublishError::Spool(path, e)) => {
                    error!(message = "Spooled file unreadable; failing the transfer.", transfer_id = %tid, path, error = %e);
                    let msg =
                        format!("cannot read the spooled file {path}: {e}; send the file again");
                    let _ = self.store.fail(
                        TX,
                        tid,
                        peer,
                        Status::SendFailed,
                        "spool_unreadable",
                        &msg,
                    );
                    return;
                }
                Err(publish::PublishError::Broker(e)) => {
                    warn!(message = "Publishing interrupted; resuming from the first unconfirmed chunk.",
                        transfer_id = %tid, to = %peer, next_chunk = resume.next, error_code = e.code(), error = %e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// A receipt from a receiving node: record it, ack it, run the hooks.
    pub async fn on_receipt(self: &Arc<Self>, r: Receipt, d: Delivery) {
        if self.cfg.verify_sender() && d.user_id.as_deref() != Some(r.from.as_str()) {
            // A forged receipt could make this agent delete the only copy.
            warn!(message = "Dead-lettering a receipt whose sender is not its broker user.",
                transfer_id = %r.transfer_id, from = %r.from, user = ?d.user_id, error_code = "sender_mismatch");
            let _ = d.dead_letter().await;
            return;
        }
        if r.to != self.cfg.node {
            warn!(message = "Ignoring a receipt addressed to another node.", to = %r.to, transfer_id = %r.transfer_id);
            let _ = d.ack().await;
            return;
        }
        // Without hooks for this outcome the transfer ends with the receipt.
        let hooks = self
            .cfg
            .send_profile(&r.file_id)
            .is_some_and(|p| !if r.ok { &p.on_success } else { &p.on_failure }.is_empty());
        let next = match (hooks, r.ok) {
            (true, _) => Status::HookRunning,
            (false, true) => Status::Sent,
            (false, false) => Status::SendFailed,
        };
        match self.store.record_receipt(&r, next) {
            Ok(true) => {
                info!(message = "Receipt.", transfer_id = %r.transfer_id, from = %r.from, ok = r.ok, error_code = ?r.error_code);
                let _ = d.ack().await;
                let this = self.clone();
                self.tasks.spawn(async move {
                    if hooks {
                        if let Err(e) = this.run_hooks(&r.transfer_id, &r.from).await {
                            error!(message = "State database failed while running sender hooks.", error = %e);
                        }
                    }
                    this.settle_spool(&r.transfer_id).await;
                });
            }
            Ok(false) => {
                info!(message = "Duplicate or unknown receipt.", transfer_id = %r.transfer_id, from = %r.from);
                let _ = d.ack().await;
            }
            // Not acked: delivered again after a reconnect.
            Err(e) => {
                error!(message = "State database failed while recording a receipt.", error = %e)
            }
        }
    }

    async fn run_hooks(&self, tid: &str, peer: &str) -> Result<(), StoreError> {
        // The row was recorded with the receipt by a call that waited.
        let Some(row) = self.store.deferred().get(TX, tid, peer)? else {
            return Ok(());
        };
        let Some(profile) = self.cfg.send_profile(&row.file_id) else {
            let status = if row.delivered {
                Status::Sent
            } else {
                Status::SendFailed
            };
            return self.store.set_status(TX, tid, peer, status);
        };
        let (event, specs) = if row.delivered {
            (Event::Sent, &profile.on_success)
        } else {
            (Event::SendFailed, &profile.on_failure)
        };
        let ctx = HookContext::for_row(&row, &self.cfg.node, event);
        let log = hooks::log_path(&self.cfg.log_dir(), tid, event);
        let mut status = if row.delivered {
            Status::Sent
        } else {
            Status::SendFailed
        };
        match hooks::run_all(specs, &ctx, &log).await {
            Some((argv0, outcome)) => {
                let described = outcome.describe(&argv0);
                let mut error = None;
                if !outcome.ok() {
                    warn!(message = "Sender hook failed.", transfer_id = %tid, error = %described);
                    if row.delivered {
                        status = Status::HookFailed;
                        error = Some((outcome.error_code(), described.as_str()));
                    }
                }
                self.store
                    .finish_hooks(TX, tid, peer, &outcome.record(), status, error)?;
            }
            None => {
                self.store
                    .advance(TX, tid, peer, Status::HookRunning, status)?;
            }
        }
        Ok(())
    }

    /// Once every receiver has settled a transfer, applies `after_send` to the
    /// spooled file. A file any receiver failed stays in the spool for `resend`.
    async fn settle_spool(&self, tid: &str) {
        let _one_at_a_time = self.settling.lock().await;
        // Every status read here was written by a call that waited.
        let Ok(rows) = self.store.deferred().rows_of(TX, tid) else {
            return;
        };
        if rows.is_empty()
            || !rows.iter().all(|r| r.status.is_final())
            || !rows.iter().all(|r| r.delivered)
        {
            return;
        }
        let Some(path) = rows[0].path.as_ref().map(PathBuf::from) else {
            return;
        };
        // Settled before (by the other receipt of a multicast transfer):
        // the path now says where the file went.
        if !path.starts_with(self.cfg.spool_dir()) {
            return;
        }
        let Some(profile) = self.cfg.send_profile(&rows[0].file_id) else {
            return;
        };
        let done = match &profile.after_send {
            AfterSend::Keep => Ok(()),
            AfterSend::Delete => durable::remove_if_exists(&path)
                .and_then(|()| remove_transfer_dir(&path, &self.cfg.spool_dir())),
            AfterSend::MoveTo(dir) => {
                move_to(&path, dir, &rows[0].file_name, tid).and_then(|target| {
                    // History shows where the sent file went.
                    if let Some(target) = target {
                        for r in &rows {
                            let _ = self.store.set_path(
                                TX,
                                tid,
                                &r.peer,
                                &target.display().to_string(),
                            );
                        }
                    }
                    remove_transfer_dir(&path, &self.cfg.spool_dir())
                })
            }
        };
        if let Err(e) = done {
            error!(message = "after_send failed; the file stays in the spool.", transfer_id = %tid, path = %path.display(), error = %e);
        }
    }
}

/// Moves ready files from the outbox into the spool, each under a new
/// transfer id: `(transfer id, name)` for those moved. The renames are made
/// durable together (one flush per directory, not per file).
/// A file in the spool: its transfer id, its name (as it will arrive) and
/// where it is.
pub struct Spooled {
    pub tid: String,
    pub name: String,
    pub path: PathBuf,
}

fn claim_files(profile: &SendProfile, spool: &Path, names: &[String]) -> Vec<Spooled> {
    let file_dir = spool.join(&profile.file_id);
    if let Err(e) = std::fs::create_dir_all(&file_dir) {
        error!(message = "Cannot create the spool directory; check the state directory's permissions and space.",
            dir = %file_dir.display(), error = %e, error_code = "claim_failed");
        return Vec::new();
    }
    let mut claimed = Vec::new();
    // Directories whose entries changed, flushed once each at the end: the
    // profile's spool directory, the outbox, and the directory of each file
    // whose name is too long for the flat layout.
    let mut changed = vec![file_dir.clone(), profile.outbox.clone()];
    for name in names {
        // The marker goes first: a crash after it leaves the file in the
        // outbox waiting for a new marker, never a stale marker that would
        // let the next file of that name be claimed half-written.
        if let Ready::DoneMarker(marker) = &profile.ready {
            let _ = durable::remove_if_exists(&profile.outbox.join(format!("{name}{marker}")));
        }
        let tid = uuid::Uuid::now_v7().to_string();
        let from = profile.outbox.join(name);
        let to = spool_path(spool, &profile.file_id, &tid, name);
        let own_dir = to.parent().filter(|d| *d != file_dir);
        let moved = own_dir
            .map_or(Ok(()), std::fs::create_dir)
            .and_then(|()| std::fs::rename(&from, &to));
        match moved {
            Ok(()) => {
                changed.extend(own_dir.map(Path::to_path_buf));
                claimed.push(Spooled {
                    tid,
                    name: name.clone(),
                    path: to,
                });
            }
            Err(e) => {
                let _ = own_dir.map(std::fs::remove_dir);
                if e.kind() != std::io::ErrorKind::NotFound {
                    error!(message = "Cannot claim file into the spool; the spool must be on the outbox's filesystem.",
                        file = %from.display(), spool = %to.display(), error = %e, error_code = "claim_failed");
                }
            }
        }
    }
    if claimed.is_empty() {
        return claimed;
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
    claimed
}

/// One row per receiving node for a file already in the spool.
fn claim_rows(
    profile: &SendProfile,
    file: &Spooled,
    meta: &std::collections::BTreeMap<String, String>,
    status: Status,
) -> Vec<Row> {
    let size = std::fs::metadata(&file.path).map(|m| m.len()).unwrap_or(0);
    let started_at = now_rfc3339();
    profile
        .to
        .iter()
        .map(|peer| Row {
            path: Some(file.path.display().to_string()),
            meta: meta.clone(),
            started_at: started_at.clone(),
            ..Row::begin(
                TX,
                &file.tid,
                peer,
                &profile.file_id,
                &file.name,
                (size, profile.chunk_size),
                status,
            )
        })
        .collect()
}

/// Inserts one row per receiving node for a file already in the spool.
pub fn record_claim(
    store: &Store,
    profile: &SendProfile,
    file: &Spooled,
    meta: &std::collections::BTreeMap<String, String>,
    status: Status,
) -> Result<(), StoreError> {
    store.insert_all(&claim_rows(profile, file, meta, status))
}

/// The transfer id and file name of an entry of a profile's spool
/// directory: a file `<transfer_id>.<name>`, or a directory `<transfer_id>`
/// holding `<name>` (a long name, or a spool written by an earlier version;
/// one holding nothing else is removed). Hidden entries (a `hakobu send`
/// still copying) are skipped.
fn spooled_entry(entry: &std::fs::DirEntry) -> Option<Spooled> {
    let entry_name = entry.file_name().to_string_lossy().into_owned();
    if !entry.file_type().ok()?.is_dir() {
        let (tid, name) = parse_spooled(&entry_name)?;
        return Some(Spooled {
            tid: tid.to_string(),
            name: name.to_string(),
            path: entry.path(),
        });
    }
    let name = std::fs::read_dir(entry.path()).ok().and_then(|d| {
        d.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| !ignored(n))
    });
    let Some(name) = name else {
        let _ = std::fs::remove_dir(entry.path());
        return None;
    };
    Some(Spooled {
        path: entry.path().join(&name),
        tid: entry_name,
        name,
    })
}

/// Removes the directory of its own that a spooled file with a long name (or
/// from an earlier version) has; files in the flat layout have none.
fn remove_transfer_dir(file: &Path, spool: &Path) -> std::io::Result<()> {
    let Some(dir) = file.parent() else {
        return Ok(());
    };
    if dir.parent().and_then(Path::parent) != Some(spool) {
        return Ok(());
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves a sent file into `dir` under its own name `name` (not the spool
/// entry's, which starts with the transfer id); a taken name gets the
/// transfer id appended. Returns where it went (`None` when it was moved
/// before).
fn move_to(path: &Path, dir: &Path, name: &str, tid: &str) -> std::io::Result<Option<PathBuf>> {
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
