//! The rig of `tests/encryption.rs`: one sender and its receivers on one
//! broker (a `hakobu broker` process or the cluster), their keys made with
//! `hakobu keygen`, and a test-side broker client with the access an
//! attacker with broker credentials has.

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

use crate::common::{
    Agent, BrokerProcess, bin, hook_env, rabbit_broker, recording_hook, unique, wait_until,
};

pub(crate) const CHUNK: u64 = 64 * 1024;
pub(crate) const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Embedded,
    Rabbit,
}

/// The broker of one test: an embedded broker process, or the cluster.
pub(crate) struct Backend {
    embedded: Option<BrokerProcess>,
    dir: PathBuf,
}

impl Backend {
    pub(crate) fn new(kind: Kind, dir: &Path) -> Backend {
        let embedded = (kind == Kind::Embedded).then(|| BrokerProcess::start(dir));
        if kind == Kind::Rabbit {
            crate::common::amqp_urls();
        }
        Backend {
            embedded,
            dir: dir.to_path_buf(),
        }
    }

    pub(crate) fn section(&self, first: usize) -> String {
        match &self.embedded {
            Some(b) => b.section(),
            None => rabbit_broker(first),
        }
    }

    /// A test-side client with broker access, as an attacker with `node`'s
    /// credentials would have (on the embedded broker, which authenticates
    /// every node: the receiver's to consume its queue, the sender's to
    /// publish in its name).
    pub(crate) fn client(&self, node: &str) -> Arc<dyn Broker> {
        match &self.embedded {
            Some(b) => Arc::new(Embedded::new(&b.addr, b.credentials(node), 64)),
            None => Arc::new(RabbitMq::new(RabbitmqConfig {
                urls: crate::common::amqp_urls(),
                confirm_timeout: Duration::from_secs(20),
                prefetch: 64,
                delivery_limit: 20,
                window: 8 << 20,
                verify_sender: false,
                ..RabbitmqConfig::with_urls(crate::common::amqp_urls())
            })),
        }
    }

    /// Every file of the embedded broker's data directory, concatenated.
    pub(crate) fn stored_bytes(&self) -> Vec<u8> {
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
pub(crate) fn run<F: std::future::Future<Output = T>, T>(f: F) -> T {
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
pub(crate) fn keygen(path: &Path) -> String {
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
pub(crate) fn pattern_file(path: &Path, size: usize, tag: u8) -> Vec<u8> {
    let unit: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37) ^ tag.wrapping_mul(101) ^ 0xa5)
        .collect();
    let data: Vec<u8> = unit.iter().copied().cycle().take(size).collect();
    fs::write(path, &data).unwrap();
    unit
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A receiving node of a rig: its key setup.
#[derive(Clone, Copy)]
pub(crate) enum Keys {
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
pub(crate) struct Rig {
    _tmp: tempfile::TempDir,
    pub(crate) root: PathBuf,
    pub(crate) backend: Backend,
    pub(crate) alpha: Agent,
    pub(crate) receivers: Vec<Agent>,
    pub(crate) hooks: PathBuf,
}

impl Rig {
    pub(crate) fn new(kind: Kind, keys: &[Keys]) -> Rig {
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

    pub(crate) fn outbox(&self, id: &str) -> PathBuf {
        self.root.join("outbox").join(id)
    }

    pub(crate) fn inbox(&self, r: usize, id: &str) -> PathBuf {
        self.receivers[r].dir.join("inbox").join(id)
    }

    /// Writes a file of `size` bytes of its own pattern into `stage`, then
    /// moves it into profile `id`'s outbox; returns the pattern unit.
    pub(crate) fn put(&self, id: &str, name: &str, size: usize, tag: u8) -> Vec<u8> {
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
    pub(crate) fn sent_copy(&self, id: &str, name: &str) -> PathBuf {
        self.root.join("orig").join(format!("{id}.{name}"))
    }

    /// Alpha's rows, by (file name, peer).
    pub(crate) fn alpha_rows(&self) -> BTreeMap<(String, String), serde_json::Value> {
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
    pub(crate) fn wait_published(&self, n: usize) {
        wait_until(WAIT, &format!("{n} transfers published"), || {
            let rows = self.alpha.history();
            rows.len() == n && rows.iter().all(|r| r["status"] == "awaiting_receipt")
        });
    }

    /// Waits until every alpha row is settled; returns status and error code
    /// by (file name, peer).
    pub(crate) fn wait_settled(&self, n: usize) -> BTreeMap<(String, String), (String, String)> {
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

    pub(crate) fn logs(&self) -> String {
        let mut s = format!("alpha log:\n{}\n", self.alpha.log());
        for r in &self.receivers {
            s.push_str(&format!("{} log:\n{}\n", r.node, r.log()));
        }
        s
    }

    /// The failure hook of receiver `r` ran for `name` with `code`.
    pub(crate) fn assert_failure_hook(&self, r: usize, name: &str, code: &str) {
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
pub(crate) async fn take_all(
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
pub(crate) async fn put_back(
    client: &Arc<dyn Broker>,
    node: &str,
    chunks: &[(ChunkHeader, Bytes)],
) {
    let mut confirms = Vec::new();
    for (h, body) in chunks {
        let frame = Message::Chunk(h.clone(), body.clone()).encode();
        confirms.push(client.publish(node, frame).await.expect("publish"));
    }
    for c in confirms {
        c.await.expect("confirm");
    }
}

pub(crate) fn chunks_of(size: usize) -> usize {
    size.div_ceil(CHUNK as usize).max(1)
}

/// The size of the largest file under `dir` (the partial file, mid-transfer).
pub(crate) fn largest_file(dir: &Path) -> u64 {
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
