//! Priority and bandwidth (issue 13 item 6) against the real binary, on the
//! embedded broker (a `hakobu broker` process) and on the real three-node
//! RabbitMQ cluster.
//!
//! - Priority: five large priority-1 files are mid-publish, holding every
//!   permit of bytes in flight the sender has, when a small priority-9 file
//!   arrives in another outbox: it is published at once (the large ones
//!   pause between chunks) and placed before any of them completes.
//! - Bandwidth: a profile's `bandwidth:` and the agent's top-level one cap
//!   the rate measured from history's timestamps (claim to placement) at
//!   the cap plus its burst.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::{Agent, BrokerProcess, hook_runs, rabbit_broker, recording_hook, unique, wait_until};

const WAIT: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Embedded,
    Rabbit,
}

/// A sender with send profiles `(file_id, extra lines)` and a receiver of
/// each, on one broker.
struct Rig {
    _tmp: tempfile::TempDir,
    _broker: Option<BrokerProcess>,
    root: PathBuf,
    alpha: Agent,
    beta: Agent,
    hooks: PathBuf,
}

impl Rig {
    fn new(kind: Kind, top: &str, profiles: &[(&str, &str)]) -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let broker = (kind == Kind::Embedded).then(|| BrokerProcess::start(&root));
        let section = |first| match &broker {
            Some(b) => b.section(),
            None => rabbit_broker(first),
        };
        let (a, b) = (unique("alpha"), unique("beta"));
        let hooks = root.join("hooks");
        let hook = recording_hook(&hooks, "hook.sh");
        let (mut send, mut receive) = (String::new(), String::new());
        for (id, extra) in profiles {
            send.push_str(&format!(
                "  - file_id: {id}\n    outbox: {root}/out/{id}\n    to: [ {b} ]\n    ready: {{ done_marker: \".done\" }}\n    chunk_size: 256KiB\n{extra}",
                root = root.display()
            ));
            receive.push_str(&format!(
                "  - file_id: {id}\n    from: [ {a} ]\n    inbox: {root}/in/{id}\n    on_success: [ \"{hook}\", \"{{file_name}}\" ]\n    on_failure: [ \"{hook}\", \"{{file_name}}\" ]\n",
                root = root.display(),
                hook = hook.display()
            ));
        }
        let alpha = Agent::new(
            &a,
            &root.join("alpha"),
            &format!(
                "node: {a}\nstate_dir: {root}/alpha/state\n{broker}{top}send:\n{send}",
                root = root.display(),
                broker = section(0)
            ),
        );
        let beta = Agent::new(
            &b,
            &root.join("beta"),
            &format!(
                "node: {b}\nstate_dir: {root}/beta/state\n{broker}receive:\n{receive}",
                root = root.display(),
                broker = section(1)
            ),
        );
        let mut rig = Rig {
            _tmp: tmp,
            _broker: broker,
            root,
            alpha,
            beta,
            hooks,
        };
        rig.beta.start();
        rig.alpha.start();
        rig
    }

    /// Writes `size` bytes as `name` into profile `id`'s outbox, then its
    /// done marker.
    fn drop(&self, id: &str, name: &str, size: u64) {
        let out = self.root.join("out").join(id);
        fs::create_dir_all(&out).unwrap();
        let stage = self.root.join("stage");
        fs::create_dir_all(&stage).unwrap();
        common::write_pattern(&stage.join(name), size, size ^ name.len() as u64);
        fs::rename(stage.join(name), out.join(name)).unwrap();
        fs::write(out.join(format!("{name}.done")), b"").unwrap();
    }

    fn inbox(&self, id: &str) -> PathBuf {
        self.root.join("in").join(id)
    }

    /// Beta's rows, once `n` are received.
    fn received(&self, n: usize) -> Vec<serde_json::Value> {
        let mut rows = Vec::new();
        wait_until(WAIT, &format!("{n} files received"), || {
            rows = self.beta.history();
            let failed: Vec<_> = rows
                .iter()
                .filter(|r| r["status"].as_str().is_some_and(|s| s.contains("fail")))
                .collect();
            assert!(failed.is_empty(), "{failed:?}\n{}", self.logs());
            rows.iter().filter(|r| r["status"] == "received").count() >= n
        });
        rows
    }

    fn logs(&self) -> String {
        format!(
            "alpha log:\n{}\nbeta log:\n{}",
            self.alpha.log(),
            self.beta.log()
        )
    }
}

fn time_of(r: &serde_json::Value, key: &str) -> SystemTime {
    humantime::parse_rfc3339(r[key].as_str().unwrap_or_else(|| panic!("no {key}: {r}")))
        .unwrap_or_else(|e| panic!("{key} of {r}: {e}"))
}

/// MiB/s from the earliest start to the latest finish of `rows`.
fn rate(rows: &[&serde_json::Value]) -> f64 {
    let start = rows.iter().map(|r| time_of(r, "started_at")).min().unwrap();
    let end = rows
        .iter()
        .map(|r| time_of(r, "finished_at"))
        .max()
        .unwrap();
    let bytes: u64 = rows.iter().map(|r| r["size"].as_u64().unwrap()).sum();
    let secs = end.duration_since(start).unwrap().as_secs_f64();
    bytes as f64 / MIB as f64 / secs
}

fn priority_9_overtakes_priority_1(kind: Kind) {
    // The agent's cap keeps the large files mid-publish for a while; each
    // holds a window of the sender's bytes in flight (four windows for
    // all), so four of them fill it and the fifth waits.
    let top = "bandwidth: 8MiB/s\n";
    let rig = Rig::new(
        kind,
        top,
        &[("LOW", "    priority: 1\n"), ("HIGH", "    priority: 9\n")],
    );
    for i in 0..5 {
        rig.drop("LOW", &format!("low-{i}.bin"), 24 * MIB);
    }
    wait_until(WAIT, "the large files to be mid-publish", || {
        let rows = rig.alpha.history();
        rows.len() == 5
            && rows.iter().any(|r| r["progress"].as_u64().unwrap_or(0) > 0)
            && rows.iter().all(|r| r["status"] == "sending")
    });
    rig.drop("HIGH", "urgent.csv", 300 * 1024);
    let rows = rig.received(6);
    let urgent = rows
        .iter()
        .find(|r| r["file_name"] == "urgent.csv")
        .unwrap();
    assert_eq!(
        fs::metadata(rig.inbox("HIGH").join("urgent.csv"))
            .unwrap()
            .len(),
        300 * 1024
    );
    // Hooks run in the order the files were placed: the urgent one first.
    let tid = urgent["transfer_id"].as_str().unwrap();
    let runs = hook_runs(&rig.hooks);
    let first = runs
        .iter()
        .position(|l| l.starts_with(tid))
        .unwrap_or_else(|| panic!("no hook for urgent.csv ({tid}): {runs:?}"));
    assert!(
        first == 0,
        "{first} large priority-1 files completed before the priority-9 one: {runs:?}\nurgent: {urgent}\n{}",
        rig.logs()
    );
    for i in 0..5 {
        assert_eq!(
            fs::metadata(rig.inbox("LOW").join(format!("low-{i}.bin")))
                .unwrap()
                .len(),
            24 * MIB
        );
    }
}

fn caps_hold(kind: Kind) {
    let rig = Rig::new(
        kind,
        "bandwidth: 6MiB/s\n",
        &[
            ("CAPPED", "    bandwidth: 3MiB/s\n"),
            ("FREE", ""),
            ("FREE2", ""),
        ],
    );
    rig.drop("CAPPED", "capped.bin", 12 * MIB);
    let rows = rig.received(1);
    let capped = rate(&[&rows[0]]);
    assert!(
        capped <= 3.0 * 1.15,
        "a profile capped at 3 MiB/s moved {capped:.2} MiB/s: {}",
        rows[0]
    );
    // Two uncapped profiles together, under the agent's 6 MiB/s.
    rig.drop("FREE", "free-1.bin", 12 * MIB);
    rig.drop("FREE2", "free-2.bin", 12 * MIB);
    let rows = rig.received(3);
    let free: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["file_name"].as_str().unwrap().starts_with("free-"))
        .collect();
    let both = rate(&free);
    assert!(
        both <= 6.0 * 1.15,
        "an agent capped at 6 MiB/s moved {both:.2} MiB/s: {free:?}"
    );
    for (id, name) in [("FREE", "free-1.bin"), ("FREE2", "free-2.bin")] {
        let got = fs::metadata(rig.inbox(id).join(name)).unwrap().len();
        assert_eq!(got, 12 * MIB);
    }
}

#[test]
fn priority_on_the_embedded_broker() {
    priority_9_overtakes_priority_1(Kind::Embedded);
}

#[test]
fn priority_on_the_cluster() {
    priority_9_overtakes_priority_1(Kind::Rabbit);
}

#[test]
fn bandwidth_on_the_embedded_broker() {
    caps_hold(Kind::Embedded);
}

#[test]
fn bandwidth_on_the_cluster() {
    caps_hold(Kind::Rabbit);
}

#[test]
fn bad_priority_and_bandwidth_settings_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (top, profile, key, says) in [
        ("", "    priority: 0\n", "priority", "1 to 9"),
        ("", "    priority: 10\n", "priority", "1 to 9"),
        ("", "    bandwidth: 10MiB\n", "bandwidth", "not a rate"),
        ("", "    bandwidth: 0MiB/s\n", "bandwidth", "more than 0"),
        ("bandwidth: fast\n", "", "bandwidth", "not a rate"),
    ] {
        let yaml = format!(
            "node: a\nstate_dir: {d}/s\nbroker:\n  embedded: {{ listen: \"127.0.0.1:0\" }}\n{top}send:\n  - file_id: X\n    outbox: {d}/out\n    to: [ b ]\n{profile}",
            d = dir.path().display()
        );
        let cfg = dir.path().join("a.yaml");
        fs::write(&cfg, yaml).unwrap();
        let out = std::process::Command::new(common::bin())
            .args(["check", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{top}{profile}: accepted");
        assert!(
            err.contains(says) && err.contains(key) && err.contains("a.yaml:"),
            "{top}{profile}: {err}"
        );
    }
}
