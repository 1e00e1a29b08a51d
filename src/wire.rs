//! The wire format: the one place that turns typed messages into bytes and
//! back. Chunk bodies travel as raw bytes after a small versioned header;
//! decoding never trusts a length it has not checked against the input.
//!
//! Frame layout (all integers big-endian):
//! `"HKB"` · version `u8` · kind `u8` · header length `u32` · header (JSON) · body
//!
//! A batch (kind 3) carries several chunk or receipt frames in one broker
//! message: its header is `{"count":N}`, its body N times `length u32 · frame`.
//! Batches do not nest. A send request (kind 4) and its reply (kind 5) are
//! header-only frames (`wire/request.rs`), alone or in a batch.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::domain::{FileId, NodeName, TransferId};
use crate::error_code::ErrorCode;

mod parent;
mod request;
pub use request::{Request, RequestReply};

const MAGIC: &[u8; 3] = b"HKB";
pub const VERSION: u8 = 1;
const KIND_CHUNK: u8 = 1;
const KIND_RECEIPT: u8 = 2;
const KIND_BATCH: u8 = 3;
const KIND_REQUEST: u8 = 4;
const KIND_REQUEST_REPLY: u8 = 5;
const PREFIX: usize = 3 + 1 + 1 + 4;
/// Most messages one batch may carry.
pub const MAX_BATCH: usize = 1024;
/// Headers are small; anything larger is hostile.
pub const MAX_HEADER: usize = 64 * 1024;

/// One slice of a file. Every chunk names its transfer completely, so the
/// receiver can check it whatever order chunks arrive in. Decoding checks
/// the names (transfer id, file id, nodes): a header that breaks a rule is
/// malformed. The file name is checked where a transfer is admitted, so
/// that a sender hears why it was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkHeader {
    pub transfer_id: TransferId,
    pub file_id: FileId,
    /// Sending node.
    pub from: NodeName,
    /// Receiving node.
    pub to: NodeName,
    /// Original base name, as the sender gave it.
    pub file_name: String,
    /// Size of the whole file.
    pub size: u64,
    /// Bytes per chunk for this transfer; the last chunk may be shorter.
    pub chunk_size: u64,
    pub offset: u64,
    /// Only on the last chunk: what the whole file must verify against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Trailer>,
    /// Only when the body is sealed end to end (`encrypt: true`): how to
    /// open it (`src/transform/seal.rs`). Absent: the body is the plain bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<Sealed>,
    /// Only when the body is compressed (`compress:` on the send profile):
    /// with what. Decided per chunk (a chunk that does not shrink travels
    /// plain); under a seal, compressed before sealing. Absent: not compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed: Option<Codec>,
    /// Only for a file sent because the receiver asked for it (`hakobu
    /// request`): the request's id, recorded on the receiver's row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<TransferId>,
    /// Which try of the transfer this chunk belongs to (a send profile's
    /// `retry:`); absent means 1. A receiver restarts a transfer it failed
    /// for a later try, and ignores chunks of an earlier one.
    #[serde(default = "first_attempt", skip_serializing_if = "is_first_attempt")]
    pub attempt: u32,
    /// The transfer that started this one (`wire/parent.rs`); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<TransferId>,
}

fn first_attempt() -> u32 {
    1
}

fn is_first_attempt(n: &u32) -> bool {
    *n == 1
}

/// How a chunk body is compressed (`src/transform/compress.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// One or more zstd frames that inflate to exactly the chunk's length.
    Zstd,
}

/// How a sealed chunk body is opened: the transfer's data key, wrapped for
/// the receiving node. Every sealed chunk carries it, so that any chunk can
/// be opened first (after a restart, a redelivery, a resume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    /// The scheme: 1 is an age X25519 file holding a 32-byte
    /// XChaCha20-Poly1305 key; the body is nonce (24) · ciphertext · tag (16).
    pub v: u8,
    /// The age file, standard base64.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trailer {
    /// Lower-case hex SHA-256 of the whole file.
    pub sha256: String,
    /// RFC 3339 time the sender claimed the file.
    pub started_at: String,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// The receiver's outcome, sent back to the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub transfer_id: TransferId,
    pub file_id: FileId,
    /// The receiving node.
    pub from: NodeName,
    /// The sender, to whom the receipt goes.
    pub to: NodeName,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the file was placed on the receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_exit: Option<i32>,
    pub finished_at: String,
    /// The try this receipt settles (see [`ChunkHeader::attempt`]); absent
    /// means 1. A receipt of an earlier try never settles a later one.
    #[serde(default = "first_attempt", skip_serializing_if = "is_first_attempt")]
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Chunk(ChunkHeader, Bytes),
    Receipt(Receipt),
    Request(Request),
    RequestReply(RequestReply),
    /// Chunks and receipts that travel together in one broker message
    /// (small files, and the receipts of a burst); never a batch itself.
    Batch(Vec<Message>),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchHeader {
    count: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message too short for a hakobu frame ({0} bytes)")]
    Short(usize),
    #[error("not a hakobu frame (bad magic)")]
    Magic,
    #[error("unsupported frame version {0}; upgrade this agent")]
    Version(u8),
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("declared header length {declared} exceeds the frame ({available} bytes) or the limit")]
    HeaderLength { declared: usize, available: usize },
    #[error("malformed header: {0}")]
    Header(String),
    #[error("a receipt or a request carries no body")]
    ReceiptBody,
    #[error("malformed batch: {0}")]
    Batch(&'static str),
}

impl DecodeError {
    /// A frame of a version this agent does not know is not malformed: a
    /// newer hakobu sent it, and the operator's fix is an upgrade.
    pub const fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Version(_) => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::MalformedMessage,
        }
    }
}

impl Message {
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(PREFIX + 512 + self.body_len());
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Encodes a chunk whose body `fill` writes straight into the frame, so
    /// that the body is never copied: `fill` gets the `len` bytes to fill.
    pub fn encode_chunk_in_place<E>(
        header: &ChunkHeader,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Bytes, E> {
        let json = to_json(header);
        let mut out = BytesMut::with_capacity(PREFIX + json.len() + len);
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(KIND_CHUNK);
        out.put_u32(json.len() as u32);
        out.put_slice(&json);
        let at = out.len();
        out.resize(at + len, 0);
        fill(&mut out[at..])?;
        Ok(out.freeze())
    }

    /// A batch of `parts` (chunks and receipts; nested batches are flattened).
    pub fn batch(parts: Vec<Message>) -> Message {
        let mut flat = Vec::with_capacity(parts.len());
        for p in parts {
            match p {
                Message::Batch(inner) => flat.extend(inner),
                other => flat.push(other),
            }
        }
        Message::Batch(flat)
    }

    /// Bytes of payload: what a batch limit counts.
    pub fn body_len(&self) -> usize {
        match self {
            Message::Chunk(_, body) => body.len(),
            Message::Receipt(_) | Message::Request(_) | Message::RequestReply(_) => 0,
            Message::Batch(parts) => parts.iter().map(Message::body_len).sum(),
        }
    }

    fn encode_into(&self, out: &mut BytesMut) {
        let (kind, header) = match self {
            Message::Chunk(h, _) => (KIND_CHUNK, to_json(h)),
            Message::Receipt(r) => (KIND_RECEIPT, to_json(r)),
            Message::Request(r) => (KIND_REQUEST, to_json(r)),
            Message::RequestReply(r) => (KIND_REQUEST_REPLY, to_json(r)),
            Message::Batch(parts) => (KIND_BATCH, to_json(&BatchHeader { count: parts.len() })),
        };
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(kind);
        out.put_u32(header.len() as u32);
        out.put_slice(&header);
        match self {
            Message::Chunk(_, body) => out.put_slice(body),
            Message::Receipt(_) | Message::Request(_) | Message::RequestReply(_) => {}
            Message::Batch(parts) => {
                for p in parts {
                    // The part's length goes in front once it is written.
                    let at = out.len();
                    out.put_u32(0);
                    p.encode_into(out);
                    let len = (out.len() - at - 4) as u32;
                    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
                }
            }
        }
    }

    /// Decodes a frame. Bodies are zero-copy slices of `frame`.
    pub fn decode(frame: Bytes) -> Result<Message, DecodeError> {
        match Self::decode_one(frame)? {
            (KIND_BATCH, header, body) => {
                let count = from_json::<BatchHeader>(&header)?.count;
                if count == 0 || count > MAX_BATCH {
                    return Err(DecodeError::Batch("count out of range"));
                }
                let mut parts = Vec::with_capacity(count);
                let mut rest = body;
                while rest.len() >= 4 {
                    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    if len > rest.len() - 4 {
                        return Err(DecodeError::Batch("a part is longer than the batch"));
                    }
                    let part = rest.slice(4..4 + len);
                    rest = rest.slice(4 + len..);
                    let (kind, header, body) = Self::decode_one(part)?;
                    if kind == KIND_BATCH {
                        return Err(DecodeError::Batch("nested batch"));
                    }
                    parts.push(Self::single(kind, &header, body)?);
                    if parts.len() > count {
                        break;
                    }
                }
                if parts.len() != count || !rest.is_empty() {
                    return Err(DecodeError::Batch("part count or length does not match"));
                }
                Ok(Message::Batch(parts))
            }
            (kind, header, body) => Self::single(kind, &header, body),
        }
    }

    fn single(kind: u8, header: &[u8], body: Bytes) -> Result<Message, DecodeError> {
        match kind {
            KIND_CHUNK => Ok(Message::Chunk(from_json(header)?, body)),
            KIND_RECEIPT if body.is_empty() => Ok(Message::Receipt(from_json(header)?)),
            KIND_RECEIPT => Err(DecodeError::ReceiptBody),
            KIND_REQUEST if body.is_empty() => Ok(Message::Request(from_json(header)?)),
            KIND_REQUEST_REPLY if body.is_empty() => Ok(Message::RequestReply(from_json(header)?)),
            KIND_REQUEST | KIND_REQUEST_REPLY => Err(DecodeError::ReceiptBody),
            other => Err(DecodeError::Kind(other)),
        }
    }

    /// One frame's kind, header and body, every length checked.
    fn decode_one(frame: Bytes) -> Result<(u8, Bytes, Bytes), DecodeError> {
        if frame.len() < PREFIX {
            return Err(DecodeError::Short(frame.len()));
        }
        if &frame[..3] != MAGIC {
            return Err(DecodeError::Magic);
        }
        if frame[3] != VERSION {
            return Err(DecodeError::Version(frame[3]));
        }
        let kind = frame[4];
        let declared = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) as usize;
        let available = frame.len() - PREFIX;
        if declared > available || declared > MAX_HEADER {
            return Err(DecodeError::HeaderLength {
                declared,
                available,
            });
        }
        let header = frame.slice(PREFIX..PREFIX + declared);
        let body = frame.slice(PREFIX + declared..);
        Ok((kind, header, body))
    }
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError::Header(e.to_string()))
}

impl ChunkHeader {
    /// Number of chunks in this transfer; an empty file still travels as one.
    pub fn chunk_count(&self) -> Option<u64> {
        chunk_count(self.size, self.chunk_size)
    }

    /// Length the body of the chunk at `offset` must have.
    pub fn expected_len(&self) -> Option<u64> {
        if self.chunk_size == 0 || self.offset % self.chunk_size != 0 {
            return None;
        }
        if self.size == 0 {
            return (self.offset == 0).then_some(0);
        }
        if self.offset >= self.size {
            return None;
        }
        Some(self.chunk_size.min(self.size - self.offset))
    }

    pub fn index(&self) -> u64 {
        self.offset.checked_div(self.chunk_size).unwrap_or(0)
    }
}

pub fn chunk_count(size: u64, chunk_size: u64) -> Option<u64> {
    if chunk_size == 0 {
        return None;
    }
    Some(size.div_ceil(chunk_size).max(1))
}

#[cfg(test)]
mod tests;
