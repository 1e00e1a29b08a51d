//! Chunks built by hand, in the agent's own wire format (`hakobu::wire`),
//! for tests that publish past the sending agent: a crash placed between
//! two chunks, links planted between them, a forged sender.

use bytes::Bytes;
use hakobu::broker::Broker;
use hakobu::broker::embedded::Embedded;
use hakobu::domain::{FileId, NodeName, TransferId};
use hakobu::wire::{ChunkHeader, Message, Trailer};
use sha2::{Digest, Sha256};

use super::BrokerProcess;

/// Chunk `idx` of the transfer `tid` of `data`, named `name`, of file id
/// `DATA` from `from` to `to`, in chunks of `chunk_size` bytes; the last
/// one carries the digest.
pub fn chunk(
    tid: &TransferId,
    (from, to): (&str, &str),
    name: &str,
    data: &[u8],
    (idx, chunk_size): (u64, u64),
) -> Message {
    let offset = idx * chunk_size;
    let end = (offset + chunk_size).min(data.len() as u64);
    let last = end == data.len() as u64;
    let header = ChunkHeader {
        transfer_id: tid.clone(),
        file_id: FileId::parse("DATA").unwrap(),
        from: NodeName::parse(from).unwrap(),
        to: NodeName::parse(to).unwrap(),
        file_name: name.into(),
        size: data.len() as u64,
        chunk_size,
        offset,
        last: last.then(|| Trailer {
            sha256: hex::encode(Sha256::digest(data)),
            started_at: "2026-12-01T00:00:00Z".into(),
            meta: Default::default(),
        }),
        sealed: None,
        compressed: None,
        request_id: None,
        attempt: 1,
        parent_id: None,
    };
    Message::Chunk(
        header,
        Bytes::copy_from_slice(&data[offset as usize..end as usize]),
    )
}

/// Publishes `msg` to `to`'s queue with `node`'s credentials, confirmed.
pub fn publish_as(
    rt: &tokio::runtime::Runtime,
    broker: &BrokerProcess,
    (node, to): (&str, &str),
    msg: Message,
) {
    rt.block_on(async {
        let client = Embedded::new(&broker.addr, broker.credentials(node), 1);
        let confirm = client.publish(to, msg.encode()).await.unwrap();
        confirm.await.unwrap();
    });
}
