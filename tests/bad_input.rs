//! Bad input on the real three-node RabbitMQ cluster: a rogue publisher with
//! broker credentials injects crafted messages straight into a receiving
//! agent's queue. Each one must be refused with its stable error code, in
//! history, in the failure hook and in a failure receipt to the sender; what
//! cannot be parsed goes to the dead-letter queue. Nothing is ever written
//! outside the inbox, the agent stays up, and it still accepts a good transfer.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
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

use common::{Agent, hook_env, hook_runs, rabbit_broker, recording_hook, unique, wait_until};

const FILE_ID: &str = "DATA";
const CHUNK: u64 = 64 * 1024;
const MAX_SIZE: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(30);
/// How long to watch for something that must not happen (a second hook run,
/// a second receipt) after everything that should happen has happened.
const SETTLE: Duration = Duration::from_secs(1);

fn new_tid() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A chunk header as a rogue publisher writes it: every field free text,
/// so that a test can put anything there (the agent's own `ChunkHeader`
/// refuses names that break its rules).
#[derive(Clone, Serialize)]
struct ChunkHeader {
    transfer_id: String,
    file_id: String,
    from: String,
    to: String,
    file_name: String,
    size: u64,
    chunk_size: u64,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last: Option<Trailer>,
}

#[derive(Clone, Serialize)]
struct Trailer {
    sha256: String,
    started_at: String,
    meta: BTreeMap<String, String>,
}

/// A chunk frame in the wire format (see `src/wire.rs`): `HKB`, version 1,
/// kind 1, the header's length, the header as JSON, the body.
fn chunk_frame(h: &ChunkHeader, body: &[u8]) -> Bytes {
    let header = serde_json::to_vec(h).unwrap();
    let mut frame = b"HKB\x01\x01".to_vec();
    frame.extend_from_slice(&(header.len() as u32).to_be_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(body);
    Bytes::from(frame)
}

fn trailer(sha256: String) -> Option<Trailer> {
    Some(Trailer {
        sha256,
        started_at: "2026-01-01T00:00:00Z".into(),
        meta: BTreeMap::new(),
    })
}

/// A deterministic, non-repeating byte pattern.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
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
fn fingerprint(path: &Path) -> Option<(u64, u64, i64, i64)> {
    fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// The broker settings of an agent's configuration, with every default: the
/// rogue publishes with the same credentials the agents use.
fn broker_config_of(file: &Path, yaml: &str) -> RabbitmqConfig {
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
struct Opts {
    /// The DATA profile's `on_failure` (YAML; `{hook}` names the recording
    /// hook); default `[ "{hook}", "{file_name}" ]`.
    on_failure: Option<&'static str>,
    /// Environment of the agent (and so of its hooks).
    env: &'static [(&'static str, &'static str)],
    /// Extra lines for the `broker.rabbitmq` section.
    broker_extra: &'static str,
    /// Extra lines for the DATA receive profile.
    profile_extra: &'static str,
}

/// The receipts a message on a sender's queue carries: one, or a batch of
/// them (receipts that wait together travel as one message).
fn receipts_in(msg: Message) -> Vec<Receipt> {
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
struct Rig {
    // Dropped first: the agent stops before its directory goes.
    agent: Agent,
    rt: tokio::runtime::Runtime,
    broker: RabbitMq,
    subscriptions: HashMap<String, mpsc::Receiver<Delivery>>,
    /// Receipts read while looking for another transfer's.
    early_receipts: HashMap<String, Receipt>,
    /// Every receipt the rogue got, by transfer id.
    receipt_counts: HashMap<String, usize>,
    /// The node the receive profile accepts DATA from.
    allowed: String,
    /// A node the configuration names (it may send OTHER), not allowed DATA.
    other_sender: String,
    inbox: PathBuf,
    hooks: PathBuf,
    /// Names placed by good transfers.
    placed: Vec<String>,
    /// Publishes that were not confirmed and went out again.
    republished: std::cell::Cell<usize>,
    etc_passwd: Option<(u64, u64, i64, i64)>,
    tmp: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(Opts::default())
    }

    fn with(opts: Opts) -> Rig {
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
    fn log_tail(&self) -> String {
        let log = self.agent.log();
        let lines: Vec<&str> = log.lines().collect();
        let skip = lines.len().saturating_sub(60);
        let mut tail = lines[skip..].join("\n");
        if skip > 0 {
            tail = format!("[{skip} earlier lines]\n{tail}");
        }
        tail
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// A valid header for a one-chunk transfer of `body`; tests then break it.
    fn header(&self, from: &str, tid: &str, name: &str, body: &[u8]) -> ChunkHeader {
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
        }
    }

    /// Starts consuming `node`'s queue, where the receiver sends its receipts.
    fn listen_as(&mut self, node: &str) {
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
    fn inject(&self, payload: Bytes) {
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

    fn inject_chunk(&self, h: ChunkHeader, body: &[u8]) {
        self.inject(chunk_frame(&h, body));
    }

    /// The receipt for `tid` on `from`'s queue (acked), within [`WAIT`].
    fn receipt(&mut self, from: &str, tid: &str) -> Receipt {
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
    fn drain_receipts(&mut self) {
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
    fn final_row(&self, tid: &str) -> Value {
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

    fn runs_of(&self, tid: &str) -> Vec<String> {
        hook_runs(&self.hooks)
            .into_iter()
            .filter(|l| l.split(' ').next() == Some(tid))
            .collect()
    }

    /// Checks everything a refused transfer must show. `hook` says whether a
    /// receive profile exists, so that the failure hook must have run.
    fn expect_refused(&mut self, from: &str, tid: &str, code: &str, hook: bool) {
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
    fn expect_refused_unanswered(&mut self, from: &str, tid: &str, code: &str) {
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

    fn expect_failed_row(&self, from: &str, tid: &str, code: &str) {
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

    fn expect_failure_hook(&self, tid: &str, code: &str, hook: bool) {
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
    fn queue_exists(&self, node: &str) -> bool {
        self.passive_declare(&queue_name(node)).is_some()
    }

    /// Messages ready in the dead-letter queue. Nobody consumes it in the
    /// tests, so the count only grows.
    fn dead_letter_count(&self) -> u32 {
        self.passive_declare(DEAD_LETTER_QUEUE).unwrap_or(0)
    }

    /// A passive declare, which creates nothing: the queue's ready-message
    /// count, or `None` when it does not exist.
    fn passive_declare(&self, queue: &str) -> Option<u32> {
        use lapin::options::QueueDeclareOptions;
        let url = common::amqp_urls()[0].clone();
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
    fn assert_nothing_escaped(&self) {
        let partial_dir = self.inbox.join(".hakobu-partial");
        let mut want: Vec<String> = self.placed.clone();
        if partial_dir.exists() {
            want.push(".hakobu-partial".into());
            assert_eq!(
                common::dir_names(&partial_dir),
                Vec::<String>::new(),
                "partial files left behind"
            );
        }
        want.sort();
        assert_eq!(
            common::dir_names(&self.inbox),
            want,
            "unexpected names in the inbox"
        );
        // The agent may not have created the inbox (or `data/`) at all.
        let beside = common::dir_names(self.inbox.parent().unwrap());
        assert!(
            beside.iter().all(|n| n == "inbox"),
            "something was written beside the inbox: {beside:?}"
        );
        let root = common::dir_names(self.root());
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
    fn good_transfer_works(&mut self) {
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
    fn finish(&mut self, refused: &[&str]) {
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

#[test]
fn a_sender_not_in_from_is_refused() {
    let mut rig = Rig::new();
    let body = b"not from you\n";

    // A node this agent knows (it may send OTHER), but not for DATA: refused
    // and told so.
    let known = rig.other_sender.clone();
    rig.listen_as(&known);
    let tid = new_tid();
    rig.inject_chunk(rig.header(&known, &tid, "x.csv", body), body);
    rig.expect_refused(&known, &tid, "sender_not_allowed", true);

    // A node this configuration never names: refused and recorded, but not
    // answered, so that a forged `from` cannot make the agent create queues.
    let stranger = unique("stranger");
    let tid2 = new_tid();
    rig.inject_chunk(rig.header(&stranger, &tid2, "y.csv", body), body);
    rig.expect_refused_unanswered(&stranger, &tid2, "sender_not_allowed");

    rig.finish(&[&tid]);
    assert!(rig.queue_exists(&known), "the positive control failed");
}

#[test]
fn an_unknown_file_id_is_refused_without_a_hook() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let tid = new_tid();
    let body = b"for nobody\n";
    let mut h = rig.header(&from, &tid, "x.csv", body);
    h.file_id = "NO_SUCH_PROFILE".into();
    rig.inject_chunk(h, body);
    rig.expect_refused(&from, &tid, "unknown_file_id", false);
    rig.finish(&[&tid]);
}

#[test]
fn file_names_that_are_not_plain_base_names_are_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let names = [
        "../evil",
        "../../evil",
        "/etc/passwd",
        "a/b",
        "..",
        "a\nb",
        "a\\b",
        ".hidden",
    ];
    let mut tids = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let tid = new_tid();
        let body = format!("payload {i}\n").into_bytes();
        rig.inject_chunk(rig.header(&from, &tid, name, &body), &body);
        tids.push(tid);
    }
    for (name, tid) in names.iter().zip(&tids) {
        eprintln!("checking file name {name:?} ({tid})");
        rig.expect_refused(&from, tid, "bad_file_name", true);
        let env = hook_env(&rig.hooks, tid, "receive_failed");
        if !name.contains('\n') {
            // The hook sees the offending name as it came, but no path.
            assert_eq!(env.get("HAKOBU_FILE_NAME").map(String::as_str), Some(*name));
        }
        assert_eq!(env.get("HAKOBU_PATH").map(String::as_str), Some(""));
    }
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

/// A NUL cannot travel in an environment variable or an argv element; the
/// failure hook (`[hook, "{file_name}"]`) must still run once and the receipt
/// must still go back.
#[test]
fn a_file_name_with_a_nul_is_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let tid = new_tid();
    let body = b"nul\n";
    rig.inject_chunk(rig.header(&from, &tid, "a\0b", body), body);
    rig.expect_refused(&from, &tid, "bad_file_name", true);
    rig.finish(&[&tid]);
}

/// A failure hook that does not finish normally (here: it times out) still
/// counts as run: it runs once, and the receipt goes back.
#[test]
fn a_failure_hook_that_times_out_runs_once_and_the_receipt_still_goes_back() {
    let mut rig = Rig::with(Opts {
        on_failure: Some("{ run: [ \"{hook}\", \"{file_name}\" ], timeout: 1s }"),
        env: &[("HOOK_SLEEP", "3")],
        ..Opts::default()
    });
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let tid = new_tid();
    let body = b"escape\n";
    rig.inject_chunk(rig.header(&from, &tid, "../evil", body), body);
    rig.expect_refused(&from, &tid, "bad_file_name", true);
    rig.finish(&[&tid]);
}

#[test]
fn a_declared_size_over_max_size_is_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let mut tids = Vec::new();
    for size in [MAX_SIZE + 1, u64::MAX] {
        // The first chunk of a file that would be too large.
        let tid = new_tid();
        let body = pattern(CHUNK as usize, size);
        let mut h = rig.header(&from, &tid, "huge.bin", &body);
        h.size = size;
        h.last = None;
        rig.inject_chunk(h, &body);
        tids.push(tid);
    }
    for tid in &tids {
        rig.expect_refused(&from, tid, "file_too_large", true);
    }
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

#[test]
fn a_chunk_outside_the_declared_size_is_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let small = b"0123456789".to_vec();
    let mut tids = Vec::new();

    // Each case: (size, offset, body) of a single, last chunk.
    let cases: Vec<(u64, u64, Vec<u8>)> = vec![
        // Offset beyond the declared size.
        (10, CHUNK, small.clone()),
        // Far beyond, where a sparse write would make a huge file.
        (10, CHUNK * (1 << 40), small.clone()),
        // A body longer than the declared size.
        (10, 0, pattern(20, 1)),
        // A body longer than a chunk.
        (MAX_SIZE, 0, pattern(CHUNK as usize + 1, 2)),
        // A body shorter than declared.
        (100, 0, pattern(50, 3)),
        // An offset off the chunk grid.
        (CHUNK * 2, 1, pattern(CHUNK as usize, 4)),
    ];
    let mut first = None;
    for (size, offset, body) in cases {
        let tid = new_tid();
        let mut h = rig.header(&from, &tid, "range.bin", &body);
        h.size = size;
        h.offset = offset;
        first.get_or_insert_with(|| (h.clone(), body.clone()));
        rig.inject_chunk(h, &body);
        tids.push(tid);
    }

    // A good first chunk (written to the partial file), then a second chunk
    // beyond the end: the transfer fails and the partial file goes.
    let tid = new_tid();
    let file = pattern(CHUNK as usize + 100, 5);
    let mut h = rig.header(&from, &tid, "two.bin", &file);
    h.last = None;
    rig.inject_chunk(h.clone(), &file[..CHUNK as usize]);
    h.offset = 2 * CHUNK;
    h.last = trailer(sha256(&file));
    rig.inject_chunk(h, &file[CHUNK as usize..]);
    tids.push(tid);

    for tid in &tids {
        rig.expect_refused(&from, tid, "chunk_out_of_range", true);
    }
    // The same bad chunk again (a redelivery, or a replay): the transfer is
    // settled, so no second hook and no second receipt (checked by finish).
    let (h, body) = first.unwrap();
    rig.inject_chunk(h, &body);
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

/// A flood of transfers begun and never finished (a first chunk each, then
/// nothing): after `partial_ttl` every one expires, its partial file is
/// removed, its failure hook runs once and a failure receipt goes back; the
/// agent keeps receiving.
#[test]
fn a_flood_of_unfinished_transfers_expires_and_is_cleaned_up() {
    let mut rig = Rig::with(Opts {
        profile_extra: "    partial_ttl: 3s\n",
        ..Default::default()
    });
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let file = pattern(CHUNK as usize * 2, 11);
    let mut tids = Vec::new();
    for i in 0..50 {
        let tid = new_tid();
        let mut h = rig.header(&from, &tid, &format!("flood-{i}.bin"), &file);
        h.last = None;
        rig.inject_chunk(h, &file[..CHUNK as usize]);
        tids.push(tid);
    }
    for tid in &tids {
        rig.expect_refused(&from, tid, "transfer_expired", true);
    }
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

#[test]
fn a_sha256_mismatch_is_refused_and_nothing_is_placed() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let mut tids = Vec::new();

    // One chunk, the digest of other bytes.
    let tid = new_tid();
    let body = b"id,amount\n1,100\n".to_vec();
    let mut h = rig.header(&from, &tid, "one.csv", &body);
    h.last = trailer(sha256(b"something else"));
    rig.inject_chunk(h, &body);
    tids.push(tid);

    // Two chunks, the last chunk's trailer wrong by one digit.
    let tid = new_tid();
    let file = pattern(CHUNK as usize + 1000, 9);
    let mut good = sha256(&file).into_bytes();
    good[0] = if good[0] == b'0' { b'1' } else { b'0' };
    let mut h = rig.header(&from, &tid, "two.bin", &file);
    h.last = None;
    rig.inject_chunk(h.clone(), &file[..CHUNK as usize]);
    h.offset = CHUNK;
    h.last = trailer(String::from_utf8(good).unwrap());
    rig.inject_chunk(h, &file[CHUNK as usize..]);
    tids.push(tid);

    for tid in &tids {
        rig.expect_refused(&from, tid, "sha256_mismatch", true);
    }
    assert!(!rig.inbox.join("one.csv").exists(), "a bad file was placed");
    assert!(!rig.inbox.join("two.bin").exists(), "a bad file was placed");
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

/// What cannot be parsed (or names no usable transfer) is dead-lettered: no
/// history row, no receipt, no hook, and the agent carries on.
#[test]
fn malformed_messages_are_dead_lettered() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let tid = new_tid();
    let body = b"hello\n".to_vec();
    let valid = chunk_frame(&rig.header(&from, &tid, "m.txt", &body), &body);

    let mut bad_version = valid.to_vec();
    bad_version[3] = 99;
    let mut bad_kind = valid.to_vec();
    bad_kind[4] = 77;
    let mut bad_json = valid[..9].to_vec();
    bad_json.extend_from_slice(b"{\"transfer_id\":");
    let header_len = bad_json.len() as u32 - 9;
    bad_json[5..9].copy_from_slice(&header_len.to_be_bytes());
    let mut unknown_field = Vec::from(&b"HKB\x01\x01"[..]);
    let header = format!(
        "{{\"transfer_id\":\"{tid}\",\"file_id\":\"DATA\",\"from\":\"{from}\",\"to\":\"{}\",\"file_name\":\"u.txt\",\"size\":1,\"chunk_size\":65536,\"offset\":0,\"exec\":\"rm -rf /\"}}",
        rig.agent.node
    );
    unknown_field.extend_from_slice(&(header.len() as u32).to_be_bytes());
    unknown_field.extend_from_slice(header.as_bytes());
    unknown_field.push(b'x');

    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", pattern(777, 42)),
        ("empty", Vec::new()),
        ("truncated frame", valid[..20].to_vec()),
        ("truncated prefix", valid[..5].to_vec()),
        ("bad version", bad_version),
        ("bad kind", bad_kind),
        ("malformed header", bad_json),
        ("unknown header field", unknown_field),
    ];
    let dead_before = rig.dead_letter_count();
    for (_, payload) in &malformed {
        rig.inject(Bytes::from(payload.clone()));
    }
    // Parsable, but naming no usable transfer: a path as transfer id, another
    // node as recipient.
    rig.inject_chunk(
        rig.header(&from, "../../../../tmp/x-1234567890", "p.txt", &body),
        &body,
    );
    let mut wrong_to = rig.header(&from, &new_tid(), "w.txt", &body);
    wrong_to.to = unique("someone-else");
    rig.inject_chunk(wrong_to, &body);
    let expected = malformed.len() + 2;

    wait_until(WAIT, "every malformed message to be dead-lettered", || {
        rig.agent.log().matches("Dead-lettering").count() >= expected
    });
    let log = rig.agent.log();
    let dead_lettered = log.matches("Dead-lettering").count();
    assert!(
        dead_lettered <= expected + rig.republished.get(),
        "{dead_lettered} dead-lettered, {expected} sent\nagent log:\n{log}"
    );
    assert!(log.contains("bytes=777"), "agent log:\n{log}");
    // They are in the dead-letter queue, not dropped.
    wait_until(WAIT, "the dead-letter queue to hold them", || {
        rig.dead_letter_count() >= dead_before + expected as u32
    });
    assert!(!log.contains("panicked"), "agent log:\n{log}");
    assert!(rig.agent.alive(), "the agent died");
    assert!(
        rig.agent.history().is_empty(),
        "malformed input became a transfer: {:?}",
        rig.agent.history()
    );

    rig.finish(&[]);
    // Only the good transfer is in history, and no hook ran for anything else.
    let history = rig.agent.history();
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["status"], "received");
    assert_eq!(hook_runs(&rig.hooks).len(), 1);
    let receipted: HashSet<&String> = rig.receipt_counts.keys().collect();
    assert_eq!(receipted.len(), 1, "receipts for malformed input");
}

/// With `verify_sender: true`, a chunk whose `from` is not the broker user
/// that published it (the rogue logs in as `hakobu` and claims to be the
/// allowed node) is dead-lettered untouched: no history, no hook, no receipt.
#[test]
fn a_forged_sender_is_dead_lettered_when_verify_sender_is_on() {
    let mut rig = Rig::with(Opts {
        broker_extra: "    verify_sender: true\n",
        ..Opts::default()
    });
    let from = rig.allowed.clone();
    let tid = new_tid();
    let body = b"forged\n";
    rig.inject_chunk(rig.header(&from, &tid, "f.csv", body), body);
    wait_until(WAIT, "the forged chunk to be dead-lettered", || {
        rig.agent
            .log()
            .lines()
            .any(|l| l.contains("Dead-lettering") && l.contains(&tid))
    });
    let log = rig.agent.log();
    assert!(log.contains("sender_mismatch"), "{}", rig.log_tail());
    assert!(rig.agent.alive(), "the agent died");
    assert!(
        rig.agent.history().is_empty(),
        "a forged chunk became a transfer: {:?}",
        rig.agent.history()
    );
    assert!(hook_runs(&rig.hooks).is_empty(), "a hook ran");
    assert!(
        !rig.queue_exists(&from),
        "a receipt queue was created for the forged sender"
    );
    rig.assert_nothing_escaped();
}
