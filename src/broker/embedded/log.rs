//! The embedded broker's durable storage: append-only segment files, each
//! with a sidecar file of acked message ids. Many appends share one fsync
//! (group commit, driven by the caller). A segment is deleted once every
//! message in it is acked; a mostly-dead segment is compacted by the caller
//! re-appending its live messages. Only the broker core uses this.
//!
//! Segment record: `len u32 · crc32 u32 · id u64 · queue_len u16 · queue ·
//! [from_len u8 · from] · payload`, where `len` counts the bytes after the crc
//! and the crc covers them. `from` is the node the broker authenticated as the
//! publisher; it is there when the top bit of `queue_len` is set (records
//! written before credentials existed have neither, and replay as they were:
//! a queue name is at most 255 bytes, so that bit was never set). A torn
//! record at the end of the last segment (a crash before its fsync, so never
//! confirmed) is cut off on replay.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tracing::{error, warn};

/// Segments roll over past this size.
pub const SEGMENT_BYTES: u64 = 64 << 20;
const HEADER: u64 = 4 + 4 + 8 + 2;
/// In `queue_len`: a `from` follows the queue name.
const HAS_FROM: u16 = 0x8000;

/// Where a message's payload lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub segment: u64,
    /// Where the payload starts; the publisher's node name is the
    /// `from_len` bytes before it.
    pub offset: u64,
    pub len: u32,
    pub from_len: u8,
}

/// A live message found on replay.
#[derive(Debug)]
pub struct Stored {
    pub id: u64,
    pub queue: String,
    pub loc: Loc,
}

struct Segment {
    file: Arc<File>,
    acks: Option<Arc<File>>,
    size: u64,
    live: u64,
    live_bytes: u64,
    dirty: bool,
}

pub struct Log {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    current: u64,
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.seg"))
}

fn ack_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.acks"))
}

impl Log {
    /// Opens `dir`, replays it, and starts a fresh segment for new appends.
    /// Returns the live messages in id order and the next free id.
    pub fn open(dir: &Path) -> io::Result<(Log, Vec<Stored>, u64)> {
        fs::create_dir_all(dir)?;
        let ids = segment_ids(dir)?;
        let mut live: BTreeMap<u64, (String, Loc)> = BTreeMap::new();
        let mut segments = BTreeMap::new();
        let mut next_id = 1;
        let last = ids.last().copied();
        for &seg in &ids {
            let path = seg_path(dir, seg);
            let (records, good_len) = scan(&path)?;
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let size = file.metadata()?.len();
            if good_len < size {
                if Some(seg) == last {
                    // Never confirmed: the fsync that would have confirmed it did not finish.
                    warn!(
                        message = "Cutting a torn record off the last segment.",
                        segment = seg,
                        at = good_len
                    );
                    file.set_len(good_len)?;
                } else {
                    error!(
                        message =
                            "Corrupt record inside a sealed segment; the rest of it is unreadable.",
                        segment = seg,
                        at = good_len
                    );
                }
            }
            for (id, queue, loc) in records {
                next_id = next_id.max(id + 1);
                live.insert(id, (queue, loc));
            }
            for id in read_acks(&ack_path(dir, seg))? {
                if live.get(&id).is_some_and(|(_, loc)| loc.segment == seg) {
                    live.remove(&id);
                }
            }
            segments.insert(
                seg,
                Segment {
                    file: Arc::new(file),
                    acks: None,
                    size: good_len,
                    live: 0,
                    live_bytes: 0,
                    dirty: false,
                },
            );
        }
        for (_, loc) in live.values() {
            if let Some(s) = segments.get_mut(&loc.segment) {
                s.live += 1;
                s.live_bytes += loc.len as u64;
            }
        }
        let current = last.map_or(1, |l| l + 1);
        let mut log = Log {
            dir: dir.to_path_buf(),
            segments,
            current,
        };
        log.open_segment(current)?;
        // Segments left with nothing live (acked before the restart) go now.
        let empty: Vec<u64> = log
            .segments
            .iter()
            .filter(|(id, s)| **id != current && s.live == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in empty {
            log.drop_segment(id)?;
        }
        crate::durable::fsync_dir(dir)?;
        let stored = live
            .into_iter()
            .map(|(id, (queue, loc))| Stored { id, queue, loc })
            .collect();
        Ok((log, stored, next_id))
    }

    fn open_segment(&mut self, id: u64) -> io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(seg_path(&self.dir, id))?;
        self.segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                acks: None,
                size: 0,
                live: 0,
                live_bytes: 0,
                dirty: true,
            },
        );
        self.current = id;
        Ok(())
    }

    /// Appends a message (not yet durable: call [`Log::sync`] before confirming).
    pub fn append(&mut self, id: u64, queue: &str, from: &str, payload: &[u8]) -> io::Result<Loc> {
        if self
            .segments
            .get(&self.current)
            .is_some_and(|s| s.size >= SEGMENT_BYTES)
        {
            let next = self.current + 1;
            self.open_segment(next)?;
            crate::durable::fsync_dir(&self.dir)?;
        }
        let q = &queue.as_bytes()[..queue.len().min(255)];
        let from = &from.as_bytes()[..from.len().min(255)];
        let body_len = 8 + 2 + q.len() + 1 + from.len() + payload.len();
        let mut rec = Vec::with_capacity(8 + body_len);
        rec.extend_from_slice(&(body_len as u32).to_be_bytes());
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(&id.to_be_bytes());
        rec.extend_from_slice(&(q.len() as u16 | HAS_FROM).to_be_bytes());
        rec.extend_from_slice(q);
        rec.push(from.len() as u8);
        rec.extend_from_slice(from);
        rec.extend_from_slice(payload);
        let crc = crc32fast::hash(&rec[8..]);
        rec[4..8].copy_from_slice(&crc.to_be_bytes());
        let seg = self
            .segments
            .get_mut(&self.current)
            .ok_or_else(|| io::Error::other("no current segment"))?;
        if let Err(e) = (&*seg.file).write_all(&rec) {
            // A write cut short (a full disk) leaves part of a record at the
            // end, where the next append would follow it and every offset
            // after it would be wrong: cut it off. If even that fails, the
            // next append starts a new segment (a torn tail is what a crash
            // leaves, and reading the log at start stops at it).
            if seg.file.set_len(seg.size).is_err() {
                seg.size = seg.size.max(SEGMENT_BYTES);
            }
            return Err(e);
        }
        let loc = Loc {
            segment: self.current,
            offset: seg.size + HEADER + q.len() as u64 + 1 + from.len() as u64,
            len: payload.len() as u32,
            from_len: from.len() as u8,
        };
        seg.size += rec.len() as u64;
        seg.live += 1;
        seg.live_bytes += payload.len() as u64;
        seg.dirty = true;
        Ok(loc)
    }

    /// Records that a message is acked. Acks need no fsync of their own: a
    /// lost ack only means a redelivery, which consumers tolerate.
    pub fn ack(&mut self, id: u64, loc: Loc) -> io::Result<()> {
        let dir = self.dir.clone();
        let Some(seg) = self.segments.get_mut(&loc.segment) else {
            return Ok(());
        };
        seg.live = seg.live.saturating_sub(1);
        seg.live_bytes = seg.live_bytes.saturating_sub(loc.len as u64);
        if seg.live == 0 && loc.segment != self.current {
            return self.drop_segment(loc.segment);
        }
        if seg.acks.is_none() {
            seg.acks = Some(Arc::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(ack_path(&dir, loc.segment))?,
            ));
        }
        if let Some(f) = &seg.acks {
            (&**f).write_all(&id.to_be_bytes())?;
        }
        seg.dirty = true;
        Ok(())
    }

    /// Makes every append and ack so far durable: one fsync per dirty file.
    pub fn sync(&mut self) -> io::Result<()> {
        self.take_dirty().sync()
    }

    /// The files written since the last call, marked clean: syncing them
    /// (on another thread, while appends go on) makes every append and ack
    /// made before this call durable.
    pub fn take_dirty(&mut self) -> Dirty {
        let mut files = Vec::new();
        for seg in self.segments.values_mut().filter(|s| s.dirty) {
            files.push(seg.file.clone());
            files.extend(seg.acks.clone());
            seg.dirty = false;
        }
        Dirty(files)
    }

    #[cfg(test)]
    pub fn read(&self, loc: Loc) -> io::Result<Bytes> {
        Ok(self.read_with_from(loc)?.1)
    }

    /// The payload and the node that published it ("" for a record
    /// written before credentials existed).
    pub fn read_with_from(&self, loc: Loc) -> io::Result<(String, Bytes)> {
        let seg = self
            .segments
            .get(&loc.segment)
            .ok_or_else(|| io::Error::other("segment reclaimed"))?;
        let from_len = loc.from_len as usize;
        let mut buf = vec![0u8; from_len + loc.len as usize];
        seg.file
            .read_exact_at(&mut buf, loc.offset - from_len as u64)?;
        let mut payload = Bytes::from(buf);
        let from = payload.split_to(from_len);
        let from = String::from_utf8(from.to_vec()).unwrap_or_default();
        Ok((from, payload))
    }

    /// A sealed segment more than half dead, worth compacting, among those
    /// `movable` allows.
    pub fn compaction_candidate(&self, movable: impl Fn(u64) -> bool) -> Option<u64> {
        self.segments
            .iter()
            .find(|(id, s)| {
                **id != self.current && s.live > 0 && s.live_bytes * 2 < s.size && movable(**id)
            })
            .map(|(id, _)| *id)
    }

    /// Deletes a segment and its ack file (after its live messages moved).
    pub fn drop_segment(&mut self, id: u64) -> io::Result<()> {
        self.segments.remove(&id);
        crate::durable::remove_if_exists(&seg_path(&self.dir, id))?;
        crate::durable::remove_if_exists(&ack_path(&self.dir, id))
    }

    #[cfg(test)]
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

/// Files to fsync, from [`Log::take_dirty`]. Holding them is safe after their
/// segment is dropped: the descriptors stay valid, and syncing an unlinked
/// file is harmless.
pub struct Dirty(Vec<Arc<File>>);

impl Dirty {
    pub fn sync(&self) -> io::Result<()> {
        self.0.iter().try_for_each(|f| f.sync_data())
    }
}

/// The ids of the segment files in `dir`, in order.
fn segment_ids(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids: Vec<u64> = fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Live messages per queue as `(count, payload bytes)`, read without opening
/// the log for writing (a running broker holds it): `hakobu broker status`.
/// A segment reclaimed while it is read is skipped.
pub fn census(dir: &Path) -> io::Result<BTreeMap<String, (u64, u64)>> {
    let ids = segment_ids(dir)?;
    let mut live: BTreeMap<u64, (String, Loc)> = BTreeMap::new();
    for seg in ids {
        let records = match scan(&seg_path(dir, seg)) {
            Ok((records, _)) => records,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for (id, queue, loc) in records {
            live.insert(id, (queue, loc));
        }
        for id in read_acks(&ack_path(dir, seg))? {
            if live.get(&id).is_some_and(|(_, loc)| loc.segment == seg) {
                live.remove(&id);
            }
        }
    }
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (queue, loc) in live.into_values() {
        let e = out.entry(queue).or_default();
        e.0 += 1;
        e.1 += loc.len as u64;
    }
    Ok(out)
}

/// The records of one segment as `(id, queue, location)`.
type Records = Vec<(u64, String, Loc)>;

/// Reads a segment's records; returns them and the length of the valid prefix.
fn scan(path: &Path) -> io::Result<(Records, u64)> {
    let seg: u64 = path
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while data.len() - at >= HEADER as usize {
        let body_len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_be_bytes(data[at + 4..at + 8].try_into().unwrap_or_default());
        if body_len < 10 || data.len() - at - 8 < body_len {
            break;
        }
        let body = &data[at + 8..at + 8 + body_len];
        if crc32fast::hash(body) != crc {
            break;
        }
        let id = u64::from_be_bytes(body[..8].try_into().unwrap_or_default());
        let raw_qlen = u16::from_be_bytes([body[8], body[9]]);
        let qlen = (raw_qlen & !HAS_FROM) as usize;
        if 10 + qlen > body_len {
            break;
        }
        let Ok(queue) = std::str::from_utf8(&body[10..10 + qlen]) else {
            break;
        };
        let mut head = 10 + qlen;
        let mut from_len = 0u8;
        if raw_qlen & HAS_FROM != 0 {
            let Some(&n) = body.get(head) else { break };
            if head + 1 + n as usize > body_len {
                break;
            }
            from_len = n;
            head += 1 + n as usize;
        }
        let offset = (at + 8 + head) as u64;
        out.push((
            id,
            queue.to_string(),
            Loc {
                segment: seg,
                offset,
                len: (body_len - head) as u32,
                from_len,
            },
        ));
        at += 8 + body_len;
    }
    Ok((out, at as u64))
}

fn read_acks(path: &Path) -> io::Result<Vec<u64>> {
    match fs::read(path) {
        Ok(b) => Ok(b
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_returns_unacked_messages_and_cuts_torn_tails() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut log, stored, next) = Log::open(d.path()).unwrap();
            assert!(stored.is_empty());
            assert_eq!(next, 1);
            let a = log.append(1, "q", "alpha", b"one").unwrap();
            log.append(2, "q", "", b"two").unwrap();
            log.append(3, "r", "beta", b"three").unwrap();
            log.sync().unwrap();
            assert_eq!(&log.read(a).unwrap()[..], b"one");
            log.ack(1, a).unwrap();
            log.sync().unwrap();
        }
        // A torn record at the end of the newest segment.
        let newest = fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .max()
            .unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&newest)
            .unwrap()
            .write_all(&[0, 0, 0, 50, 1, 2])
            .unwrap();
        let (log, stored, next) = Log::open(d.path()).unwrap();
        let ids: Vec<u64> = stored.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(next, 4);
        assert_eq!(&log.read(stored[1].loc).unwrap()[..], b"three");
        let (from, _) = log.read_with_from(stored[1].loc).unwrap();
        assert_eq!(from, "beta");
        assert_eq!(stored[1].queue, "r");
    }

    /// A record in the format before credentials (no `from`): replayed as it
    /// was, with no publisher.
    #[test]
    fn records_of_the_old_format_replay() {
        let d = tempfile::tempdir().unwrap();
        let (q, payload) = (b"hakobu.node.beta", b"old message");
        let body_len = 8 + 2 + q.len() + payload.len();
        let mut rec = Vec::new();
        rec.extend_from_slice(&(body_len as u32).to_be_bytes());
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(&7u64.to_be_bytes());
        rec.extend_from_slice(&(q.len() as u16).to_be_bytes());
        rec.extend_from_slice(q);
        rec.extend_from_slice(payload);
        let crc = crc32fast::hash(&rec[8..]);
        rec[4..8].copy_from_slice(&crc.to_be_bytes());
        fs::write(seg_path(d.path(), 1), &rec).unwrap();
        let (mut log, stored, next) = Log::open(d.path()).unwrap();
        assert_eq!(next, 8);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].queue, "hakobu.node.beta");
        let (from, body) = log.read_with_from(stored[0].loc).unwrap();
        assert_eq!((from.as_str(), &body[..]), ("", &payload[..]));
        // New records go beside it, with their publisher.
        let loc = log.append(8, "hakobu.node.beta", "alpha", b"new").unwrap();
        log.sync().unwrap();
        drop(log);
        let (log, stored, _) = Log::open(d.path()).unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(log.read_with_from(stored[1].loc).unwrap().0, "alpha");
        assert_eq!(stored[1].loc.len, loc.len);
    }

    /// A log in `dir` with 70 messages of 1 MiB, synced: more than one segment.
    fn seventy_mib(dir: &Path) -> (Log, Vec<(u64, Loc)>) {
        let (mut log, _, _) = Log::open(dir).unwrap();
        let big = vec![7u8; 1 << 20];
        let locs = (1..=70)
            .map(|id| (id, log.append(id, "q", "n", &big).unwrap()))
            .collect();
        log.sync().unwrap();
        assert!(log.segment_count() >= 2);
        (log, locs)
    }

    #[test]
    fn fully_acked_segments_are_deleted() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, locs) = seventy_mib(d.path());
        for (id, loc) in locs {
            log.ack(id, loc).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.segment_count(), 1, "only the current segment remains");
        drop(log);
        let (_, stored, _) = Log::open(d.path()).unwrap();
        assert!(stored.is_empty());
    }

    #[test]
    fn compaction_skips_segments_it_may_not_move() {
        let d = tempfile::tempdir().unwrap();
        let (mut log, locs) = seventy_mib(d.path());
        let sealed = locs[0].1.segment;
        // All but one message of the sealed segment acked: mostly dead.
        for (id, loc) in locs.iter().filter(|(_, l)| l.segment == sealed).skip(1) {
            log.ack(*id, *loc).unwrap();
        }
        assert_eq!(log.compaction_candidate(|_| true), Some(sealed));
        // The broker core refuses a segment holding unconfirmed messages,
        // which are in no queue yet and would keep their old location.
        assert_eq!(log.compaction_candidate(|s| s != sealed), None);
    }
}
