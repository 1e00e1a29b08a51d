//! Chunk and publish one spooled file to one receiving node: SHA-256 computed
//! while streaming, publisher confirms pipelined in a window bounded in bytes.
//! On a broker error the caller retries from the first unconfirmed chunk,
//! re-read from the spooled file.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::broker::{BrokerError, Confirm};
use crate::coalesce::Coalescer;
use crate::store::Row;
use crate::wire::{ChunkHeader, Message, Trailer, chunk_count};

/// Where to pick up after a failure: the first chunk not known to be durable,
/// and the digest state just before it.
#[derive(Clone, Default)]
pub struct Resume {
    pub next: u64,
    pub hasher: Sha256,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot read the spooled file {0}: {1}; it may have been removed by hand")]
    Spool(String, std::io::Error),
}

struct InFlight {
    idx: u64,
    len: u64,
    hasher_before: Sha256,
    confirm: Confirm,
}

/// Publishes the chunks of `row`'s spooled file from `resume` on. Returns the
/// file's SHA-256 once every chunk is confirmed; `on_progress` sees confirmed bytes.
/// A file of one chunk goes through `out` with whatever else waits for the
/// same node; the chunks of a larger one straight to the broker, in a window.
pub async fn publish(
    out: &Coalescer,
    node: &str,
    row: &Row,
    window: u64,
    resume: &mut Resume,
    on_progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<String, PublishError> {
    let path = row.path.clone().unwrap_or_default();
    let file = std::fs::File::open(&path).map_err(|e| PublishError::Spool(path.clone(), e))?;
    let file = Arc::new(file);
    let count = chunk_count(row.size, row.chunk_size).unwrap_or(1);
    if count == 1 {
        let body = read_at(&file, &path, 0, row.size).await?;
        let sha256 = hex::encode(Sha256::digest(&body));
        let msg = Message::Chunk(chunk_header(node, row, 0, Some(sha256.clone())), body);
        out.publish(&row.peer, msg).await?;
        on_progress(row.size);
        return Ok(sha256);
    }
    let broker = out.broker();
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut bytes_in_flight = 0u64;
    let mut idx = resume.next;
    let mut confirmed = idx * row.chunk_size;
    // Read ahead: the next chunk is read, hashed and framed on a blocking
    // thread while this one waits for room in the window.
    let mut hasher_before = resume.hasher.clone();
    let mut next =
        (idx < count).then(|| prepare(&file, node, row, idx, count, hasher_before.clone()));
    let mut digest = hex::encode(hasher_before.clone().finalize());

    while let Some(reading) = next.take() {
        let (payload, hasher_after) = reading
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(|e| PublishError::Spool(path.clone(), e))?;
        let len = chunk_len(row, idx);
        if idx + 1 < count {
            next = Some(prepare(
                &file,
                node,
                row,
                idx + 1,
                count,
                hasher_after.clone(),
            ));
        } else {
            digest = hex::encode(hasher_after.clone().finalize());
        }
        while bytes_in_flight + len > window && !in_flight.is_empty() {
            let done = settle(&mut in_flight, resume).await?;
            bytes_in_flight -= done;
            confirmed += done;
            on_progress(confirmed);
        }
        match broker.publish(&row.peer, payload).await {
            Ok(confirm) => in_flight.push_back(InFlight {
                idx,
                len,
                hasher_before,
                confirm,
            }),
            Err(e) => {
                *resume = match in_flight.front() {
                    Some(f) => Resume {
                        next: f.idx,
                        hasher: f.hasher_before.clone(),
                    },
                    None => Resume {
                        next: idx,
                        hasher: hasher_before,
                    },
                };
                return Err(e.into());
            }
        }
        bytes_in_flight += len;
        hasher_before = hasher_after;
        idx += 1;
    }
    while !in_flight.is_empty() {
        confirmed += settle(&mut in_flight, resume).await?;
        on_progress(confirmed);
    }
    *resume = Resume::default();
    Ok(digest)
}

fn chunk_len(row: &Row, idx: u64) -> u64 {
    let offset = idx * row.chunk_size;
    row.chunk_size.min(row.size - offset.min(row.size))
}

type Prepared = tokio::task::JoinHandle<std::io::Result<(Bytes, Sha256)>>;

/// Reads chunk `idx` straight into its frame, on a blocking thread, and
/// continues `hasher` with it. The last chunk's header carries the file's
/// digest, known only once its body is hashed: that one is copied once.
fn prepare(
    file: &Arc<std::fs::File>,
    node: &str,
    row: &Row,
    idx: u64,
    count: u64,
    mut hasher: Sha256,
) -> Prepared {
    let file = file.clone();
    let offset = idx * row.chunk_size;
    let len = chunk_len(row, idx);
    let last = idx + 1 == count;
    let mut header = chunk_header(node, row, offset, last.then(String::new));
    tokio::task::spawn_blocking(move || {
        if !last {
            let frame = Message::encode_chunk_in_place(&header, len as usize, |body| {
                file.read_exact_at(body, offset)?;
                hasher.update(&*body);
                Ok::<_, std::io::Error>(())
            })?;
            return Ok((frame, hasher));
        }
        let mut body = vec![0u8; len as usize];
        file.read_exact_at(&mut body, offset)?;
        hasher.update(&body);
        if let Some(t) = header.last.as_mut() {
            t.sha256 = hex::encode(hasher.clone().finalize());
        }
        Ok((Message::Chunk(header, Bytes::from(body)).encode(), hasher))
    })
}

/// The header of `row`'s chunk at `offset`; the last one carries the
/// file's digest in its trailer.
fn chunk_header(node: &str, row: &Row, offset: u64, digest: Option<String>) -> ChunkHeader {
    ChunkHeader {
        transfer_id: row.transfer_id.clone(),
        file_id: row.file_id.clone(),
        from: node.to_string(),
        to: row.peer.clone(),
        file_name: row.file_name.clone(),
        size: row.size,
        chunk_size: row.chunk_size,
        offset,
        last: digest.map(|sha256| Trailer {
            sha256,
            started_at: row.started_at.clone(),
            meta: row.meta.clone(),
        }),
    }
}

/// Awaits the oldest confirm; on failure, points `resume` at it.
async fn settle(
    in_flight: &mut VecDeque<InFlight>,
    resume: &mut Resume,
) -> Result<u64, PublishError> {
    let Some(front) = in_flight.pop_front() else {
        return Ok(0);
    };
    match front.confirm.await {
        Ok(()) => Ok(front.len),
        Err(e) => {
            *resume = Resume {
                next: front.idx,
                hasher: front.hasher_before,
            };
            Err(e.into())
        }
    }
}

async fn read_at(
    file: &Arc<std::fs::File>,
    path: &str,
    offset: u64,
    len: u64,
) -> Result<Bytes, PublishError> {
    let f = file.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset).map(|()| Bytes::from(buf))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()));
    match read {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) | Err(e) => Err(PublishError::Spool(path.to_string(), e)),
    }
}

/// The spool path of a claimed file: `spool/<file_id>/<transfer_id>.<name>`,
/// one flat directory per file id (no directory to create, flush and remove
/// per file). A name too long to take the transfer id in front keeps a
/// directory of its own, `spool/<file_id>/<transfer_id>/<name>`, the layout
/// of earlier versions, which recovery still reads.
pub fn spool_path(
    spool: &Path,
    file_id: &str,
    transfer_id: &str,
    name: &str,
) -> std::path::PathBuf {
    let dir = spool.join(file_id);
    if transfer_id.len() + 1 + name.len() <= NAME_MAX {
        dir.join(format!("{transfer_id}.{name}"))
    } else {
        dir.join(transfer_id).join(name)
    }
}

/// The longest file name the filesystems hakobu runs on take, in bytes.
const NAME_MAX: usize = 255;

/// The transfer id and file name of a spool entry `<transfer_id>.<name>`.
pub fn parse_spooled(entry: &str) -> Option<(&str, &str)> {
    let (tid, name) = entry.split_at_checked(36)?;
    let name = name.strip_prefix('.')?;
    (crate::receiver::valid_transfer_id(tid) && !name.is_empty()).then_some((tid, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_paths_are_flat_unless_the_name_is_too_long() {
        let tid = "0190f6c4-0000-7000-8000-000000000001";
        let flat = spool_path(Path::new("/s"), "sales", tid, "a.b.csv");
        assert_eq!(flat, Path::new("/s/sales").join(format!("{tid}.a.b.csv")));
        let entry = flat.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_spooled(entry), Some((tid, "a.b.csv")));
        let long = "x".repeat(230);
        assert_eq!(
            spool_path(Path::new("/s"), "sales", tid, &long),
            Path::new("/s/sales").join(tid).join(&long)
        );
        for other in [
            ".a.tmp",
            "a.csv",
            tid,
            &format!("{tid}."),
            &format!("{tid}xa"),
        ] {
            assert_eq!(parse_spooled(other), None, "{other}");
        }
    }
}
