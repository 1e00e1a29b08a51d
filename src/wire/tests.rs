//! The wire format's own tests: round trips, lying lengths, names checked
//! as a header is decoded, frames of another version, and decoders fed
//! arbitrary bytes.

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

/// A frame of another version (a newer hakobu's, alone or inside a batch)
/// is refused as such, with its own code, whatever follows the version.
#[test]
fn another_version_is_refused_with_its_own_code() {
    for version in [0u8, VERSION + 1, u8::MAX] {
        let mut raw = chunk().encode().to_vec();
        raw[3] = version;
        let e = Message::decode(Bytes::from(raw)).unwrap_err();
        assert_eq!(e, DecodeError::Version(version));
        assert_eq!(e.code(), ErrorCode::UnsupportedVersion);
        assert!(e.to_string().contains("upgrade this agent"), "{e}");
    }
    // The second part of a batch from a newer sender.
    let raw = Message::batch(vec![receipt(), chunk()]).encode().to_vec();
    let second = PREFIX + br#"{"count":2}"#.len() + 4 + receipt().encode().len() + 4;
    assert_eq!(&raw[second..second + 3], MAGIC);
    let mut newer = raw.clone();
    newer[second + 3] = VERSION + 1;
    assert_eq!(
        Message::decode(Bytes::from(newer)),
        Err(DecodeError::Version(VERSION + 1))
    );
    // Anything else stays malformed.
    assert_eq!(DecodeError::Magic.code(), ErrorCode::MalformedMessage);
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
