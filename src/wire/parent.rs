//! The parent id a chunk header may carry (issue 14, the job flow): the
//! transfer that started this one, so that every node that receives the
//! child knows its parent. It travels as `"parent_id"` beside the other
//! names, is checked as a transfer id when the header is decoded (a header
//! with a malformed one is malformed), is absent when there is none (frames
//! of earlier releases decode as before), and under `encrypt: true` is
//! bound to the seal like every other field (`transform/seal.rs`). The
//! receiver records it on its row and refuses a later chunk of the same
//! transfer that names another parent (`inconsistent_chunk`).

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use crate::domain::TransferId;
    use crate::wire::tests::chunk;
    use crate::wire::{DecodeError, Message, PREFIX};

    fn header_text(m: &Message) -> (String, Bytes) {
        let raw = m.encode();
        let len = u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) as usize;
        let text = String::from_utf8(raw[PREFIX..PREFIX + len].to_vec()).unwrap();
        (text, raw.slice(PREFIX + len..))
    }

    fn frame(header: &str, body: &[u8]) -> Bytes {
        let mut raw = b"HKB\x01\x01".to_vec();
        raw.extend_from_slice(&(header.len() as u32).to_be_bytes());
        raw.extend_from_slice(header.as_bytes());
        raw.extend_from_slice(body);
        Bytes::from(raw)
    }

    #[test]
    fn a_parent_id_round_trips_and_is_absent_when_none() {
        let plain = chunk();
        assert!(!header_text(&plain).0.contains("parent_id"));
        let Message::Chunk(mut h, body) = plain else {
            unreachable!()
        };
        let parent = TransferId::new();
        h.parent_id = Some(parent.clone());
        let m = Message::Chunk(h, body);
        assert!(
            header_text(&m)
                .0
                .contains(&format!("\"parent_id\":\"{parent}\""))
        );
        assert_eq!(Message::decode(m.encode()).unwrap(), m);
    }

    #[test]
    fn a_frame_of_an_earlier_release_decodes_without_a_parent() {
        // The header exactly as release 0.1 wrote it: no parent_id field.
        let (text, body) = header_text(&chunk());
        let Message::Chunk(h, _) = Message::decode(frame(&text, &body)).unwrap() else {
            unreachable!()
        };
        assert_eq!(h.parent_id, None);
    }

    #[test]
    fn a_malformed_parent_id_makes_the_header_malformed() {
        let (text, body) = header_text(&chunk());
        for bad in ["\"../etc\"", "\"\"", "42", "\"short\"", "\"a b c d e f g\""] {
            let changed = text.replacen('{', &format!("{{\"parent_id\":{bad},"), 1);
            assert!(
                matches!(
                    Message::decode(frame(&changed, &body)),
                    Err(DecodeError::Header(_))
                ),
                "{bad} decoded"
            );
        }
    }
}
