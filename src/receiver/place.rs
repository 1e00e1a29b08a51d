//! Placement: the only way a file reaches an inbox name. A verified partial
//! file is put in place according to the profile's mode (`new`, `replace`,
//! `append`, `generations`), one name at a time across the agent (the
//! per-name locks), with the inode that will carry the name recorded as
//! `placing` before the step that makes it visible. Transfers completed
//! together are placed together: one ledger transaction, then one
//! directory flush per inbox for all of them.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::info;

use super::Receiver;
use super::complete::after_placing;
use super::error::ReceiveError;
use super::ingest::partial_path;
use super::verify::verify;
use crate::config::{Mode, ReceiveProfile};
use crate::domain::TransferId;
use crate::durable;
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
        let partial = partial_path(&p.inbox, &row.transfer_id);
        if let (Some(ino), Some(target)) = (row.inode, &row.path) {
            if already_placed(target, ino) {
                // Only the partial (ours, by its transfer id) may remain.
                let _ = durable::remove_if_exists(&partial);
                return Ok(target.clone());
            }
        }
        let ledger = self.ledger.clone();
        let (tid, peer) = (row.transfer_id.clone(), row.peer.clone());
        let (inbox, name, mode, size) = (p.inbox.clone(), row.file_name.clone(), p.mode, row.size);
        let sha = row.sha256.clone().unwrap_or_default();
        let hashed = self.digests.finish(&row.transfer_id, size);
        let transform = Transform::for_receive(p);
        let checked = partial.clone();
        tokio::task::spawn_blocking(move || {
            verify(&checked, size, &sha, hashed)?;
            transform.finish_file(&checked)
        })
        .await
        .map_err(|e| ReceiveError::Io(e.to_string()))??;
        let name_lock = self.names.of(&inbox.join(&name));
        let _placing = name_lock.lock().await;
        let placed = tokio::task::spawn_blocking(move || {
            place(&partial, &inbox, &name, mode, |target, inode| {
                let placing = Placing {
                    transfer_id: tid,
                    peer,
                    target: target.to_path_buf(),
                    inode,
                };
                ledger
                    .placing(vec![placing])
                    .wait()
                    .map_err(|e| ReceiveError::Io(e.to_string()))
            })
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
                    verify(&i.partial, i.row.size, &sha, i.hashed.take()).ok()?;
                    i.transform.finish_file(&i.partial).ok()?;
                    let inode = partial_inode(&i.partial).ok()?;
                    Some((i, inode))
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
            .map(|(i, inode)| Placing {
                transfer_id: i.row.transfer_id.clone(),
                peer: i.row.peer.clone(),
                target: i.target.clone(),
                inode: *inode,
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
            let target = p.inbox.join(&row.file_name);
            if row.status != Status::Receiving || !simple(p.mode) || !names.insert(target.clone()) {
                continue;
            }
            items.push(Item {
                partial: partial_path(&p.inbox, tid),
                target,
                mode: p.mode,
                next: after_placing(p),
                hashed: self.digests.finish(tid, row.size),
                transform: Transform::for_receive(p),
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
    target: PathBuf,
    mode: Mode,
    next: Status,
    hashed: Option<String>,
    transform: Transform,
}

/// Puts every verified file of a group in place, then flushes each inbox
/// directory once for all the names put there, then drops the partial
/// names that must outlive that flush.
fn put_together(ready: &[(Item, u64)]) -> Vec<Result<(), ReceiveError>> {
    let mut results: Vec<Result<(), ReceiveError>> = ready
        .iter()
        .map(|(i, ino)| put(&i.partial, &i.target, i.mode, *ino))
        .collect();
    let mut dirs: Vec<&Path> = ready
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .filter_map(|((i, _), _)| i.target.parent())
        .collect();
    dirs.sort();
    dirs.dedup();
    let failed_dirs: Vec<(&Path, String)> = dirs
        .into_iter()
        .filter_map(|d| durable::fsync_dir(d).err().map(|e| (d, e.to_string())))
        .collect();
    for ((i, _), r) in ready.iter().zip(results.iter_mut()) {
        if r.is_err() {
            continue;
        }
        *r = match failed_dirs
            .iter()
            .find(|(d, _)| Some(*d) == i.target.parent())
        {
            Some((_, e)) => Err(ReceiveError::Io(format!(
                "flushing the inbox directory: {e}"
            ))),
            None => tidy(&i.partial, i.mode),
        };
    }
    results
}

fn inode(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// True when `target` is the file whose inode was recorded before placing:
/// the placement happened before a crash.
pub fn already_placed(target: &Path, recorded: u64) -> bool {
    inode(target).map(|i| i == recorded).unwrap_or(false)
}

/// Puts `partial` in place as `inbox/name`. `record(target, inode)` is called
/// with the inode that will carry the name, before the step that makes it
/// visible, so that recovery can tell whether that step happened.
pub fn place(
    partial: &Path,
    inbox: &Path,
    name: &str,
    mode: Mode,
    record: impl FnOnce(&Path, u64) -> Result<(), ReceiveError>,
) -> Result<PathBuf, ReceiveError> {
    let target = inbox.join(name);
    let io = |what: &'static str| move |e: io::Error| ReceiveError::from_io(what, e);
    match mode {
        Mode::New | Mode::Replace => {
            let ino = inode(partial).map_err(io("reading the partial file"))?;
            record(&target, ino)?;
            put(partial, &target, mode, ino)?;
            durable::fsync_dir(inbox).map_err(io("placing the file"))?;
            tidy(partial, mode)?;
        }
        Mode::Append => {
            // Build old + new beside the partial, then rename it over the
            // name: a reader sees the old file or the whole new one.
            let combined = partial.with_extension("append");
            durable::remove_if_exists(&combined).map_err(io("preparing the append"))?;
            if target.exists() {
                fs::copy(&target, &combined).map_err(io("copying the existing file"))?;
            }
            durable::append_durable(partial, &combined).map_err(io("appending"))?;
            let ino = inode(&combined).map_err(io("reading the appended file"))?;
            record(&target, ino)?;
            durable::rename_durable(&combined, &target).map_err(io("placing the file"))?;
            durable::remove_if_exists(partial).map_err(io("removing the partial file"))?;
        }
        Mode::Generations(keep) => {
            // Rotate only while the name is taken, so that a rotation redone
            // after a crash between rotating and placing does not shift twice.
            if target.exists() {
                rotate(inbox, name, keep).map_err(io("rotating generations"))?;
            }
            let ino = inode(partial).map_err(io("reading the partial file"))?;
            record(&target, ino)?;
            durable::rename_into(partial, &target).map_err(io("placing the file"))?;
        }
    }
    Ok(target)
}

/// The inode `partial` will carry under its inbox name (modes `new` and
/// `replace`), to record before [`put`].
pub fn partial_inode(partial: &Path) -> Result<u64, ReceiveError> {
    inode(partial).map_err(|e| ReceiveError::from_io("reading the partial file", e))
}

/// True for the modes whose placement is one rename or link, which
/// [`put`] does and several transfers can share a directory flush for.
pub fn simple(mode: Mode) -> bool {
    matches!(mode, Mode::New | Mode::Replace)
}

/// Gives `partial` (inode `ino`) the name `target`, mode `new` or `replace`,
/// without flushing the directory: the caller flushes it, once for every
/// file it put there, and then calls [`tidy`]. `new` never overwrites, and
/// knows its own earlier link.
pub fn put(partial: &Path, target: &Path, mode: Mode, ino: u64) -> Result<(), ReceiveError> {
    let io = |what: &'static str| move |e: io::Error| ReceiveError::from_io(what, e);
    if mode == Mode::Replace {
        // Only the new name needs to last: a leftover partial link after a
        // crash is removed at the next start (`recovery.rs`, `sweep_partials`).
        return fs::rename(partial, target).map_err(io("placing the file"));
    }
    match fs::hard_link(partial, target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && already_placed(target, ino) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            Err(ReceiveError::FileExists(target.display().to_string()))
        }
        Err(e) => Err(io("placing the file")(e)),
    }
}

/// After [`put`] and the directory's flush: mode `new` drops the partial
/// file's name, which must outlive the flush of the new one (the two are in
/// different directories, and a crash may keep either change without the
/// other).
pub fn tidy(partial: &Path, mode: Mode) -> Result<(), ReceiveError> {
    if mode != Mode::New {
        return Ok(());
    }
    durable::remove_if_exists(partial)
        .map_err(|e| ReceiveError::from_io("removing the partial file", e))
}

/// `name.(keep-1)` → `name.keep` … `name` → `name.1`; the oldest drops off.
fn rotate(inbox: &Path, name: &str, keep: u32) -> io::Result<()> {
    let generation = |i: u32| inbox.join(format!("{name}.{i}"));
    durable::remove_if_exists(&generation(keep))?;
    for i in (1..keep).rev() {
        let from = generation(i);
        if from.exists() {
            fs::rename(&from, generation(i + 1))?;
        }
    }
    fs::rename(inbox.join(name), generation(1))?;
    durable::fsync_dir(inbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(content: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.part");
        fs::write(&p, content).unwrap();
        (d, p)
    }

    #[test]
    fn modes() {
        let (d, p) = setup(b"one");
        let inbox = d.path();
        let t = place(&p, inbox, "f", Mode::New, |_, _| Ok(())).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"one");
        assert!(!p.exists());
        fs::write(&p, b"two").unwrap();
        assert_eq!(
            place(&p, inbox, "f", Mode::New, |_, _| Ok(()))
                .unwrap_err()
                .code(),
            crate::error_code::ErrorCode::FileExists
        );
        place(&p, inbox, "f", Mode::Append, |_, _| Ok(())).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"onetwo");
        fs::write(&p, b"three").unwrap();
        place(&p, inbox, "f", Mode::Replace, |_, _| Ok(())).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"three");
        for g in ["g1", "g2", "g3"] {
            fs::write(&p, g).unwrap();
            place(&p, inbox, "f", Mode::Generations(2), |_, _| Ok(())).unwrap();
        }
        assert_eq!(fs::read(&t).unwrap(), b"g3");
        assert_eq!(fs::read(inbox.join("f.1")).unwrap(), b"g2");
        assert_eq!(fs::read(inbox.join("f.2")).unwrap(), b"g1");
        assert!(!inbox.join("f.3").exists());
    }

    #[test]
    fn new_mode_recognises_its_own_earlier_placement() {
        let (d, p) = setup(b"one");
        let target = d.path().join("f");
        // Simulates a crash after the link and before the partial was removed.
        fs::hard_link(&p, &target).unwrap();
        place(&p, d.path(), "f", Mode::New, |_, _| Ok(())).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"one");
    }
}
