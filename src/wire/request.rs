//! The messages of a send request (`hakobu request`): the request, and the
//! reply that names the transfers it started or why none was. Both travel
//! as header-only frames (kinds 4 and 5) in `super`.

use serde::{Deserialize, Serialize};

use crate::domain::{FileId, NodeName, TransferId};

/// A send request (HULFT's 送信要求, `hakobu request`): `from` asks `to` to
/// send it the file of a send profile that lists `from` in `requests_from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Chosen by the requesting node; the reply and the files sent carry it.
    pub request_id: TransferId,
    pub file_id: FileId,
    /// The requesting node, to which the file and the reply go.
    pub from: NodeName,
    /// The node asked to send.
    pub to: NodeName,
    pub requested_at: String,
}

/// The answer to a [`Request`]: refused with a code, or the transfers it
/// started (each then settles like any transfer, with a receipt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestReply {
    pub request_id: TransferId,
    pub file_id: FileId,
    /// The node that was asked.
    pub from: NodeName,
    /// The requesting node.
    pub to: NodeName,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub transfer_ids: Vec<TransferId>,
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn requests_replies_and_request_ids_round_trip() {
        let q = Message::Request(Request {
            request_id: TransferId::new(),
            file_id: FileId::parse("F").unwrap(),
            from: NodeName::parse("beta").unwrap(),
            to: NodeName::parse("alpha").unwrap(),
            requested_at: "2026-01-01T00:00:00Z".into(),
        });
        assert_eq!(Message::decode(q.encode()).unwrap(), q);
        let a = Message::RequestReply(RequestReply {
            request_id: TransferId::new(),
            file_id: FileId::parse("F").unwrap(),
            from: NodeName::parse("alpha").unwrap(),
            to: NodeName::parse("beta").unwrap(),
            ok: true,
            error_code: None,
            error: None,
            transfer_ids: vec![TransferId::new()],
        });
        assert_eq!(Message::decode(a.encode()).unwrap(), a);
        // A chunk sent for a request carries its id; one without has none on the wire.
        let Message::Chunk(mut h, body) = crate::wire::tests::chunk() else {
            unreachable!()
        };
        assert!(
            !String::from_utf8_lossy(&crate::wire::tests::chunk().encode()).contains("request_id")
        );
        h.request_id = Some(TransferId::new());
        let m = Message::Chunk(h, body);
        assert_eq!(Message::decode(m.encode()).unwrap(), m);
    }
}
