//! The group commit of the state database. Statements commit into SQLite's
//! WAL with `synchronous = NORMAL` (written, not yet on disk); a call that
//! must be durable before it returns waits here until an fdatasync of the
//! WAL covers its change. One thread makes those fdatasyncs: every call that
//! arrives while one runs is covered by the next, so callers that arrive
//! together share one flush, and the database thread does not wait for it
//! (it runs the next statements meanwhile; only SQLite's own checkpoints
//! flush on that thread).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

/// What to do once a change is durable (send a caller its result).
pub(super) type Reply = Box<dyn FnOnce() + Send>;

/// How the WAL is made durable; a parameter so that tests can watch it.
type SyncFn = Box<dyn FnMut(&Path, &mut Option<File>) -> std::io::Result<()> + Send>;

/// The counts that say what is durable. `changed` is SQLite's running count
/// of changed rows on the connection (`total_changes`), published after
/// every statement; `flushed` the count that the last completed fdatasync
/// of the WAL covered.
pub(super) struct Flush {
    changed: AtomicU64,
    flushed: AtomicU64,
    syncs: AtomicU64,
    wal: PathBuf,
}

/// The handle the database thread holds: waiting replies go to the flush thread.
pub(super) struct Flusher {
    counts: Arc<Flush>,
    requests: mpsc::Sender<(u64, Reply)>,
    thread: std::thread::JoinHandle<()>,
}

impl Flusher {
    /// Starts the flush thread for the WAL at `wal`; `changed` is the
    /// connection's count now (all of it on disk: the schema commits FULL).
    pub fn start(wal: PathBuf, changed: u64) -> std::io::Result<Flusher> {
        Flusher::start_with(wal, changed, Box::new(sync_wal))
    }

    fn start_with(wal: PathBuf, changed: u64, mut sync: SyncFn) -> std::io::Result<Flusher> {
        let counts = Arc::new(Flush {
            changed: AtomicU64::new(changed),
            flushed: AtomicU64::new(changed),
            syncs: AtomicU64::new(0),
            wal,
        });
        let (requests, rx) = mpsc::channel::<(u64, Reply)>();
        let c = counts.clone();
        let thread = std::thread::Builder::new()
            .name("hakobu-db-flush".into())
            .spawn(move || {
                let mut file = None;
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    // Everything counted before this load is written to the
                    // WAL; every request in the batch was counted before it
                    // was sent.
                    let covers = c.changed.load(Ordering::SeqCst);
                    if c.flushed.load(Ordering::SeqCst) < covers {
                        if let Err(e) = sync(&c.wal, &mut file) {
                            stop_on_failed_flush(&c.wal, &e);
                        }
                        c.syncs.fetch_add(1, Ordering::SeqCst);
                        c.flushed.fetch_max(covers, Ordering::SeqCst);
                    }
                    for (_, reply) in batch {
                        reply();
                    }
                }
            })?;
        Ok(Flusher {
            counts,
            requests,
            thread,
        })
    }

    /// Flushes what is still asked for, then ends the flush thread: before
    /// the connection closes (closing removes the WAL file it syncs).
    pub fn close(self) {
        drop(self.requests);
        let _ = self.thread.join();
    }

    /// Publishes the connection's change count after a statement.
    pub fn published(&self, total_changes: u64) {
        self.counts
            .changed
            .fetch_max(total_changes, Ordering::SeqCst);
    }

    /// Calls `reply` once every change counted up to `target` is on disk:
    /// now, when a flush has covered it already, or after the next flush.
    pub fn after(&self, target: u64, reply: Reply) {
        if self.counts.flushed.load(Ordering::SeqCst) >= target {
            return reply();
        }
        if let Err(mpsc::SendError((_, reply))) = self.requests.send((target, reply)) {
            // The flush thread is gone (it exits the process on failure, so
            // only a panic ends it): the caller is told the call failed by
            // its dropped result channel.
            drop(reply);
        }
    }
}

/// fdatasync of the WAL file, through a descriptor of our own (reopened if
/// the WAL's inode ever changes).
fn sync_wal(wal: &Path, file: &mut Option<File>) -> std::io::Result<()> {
    let ino = std::fs::metadata(wal)?.ino();
    let same = match file {
        Some(f) => f.metadata()?.ino() == ino,
        None => false,
    };
    if !same {
        *file = Some(File::open(wal)?);
    }
    file.as_ref().map_or(Ok(()), File::sync_data)
}

/// After a failed fdatasync the kernel may have dropped the dirty pages:
/// nothing this process believes committed can be trusted. Stop, as
/// databases do; SQLite recovers the WAL at the next start.
fn stop_on_failed_flush(wal: &Path, e: &std::io::Error) -> ! {
    tracing::error!(message = "Cannot flush the state database to disk; stopping. Check the disk, then start the agent again.",
        wal = %wal.display(), error = %e, error_code = %crate::error_code::ErrorCode::StateDbFlushFailed);
    std::process::exit(70);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Barrier, Mutex};
    use std::time::Duration;

    fn flusher(sync: SyncFn) -> (tempfile::TempDir, Flusher) {
        let d = tempfile::tempdir().unwrap();
        let wal = d.path().join("db-wal");
        std::fs::write(&wal, b"wal").unwrap();
        let f = Flusher::start_with(wal, 0, sync).unwrap();
        (d, f)
    }

    /// A reply that reports, once called, whether a flush covered `target`.
    fn reply_to(f: &Flusher, target: u64, tx: &mpsc::Sender<bool>) -> Reply {
        let (counts, tx) = (f.counts.clone(), tx.clone());
        Box::new(move || {
            let _ = tx.send(counts.flushed.load(Ordering::SeqCst) >= target);
        })
    }

    #[test]
    fn a_waiting_call_is_answered_only_after_a_flush_covers_it() {
        let (_d, f) = flusher(Box::new(sync_wal));
        let (tx, rx) = mpsc::channel();
        f.published(5);
        f.after(5, reply_to(&f, 5, &tx));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        assert_eq!(f.counts.syncs.load(Ordering::SeqCst), 1);
        // Covered already: answered at once, no second flush.
        f.after(3, reply_to(&f, 3, &tx));
        assert_eq!(rx.try_recv(), Ok(true));
        assert_eq!(f.counts.syncs.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn calls_that_arrive_during_a_flush_share_the_next_one() {
        // The first flush blocks until the test has queued ten more calls.
        let gate = Arc::new(Barrier::new(2));
        let first = Arc::new(Mutex::new(true));
        let (g, fst) = (gate.clone(), first.clone());
        let (_d, f) = flusher(Box::new(move |_, _| {
            if std::mem::replace(&mut *fst.lock().unwrap(), false) {
                g.wait();
            }
            Ok(())
        }));
        let (tx, rx) = mpsc::channel();
        f.published(1);
        f.after(1, reply_to(&f, 1, &tx));
        for n in 2..12 {
            f.published(n);
            f.after(n, reply_to(&f, n, &tx));
        }
        assert!(rx.try_recv().is_err(), "answered before its flush");
        gate.wait();
        for _ in 0..11 {
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        }
        // The first flush, and at most one more for whatever it did not
        // cover: not one per call.
        assert!(f.counts.syncs.load(Ordering::SeqCst) <= 2);
    }
}
