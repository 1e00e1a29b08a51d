use std::collections::BTreeMap;

use super::*;
use crate::keys::{self, Keyring};

/// The header of the chunk at `offset` of a 200 KiB file in 64 KiB chunks.
pub(crate) fn header(offset: u64, size: u64) -> ChunkHeader {
    ChunkHeader {
        transfer_id: TransferId::parse("0190f6c4-0000-7000-8000-000000000000").unwrap(),
        file_id: FileId::parse("DATA").unwrap(),
        from: NodeName::parse("alpha").unwrap(),
        to: NodeName::parse("beta").unwrap(),
        file_name: "pay.csv".into(),
        size,
        chunk_size: 65536,
        offset,
        last: None,
        sealed: None,
        request_id: None,
        attempt: 1,
        compressed: None,
        parent_id: None,
    }
}

struct Node {
    _dir: tempfile::TempDir,
    ring: Keyring,
    public: age::x25519::Recipient,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let (text, public) = keys::generate("test");
    crate::secret::create(&path, &text).unwrap();
    Node {
        _dir: dir,
        ring: Keyring::new(Some(path), BTreeMap::new()),
        public: keys::parse_public_key(&public).unwrap(),
    }
}

/// Seals `plain` as the chunk `h`; returns the header as sent and the body.
fn seal(s: &Sealer, mut h: ChunkHeader, plain: &[u8]) -> (ChunkHeader, Vec<u8>) {
    h.sealed = Some(s.sealed());
    let mut body = vec![0u8; plain.len() + OVERHEAD];
    body[NONCE..NONCE + plain.len()].copy_from_slice(plain);
    s.seal_in_place(&h, &mut body).unwrap();
    (h, body)
}

fn try_open(n: &Node, h: &ChunkHeader, body: &[u8]) -> Result<Bytes, OpenError> {
    open(&n.ring, h, h.sealed.as_ref().unwrap(), body)
}

#[test]
fn a_sealed_chunk_opens_for_its_node_and_hides_its_bytes() {
    let beta = node();
    let s = Sealer::new(&beta.public).unwrap();
    let plain = vec![0x5a; 65536];
    let (h, body) = seal(&s, header(65536, 200_000), &plain);
    assert!(!body.windows(64).any(|w| w == &plain[..64]));
    assert_eq!(&try_open(&beta, &h, &body).unwrap()[..], &plain[..]);
    // Remembered: the same key opens again without the private key file.
    std::fs::remove_file(beta.ring.private_key_file().unwrap()).unwrap();
    assert_eq!(&try_open(&beta, &h, &body).unwrap()[..], &plain[..]);
}

#[test]
fn changed_moved_swapped_or_cut_chunks_do_not_open() {
    let beta = node();
    let s = Sealer::new(&beta.public).unwrap();
    let plain = vec![7u8; 65536];
    let (h, body) = seal(&s, header(65536, 200_000), &plain);
    // A flipped byte anywhere: nonce, ciphertext, tag.
    for i in [0, NONCE + 10, body.len() - 1] {
        let mut b = body.clone();
        b[i] ^= 1;
        assert!(
            matches!(try_open(&beta, &h, &b), Err(OpenError::Forged)),
            "byte {i}"
        );
    }
    // Another offset, size, name, sender, transfer; a trailer added.
    let mut moved = h.clone();
    moved.offset = 0;
    assert!(matches!(
        try_open(&beta, &moved, &body),
        Err(OpenError::Forged)
    ));
    let mut resized = h.clone();
    resized.size = 131072;
    assert!(matches!(
        try_open(&beta, &resized, &body),
        Err(OpenError::Forged)
    ));
    let mut renamed = h.clone();
    renamed.file_name = "other.csv".into();
    assert!(matches!(
        try_open(&beta, &renamed, &body),
        Err(OpenError::Forged)
    ));
    let mut other = h.clone();
    other.transfer_id = TransferId::new();
    assert!(matches!(
        try_open(&beta, &other, &body),
        Err(OpenError::Forged)
    ));
    let mut trailed = h.clone();
    trailed.last = Some(Trailer {
        sha256: "0".repeat(64),
        started_at: "x".into(),
        meta: BTreeMap::new(),
    });
    assert!(matches!(
        try_open(&beta, &trailed, &body),
        Err(OpenError::Forged)
    ));
    // Cut short.
    assert!(matches!(
        try_open(&beta, &h, &body[..body.len() - 1]),
        Err(OpenError::Forged)
    ));
    assert!(matches!(
        try_open(&beta, &h, &body[..10]),
        Err(OpenError::Forged)
    ));
    // The body of another transfer's chunk at the same place, with its key.
    let s2 = Sealer::new(&beta.public).unwrap();
    let mut h2 = header(65536, 200_000);
    h2.transfer_id = TransferId::new();
    let (h2, body2) = seal(&s2, h2, &plain);
    let mut spliced = h.clone();
    spliced.sealed = h2.sealed.clone();
    assert!(matches!(
        try_open(&beta, &spliced, &body2),
        Err(OpenError::Forged)
    ));
    assert!(matches!(
        try_open(&beta, &h, &body2),
        Err(OpenError::Forged)
    ));
}

#[test]
fn a_wrong_key_or_none_does_not_open_and_keys_may_change_mid_transfer() {
    let (beta, gamma) = (node(), node());
    let s = Sealer::new(&beta.public).unwrap();
    let (h, body) = seal(&s, header(0, 200_000), b"hello");
    assert!(matches!(
        try_open(&gamma, &h, &body),
        Err(OpenError::NotForUs)
    ));
    let none = Keyring::default();
    let e = open(&none, &h, h.sealed.as_ref().unwrap(), &body).unwrap_err();
    assert!(e.to_string().contains("keys.private_key_file"), "{e}");
    let mut garbled = h.clone();
    garbled.sealed.as_mut().unwrap().key = "not base64!".into();
    assert!(matches!(
        try_open(&beta, &garbled, &body),
        Err(OpenError::Wrapped)
    ));
    garbled.sealed.as_mut().unwrap().key = BASE64.encode(b"age-encryption.org/v1\n");
    assert!(matches!(
        try_open(&beta, &garbled, &body),
        Err(OpenError::Wrapped)
    ));
    garbled.sealed.as_mut().unwrap().v = 2;
    assert!(matches!(
        try_open(&beta, &garbled, &body),
        Err(OpenError::Scheme(2))
    ));
    // A sender restarted mid-file seals the rest with a new data key.
    let s2 = Sealer::new(&beta.public).unwrap();
    let (h2, body2) = seal(&s2, header(65536, 200_000), b"world");
    assert_eq!(&try_open(&beta, &h, &body).unwrap()[..], b"hello");
    assert_eq!(&try_open(&beta, &h2, &body2).unwrap()[..], b"world");
}

#[test]
fn opening_arbitrary_bodies_never_panics() {
    let beta = node();
    let s = Sealer::new(&beta.public).unwrap();
    let (h, body) = seal(&s, header(0, 200_000), &[1u8; 100]);
    for len in 0..body.len() {
        let _ = try_open(&beta, &h, &body[..len]);
    }
    for cut in 0..h.sealed.as_ref().unwrap().key.len() {
        let mut g = h.clone();
        g.sealed.as_mut().unwrap().key.truncate(cut);
        let _ = try_open(&beta, &g, &body);
    }
}

mod mutated {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// A wrapped key or a body changed anywhere never panics and never opens.
        #[test]
        fn mutated_keys_and_bodies_never_open(pos in 0usize..4096, byte in any::<u8>(), in_key in any::<bool>()) {
            let beta = node();
            let s = Sealer::new(&beta.public).unwrap();
            let (mut h, mut body) = seal(&s, header(0, 200_000), &[9u8; 300]);
            if in_key {
                let mut raw = BASE64.decode(&h.sealed.as_ref().unwrap().key).unwrap();
                let i = pos % raw.len();
                prop_assume!(raw[i] != byte);
                raw[i] = byte;
                h.sealed.as_mut().unwrap().key = BASE64.encode(raw);
            } else {
                let i = pos % body.len();
                prop_assume!(body[i] != byte);
                body[i] = byte;
            }
            prop_assert!(try_open(&beta, &h, &body).is_err());
        }
    }
}

/// Compress, then seal (`compress: zstd` with `encrypt: true`): the chunk
/// opens and inflates back, and the seal binds the `compressed` flag, so
/// that stripping or adding it on the way does not open.
#[test]
fn a_compressed_sealed_chunk_round_trips_and_its_flag_is_bound() {
    use crate::transform::Transform;
    use crate::wire::Codec;
    let beta = node();
    let s = std::sync::Arc::new(Sealer::new(&beta.public).unwrap());
    let t = Transform::Compress {
        level: 3,
        then: Box::new(Transform::Seal(s.clone())),
    };
    let plain: Vec<u8> = (0..65536u32).map(|i| b"a,b,c\n"[i as usize % 6]).collect();
    let mut h = header(65536, 200_000);
    h.sealed = t.sealed();
    let body = t.encode(&mut h, Bytes::from(plain.clone())).unwrap();
    assert_eq!(h.compressed, Some(Codec::Zstd));
    assert!(body.len() < plain.len() / 10, "{}", body.len());
    let rx = Transform::Open(std::sync::Arc::new(Keyring::new(
        beta.ring.private_key_file().map(Into::into),
        BTreeMap::new(),
    )));
    assert_eq!(&rx.decode(&h, body.clone()).unwrap()[..], &plain[..]);
    let mut stripped = h.clone();
    stripped.compressed = None;
    assert!(try_open(&beta, &stripped, &body).is_err());
    // Uncompressed and sealed: adding the flag does not open either.
    let (h2, body2) = seal(&s, header(65536, 200_000), &plain);
    let mut added = h2.clone();
    added.compressed = Some(Codec::Zstd);
    assert!(try_open(&beta, &added, &body2).is_err());
    assert_eq!(&try_open(&beta, &h2, &body2).unwrap()[..], &plain[..]);
}

/// The parent id (the job flow) is bound like the rest of the header: a
/// sealed chunk with one does not open when it is changed or stripped, and
/// one without does not open when one is added.
#[test]
fn a_parent_id_is_bound_to_the_seal() {
    let beta = node();
    let s = Sealer::new(&beta.public).unwrap();
    let plain = vec![7u8; 1000];
    let mut with = header(0, 1000);
    with.parent_id = Some(TransferId::new());
    let (h, body) = seal(&s, with, &plain);
    assert_eq!(&try_open(&beta, &h, &body).unwrap()[..], &plain[..]);
    let mut forged = h.clone();
    forged.parent_id = Some(TransferId::new());
    assert!(try_open(&beta, &forged, &body).is_err());
    let mut stripped = h.clone();
    stripped.parent_id = None;
    assert!(try_open(&beta, &stripped, &body).is_err());
    let (h2, body2) = seal(&s, header(0, 1000), &plain);
    let mut added = h2.clone();
    added.parent_id = Some(TransferId::new());
    assert!(try_open(&beta, &added, &body2).is_err());
    assert_eq!(&try_open(&beta, &h2, &body2).unwrap()[..], &plain[..]);
}
