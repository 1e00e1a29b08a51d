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
    pub const fn code(&self) -> ErrorCode {
        ErrorCode::MalformedMessage
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(super) fn chunk() -> Message {
        Message::Chunk(
            ChunkHeader {
                transfer_id: TransferId::parse("0190f6c4-0000-7000-8000-000000000000").unwrap(),
                file_id: FileId::parse("DAILY_SALES").unwrap(),
                from: NodeName::parse("alpha").unwrap(),
                to: NodeName::parse("beta").unwrap(),
                file_name: "sales.csv".into(),
                size: 5,
                chunk_size: 65536,
                offset: 0,
                last: Some(Trailer {
                    sha256: "00".into(),
                    started_at: "2026-01-01T00:00:00Z".into(),
                    meta: BTreeMap::from([("k".into(), "v".into())]),
                }),
                sealed: None,
                request_id: None,
                attempt: 1,
                compressed: None,
                parent_id: None,
            },
            Bytes::from_static(b"hello"),
        )
    }

    #[test]
    fn round_trip() {
        let m = chunk();
        assert_eq!(Message::decode(m.encode()).unwrap(), m);
        let r = Message::Receipt(Receipt {
            transfer_id: TransferId::new(),
            file_id: FileId::parse("F").unwrap(),
            from: NodeName::parse("beta").unwrap(),
            to: NodeName::parse("alpha").unwrap(),
            ok: false,
            error_code: Some("sha256_mismatch".into()),
            error: Some("x".into()),
            path: None,
            hook_exit: Some(3),
            finished_at: "2026-01-01T00:00:00Z".into(),
            attempt: 1,
        });
        assert_eq!(Message::decode(r.encode()).unwrap(), r);
    }

    fn receipt() -> Message {
        Message::Receipt(Receipt {
            transfer_id: TransferId::new(),
            file_id: FileId::parse("F").unwrap(),
            from: NodeName::parse("beta").unwrap(),
            to: NodeName::parse("alpha").unwrap(),
            ok: true,
            error_code: None,
            error: None,
            path: Some("/in/x".into()),
            hook_exit: Some(0),
            finished_at: "2026-01-01T00:00:00Z".into(),
            attempt: 1,
        })
    }

    #[test]
    fn batches_round_trip_and_refuse_lies() {
        let b = Message::batch(vec![chunk(), receipt(), Message::batch(vec![receipt()])]);
        let Message::Batch(parts) = &b else {
            unreachable!()
        };
        assert_eq!(parts.len(), 3, "nested batches are flattened");
        assert_eq!(b.body_len(), 5);
        let raw = b.encode();
        assert_eq!(Message::decode(raw.clone()).unwrap(), b);
        // A part that claims more than the batch holds.
        let mut lying = raw.to_vec();
        let first_part = PREFIX + br#"{"count":3}"#.len();
        lying[first_part..first_part + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Message::decode(Bytes::from(lying)),
            Err(DecodeError::Batch(_))
        ));
        // A count that does not match the parts, and trailing bytes.
        let mut wrong = raw.to_vec();
        wrong[PREFIX + 9] = b'2';
        assert!(Message::decode(Bytes::from(wrong)).is_err());
        let mut trailing = raw.to_vec();
        trailing.push(0);
        assert!(Message::decode(Bytes::from(trailing)).is_err());
        // Nested batches on the wire.
        let mut nested = BytesMut::new();
        Message::Batch(vec![Message::Batch(vec![receipt()])]).encode_into(&mut nested);
        assert_eq!(
            Message::decode(nested.freeze()),
            Err(DecodeError::Batch("nested batch"))
        );
        assert!(matches!(
            Message::decode(Message::Batch(Vec::new()).encode()),
            Err(DecodeError::Batch(_))
        ));
    }

    #[test]
    fn chunks_encoded_in_place_are_chunks() {
        let m = chunk();
        let Message::Chunk(h, body) = &m else {
            unreachable!()
        };
        let frame = Message::encode_chunk_in_place(h, body.len(), |buf| {
            buf.copy_from_slice(body);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(frame, m.encode());
        assert_eq!(
            Message::encode_chunk_in_place(h, 3, |_| Err("unreadable")),
            Err("unreadable")
        );
    }

    #[test]
    fn rejects_lying_lengths() {
        let mut raw = chunk().encode().to_vec();
        raw[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Message::decode(Bytes::from(raw)),
            Err(DecodeError::HeaderLength { .. })
        ));
        assert_eq!(
            Message::decode(Bytes::from_static(b"HK")),
            Err(DecodeError::Short(2))
        );
        assert_eq!(
            Message::decode(Bytes::from_static(b"XXX\x01\x01\0\0\0\0")),
            Err(DecodeError::Magic)
        );
    }

    #[test]
    fn names_in_a_header_are_checked_as_it_is_decoded() {
        let good = chunk().encode();
        let header_len = u32::from_be_bytes([good[5], good[6], good[7], good[8]]) as usize;
        let header = std::str::from_utf8(&good[PREFIX..PREFIX + header_len]).unwrap();
        for (field, bad) in [
            (
                "0190f6c4-0000-7000-8000-000000000000",
                "../../../../etc/passwd",
            ),
            ("\"alpha\"", "\"al/pha\""),
            ("\"DAILY_SALES\"", "\"..\""),
        ] {
            let changed = header.replacen(field, bad, 1);
            assert_ne!(header, changed, "{field} not in the header");
            let mut raw = good[..5].to_vec();
            raw.extend_from_slice(&(changed.len() as u32).to_be_bytes());
            raw.extend_from_slice(changed.as_bytes());
            raw.extend_from_slice(&good[PREFIX + header_len..]);
            match Message::decode(Bytes::from(raw)) {
                Err(DecodeError::Header(e)) => assert!(e.contains("not a valid"), "{e}"),
                other => panic!("{bad} decoded as {other:?}"),
            }
        }
    }

    #[test]
    fn expected_lengths() {
        let Message::Chunk(mut h, _) = chunk() else {
            unreachable!()
        };
        h.size = 150_000;
        h.offset = 131072;
        assert_eq!(h.expected_len(), Some(150_000 - 131072));
        h.offset = 1;
        assert_eq!(h.expected_len(), None);
        h.offset = 196608;
        assert_eq!(h.expected_len(), None);
        assert_eq!(h.chunk_count(), Some(3));
        h.size = 0;
        h.offset = 0;
        assert_eq!(h.expected_len(), Some(0));
        assert_eq!(h.chunk_count(), Some(1));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(Bytes::from(data));
        }

        #[test]
        fn decoding_mutated_frames_never_panics(pos in 0usize..200, byte in any::<u8>()) {
            let mut raw = chunk().encode().to_vec();
            let i = pos % raw.len();
            raw[i] = byte;
            let _ = Message::decode(Bytes::from(raw));
        }

        #[test]
        fn decoding_mutated_batches_never_panics(pos in 0usize..2000, byte in any::<u8>()) {
            let mut raw = Message::batch(vec![chunk(), receipt(), chunk()]).encode().to_vec();
            let i = pos % raw.len();
            raw[i] = byte;
            let _ = Message::decode(Bytes::from(raw));
        }
    }
}
