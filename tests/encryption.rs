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

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hakobu::broker::embedded::Embedded;
use hakobu::broker::rabbitmq::RabbitMq;
use hakobu::broker::{Broker, Delivery};
use hakobu::config::RabbitmqConfig;
use hakobu::wire::{ChunkHeader, Message};

use common::{
    Agent, BrokerProcess, bin, hook_env, rabbit_broker, recording_hook, sha256_file, unique,
    wait_until,
};

const CHUNK: u64 = 64 * 1024;
const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Embedded,
    Rabbit,
}

/// The broker of one test: an embedded broker process, or the cluster.
struct Backend {
    embedded: Option<BrokerProcess>,
    dir: PathBuf,
}

impl Backend {
    fn new(kind: Kind, dir: &Path) -> Backend {
        let embedded = (kind == Kind::Embedded).then(|| BrokerProcess::start(dir));
        if kind == Kind::Rabbit {
            common::amqp_urls();
        }
        Backend {
            embedded,
            dir: dir.to_path_buf(),
        }
    }

    fn section(&self, first: usize) -> String {
        match &self.embedded {
            Some(b) => b.section(),
            None => rabbit_broker(first),
        }
    }

    /// A test-side client with broker access, as an attacker would have.
    fn client(&self) -> Arc<dyn Broker> {
        match &self.embedded {
            Some(b) => Arc::new(Embedded::new(&b.addr, None, 64)),
            None => Arc::new(RabbitMq::new(RabbitmqConfig {
                urls: common::amqp_urls(),
                confirm_timeout: Duration::from_secs(20),
                prefetch: 64,
                delivery_limit: 20,
                window: 8 << 20,
                verify_sender: false,
                max_queue: None,
            })),
        }
    }

    /// Every file of the embedded broker's data directory, concatenated.
    fn stored_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        let mut dirs = vec![self.dir.join("broker-data")];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    all.extend(fs::read(&p).unwrap_or_default());
                }
            }
        }
        all
    }
}

/// One runtime for the whole test binary: a broker client lives on the
/// runtime it was made on.
fn run<F: std::future::Future<Output = T>, T>(f: F) -> T {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    })
    .block_on(f)
}

/// `hakobu keygen --out PATH`: the public key it prints.
fn keygen(path: &Path) -> String {
    let out = Command::new(bin())
        .args(["keygen", "--out"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(public.starts_with("age1"), "{public}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    public
}

/// 64 bytes no other file holds, repeated to `size` bytes.
fn pattern_file(path: &Path, size: usize, tag: u8) -> Vec<u8> {
    let unit: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37) ^ tag.wrapping_mul(101) ^ 0xa5)
        .collect();
    let data: Vec<u8> = unit.iter().copied().cycle().take(size).collect();
    fs::write(path, &data).unwrap();
    unit
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A receiving node of a rig: its key setup.
#[derive(Clone, Copy)]
enum Keys {
    /// Its own key, which the sender has.
    Right,
    /// A key of its own, but the sender has another one for it.
    Wrong,
    /// No private key at all.
    None,
}

/// One sender and some receivers on one broker. The sender's SECRET
/// profile is encrypted to every receiver; its PLAIN profile is not. Each
/// receiver's SECRET profile requires encryption (except with `Keys::None`,
/// which has no key), and its LEAK profile requires it too but the sender's
/// LEAK profile does not encrypt.
struct Rig {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    backend: Backend,
    alpha: Agent,
    receivers: Vec<Agent>,
    hooks: PathBuf,
}

impl Rig {
    fn new(kind: Kind, keys: &[Keys]) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let backend = Backend::new(kind, &root);
        let hooks = root.join("hooks");
        let hook = recording_hook(&hooks, "hook.sh");
        let a = unique("alpha");
        let names: Vec<String> = (0..keys.len()).map(|i| unique(&format!("r{i}"))).collect();
        let mut peers = String::new();
        let mut receivers = Vec::new();
        for (i, (name, k)) in names.iter().zip(keys).enumerate() {
            let dir = root.join(name);
            fs::create_dir_all(&dir).unwrap();
            let key_file = dir.join("node.key");
            let (public, keys_yaml, require) = match k {
                Keys::Right => {
                    let p = keygen(&key_file);
                    (
                        p,
                        format!("keys: {{ private_key_file: {} }}\n", key_file.display()),
                        true,
                    )
                }
                Keys::Wrong => {
                    keygen(&key_file);
                    let p = keygen(&dir.join("lost.key"));
                    (
                        p,
                        format!("keys: {{ private_key_file: {} }}\n", key_file.display()),
                        true,
                    )
                }
                Keys::None => (keygen(&dir.join("lost.key")), String::new(), false),
            };
            peers.push_str(&format!("    {name}: \"{public}\"\n"));
            let mut profiles = String::new();
            for (id, req) in [("SECRET", require), ("PLAIN", false), ("LEAK", require)] {
                profiles.push_str(&format!(
                    "  - file_id: {id}\n    from: [ {a} ]\n    inbox: {inbox}\n    require_encryption: {req}\n    on_success: [ \"{hook}\", \"{{path}}\" ]\n    on_failure: [ \"{hook}\", \"{{file_name}}\" ]\n",
                    inbox = dir.join("inbox").join(id).display(),
                    hook = hook.display(),
                ));
            }
            let yaml = format!(
                "node: {name}\nstate_dir: {state}\n{broker}{keys_yaml}receive:\n{profiles}",
                state = dir.join("state").display(),
                broker = backend.section(1 + i % 2),
            );
            receivers.push(Agent::new(name, &dir, &yaml));
        }
        let to = names.join(", ");
        let mut profiles = String::new();
        for (id, enc) in [("SECRET", true), ("PLAIN", false), ("LEAK", false)] {
            profiles.push_str(&format!(
                "  - file_id: {id}\n    outbox: {outbox}\n    to: [ {to} ]\n    encrypt: {enc}\n    chunk_size: 64KiB\n    ready: {{ stable_for: 200ms }}\n    after_send: keep\n    on_success: [ \"{hook}\", \"{{file_name}}\" ]\n    on_failure: [ \"{hook}\", \"{{file_name}}\" ]\n",
                outbox = root.join("outbox").join(id).display(),
                hook = hook.display(),
            ));
        }
        let yaml = format!(
            "node: {a}\nstate_dir: {state}\n{broker}keys:\n  peers:\n{peers}send:\n{profiles}",
            state = root.join("alpha/state").display(),
            broker = backend.section(0),
        );
        let alpha = Agent::new(&a, &root.join("alpha"), &yaml);
        Rig {
            _tmp: tmp,
            root,
            backend,
            alpha,
            receivers,
            hooks,
        }
    }

    fn outbox(&self, id: &str) -> PathBuf {
        self.root.join("outbox").join(id)
    }

    fn inbox(&self, r: usize, id: &str) -> PathBuf {
        self.receivers[r].dir.join("inbox").join(id)
    }

    /// Writes a file of `size` bytes of its own pattern into `stage`, then
    /// moves it into profile `id`'s outbox; returns the pattern unit.
    fn put(&self, id: &str, name: &str, size: usize, tag: u8) -> Vec<u8> {
        let stage = self.root.join("stage");
        fs::create_dir_all(&stage).unwrap();
        let unit = pattern_file(&stage.join(name), size, tag);
        fs::create_dir_all(self.root.join("orig")).unwrap();
        fs::copy(stage.join(name), self.sent_copy(id, name)).unwrap();
        fs::create_dir_all(self.outbox(id)).unwrap();
        fs::rename(stage.join(name), self.outbox(id).join(name)).unwrap();
        unit
    }

    /// A copy of what was dropped into profile `id`'s outbox as `name`.
    fn sent_copy(&self, id: &str, name: &str) -> PathBuf {
        self.root.join("orig").join(format!("{id}.{name}"))
    }

    /// Alpha's rows, by (file name, peer).
    fn alpha_rows(&self) -> BTreeMap<(String, String), serde_json::Value> {
        self.alpha
            .history()
            .into_iter()
            .map(|r| {
                let k = (
                    r["file_name"].as_str().unwrap().to_string(),
                    r["peer"].as_str().unwrap().to_string(),
                );
                (k, r)
            })
            .collect()
    }

    /// Waits until alpha has `n` rows, all published (awaiting a receipt).
    fn wait_published(&self, n: usize) {
        wait_until(WAIT, &format!("{n} transfers published"), || {
            let rows = self.alpha.history();
            rows.len() == n && rows.iter().all(|r| r["status"] == "awaiting_receipt")
        });
    }

    /// Waits until every alpha row is settled; returns status and error code
    /// by (file name, peer).
    fn wait_settled(&self, n: usize) -> BTreeMap<(String, String), (String, String)> {
        let mut out = BTreeMap::new();
        wait_until(WAIT, &format!("{n} transfers settled"), || {
            out = self
                .alpha_rows()
                .into_iter()
                .map(|(k, r)| {
                    let s = r["status"].as_str().unwrap_or_default().to_string();
                    let c = r["error_code"].as_str().unwrap_or_default().to_string();
                    (k, (s, c))
                })
                .collect();
            out.len() == n
                && out
                    .values()
                    .all(|(s, _)| s == "sent" || s == "send_failed" || s == "hook_failed")
        });
        out
    }

    fn logs(&self) -> String {
        let mut s = format!("alpha log:\n{}\n", self.alpha.log());
        for r in &self.receivers {
            s.push_str(&format!("{} log:\n{}\n", r.node, r.log()));
        }
        s
    }

    /// The failure hook of receiver `r` ran for `name` with `code`.
    fn assert_failure_hook(&self, r: usize, name: &str, code: &str) {
        let row = self.receivers[r]
            .history()
            .into_iter()
            .find(|row| row["file_name"] == name)
            .unwrap_or_else(|| panic!("{name}: no row on {}", self.receivers[r].node));
        assert_eq!(row["status"], "receive_failed", "{row}");
        assert_eq!(row["error_code"], code, "{row}");
        let tid = row["transfer_id"].as_str().unwrap();
        wait_until(WAIT, "the failure hook", || {
            !hook_env(&self.hooks, tid, "receive_failed").is_empty()
        });
        let env = hook_env(&self.hooks, tid, "receive_failed");
        assert_eq!(env["HAKOBU_ERROR_CODE"], code, "{env:?}");
    }
}

/// Takes every message off `node`'s queue until `chunks` chunks were seen
/// (acking each, as an attacker with broker access can), as single chunks.
async fn take_all(
    client: &Arc<dyn Broker>,
    node: &str,
    chunks: usize,
) -> Vec<(ChunkHeader, Bytes)> {
    let mut rx = client.subscribe(node).await.expect("subscribe");
    let mut out = Vec::new();
    while out.len() < chunks {
        let d: Delivery = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {chunks} chunks on the queue", out.len()))
            .expect("a delivery");
        let msg = Message::decode(d.payload.clone()).expect("a hakobu message");
        let parts = match msg {
            Message::Batch(p) => p,
            m => vec![m],
        };
        for p in parts {
            match p {
                Message::Chunk(h, body) => out.push((h, body)),
                other => panic!("not a chunk: {other:?}"),
            }
        }
        d.ack().await.expect("ack");
    }
    out
}

/// Publishes `chunks` to `node`'s queue, each as its own message.
async fn put_back(client: &Arc<dyn Broker>, node: &str, chunks: &[(ChunkHeader, Bytes)]) {
    let mut confirms = Vec::new();
    for (h, body) in chunks {
        let frame = Message::Chunk(h.clone(), body.clone()).encode();
        confirms.push(client.publish(node, frame).await.expect("publish"));
    }
    for c in confirms {
        c.await.expect("confirm");
    }
}

fn chunks_of(size: usize) -> usize {
    size.div_ceil(CHUNK as usize).max(1)
}

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
    let client = rig.backend.client();
    let total = chunks_of(secret_size) + chunks_of(plain_size) + 1;
    let chunks = run(async {
        let c = take_all(&client, &node, total).await;
        put_back(&client, &node, &c).await;
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
    drop(client);
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
    let client = rig.backend.client();
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
    run(put_back(&client, &node, &chunks));
    drop(client);
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
    let client = rig.backend.client();
    let mut chunks = run(take_all(&client, &node, n));
    chunks.sort_by_key(|(h, _)| h.offset);
    // The first 40 chunks, then the receiver dies (kill -9) once it wrote them.
    run(put_back(&client, &node, &chunks[..40]));
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
    run(put_back(&client, &node, &rest));
    drop(client);
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

/// The size of the largest file under `dir` (the partial file, mid-transfer).
fn largest_file(dir: &Path) -> u64 {
    let mut max = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => dirs.push(e.path()),
                Ok(m) => max = max.max(m.len()),
                Err(_) => {}
            }
        }
    }
    max
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
