//! The embedded broker under attack: a real `hakobu broker` process and real
//! agents, attacked by a second process running as `nobody` (this test
//! binary, copied where `nobody` may run it, entering
//! `attacker::attacker_entry_point` in `security_embedded/attacker.rs`)
//! that speaks the broker's protocol over raw TCP, as a rogue local process
//! would. Each test is a reproduction from the security review (issue 12,
//! items 1 and 6) that worked before the broker had credentials and limits.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::attacker::open_dir;
use common::{Agent, BrokerProcess, hook_runs, recording_hook, unique, visible_names, wait_until};
use hakobu::domain::{FileId, NodeName, TransferId};
use hakobu::wire::{Message, Receipt};

const WAIT: Duration = Duration::from_secs(60);

#[path = "security_embedded/attacker.rs"]
mod attacker;

use attacker::{Attack, Report};

// ---- the victims ----

/// A broker, and agents `alpha` (sends `DATA` to beta) and `beta` (receives
/// it from alpha, with a recording hook), under a directory the attacker
/// may read (its payloads go there).
struct Rig {
    tmp: tempfile::TempDir,
    broker: BrokerProcess,
    hooks: PathBuf,
    alpha: String,
    beta: String,
}

impl Rig {
    fn new(broker_args: &[&str]) -> Rig {
        let tmp = open_dir("hakobu-sec-");
        let broker = BrokerProcess::start_with(tmp.path(), broker_args);
        let hooks = tmp.path().join("hooks");
        recording_hook(&hooks, "hook.sh");
        Rig {
            broker,
            hooks,
            alpha: unique("alpha"),
            beta: unique("beta"),
            tmp,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn alpha(&self) -> Agent {
        let yaml = format!(
            "node: {a}\nstate_dir: state\n{broker}send:\n  - file_id: DATA\n    outbox: {outbox}\n    to: [ {b} ]\n    ready: {{ stable_for: 200ms }}\n    after_send: delete\n",
            a = self.alpha,
            b = self.beta,
            broker = self.broker.section(),
            outbox = self.path("outbox").display(),
        );
        Agent::new(&self.alpha, &self.path("alpha"), &yaml)
    }

    fn beta(&self) -> Agent {
        let hook = self.hooks.join("hook.sh");
        let yaml = format!(
            "node: {b}\nstate_dir: state\n{broker}receive:\n  - file_id: DATA\n    from: [ {a} ]\n    inbox: {inbox}\n    on_success: [ \"{hook}\", \"{{path}}\" ]\n    on_failure: [ \"{hook}\" ]\n",
            a = self.alpha,
            b = self.beta,
            broker = self.broker.section(),
            inbox = self.path("inbox").display(),
            hook = hook.display(),
        );
        Agent::new(&self.beta, &self.path("beta"), &yaml)
    }

    fn attack(&self, kind: &str) -> Attack {
        Attack::new(kind, &self.broker.addr)
    }

    /// An attack with the credentials of node `x`, which the broker knows
    /// (a node on this host gone rogue, or its secret stolen).
    fn attack_as(&self, kind: &str, x: &str) -> Attack {
        let secret = self.broker.credentials(x).secret;
        self.attack(kind).acting_as(x, &secret)
    }

    /// Writes `msg` where the attacker can read it; returns the path.
    fn payload(&self, name: &str, msg: &Message) -> String {
        let p = self.path(name);
        std::fs::write(&p, msg.encode()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p.display().to_string()
    }

    /// A message in beta's queue, published by alpha.
    fn message_for_beta(&self) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            use hakobu::broker::Broker;
            let b = hakobu::broker::embedded::Embedded::new(
                &self.broker.addr,
                self.broker.credentials(&self.alpha),
                1,
            );
            let c = b.publish(&self.beta, Bytes::from_static(b"payroll")).await;
            c.unwrap().await.unwrap();
        });
    }
}

/// A whole one-chunk file from `from` to `to`.
fn forged_file(from: &str, to: &str, data: &[u8]) -> (TransferId, Message) {
    let tid = TransferId::new();
    let msg = common::forge::chunk(&tid, (from, to), "forged.csv", data, (0, 64 << 10));
    (tid, msg)
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Samples `f` every 20 ms until `child` exits; the largest value, and the
/// child's output.
fn peak_while(mut child: Child, mut f: impl FnMut() -> u64) -> (u64, Report) {
    let mut peak = 0;
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(f());
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the attacker hangs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (peak, Report(child.wait_with_output().unwrap()))
}

// ---- the attacks ----

/// Review: with no token the broker took any loopback connection, which
/// could then consume any queue. Now nothing happens before a hello with a
/// node's secret.
#[test]
fn no_credentials_no_access() {
    let rig = Rig::new(&[]);
    rig.message_for_beta();
    let queue = format!("hakobu.node.{}", rig.beta);
    for (node, secret) in [("", ""), (rig.beta.as_str(), "guess"), ("root", "")] {
        let r = rig
            .attack("steal")
            .acting_as(node, secret)
            .set("QUEUE", &queue)
            .run();
        assert!(r.get("hello").starts_with("refused"), "{}", r.get("hello"));
        assert_eq!(r.num("delivered"), 0, "a message was stolen as {node:?}");
        assert_eq!(r.num("delivered_without_hello"), 0);
    }
}

/// Review: any client could consume any node's queue (steal a file, ack it
/// away). Node X's own credentials do not open beta's queue.
#[test]
fn another_nodes_credentials_cannot_consume_its_queue() {
    let rig = Rig::new(&[]);
    rig.message_for_beta();
    let r = rig
        .attack_as("steal", &unique("x"))
        .set("QUEUE", &format!("hakobu.node.{}", rig.beta))
        .run();
    assert_eq!(r.get("hello"), "welcome");
    assert_eq!(r.num("delivered"), 0, "node X consumed beta's queue");
    assert!(
        r.get("last").contains("may consume only its own queue"),
        "{}",
        r.get("last")
    );
    // And the dead-letter queue is no one's.
    let r = rig
        .attack_as("steal", &unique("x"))
        .set("QUEUE", "hakobu.dead-letter")
        .run();
    assert_eq!(r.num("delivered"), 0);
}

/// Review: a chunk claiming `from: alpha` was believed, and beta placed the
/// file and ran its success hook. From node X it is now dead-lettered as
/// `sender_mismatch`: no file, no hook.
#[test]
fn a_file_forged_as_alpha_is_refused() {
    let rig = Rig::new(&[]);
    let mut beta = rig.beta();
    beta.start();
    let (tid, msg) = forged_file(&rig.alpha, &rig.beta, b"name,salary\nmallory,1000000\n");
    let r = rig
        .attack_as("publish", &unique("x"))
        .set("QUEUE", &format!("hakobu.node.{}", rig.beta))
        .set("PAYLOAD", &rig.payload("forged", &msg))
        .run();
    assert_eq!(
        r.get("publish"),
        "confirmed",
        "publishing to a node queue is allowed"
    );
    wait_until(WAIT, "beta to refuse the forged chunk", || {
        beta.log().contains("sender_mismatch")
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        visible_names(&rig.path("inbox")).is_empty(),
        "the forged file was placed"
    );
    assert!(hook_runs(&rig.hooks).is_empty(), "a hook ran for {tid}");
    assert!(
        beta.history().is_empty(),
        "the forged transfer was recorded"
    );
}

/// Review: a success receipt forged for alpha's transfer made alpha delete
/// its only copy. Neither a receipt claiming to come from beta nor one from
/// node X (which the transfer was not sent to) changes anything now.
#[test]
fn a_forged_receipt_leaves_alphas_file_in_its_spool() {
    let rig = Rig::new(&[]);
    let mut alpha = rig.alpha();
    alpha.start(); // beta is not running: the transfer waits for its receipt
    common::drop_file(&rig.path("outbox"), "payroll.csv", |p| {
        std::fs::write(p, b"the only copy\n").unwrap()
    });
    wait_until(WAIT, "the transfer to wait for its receipt", || {
        !alpha.with_status("awaiting_receipt").is_empty()
    });
    let row = alpha.with_status("awaiting_receipt").remove(0);
    let tid = TransferId::parse(row["transfer_id"].as_str().unwrap()).unwrap();
    let x = unique("x");
    for (claimed, code) in [
        (rig.beta.as_str(), "sender_mismatch"),
        (x.as_str(), "unexpected_receipt"),
    ] {
        let receipt = Message::Receipt(Receipt {
            transfer_id: tid.clone(),
            file_id: FileId::parse("DATA").unwrap(),
            from: NodeName::parse(claimed).unwrap(),
            to: NodeName::parse(&rig.alpha).unwrap(),
            ok: true,
            error_code: None,
            error: None,
            path: Some("/nowhere".into()),
            hook_exit: Some(0),
            finished_at: "2026-12-02T00:00:00Z".into(),
            attempt: 1,
        });
        let r = rig
            .attack_as("publish", &x)
            .set("QUEUE", &format!("hakobu.node.{}", rig.alpha))
            .set("PAYLOAD", &rig.payload(code, &receipt))
            .run();
        assert_eq!(r.get("publish"), "confirmed");
        wait_until(WAIT, code, || alpha.log().contains(code));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        alpha.with_status("awaiting_receipt").len(),
        1,
        "{:?}",
        alpha.history()
    );
    let spool = rig.path("alpha/state/spool/DATA");
    assert_eq!(visible_names(&spool).len(), 1, "the spooled copy went");
}

/// A secret file its group may read is refused when the agent starts, with
/// a sentence saying how to fix it.
#[test]
fn a_group_readable_secret_is_refused_at_start() {
    let rig = Rig::new(&[]);
    let alpha = rig.alpha();
    let secret = alpha.secret_path();
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    common::write_secret(&secret, &rig.broker.credentials(&rig.alpha).secret);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = common::must_refuse_to_start(
        Command::new(common::bin())
            .args(["run", "-c"])
            .arg(&alpha.config)
            .current_dir(&alpha.dir),
        "the agent, with a secret its group may read,",
    );
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains(&rig.broker.credentials(&rig.alpha).secret));
}

/// Review: before the hello the broker read frames of up to 17 MiB, so a
/// stranger made it buffer 17 MiB per connection. Now a connection that
/// announces more than 4 KiB before its hello is closed at once.
#[test]
fn an_oversized_frame_before_the_hello_is_refused() {
    let rig = Rig::new(&[]);
    let pid = rig.broker.pid();
    let before = status_kib(pid, "VmRSS");
    let (peak, r) = peak_while(rig.attack("oversize").spawn(), || status_kib(pid, "VmRSS"));
    assert_eq!(
        r.num("refused"),
        40,
        "connections kept reading a 16 MiB hello"
    );
    let grown = peak.saturating_sub(before) >> 10;
    eprintln!("oversized hellos: broker VmRSS {before} KiB, peak {peak} KiB");
    assert!(
        grown < 64,
        "the broker grew {grown} MiB (from {before} KiB)"
    );
    rig.message_for_beta(); // still serving
}

/// Review: no cap on connections. A flood of strangers, then of node X's
/// authenticated connections, is refused beyond the caps, and agents that
/// were connected keep transferring files meanwhile.
#[test]
fn a_connection_flood_is_refused_and_agents_keep_working() {
    let rig = Rig::new(&["--max-connections", "24"]);
    let (mut alpha, mut beta) = (rig.alpha(), rig.beta());
    beta.start();
    alpha.start();
    let pid = rig.broker.pid();
    let fds = open_fds(pid);
    let flood = rig
        .attack("flood")
        .set("COUNT", "600")
        .set("HOLD", "4")
        .spawn();
    std::thread::sleep(Duration::from_millis(500));
    common::drop_file(&rig.path("outbox"), "during-flood.csv", |p| {
        std::fs::write(p, b"still here\n").unwrap()
    });
    let (peak, r) = peak_while(flood, || open_fds(pid) as u64);
    eprintln!(
        "flood: broker descriptors {fds} before, peak {peak}; attacker held {}",
        r.num("held")
    );
    assert!(r.num("held") > 300, "the attacker could not even connect");
    assert!(
        peak < (fds + 64 + 40) as u64,
        "the broker held {peak} descriptors (from {fds})"
    );
    wait_until(WAIT, "the file sent during the flood", || {
        visible_names(&rig.path("inbox")) == ["during-flood.csv"]
    });
    let x = unique("x");
    let secret = rig.broker.credentials(&x).secret;
    let r = rig
        .attack("flood")
        .acting_as(&x, &secret)
        .set("COUNT", "100")
        .set("HOLD", "1")
        .run();
    let welcomed = r.num("welcomed");
    assert!(
        welcomed <= 20,
        "{welcomed} connections beyond max_connections"
    );
    common::drop_file(&rig.path("outbox"), "after-flood.csv", |p| {
        std::fs::write(p, b"and here\n").unwrap()
    });
    wait_until(WAIT, "the file sent after the flood", || {
        visible_names(&rig.path("inbox")).len() == 2
    });
}

/// Review (issue 12's follow-up): one node's credentials could take every
/// seat of `max_connections`, locking every other node out. Now a node has
/// at most `max_connections_per_node`, and another node still connects
/// while it holds all of its own.
#[test]
fn one_node_cannot_take_every_connection() {
    use std::io::BufRead;
    let rig = Rig::new(&["--max-connections", "64", "--max-connections-per-node", "8"]);
    let mut hog = rig
        .attack_as("flood", &unique("x"))
        .set("COUNT", "100")
        .set("HOLD", "6")
        .spawn();
    // The hog reports how many of its 100 were welcomed once it has tried
    // them all, and holds them open for HOLD seconds after.
    let mut lines = std::io::BufReader::new(hog.stdout.take().unwrap()).lines();
    let hog_welcomed: u64 = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split_once("ATTACK welcomed=")
                .map(|(_, n)| n.trim().parse().unwrap())
        })
        .expect("the hog reported nothing");
    let other = rig
        .attack_as("flood", &unique("y"))
        .set("COUNT", "4")
        .set("HOLD", "0")
        .run();
    let _ = hog.wait();
    eprintln!(
        "one node welcomed {hog_welcomed} of 100; another node then {} of 4",
        other.num("welcomed")
    );
    assert_eq!(hog_welcomed, 8, "one node held more than its share");
    assert_eq!(
        other.num("welcomed"),
        4,
        "another node was locked out by the first"
    );
}

/// Review: deliveries were limited in number only, and queued for a
/// consumer in memory: one that never reads made the broker hold every
/// message of its queue. Now the broker holds at most 32 MiB for it.
#[test]
fn a_consumer_that_never_reads_does_not_grow_the_broker() {
    let rig = Rig::new(&[]);
    let pid = rig.broker.pid();
    let before = status_kib(pid, "VmRSS");
    common::attacker::let_nobody_write(&rig.path("marks"));
    let mark = rig.path("marks/published");
    let x = unique("x");
    let hog = rig
        .attack_as("hog", &x)
        .set("MIB", "300")
        .set("MARK", &mark.display().to_string());
    let mut after_publish = 0;
    let (_, r) = peak_while(hog.spawn(), || {
        if mark.exists() {
            after_publish = after_publish.max(status_kib(pid, "VmRSS"));
        }
        0
    });
    assert_eq!(r.num("confirmed"), 300);
    assert!(
        after_publish > 0,
        "the attacker never reported its publishes"
    );
    let grown = after_publish.saturating_sub(before) >> 10;
    eprintln!(
        "never-reading consumer: broker VmRSS {before} KiB, after 300 MiB {after_publish} KiB"
    );
    assert!(
        grown < 128,
        "the broker grew {grown} MiB for a consumer that never reads"
    );
}

/// A broker-wide disk quota: beyond `--max-disk` publishes are refused (a
/// nack, which senders retry) until consumers make room.
#[test]
fn the_disk_quota_refuses_publishes_until_there_is_room() {
    let rig = Rig::new(&["--max-disk", "3MiB"]);
    let x = unique("x");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use hakobu::broker::{Broker, BrokerError};
        let b = hakobu::broker::embedded::Embedded::new(
            &rig.broker.addr,
            rig.broker.credentials(&x),
            16,
        );
        let mib = || Bytes::from(vec![1u8; 1 << 20]);
        for _ in 0..3 {
            b.publish(&x, mib()).await.unwrap().await.unwrap();
        }
        let refused = b.publish(&x, mib()).await.unwrap().await;
        assert!(matches!(refused, Err(BrokerError::Nack)), "{refused:?}");
        let mut rx = b.subscribe(&x).await.unwrap();
        let d = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        d.ack().await.unwrap();
        let mut again = Err(BrokerError::Nack);
        for _ in 0..50 {
            again = b.publish(&x, mib()).await.unwrap().await;
            if again.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        again.expect("room again once a message was acked");
    });
}

/// The dead-letter queue keeps at most `--max-dead-letter` bytes, dropping
/// its oldest, and `hakobu broker status` shows its depth.
#[test]
fn the_dead_letter_queue_is_bounded_and_visible() {
    let rig = Rig::new(&["--max-dead-letter", "2MiB"]);
    let x = unique("x");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use hakobu::broker::Broker;
        let b = hakobu::broker::embedded::Embedded::new(
            &rig.broker.addr,
            rig.broker.credentials(&x),
            16,
        );
        for i in 0..6u8 {
            let c = b.publish(&x, Bytes::from(vec![i; 1 << 20])).await;
            c.unwrap().await.unwrap();
        }
        let mut rx = b.subscribe(&x).await.unwrap();
        for _ in 0..6 {
            let d = tokio::time::timeout(WAIT, rx.recv())
                .await
                .unwrap()
                .unwrap();
            d.dead_letter().await.unwrap();
        }
    });
    let status = || {
        let out = Command::new(common::bin())
            .args(["broker", "status", "--data"])
            .arg(rig.broker.data())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until(WAIT, "x's queue to empty", || {
        status()
            .lines()
            .all(|l| !l.starts_with(&format!("hakobu.node.{x} ")) || l.contains(" 0 "))
    });
    let text = status();
    let dead = text
        .lines()
        .find(|l| l.starts_with("hakobu.dead-letter"))
        .unwrap_or_else(|| panic!("no dead-letter line in\n{text}"));
    let depth: u64 = dead.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(depth, 2, "kept the newest 2 MiB only:\n{text}");
    assert!(text.contains(&x), "{text}");
}

/// A connection that says nothing after its hello is closed after the idle
/// timeout; agents, which ping while they wait, stay connected and work.
#[test]
fn a_silent_connection_is_closed_and_idle_agents_are_not() {
    let rig = Rig::new(&["--idle-timeout", "25s"]);
    let (mut alpha, mut beta) = (rig.alpha(), rig.beta());
    beta.start();
    alpha.start();
    let r = rig.attack_as("silent", &unique("x")).run();
    assert_eq!(r.get("hello"), "welcome");
    let ms = r.num("closed_after_ms");
    assert!((20_000..29_000).contains(&ms), "closed after {ms} ms");
    // The agents were idle as long: they still deliver at once.
    common::drop_file(&rig.path("outbox"), "after-idle.csv", |p| {
        std::fs::write(p, b"awake\n").unwrap()
    });
    wait_until(
        Duration::from_secs(15),
        "the file sent after the idle time",
        || visible_names(&rig.path("inbox")) == ["after-idle.csv"],
    );
    assert!(
        !beta.log().contains("Consumer lost the embedded broker"),
        "{}",
        beta.log()
    );
}
