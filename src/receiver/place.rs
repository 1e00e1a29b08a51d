//! Placement: the only way a file reaches an inbox name. A verified partial
//! file is put in place according to the profile's mode (`new`, `replace`,
//! `append`, `generations`), one name at a time across the agent (the
//! per-name locks), with the inode that will carry the name recorded as
//! `placing` before the step that makes it visible. Transfers completed
//! together are placed together: one ledger transaction, then one
//! directory flush per inbox for all of them.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Seek};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, renameat};
use nix::unistd::{UnlinkatFlags, linkat, unlinkat};
use tracing::info;

use super::Receiver;
use super::complete::after_placing;
use super::error::ReceiveError;
use super::ingest::partial_path;
use super::partial::{self, Dirs};
pub use super::staged::Staged;
use super::staged::inbox_name;
use super::verify::verify_file;
use crate::config::{Mode, ReceiveProfile};
use crate::domain::TransferId;
use crate::store::{Placing, ReceiveRow, Status, StoreError};
use crate::transform::Transform;

/// One lock per inbox name: two transfers of the same name (two senders, or
/// one name sent twice) are placed one after the other, so `append` and
/// `generations` never interleave.
#[derive(Default)]
pub struct NameLocks(Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>);

impl NameLocks {
    fn of(&self, target: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        names.entry(target.to_path_buf()).or_default().clone()
    }

    /// Drops the locks nobody holds, so the map stays as small as the work.
    fn prune(&self) {
        let mut names = self.0.lock().unwrap_or_else(|p| p.into_inner());
        names.retain(|_, lock| Arc::strong_count(lock) > 1);
    }
}

impl Receiver {
    /// Verifies and places one transfer's file; `placing` is recorded with
    /// the inode just before the name appears. A row that recorded an inode
    /// now under its name was placed before a restart.
    pub(super) async fn place(
        &self,
        row: &ReceiveRow,
        p: &ReceiveProfile,
    ) -> Result<PathBuf, ReceiveError> {
        if let (Some(ino), Some(target)) = (row.inode, &row.path) {
            if already_placed(target, ino) {
                // Only the partial (ours, by its transfer id) may remain.
                let _ = partial::remove(&p.inbox, &row.transfer_id);
                return Ok(target.clone());
            }
        }
        let ledger = self.ledger.clone();
        let (tid, peer) = (row.transfer_id.clone(), row.peer.clone());
        let name = inbox_name(row, p)?;
        let (inbox, mode, size) = (p.inbox.clone(), p.mode, row.size);
        let file_mode = p.file_mode;
        let sha = row.sha256.clone().unwrap_or_default();
        let hashed = self.digests.finish(&row.transfer_id, size);
        let transform = Transform::for_receive(p);
        let (checked_inbox, checked_name, checked_tid) = (inbox.clone(), name.clone(), tid.clone());
        let (staged, converted) = tokio::task::spawn_blocking(move || {
            let mut staged = Staged::open(&checked_inbox, &checked_tid, &checked_name)?;
            verify_file(&mut staged.file, size, &sha, hashed)?;
            staged.finish(&transform)
        })
        .await
        .map_err(|e| ReceiveError::Io(e.to_string()))??;
        let name_lock = self.names.of(&inbox.join(&name));
        let _placing = name_lock.lock().await;
        let placed = tokio::task::spawn_blocking(move || {
            let converting = converted.is_some();
            let (done_inbox, done_tid) = (inbox.clone(), tid.clone());
            let placed = place(staged, &inbox, &name, (mode, file_mode), |target, inode| {
                let placing = Placing {
                    transfer_id: tid,
                    peer,
                    target: target.to_path_buf(),
                    inode,
                    converted,
                };
                ledger
                    .placing(vec![placing])
                    .wait()
                    .map_err(|e| ReceiveError::Io(e.to_string()))
            })?;
            if converting {
                // The file as received, kept until the converted one was
                // placed; a failure here leaves it to the next start's sweep.
                let _ = partial::remove(&done_inbox, &done_tid);
            }
            Ok(placed)
        })
        .await
        .map_err(|e| ReceiveError::Io(e.to_string()))?;
        drop(_placing);
        self.names.prune();
        placed
    }

    /// Places transfers that completed together as one group: one ledger
    /// transaction records every `placing`, the renames (or links) follow,
    /// then one flush per inbox directory, then one transaction records
    /// every `placed`. Per transfer the order is the one
    /// [`Receiver::place`] keeps, so recovery reads the ledger the same way;
    /// the group only shares the flushes. Only transfers just completed
    /// (`receiving`) in modes `new` and `replace`, each name once, join;
    /// the rest, and any that does not verify, are left to go on alone.
    /// Returns those placed.
    pub(super) async fn place_together(
        &self,
        tids: &[TransferId],
    ) -> Result<HashSet<TransferId>, StoreError> {
        let items = self.group(tids).await?;
        if items.is_empty() {
            return Ok(HashSet::new());
        }
        // One name at a time across the agent: the locks, taken in one order.
        let locks: Vec<_> = items.iter().map(|i| self.names.of(&i.target)).collect();
        let mut held = Vec::with_capacity(locks.len());
        for lock in &locks {
            held.push(lock.lock().await);
        }
        // Verify each and read the inode that will carry its name. (Should
        // a blocking task fail, each transfer goes on alone, from whatever
        // its ledger row says.)
        let Ok(ready) = tokio::task::spawn_blocking(move || {
            items
                .into_iter()
                .filter_map(|mut i| {
                    let sha = i.row.sha256.clone().unwrap_or_default();
                    let mut staged = Staged::open(&i.inbox, &i.row.transfer_id, &i.name).ok()?;
                    verify_file(&mut staged.file, i.row.size, &sha, i.hashed.take()).ok()?;
                    staged.chmod(i.file_mode).ok()?;
                    Some((i, staged))
                })
                .collect::<Vec<_>>()
        })
        .await
        else {
            return Ok(HashSet::new());
        };
        if ready.is_empty() {
            return Ok(HashSet::new());
        }
        let placing = ready
            .iter()
            .map(|(i, staged)| Placing {
                transfer_id: i.row.transfer_id.clone(),
                peer: i.row.peer.clone(),
                target: i.target.clone(),
                inode: staged.ino,
                converted: None,
            })
            .collect();
        self.ledger.placing(placing).await?;
        let Ok((ready, results)) = tokio::task::spawn_blocking(move || {
            let results = put_together(&ready);
            (ready, results)
        })
        .await
        else {
            return Ok(HashSet::new());
        };
        let mut placed = Vec::new();
        for ((i, _), result) in ready.into_iter().zip(results) {
            match result {
                Ok(()) => placed.push(i),
                Err(e) => self.placing_failed(&i.row, &i.partial, &e).await?,
            }
        }
        let done = placed
            .iter()
            .map(|i| (i.row.transfer_id.clone(), i.row.peer.clone(), i.next))
            .collect();
        self.ledger.placed(done).await?;
        drop(held);
        drop(locks);
        self.names.prune();
        for i in &placed {
            info!(message = "Placed.", transfer_id = %i.row.transfer_id, path = %i.target.display());
        }
        Ok(placed
            .into_iter()
            .map(|i| i.row.transfer.transfer_id)
            .collect())
    }

    /// The transfers of `tids` that may be placed as a group (see
    /// [`Receiver::place_together`]).
    async fn group(&self, tids: &[TransferId]) -> Result<Vec<Item>, StoreError> {
        let reads = self.ledger.deferred();
        let mut items = Vec::new();
        let mut names = HashSet::new();
        for tid in tids {
            let Some(row) = reads.get(tid).await? else {
                continue;
            };
            let Some(p) = self.cfg.receive_profile(&row.file_id) else {
                continue;
            };
            // A conversion, or a name that does not render, goes alone.
            let Ok(name) = inbox_name(&row, p) else {
                continue;
            };
            let target = p.inbox.join(&name);
            if row.status != Status::Receiving
                || !simple(p.mode)
                || p.convert.is_some()
                || !names.insert(target.clone())
            {
                continue;
            }
            items.push(Item {
                partial: partial_path(&p.inbox, tid),
                inbox: p.inbox.clone(),
                target,
                mode: p.mode,
                file_mode: p.file_mode,
                next: after_placing(p),
                hashed: self.digests.finish(tid, row.size),
                name,
                row,
            });
        }
        // One order for the locks across the agent.
        items.sort_by(|a, b| a.target.cmp(&b.target));
        Ok(items)
    }
}

/// One transfer of a group placement.
struct Item {
    row: ReceiveRow,
    partial: PathBuf,
    inbox: PathBuf,
    target: PathBuf,
    mode: Mode,
    file_mode: u32,
    next: Status,
    hashed: Option<String>,
    /// The inbox name (`name:`).
    name: String,
}

/// Puts every verified file of a group in place, then flushes each inbox
/// directory once for all the names put there, then drops the partial
/// names that must outlive that flush.
fn put_together(ready: &[(Item, Staged)]) -> Vec<Result<(), ReceiveError>> {
    let mut results: Vec<Result<(), ReceiveError>> = ready
        .iter()
        .map(|(i, staged)| put(staged, &i.name, &i.target, i.mode))
        .collect();
    let mut flushed: HashMap<&Path, Option<String>> = HashMap::new();
    for ((i, staged), r) in ready.iter().zip(&results) {
        if r.is_ok() && !flushed.contains_key(i.inbox.as_path()) {
            let e = partial::fsync_dir(&staged.dirs.inbox).err();
            flushed.insert(&i.inbox, e.map(|e| e.to_string()));
        }
    }
    for ((i, staged), r) in ready.iter().zip(results.iter_mut()) {
        if r.is_err() {
            continue;
        }
        *r = match flushed.get(i.inbox.as_path()) {
            Some(Some(e)) => Err(ReceiveError::Io(format!(
                "flushing the inbox directory: {e}"
            ))),
            _ => tidy(staged, i.mode),
        };
    }
    results
}

/// True when `target` is the file whose inode was recorded before placing:
/// the placement happened before a crash. A link at the name is never it.
pub fn already_placed(target: &Path, recorded: u64) -> bool {
    fs::symlink_metadata(target)
        .map(|m| m.file_type().is_file() && m.ino() == recorded)
        .unwrap_or(false)
}

/// Puts `staged` in place as `inbox/name`, in `mode`, with the permissions
/// `file_mode`. `record(target, inode)` is called with the inode that will
/// carry the name, before the step that makes it visible, so that recovery
/// can tell whether that step happened. Every step works on the inbox's
/// and the partial directory's descriptors; `append` and `generations`
/// refuse a link or a non-regular file at the name (`unsafe_inbox`).
pub fn place(
    staged: Staged,
    inbox: &Path,
    name: &str,
    (mode, file_mode): (Mode, u32),
    record: impl FnOnce(&Path, u64) -> Result<(), ReceiveError>,
) -> Result<PathBuf, ReceiveError> {
    let target = inbox.join(name);
    let io = |what: &'static str| move |e: io::Error| ReceiveError::from_io(what, e);
    let errno = |what: &'static str| move |e: Errno| ReceiveError::from_io(what, e.into());
    let dirs = &staged.dirs;
    match mode {
        Mode::New | Mode::Replace => {
            staged.chmod(file_mode)?;
            record(&target, staged.ino)?;
            put(&staged, name, &target, mode)?;
            partial::fsync_dir(&dirs.inbox).map_err(io("placing the file"))?;
            tidy(&staged, mode)?;
        }
        Mode::Append => {
            // Build old + new beside the partial, then rename it over the
            // name: a reader sees the old file or the whole new one.
            let combined = format!("{}.append", staged.name.trim_end_matches(".part"));
            partial::remove_at(dirs, &combined).map_err(io("preparing the append"))?;
            let mut out = partial::open_file(dirs, &combined, true)?;
            if let Some(mut existing) = open_existing(dirs, name, &target)? {
                io::copy(&mut existing, &mut out).map_err(io("copying the existing file"))?;
            }
            let mut src = &staged.file;
            src.seek(io::SeekFrom::Start(0))
                .map_err(io("reading the partial file"))?;
            io::copy(&mut src, &mut out).map_err(io("appending"))?;
            out.sync_all().map_err(io("appending"))?;
            {
                use std::os::unix::fs::PermissionsExt;
                out.set_permissions(fs::Permissions::from_mode(file_mode))
                    .map_err(io("setting the file's mode"))?;
            }
            let ino = out.metadata().map_err(io("appending"))?.ino();
            record(&target, ino)?;
            renameat(&dirs.partial, combined.as_str(), &dirs.inbox, name)
                .map_err(errno("placing the file"))?;
            partial::fsync_dir(&dirs.inbox).map_err(io("placing the file"))?;
            partial::fsync_dir(&dirs.partial).map_err(io("placing the file"))?;
            partial::remove_at(dirs, &staged.name).map_err(io("removing the partial file"))?;
        }
        Mode::Generations(keep) => {
            // Rotate only while the name is taken, so that a rotation redone
            // after a crash between rotating and placing does not shift twice.
            match partial::stat_in_inbox(dirs, name)? {
                None => {}
                Some(st) if partial::is_regular(&st) => {
                    rotate(dirs, name, keep).map_err(io("rotating generations"))?
                }
                Some(_) => return Err(not_regular(&target)),
            }
            staged.chmod(file_mode)?;
            record(&target, staged.ino)?;
            renameat(&dirs.partial, staged.name.as_str(), &dirs.inbox, name)
                .map_err(errno("placing the file"))?;
            partial::fsync_dir(&dirs.inbox).map_err(io("placing the file"))?;
        }
    }
    Ok(target)
}

fn not_regular(target: &Path) -> ReceiveError {
    ReceiveError::UnsafeInbox(format!(
        "{} is a link or not a regular file, and the profile's mode keeps the file at that name",
        target.display()
    ))
}

/// The regular file at the inbox name, opened without following a link;
/// `None` when the name is free.
fn open_existing(dirs: &Dirs, name: &str, target: &Path) -> Result<Option<File>, ReceiveError> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let f = match openat(&dirs.inbox, name, flags, nix::sys::stat::Mode::empty()) {
        Ok(fd) => File::from(fd),
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP | Errno::ENXIO) => return Err(not_regular(target)),
        Err(e) => return Err(ReceiveError::from_io("opening the existing file", e.into())),
    };
    let meta = f
        .metadata()
        .map_err(|e| ReceiveError::from_io("reading the existing file", e))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(target));
    }
    Ok(Some(f))
}

/// True for the modes whose placement is one rename or link, which
/// [`put`] does and several transfers can share a directory flush for.
pub fn simple(mode: Mode) -> bool {
    matches!(mode, Mode::New | Mode::Replace)
}

/// Gives `staged` the inbox name `name`, mode `new` or `replace`, without
/// flushing the directory: the caller flushes it, once for every file it
/// put there, and then calls [`tidy`]. `new` never overwrites, and knows
/// its own earlier link; `replace` renames over whatever is at the name
/// (a link there is replaced, never followed).
fn put(staged: &Staged, name: &str, target: &Path, mode: Mode) -> Result<(), ReceiveError> {
    let errno = |e: Errno| ReceiveError::from_io("placing the file", e.into());
    let dirs = &staged.dirs;
    if mode == Mode::Replace {
        // Only the new name needs to last: a leftover partial link after a
        // crash is removed at the next start (`recovery.rs`, `sweep_partials`).
        return renameat(&dirs.partial, staged.name.as_str(), &dirs.inbox, name).map_err(errno);
    }
    match linkat(
        &dirs.partial,
        staged.name.as_str(),
        &dirs.inbox,
        name,
        AtFlags::empty(),
    ) {
        Ok(()) => Ok(()),
        Err(Errno::EEXIST) => {
            let ours = partial::stat_in_inbox(dirs, name)?
                .is_some_and(|st| partial::is_regular(&st) && st.st_ino == staged.ino);
            if ours {
                Ok(())
            } else {
                Err(ReceiveError::FileExists(target.display().to_string()))
            }
        }
        Err(e) => Err(errno(e)),
    }
}

/// After [`put`] and the directory's flush: mode `new` drops the partial
/// file's name, which must outlive the flush of the new one (the two are in
/// different directories, and a crash may keep either change without the
/// other).
fn tidy(staged: &Staged, mode: Mode) -> Result<(), ReceiveError> {
    if mode != Mode::New {
        return Ok(());
    }
    partial::remove_at(&staged.dirs, &staged.name)
        .map_err(|e| ReceiveError::from_io("removing the partial file", e))
}

/// `name.(keep-1)` → `name.keep` … `name` → `name.1`; the oldest drops off.
/// Names inside the inbox's descriptor: a link among the generations is
/// moved, never followed.
fn rotate(dirs: &Dirs, name: &str, keep: u32) -> io::Result<()> {
    let generation = |i: u32| format!("{name}.{i}");
    match unlinkat(
        &dirs.inbox,
        generation(keep).as_str(),
        UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    for i in (1..keep).rev() {
        let (from, to) = (generation(i), generation(i + 1));
        match renameat(&dirs.inbox, from.as_str(), &dirs.inbox, to.as_str()) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    renameat(&dirs.inbox, name, &dirs.inbox, generation(1).as_str())?;
    partial::fsync_dir(&dirs.inbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inbox with the partial file of a new transfer holding `content`.
    fn setup(content: &[u8]) -> (tempfile::TempDir, PathBuf, TransferId) {
        let d = tempfile::tempdir().unwrap();
        let inbox = d.path().join("inbox");
        let tid = TransferId::new();
        write(&inbox, &tid, content);
        (d, inbox, tid)
    }

    fn write(inbox: &Path, tid: &TransferId, content: &[u8]) {
        use std::io::Write;
        let dirs = partial::open_dirs(inbox, true).unwrap();
        let mut f = partial::open_file(&dirs, &partial::name_of(tid), true).unwrap();
        f.write_all(content).unwrap();
    }

    fn place_as(inbox: &Path, tid: &TransferId, mode: Mode) -> Result<PathBuf, ReceiveError> {
        let staged = Staged::open(inbox, tid, "f")?;
        place(staged, inbox, "f", (mode, 0o640), |_, _| Ok(()))
    }

    #[test]
    fn modes() {
        let (_d, inbox, tid) = setup(b"one");
        let t = place_as(&inbox, &tid, Mode::New).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"one");
        assert_eq!(fs::metadata(&t).unwrap().mode() & 0o7777, 0o640);
        assert!(!partial_path(&inbox, &tid).exists());
        let tid = TransferId::new();
        write(&inbox, &tid, b"two");
        assert_eq!(
            place_as(&inbox, &tid, Mode::New).unwrap_err().code(),
            crate::error_code::ErrorCode::FileExists
        );
        place_as(&inbox, &tid, Mode::Append).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"onetwo");
        let tid = TransferId::new();
        write(&inbox, &tid, b"three");
        place_as(&inbox, &tid, Mode::Replace).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"three");
        for g in ["g1", "g2", "g3"] {
            let tid = TransferId::new();
            write(&inbox, &tid, g.as_bytes());
            place_as(&inbox, &tid, Mode::Generations(2)).unwrap();
        }
        assert_eq!(fs::read(&t).unwrap(), b"g3");
        assert_eq!(fs::read(inbox.join("f.1")).unwrap(), b"g2");
        assert_eq!(fs::read(inbox.join("f.2")).unwrap(), b"g1");
        assert!(!inbox.join("f.3").exists());
    }

    #[test]
    fn new_mode_recognises_its_own_earlier_placement() {
        let (_d, inbox, tid) = setup(b"one");
        let target = inbox.join("f");
        // Simulates a crash after the link and before the partial was removed.
        fs::hard_link(partial_path(&inbox, &tid), &target).unwrap();
        place_as(&inbox, &tid, Mode::New).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"one");
    }

    #[test]
    fn append_and_generations_refuse_a_link_at_the_name() {
        let (d, inbox, tid) = setup(b"new");
        let secret = d.path().join("secret");
        fs::write(&secret, b"secret").unwrap();
        std::os::unix::fs::symlink(&secret, inbox.join("f")).unwrap();
        for mode in [Mode::Append, Mode::Generations(3)] {
            let e = place_as(&inbox, &tid, mode).unwrap_err();
            assert_eq!(e.code(), crate::error_code::ErrorCode::UnsafeInbox, "{e}");
        }
        assert_eq!(fs::read(&secret).unwrap(), b"secret");
        assert!(!inbox.join("f.1").exists());
        // Replace renames over the link, never through it.
        place_as(&inbox, &tid, Mode::Replace).unwrap();
        assert_eq!(fs::read(inbox.join("f")).unwrap(), b"new");
        assert_eq!(fs::read(&secret).unwrap(), b"secret");
    }
}
