//! Watch: one outbox, with inotify as a wake-up hint and a periodic rescan as
//! the fallback; the readiness rule (`stable_for` or `done_marker`) decides
//! when a file is complete and may be claimed. Runs until the agent stops.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Sender;
use crate::config::{Ready, SendProfile};

/// Names never picked up: hidden files and the usual temporary suffixes.
pub fn ignored(name: &str) -> bool {
    const SUFFIXES: [&str; 4] = [".tmp", ".part", ".filepart", ".swp"];
    name.starts_with('.') || SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// How long a wake-up waits for the rest of its burst before scanning.
const COALESCE: Duration = Duration::from_millis(5);

/// Files claimed together, at most: a fuller outbox is claimed a batch at
/// a time, each once the one before has publishers (`backlog.rs`), so a
/// million files dropped at once wait in the outbox, not in memory.
pub(super) const CLAIM_MAX: usize = 1024;

struct Seen {
    size: u64,
    mtime: SystemTime,
    ino: u64,
    since: Instant,
}

/// A file ready to be claimed: its name and the inode the watcher saw
/// there, which the claim checks again once the file is in the spool.
pub type ReadyFile = (String, u64);

/// Watches `profile`'s outbox and claims what is ready, until the sender's
/// stop token is cancelled (checked between claims: a claim under way
/// finishes, so that its files are recorded).
pub async fn watch(sender: Arc<Sender>, profile: SendProfile) {
    let Some(outbox) = profile.outbox.clone() else {
        return;
    };
    if let Err(e) = fs::create_dir_all(&outbox) {
        warn!(message = "Cannot create outbox; retrying at each rescan.", outbox = %outbox.display(), error = %e);
    }
    let (tx, mut wake) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(move |_event| {
        let _ = tx.try_send(());
    })
    .and_then(|mut w| w.watch(&outbox, RecursiveMode::NonRecursive).map(|()| w));
    if let Err(e) = &watcher {
        warn!(message = "No inotify on the outbox; relying on the periodic rescan.", outbox = %outbox.display(), error = %e);
    }
    let rescan = match profile.ready {
        Ready::StableFor(d) => (d / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        Ready::DoneMarker(_) => Duration::from_secs(1),
    };
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let stop = sender.stop.clone();
    while !stop.is_cancelled() {
        // Higher priority first: nothing is claimed here while a more
        // urgent profile's transfer is being published (`throttle.rs`).
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = sender.priorities.yield_to_higher(profile.priority) => {}
        }
        // Nothing more is claimed while this priority's claimed files
        // wait for a publisher.
        sender.wait_for_room(profile.priority).await;
        let ready = ready_files(&profile, &outbox, &mut seen, CLAIM_MAX);
        let full = ready.len() >= CLAIM_MAX;
        if !ready.is_empty() {
            let started = sender.claim(&profile, ready, None).await;
            if full && !started.tids.is_empty() {
                // More may be ready now: no wait for a wake-up. (A claim
                // that took nothing, files it cannot rename, waits for the
                // rescan as before.)
                continue;
            }
        }
        // With stable_for, a file must be re-looked at when its time is up
        // even if nothing else happens, hence the timeout.
        tokio::select! {
            _ = stop.cancelled() => {}
            woken = tokio::time::timeout(rescan, wake.recv()) => {
                if let Ok(Some(())) = woken {
                    // A burst of events (files dropped together) makes one scan.
                    tokio::time::sleep(COALESCE).await;
                    let _ = wake.try_recv();
                }
            }
        }
    }
}

/// Names in the outbox that are complete now, regular files (a link is
/// never ready), each with the inode seen; at most `limit` (the directory's
/// order decides which: the next scan finds the others).
fn ready_files(
    profile: &SendProfile,
    outbox: &std::path::Path,
    seen: &mut HashMap<String, Seen>,
    limit: usize,
) -> Vec<ReadyFile> {
    let entries = match fs::read_dir(outbox) {
        Ok(e) => e,
        Err(e) => {
            debug!(message = "Cannot read outbox.", outbox = %outbox.display(), error = %e);
            return Vec::new();
        }
    };
    let mut present = HashSet::new();
    let mut ready = Vec::new();
    let mut whole = true;
    for entry in entries.flatten() {
        if ready.len() >= limit {
            // The rest of the directory is not looked at this time.
            whole = false;
            break;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if ignored(&name) {
            continue;
        }
        match &profile.ready {
            // Only markers are looked at (no stat of every data file).
            Ready::DoneMarker(marker) => {
                let is_marker = entry.file_type().is_ok_and(|t| t.is_file());
                if let Some(target) = name.strip_suffix(marker.as_str()).filter(|_| is_marker) {
                    let file = outbox
                        .join(target)
                        .symlink_metadata()
                        .ok()
                        .filter(|m| m.is_file());
                    if let Some(m) = file.filter(|_| {
                        !target.is_empty() && !ignored(target) && included(profile, target)
                    }) {
                        ready.push((target.to_string(), m.ino()));
                    }
                }
            }
            Ready::StableFor(d) => {
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.file_type().is_file() || !included(profile, &name) {
                    continue;
                }
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let (size, ino) = (meta.len(), meta.ino());
                present.insert(name.clone());
                match seen.get(&name) {
                    // Another inode under the name is another file: its wait starts over.
                    Some(s) if s.size == size && s.mtime == mtime && s.ino == ino => {
                        if s.since.elapsed() >= *d {
                            ready.push((name.clone(), ino));
                            seen.remove(&name);
                        }
                    }
                    _ => {
                        seen.insert(
                            name,
                            Seen {
                                size,
                                mtime,
                                ino,
                                since: Instant::now(),
                            },
                        );
                    }
                }
            }
        }
    }
    if whole {
        seen.retain(|name, _| present.contains(name));
    }
    ready.sort();
    ready
}

/// What is ready in `profile`'s outbox now, for a request: a file under
/// `stable_for` counts when it has not changed for that long (its mtime);
/// under `done_marker`, when its marker is there.
pub(super) fn ready_now(profile: &SendProfile) -> Vec<ReadyFile> {
    let Some(outbox) = profile.outbox.as_deref() else {
        return Vec::new();
    };
    let Ready::StableFor(d) = profile.ready else {
        return ready_files(profile, outbox, &mut HashMap::new(), usize::MAX);
    };
    let Ok(entries) = fs::read_dir(outbox) else {
        return Vec::new();
    };
    let mut ready: Vec<ReadyFile> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let meta = entry.metadata().ok()?;
            let age = meta.modified().ok()?.elapsed().unwrap_or_default();
            (!ignored(&name) && meta.file_type().is_file() && included(profile, &name) && age >= d)
                .then(|| (name, meta.ino()))
        })
        .collect();
    ready.sort();
    ready
}

fn included(profile: &SendProfile, name: &str) -> bool {
    profile.include.is_empty() || profile.include.iter().any(|p| p.matches(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_names() {
        for n in [".x", "a.tmp", "a.part", "a.filepart", ".a.swp", "b.swp"] {
            assert!(ignored(n), "{n}");
        }
        assert!(!ignored("sales.csv"));
    }
}
