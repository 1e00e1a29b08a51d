//! End-to-end encryption (`encrypt: true`) against the real binary, on the
//! embedded broker (a `hakobu broker` process) and on the real three-node
//! RabbitMQ cluster. The broker, its disks and anyone with broker access see
//! ciphertext only: the test reads what the broker holds before the receiver
//! starts (for the embedded broker, its segment files on disk; on both, every
//! message, consumed by a test-side client) and finds none of the file's
//! bytes, where a plain file sent beside it is found (the control). A chunk
//! changed, moved, swapped into another transfer or cut short by a test-side
//! publisher fails its transfer with `decrypt_failed` and its failure hook;
//! so does a receiver with another key or none. A receiver restarted in the
//! middle of a file, whose first chunk after the restart is one from the
//! middle, finishes it.

mod common;
#[path = "encryption/rig.rs"]
mod rig;

use std::fs;
use std::time::Duration;

use bytes::Bytes;
use hakobu::wire::ChunkHeader;

use common::{sha256_file, wait_until};
use rig::*;

// ---- an encrypted transfer arrives; the broker sees ciphertext only ----

fn broker_sees_ciphertext_only(kind: Kind) {
    let mut rig = Rig::new(kind, &[Keys::Right]);
    rig.alpha.start();
    let secret_size = (1 << 20) + 1000;
    let plain_size = 200 * 1024;
    let secret = rig.put("SECRET", "payroll.bin", secret_size, 1);
    let plain = rig.put("PLAIN", "menu.bin", plain_size, 2);
    let small = rig.put("SECRET", "small.bin", 3000, 3);
    rig.wait_published(3);
    if kind == Kind::Embedded {
        let stored = rig.backend.stored_bytes();
        assert!(
            contains(&stored, &plain),
            "control: the plain file's bytes are not in the broker's data directory, so the scan proves nothing"
        );
        assert!(
            !contains(&stored, &secret),
            "the encrypted file's bytes are in the broker's data directory"
        );
        assert!(
            !contains(&stored, &small),
            "the small encrypted file's bytes are on the broker's disk"
        );
    }
    // What anyone who can consume the queue gets.
    let node = rig.receivers[0].node.clone();
    let client = rig.backend.client(&node);
    let publisher = rig.backend.client(&rig.alpha.node);
    let total = chunks_of(secret_size) + chunks_of(plain_size) + 1;
    let chunks = run(async {
        let c = take_all(&client, &node, total).await;
        put_back(&publisher, &node, &c).await;
        c
    });
    let mut sealed = 0;
    for (h, body) in &chunks {
        if h.file_id == "PLAIN" {
            assert!(h.sealed.is_none());
            assert!(contains(body, &plain[..16]) || body.len() < 64);
            continue;
        }
        sealed += 1;
        assert!(
            h.sealed.is_some(),
            "a chunk of an encrypted profile is not sealed: {h:?}"
        );
        assert!(!contains(body, &secret[..16]) && !contains(body, &small[..16]));
        assert_eq!(body.len() as u64, h.expected_len().unwrap() + 40);
    }
    assert_eq!(sealed, chunks_of(secret_size) + 1);
    drop((client, publisher));
    rig.receivers[0].start();
    let done = rig.wait_settled(3);
    assert!(
        done.values().all(|(s, _)| s == "sent"),
        "{done:?}\n{}",
        rig.logs()
    );
    for (id, name) in [
        ("SECRET", "payroll.bin"),
        ("PLAIN", "menu.bin"),
        ("SECRET", "small.bin"),
    ] {
        assert_eq!(
            sha256_file(&rig.inbox(0, id).join(name)),
            sha256_file(&rig.sent_copy(id, name)),
            "{name}"
        );
    }
    // The digest the transfer carries is the plaintext's, as without encryption.
    let row = &rig.alpha_rows()[&("payroll.bin".to_string(), node)];
    assert_eq!(
        row["sha256"],
        sha256_file(&rig.sent_copy("SECRET", "payroll.bin"))
    );
}

#[test]
fn embedded_broker_storage_holds_no_plaintext_and_the_file_arrives() {
    broker_sees_ciphertext_only(Kind::Embedded);
}

#[test]
fn rabbitmq_messages_hold_no_plaintext_and_the_file_arrives() {
    broker_sees_ciphertext_only(Kind::Rabbit);
}

// ---- tampered chunks fail with decrypt_failed ----

fn tampered_chunks_fail(kind: Kind) {
    let mut rig = Rig::new(kind, &[Keys::Right]);
    rig.alpha.start();
    let size = 200 * 1024;
    let names = [
        "flipped.bin",
        "moved.bin",
        "spliced.bin",
        "cut.bin",
        "good.bin",
    ];
    for (i, n) in names.iter().enumerate() {
        rig.put("SECRET", n, size, 10 + i as u8);
    }
    rig.wait_published(names.len());
    let node = rig.receivers[0].node.clone();
    let client = rig.backend.client(&node);
    let publisher = rig.backend.client(&rig.alpha.node);
    let mut chunks = run(take_all(&client, &node, names.len() * chunks_of(size)));
    let find = |chunks: &[(ChunkHeader, Bytes)], name: &str, offset: u64| {
        chunks
            .iter()
            .position(|(h, _)| h.file_name == name && h.offset == offset)
            .unwrap_or_else(|| panic!("no chunk of {name} at {offset}"))
    };
    // One flipped ciphertext byte.
    let i = find(&chunks, "flipped.bin", CHUNK);
    let mut b = chunks[i].1.to_vec();
    b[1000] ^= 0x01;
    chunks[i].1 = Bytes::from(b);
    // Two chunks' offsets swapped: each body moved to the other's place.
    let (i, j) = (
        find(&chunks, "moved.bin", 0),
        find(&chunks, "moved.bin", CHUNK),
    );
    let (oi, oj) = (chunks[i].0.offset, chunks[j].0.offset);
    chunks[i].0.offset = oj;
    chunks[j].0.offset = oi;
    // Another transfer's chunk (body and wrapped key) at the same place.
    let (i, j) = (
        find(&chunks, "spliced.bin", CHUNK),
        find(&chunks, "good.bin", CHUNK),
    );
    chunks[i].1 = chunks[j].1.clone();
    chunks[i].0.sealed = chunks[j].0.sealed.clone();
    // The last chunk cut short by a byte.
    let i = find(&chunks, "cut.bin", 3 * CHUNK);
    chunks[i].1 = chunks[i].1.slice(..chunks[i].1.len() - 1);
    run(put_back(&publisher, &node, &chunks));
    drop((client, publisher));
    rig.receivers[0].start();
    let done = rig.wait_settled(names.len());
    for n in names {
        let (status, code) = &done[&(n.to_string(), node.clone())];
        if n == "good.bin" {
            assert_eq!(status, "sent", "{n}: {code}\n{}", rig.logs());
            assert_eq!(
                sha256_file(&rig.inbox(0, "SECRET").join(n)),
                sha256_file(&rig.sent_copy("SECRET", n))
            );
        } else {
            assert_eq!(
                (status.as_str(), code.as_str()),
                ("send_failed", "decrypt_failed"),
                "{n}\n{}",
                rig.logs()
            );
            rig.assert_failure_hook(0, n, "decrypt_failed");
            assert!(!rig.inbox(0, "SECRET").join(n).exists(), "{n} was placed");
        }
    }
    assert!(rig.receivers[0].alive(), "the receiver died");
}

#[test]
fn embedded_tampered_chunks_fail_with_decrypt_failed() {
    tampered_chunks_fail(Kind::Embedded);
}

#[test]
fn rabbitmq_tampered_chunks_fail_with_decrypt_failed() {
    tampered_chunks_fail(Kind::Rabbit);
}

// ---- multicast; a wrong key, no key, a plain chunk where encryption is required ----

fn keys_decide(kind: Kind) {
    let mut rig = Rig::new(kind, &[Keys::Right, Keys::Wrong, Keys::None, Keys::Right]);
    for r in &mut rig.receivers {
        r.start();
    }
    rig.alpha.start();
    rig.put("SECRET", "multi.bin", 300 * 1024, 20);
    rig.put("SECRET", "tiny.bin", 100, 21);
    rig.put("LEAK", "leak.bin", 70 * 1024, 22);
    let done = rig.wait_settled(12);
    let name = |i: usize| rig.receivers[i].node.clone();
    for f in ["multi.bin", "tiny.bin"] {
        for r in [0, 3] {
            assert_eq!(
                done[&(f.to_string(), name(r))].0,
                "sent",
                "{f} to {}\n{}",
                name(r),
                rig.logs()
            );
            assert_eq!(
                sha256_file(&rig.inbox(r, "SECRET").join(f)),
                sha256_file(&rig.sent_copy("SECRET", f))
            );
        }
        for r in [1, 2] {
            assert_eq!(
                done[&(f.to_string(), name(r))],
                ("send_failed".to_string(), "decrypt_failed".to_string()),
                "{f} to {}\n{}",
                name(r),
                rig.logs()
            );
            rig.assert_failure_hook(r, f, "decrypt_failed");
        }
    }
    // Where encryption is required, a plain file is refused; where not, it arrives.
    for r in [0, 1, 3] {
        assert_eq!(
            done[&("leak.bin".to_string(), name(r))],
            ("send_failed".to_string(), "encryption_required".to_string()),
            "{}",
            rig.logs()
        );
        rig.assert_failure_hook(r, "leak.bin", "encryption_required");
    }
    assert_eq!(done[&("leak.bin".to_string(), name(2))].0, "sent");
    let log = rig.receivers[1].log();
    assert!(!log.contains("AGE-SECRET-KEY"), "a private key in the log");
    assert!(rig.receivers.iter_mut().all(|r| r.alive()));
}

#[test]
fn embedded_multicast_with_a_wrong_key_and_no_key() {
    keys_decide(Kind::Embedded);
}

#[test]
fn rabbitmq_multicast_with_a_wrong_key_and_no_key() {
    keys_decide(Kind::Rabbit);
}

// ---- resume after a receiver restart mid-file ----

fn resume_mid_file(kind: Kind) {
    let mut rig = Rig::new(kind, &[Keys::Right]);
    rig.alpha.start();
    let size = (4 << 20) + 3;
    let n = chunks_of(size);
    rig.put("SECRET", "big.bin", size, 30);
    rig.wait_published(1);
    let node = rig.receivers[0].node.clone();
    let client = rig.backend.client(&node);
    let publisher = rig.backend.client(&rig.alpha.node);
    let mut chunks = run(take_all(&client, &node, n));
    chunks.sort_by_key(|(h, _)| h.offset);
    // The first 40 chunks, then the receiver dies (kill -9) once it wrote them.
    run(put_back(&publisher, &node, &chunks[..40]));
    rig.receivers[0].start();
    let inbox = rig.inbox(0, "SECRET");
    wait_until(WAIT, "the first 40 chunks on the receiver's disk", || {
        largest_file(&inbox) >= 40 * CHUNK
    });
    std::thread::sleep(Duration::from_millis(1500));
    rig.receivers[0].kill9();
    // The rest, and some again, starting in the middle: the restarted receiver
    // has no data key in memory and meets a chunk from the middle first.
    let mut rest: Vec<_> = chunks[50..].to_vec();
    rest.extend_from_slice(&chunks[30..50]);
    run(put_back(&publisher, &node, &rest));
    drop((client, publisher));
    rig.receivers[0].start();
    let done = rig.wait_settled(1);
    assert_eq!(
        done[&("big.bin".to_string(), node)].0,
        "sent",
        "{}",
        rig.logs()
    );
    assert_eq!(
        sha256_file(&inbox.join("big.bin")),
        sha256_file(&rig.sent_copy("SECRET", "big.bin"))
    );
}

#[test]
fn embedded_resume_after_a_receiver_restart_mid_file() {
    resume_mid_file(Kind::Embedded);
}

#[test]
fn rabbitmq_resume_after_a_receiver_restart_mid_file() {
    resume_mid_file(Kind::Rabbit);
}

// ---- `hakobu send --to` a node without a public key ----

#[test]
fn sending_encrypted_to_a_node_without_a_key_is_refused_at_once() {
    let rig = Rig::new(Kind::Embedded, &[Keys::Right]);
    let file = rig.root.join("one.bin");
    fs::write(&file, b"payroll").unwrap();
    let out = rig.alpha.cli(&[
        "send",
        "--file-id",
        "SECRET",
        "--to",
        "stranger",
        file.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no public key for `stranger`"), "{err}");
    assert!(rig.alpha.history().is_empty());
    // A plain profile may still send there.
    let out = rig.alpha.cli(&[
        "send",
        "--file-id",
        "PLAIN",
        "--to",
        "stranger",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
