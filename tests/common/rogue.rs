//! The rogue publisher: a receiving agent on the real cluster and a client
//! with broker credentials that injects crafted messages straight into the
//! agent's queue, reads the receipts that come back and checks what the agent
//! did with each message (history, hooks, receipts, the files beside the
//! inbox). `tests/bad_input.rs` and `tests/security_input.rs` attack with it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hakobu::broker::rabbitmq::RabbitMq;
use hakobu::broker::{Broker, DEAD_LETTER_QUEUE, Delivery, queue_name};
use hakobu::config::{BrokerConfig, Config, RabbitmqConfig};
use hakobu::wire::{Message, Receipt};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{Agent, hook_env, hook_runs, rabbit_broker, recording_hook, unique, wait_until};

pub const FILE_ID: &str = "DATA";
pub const CHUNK: u64 = 64 * 1024;
pub const MAX_SIZE: u64 = 1 << 20;
pub const WAIT: Duration = Duration::from_secs(30);
/// How long to watch for something that must not happen (a second hook run,
/// a second receipt) after everything that should happen has happened.
pub const SETTLE: Duration = Duration::from_secs(1);

pub fn new_tid() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A chunk header as a rogue publisher writes it: every field free text,
/// so that a test can put anything there (the agent's own `ChunkHeader`
/// refuses names that break its rules).
#[derive(Clone, Serialize)]
pub struct ChunkHeader {
    pub transfer_id: String,
    pub file_id: String,
    pub from: String,
    pub to: String,
    pub file_name: String,
    pub size: u64,
    pub chunk_size: u64,
    pub offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<Trailer>,
    /// The try (a sender's `retry:`); absent means 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// `"zstd"`: the body claims to be compressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed: Option<String>,
}

#[derive(Clone, Serialize)]
pub struct Trailer {
    sha256: String,
    pub started_at: String,
    pub meta: BTreeMap<String, String>,
}

/// A chunk frame in the wire format (see `src/wire.rs`): `HKB`, version 1,
/// kind 1, the header's length, the header as JSON, the body.
pub fn chunk_frame(h: &ChunkHeader, body: &[u8]) -> Bytes {
    let header = serde_json::to_vec(h).unwrap();
    let mut frame = b"HKB\x01\x01".to_vec();
    frame.extend_from_slice(&(header.len() as u32).to_be_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(body);
    Bytes::from(frame)
}

pub fn trailer(sha256: String) -> Option<Trailer> {
    Some(Trailer {
        sha256,
        started_at: "2026-01-01T00:00:00Z".into(),
        meta: BTreeMap::new(),
    })
}

/// A deterministic, non-repeating byte pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What a file's metadata looked like, to show it was not touched.
pub fn fingerprint(path: &Path) -> Option<(u64, u64, i64, i64)> {
    fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// The broker settings of an agent's configuration, with every default: the
/// rogue publishes with the same credentials the agents use.
pub fn broker_config_of(file: &Path, yaml: &str) -> RabbitmqConfig {
    match Config::parse(file, yaml)
        .expect("the receiver's configuration")
        .broker
    {
        BrokerConfig::Rabbitmq(r) => r,
        other => panic!("not a RabbitMQ configuration: {other:?}"),
    }
}

/// Variations of the receiving agent.
#[derive(Default)]
pub struct Opts {
    /// The DATA profile's `on_failure` (YAML; `{hook}` names the recording
    /// hook); default `[ "{hook}", "{file_name}" ]`.
    pub on_failure: Option<&'static str>,
    /// Environment of the agent (and so of its hooks).
    pub env: &'static [(&'static str, &'static str)],
    /// Extra lines for the `broker.rabbitmq` section.
    pub broker_extra: &'static str,
    /// Extra lines for the DATA receive profile.
    pub profile_extra: &'static str,
}

/// The receipts a message on a sender's queue carries: one, or a batch of
/// them (receipts that wait together travel as one message).
pub fn receipts_in(msg: Message) -> Vec<Receipt> {
    match msg {
        Message::Receipt(r) => vec![r],
        Message::Batch(parts) => parts.into_iter().flat_map(receipts_in).collect(),
        other => panic!("the rogue's queue got something other than a receipt: {other:?}"),
    }
}

/// A receiving agent, and a rogue publisher on the same cluster.
///
/// Layout of the temporary directory:
/// `hooks/` (recording hook), `rx/` (config, log, cwd), `state/`,
/// `data/inbox/` — so that an escape from the inbox lands in `data/` or the
/// root, where nothing else is expected.
pub struct Rig {
    // Dropped first: the agent stops before its directory goes.
    pub agent: Agent,
    pub rt: tokio::runtime::Runtime,
    pub broker: RabbitMq,
    pub subscriptions: HashMap<String, mpsc::Receiver<Delivery>>,
    /// Receipts read while looking for another transfer's.
    pub early_receipts: HashMap<String, Receipt>,
    /// Every receipt the rogue got, by transfer id.
    pub receipt_counts: HashMap<String, usize>,
    /// The node the receive profile accepts DATA from.
    pub allowed: String,
    /// A node the configuration names (it may send OTHER), not allowed DATA.
    pub other_sender: String,
    pub inbox: PathBuf,
    pub hooks: PathBuf,
    /// Names placed by good transfers.
    pub placed: Vec<String>,
    /// Publishes that were not confirmed and went out again.
    pub republished: std::cell::Cell<usize>,
    pub etc_passwd: Option<(u64, u64, i64, i64)>,
    pub tmp: tempfile::TempDir,
}

impl Rig {
    pub fn new() -> Rig {
        Rig::with(Opts::default())
    }

    pub fn with(opts: Opts) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let node = unique("rx");
        let allowed = unique("rogue");
        let other_sender = unique("other");
        let hooks = root.join("hooks");
        let hook = recording_hook(&hooks, "hook.sh");
        let inbox = root.join("data/inbox");
        let on_failure = opts
            .on_failure
            .unwrap_or("[ \"{hook}\", \"{file_name}\" ]")
            .replace("{hook}", &hook.display().to_string());
        // A second profile makes `other_sender` a node this agent knows, but
        // one that may not send DATA.
        let yaml = format!(
            "node: {node}\nstate_dir: {root}/state\n{broker}{broker_extra}receive:\n  - file_id: {FILE_ID}\n    from: [ {allowed} ]\n    inbox: {inbox}\n    max_size: 1MiB\n    on_success: {{ run: [ \"{hook}\", \"{{path}}\" ], timeout: 5m }}\n    on_failure: {on_failure}\n{profile_extra}  - file_id: OTHER\n    from: [ {other_sender} ]\n    inbox: {root}/other-inbox\n",
            root = root.display(),
            // An explicit verify_sender in broker_extra replaces the harness's.
            broker = if opts.broker_extra.contains("verify_sender") {
                rabbit_broker(0).replace("    verify_sender: false\n", "")
            } else {
                rabbit_broker(0)
            },
            broker_extra = opts.broker_extra,
            profile_extra = opts.profile_extra,
            inbox = inbox.display(),
            hook = hook.display(),
        );
        let etc_passwd = fingerprint(Path::new("/etc/passwd"));
        let mut agent = Agent::new(&node, &root.join("rx"), &yaml);
        for (k, v) in opts.env {
            agent = agent.env(k, v);
        }
        agent.start();
        let broker = RabbitMq::new(broker_config_of(&agent.config, &yaml));
        Rig {
            agent,
            rt: tokio::runtime::Runtime::new().unwrap(),
            broker,
            subscriptions: HashMap::new(),
            early_receipts: HashMap::new(),
            receipt_counts: HashMap::new(),
            allowed,
            other_sender,
            inbox,
            hooks,
            placed: Vec::new(),
            republished: std::cell::Cell::new(0),
            etc_passwd,
            tmp,
        }
    }

    /// The end of the agent's log, for failure messages (a runaway loop can
    /// make the whole log huge).
    pub fn log_tail(&self) -> String {
        let log = self.agent.log();
        let lines: Vec<&str> = log.lines().collect();
        let skip = lines.len().saturating_sub(60);
        let mut tail = lines[skip..].join("\n");
        if skip > 0 {
            tail = format!("[{skip} earlier lines]\n{tail}");
        }
        tail
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// A valid header for a one-chunk transfer of `body`; tests then break it.
    pub fn header(&self, from: &str, tid: &str, name: &str, body: &[u8]) -> ChunkHeader {
        ChunkHeader {
            transfer_id: tid.to_string(),
            file_id: FILE_ID.to_string(),
            from: from.to_string(),
            to: self.agent.node.to_string(),
            file_name: name.to_string(),
            size: body.len() as u64,
            chunk_size: CHUNK,
            offset: 0,
            last: trailer(sha256(body)),
            attempt: None,
            compressed: None,
        }
    }

    /// Starts consuming `node`'s queue, where the receiver sends its receipts.
    pub fn listen_as(&mut self, node: &str) {
        if !self.subscriptions.contains_key(node) {
            let rx = self
                .rt
                .block_on(self.broker.subscribe(node))
                .expect("subscribe to the rogue's queue");
            self.subscriptions.insert(node.to_string(), rx);
        }
    }

    /// Publishes raw bytes to the receiver's queue until the broker confirms
    /// them. A failed publish is *unknown*, not lost (a fresh quorum queue can
    /// nack while it elects a leader), so it is published again, as the agents
    /// do; `republished` counts that, since the receiver may then see it twice.
    pub fn inject(&self, payload: Bytes) {
        let node = self.agent.node.clone();
        let deadline = Instant::now() + WAIT;
        loop {
            let sent = self.rt.block_on(async {
                match self.broker.publish(&node, payload.clone()).await {
                    Ok(confirm) => confirm.await,
                    Err(e) => Err(e),
                }
            });
            match sent {
                Ok(()) => return,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "the broker did not confirm a publish within {WAIT:?}: {e}"
                    );
                    self.republished.set(self.republished.get() + 1);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    pub fn inject_chunk(&self, h: ChunkHeader, body: &[u8]) {
        self.inject(chunk_frame(&h, body));
    }

    /// The receipt for `tid` on `from`'s queue (acked), within [`WAIT`].
    pub fn receipt(&mut self, from: &str, tid: &str) -> Receipt {
        if let Some(r) = self.early_receipts.remove(tid) {
            return r;
        }
        self.listen_as(from);
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let rx = self.subscriptions.get_mut(from).expect("subscribed above");
            let got = self
                .rt
                .block_on(async { tokio::time::timeout(left, rx.recv()).await });
            let d = match got {
                Ok(Some(d)) => d,
                Ok(None) => panic!("the subscription to {from}'s queue ended"),
                Err(_) => panic!(
                    "no receipt for {tid} on {from}'s queue within {WAIT:?}\nhistory: {:?}\nagent log:\n{}",
                    self.agent.history(),
                    self.log_tail()
                ),
            };
            let msg = Message::decode(d.payload.clone()).expect("a receipt that decodes");
            self.rt.block_on(d.ack()).expect("ack the receipt");
            for r in receipts_in(msg) {
                *self
                    .receipt_counts
                    .entry(r.transfer_id.to_string())
                    .or_default() += 1;
                self.early_receipts.insert(r.transfer_id.to_string(), r);
            }
            if let Some(r) = self.early_receipts.remove(tid) {
                return r;
            }
        }
    }

    /// Drains whatever receipts arrive within [`SETTLE`], to count duplicates.
    pub fn drain_receipts(&mut self) {
        let deadline = Instant::now() + SETTLE;
        let nodes: Vec<String> = self.subscriptions.keys().cloned().collect();
        for node in nodes {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let rx = self.subscriptions.get_mut(&node).unwrap();
                let got = self
                    .rt
                    .block_on(async { tokio::time::timeout(left, rx.recv()).await });
                let Ok(Some(d)) = got else {
                    break;
                };
                let _ = self.rt.block_on(d.ack());
                let msg = Message::decode(d.payload.clone()).expect("a receipt that decodes");
                for r in receipts_in(msg) {
                    *self
                        .receipt_counts
                        .entry(r.transfer_id.to_string())
                        .or_default() += 1;
                }
            }
        }
    }

    /// The history row of `tid` once it is final, within [`WAIT`].
    pub fn final_row(&self, tid: &str) -> Value {
        let mut row = Value::Null;
        wait_until(
            WAIT,
            &format!("transfer {tid} to settle in history"),
            || {
                row = self
                    .agent
                    .history()
                    .into_iter()
                    .find(|r| r["transfer_id"] == tid)
                    .unwrap_or(Value::Null);
                matches!(
                    row["status"].as_str(),
                    Some("received" | "receive_failed" | "hook_failed" | "hook_interrupted")
                )
            },
        );
        row
    }

    pub fn runs_of(&self, tid: &str) -> Vec<String> {
        hook_runs(&self.hooks)
            .into_iter()
            .filter(|l| l.split(' ').next() == Some(tid))
            .collect()
    }

    /// Checks everything a refused transfer must show. `hook` says whether a
    /// receive profile exists, so that the failure hook must have run.
    pub fn expect_refused(&mut self, from: &str, tid: &str, code: &str, hook: bool) {
        self.expect_failed_row(from, tid, code);
        // The failure receipt goes back to the (claimed) sender.
        let r = self.receipt(from, tid);
        assert!(!r.ok, "a refused transfer got a success receipt: {r:?}");
        assert_eq!(r.error_code.as_deref(), Some(code), "{r:?}");
        assert_eq!(r.from, self.agent.node, "{r:?}");
        assert_eq!(r.to, from, "{r:?}");
        assert!(r.path.is_none(), "a refused transfer names a path: {r:?}");
        // The receipt is sent after the failure hook, so the hook is done by now.
        self.expect_failure_hook(tid, code, hook);
    }

    /// Like [`Rig::expect_refused`] for a sender the configuration does not
    /// name: refused and recorded, but not answered, and no queue is created
    /// for it.
    pub fn expect_refused_unanswered(&mut self, from: &str, tid: &str, code: &str) {
        self.expect_failed_row(from, tid, code);
        wait_until(WAIT, &format!("transfer {tid} to be settled"), || {
            self.agent
                .log()
                .lines()
                .any(|l| l.contains("No receipt for a sender") && l.contains(tid))
        });
        self.expect_failure_hook(tid, code, true);
        assert!(
            !self.queue_exists(from),
            "a queue was created for the unknown sender {from}"
        );
    }

    pub fn expect_failed_row(&self, from: &str, tid: &str, code: &str) {
        let row = self.final_row(tid);
        assert_eq!(
            row["status"],
            "receive_failed",
            "transfer {tid}: {row}\nagent log:\n{}",
            self.log_tail()
        );
        assert_eq!(row["error_code"], code, "transfer {tid}: {row}");
        assert_eq!(row["peer"], from, "transfer {tid}: {row}");
        assert!(
            row["error"].as_str().is_some_and(|e| !e.is_empty()),
            "no error sentence in history: {row}"
        );
    }

    pub fn expect_failure_hook(&self, tid: &str, code: &str, hook: bool) {
        let runs = self.runs_of(tid);
        if !hook {
            assert!(runs.is_empty(), "a hook ran without a profile: {runs:?}");
            return;
        }
        assert_eq!(
            runs,
            vec![format!("{tid} receive_failed")],
            "the failure hook must run exactly once, and no success hook\nagent log:\n{}",
            self.log_tail()
        );
        let env = hook_env(&self.hooks, tid, "receive_failed");
        assert_eq!(
            env.get("HAKOBU_ERROR_CODE").map(String::as_str),
            Some(code),
            "{env:?}"
        );
        assert_eq!(
            env.get("HAKOBU_EVENT").map(String::as_str),
            Some("receive_failed")
        );
        assert_eq!(env.get("HAKOBU_TRANSFER_ID").map(String::as_str), Some(tid));
        assert!(env.contains_key("HAKOBU_ERROR"), "{env:?}");
    }

    /// Whether `node`'s queue exists on the cluster.
    pub fn queue_exists(&self, node: &str) -> bool {
        self.passive_declare(&queue_name(node)).is_some()
    }

    /// Messages ready in the dead-letter queue. Nobody consumes it in the
    /// tests, so the count only grows.
    pub fn dead_letter_count(&self) -> u32 {
        self.passive_declare(DEAD_LETTER_QUEUE).unwrap_or(0)
    }

    /// A passive declare, which creates nothing: the queue's ready-message
    /// count, or `None` when it does not exist.
    pub fn passive_declare(&self, queue: &str) -> Option<u32> {
        use lapin::options::QueueDeclareOptions;
        let url = super::amqp_urls()[0].clone();
        self.rt.block_on(async {
            let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
                .await
                .expect("connect to the cluster");
            let ch = conn.create_channel().await.expect("open a channel");
            let declared = ch
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await;
            let _ = conn.close(200, "bye".into()).await;
            declared.ok().map(|q| q.message_count())
        })
    }

    /// Files the rig expects: the inbox holds only what good transfers placed
    /// (and an empty partial directory), and nothing appeared beside it.
    pub fn assert_nothing_escaped(&self) {
        let partial_dir = self.inbox.join(".hakobu-partial");
        let mut want: Vec<String> = self.placed.clone();
        if partial_dir.exists() {
            want.push(".hakobu-partial".into());
            assert_eq!(
                super::dir_names(&partial_dir),
                Vec::<String>::new(),
                "partial files left behind"
            );
        }
        want.sort();
        assert_eq!(
            super::dir_names(&self.inbox),
            want,
            "unexpected names in the inbox"
        );
        // The agent may not have created the inbox (or `data/`) at all.
        let beside = super::dir_names(self.inbox.parent().unwrap());
        assert!(
            beside.iter().all(|n| n == "inbox"),
            "something was written beside the inbox: {beside:?}"
        );
        let root = super::dir_names(self.root());
        assert!(
            root.iter()
                .all(|n| ["data", "hooks", "rx", "state", "other-inbox"].contains(&n.as_str())),
            "something was written in the test's root: {root:?}"
        );
        assert_eq!(
            fingerprint(Path::new("/etc/passwd")),
            self.etc_passwd,
            "/etc/passwd changed"
        );
    }

    /// A valid one-chunk transfer from the allowed sender is placed, its
    /// success hook runs, and a success receipt comes back.
    pub fn good_transfer_works(&mut self) {
        assert!(
            self.agent.alive(),
            "the agent died\nagent log:\n{}",
            self.log_tail()
        );
        let tid = new_tid();
        let name = format!("good-{}.txt", self.placed.len());
        let body = format!("a good file, transfer {tid}\n").into_bytes();
        let from = self.allowed.clone();
        self.inject_chunk(self.header(&from, &tid, &name, &body), &body);
        let row = self.final_row(&tid);
        assert_eq!(
            row["status"],
            "received",
            "a good transfer after bad input: {row}\nagent log:\n{}",
            self.log_tail()
        );
        assert_eq!(fs::read(self.inbox.join(&name)).unwrap(), body);
        let r = self.receipt(&from, &tid);
        assert!(r.ok, "{r:?}");
        assert_eq!(
            r.path.as_deref(),
            Some(self.inbox.join(&name).to_str().unwrap())
        );
        assert_eq!(self.runs_of(&tid), vec![format!("{tid} received")]);
        self.placed.push(name);
        assert!(self.agent.alive(), "the agent died after a good transfer");
    }

    /// The end of every test: nothing more happens to the refused transfers
    /// (no second hook, no second receipt), nothing escaped, the agent is up
    /// and still works.
    pub fn finish(&mut self, refused: &[&str]) {
        self.good_transfer_works();
        self.drain_receipts();
        for tid in refused {
            assert_eq!(
                self.receipt_counts.get(*tid).copied(),
                Some(1),
                "transfer {tid}: receipts"
            );
            assert!(
                self.runs_of(tid).len() <= 1,
                "transfer {tid}: a hook ran twice: {:?}",
                self.runs_of(tid)
            );
        }
        self.assert_nothing_escaped();
        assert!(self.agent.alive(), "the agent died");
    }
}
