//! One test per defect found in review (issue 11, part 6), each against the
//! real binary and the embedded broker (`hakobu broker`), each failing on
//! the code before its fix. Crashes land exactly between two steps through
//! failpoints (`HAKOBU_FAILPOINT`, src/failpoint.rs): the agent kills itself
//! with SIGKILL there, as `kill -9` would.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hakobu::domain::TransferId;
use hakobu::wire::Message;
use serde_json::Value;

use common::{Agent, BrokerProcess, dir_names, forge, hook_runs, recording_hook, wait_until};

const WAIT: Duration = Duration::from_secs(60);

/// A broker process, a sending agent `alpha` and a receiving agent `beta`
/// for the file id `DATA`, each agent in a directory of its own.
struct Rig {
    tmp: tempfile::TempDir,
    broker: BrokerProcess,
    hooks: PathBuf,
    outbox: PathBuf,
    inbox: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let broker = BrokerProcess::start(tmp.path());
        let hooks = tmp.path().join("hooks");
        recording_hook(&hooks, "hook.sh");
        let (outbox, inbox) = (tmp.path().join("outbox"), tmp.path().join("inbox"));
        Rig {
            tmp,
            broker,
            hooks,
            outbox,
            inbox,
        }
    }

    fn alpha(&self) -> Agent {
        let yaml = format!(
            "node: alpha\nstate_dir: state\n{broker}send:\n  - file_id: DATA\n    outbox: {outbox}\n    to: [ beta ]\n    ready: {{ stable_for: 200ms }}\n    after_send: keep\n",
            broker = self.broker.section(),
            outbox = self.outbox.display(),
        );
        Agent::new("alpha", &self.tmp.path().join("alpha"), &yaml)
    }

    /// `beta`, receiving `DATA` in `mode` with the recording hook on both
    /// outcomes; `extra` is appended to its receive profile.
    fn beta(&self, mode: &str, extra: &str) -> Agent {
        let hook = self.hooks.join("hook.sh");
        let yaml = format!(
            "node: beta\nstate_dir: state\n{broker}receive:\n  - file_id: DATA\n    from: [ alpha ]\n    inbox: {inbox}\n    mode: {mode}\n    on_success: [ \"{hook}\", \"{{path}}\" ]\n    on_failure: [ \"{hook}\" ]\n{extra}",
            broker = self.broker.section(),
            inbox = self.inbox.display(),
            hook = hook.display(),
        );
        Agent::new("beta", &self.tmp.path().join("beta"), &yaml)
    }

    fn partials(&self) -> Vec<String> {
        dir_names(&self.inbox.join(".hakobu-partial"))
    }
}

/// Waits until the agent's process has exited (killed at its failpoint).
fn wait_dead(agent: &mut Agent, what: &str) {
    wait_until(WAIT, what, || !agent.alive());
}

/// The agent's only history row of `direction`, once it is final.
fn final_row(agent: &Agent, direction: &str) -> Value {
    let mut row = Value::Null;
    wait_until(
        WAIT,
        &format!("{}'s {direction} row to settle", agent.node),
        || {
            let rows: Vec<Value> = agent
                .history()
                .into_iter()
                .filter(|r| r["direction"] == direction)
                .collect();
            assert!(rows.len() <= 1, "{rows:?}");
            row = rows.into_iter().next().unwrap_or(Value::Null);
            let settled = [
                "received",
                "receive_failed",
                "hook_failed",
                "sent",
                "send_failed",
            ];
            settled.iter().any(|s| row["status"] == *s)
        },
    );
    row
}

/// Defect: a placement that failed removed the partial file before the
/// failure was recorded. A crash in between left a transfer recorded as
/// `placing`, complete, without its file: recovery then failed it for a
/// reason that was not the cause (`io_error` reading a partial file that
/// was gone) instead of `file_exists`.
#[test]
fn a_failed_placement_is_recorded_before_its_partial_file_goes() {
    let rig = Rig::new();
    fs::create_dir_all(&rig.inbox).unwrap();
    fs::write(rig.inbox.join("x.csv"), b"already here\n").unwrap();
    let mut beta = rig
        .beta("new", "")
        .env("HAKOBU_FAILPOINT", "receiver.placing_failed.recorded");
    beta.start();
    let mut alpha = rig.alpha();
    alpha.start();
    common::drop_file(&rig.outbox, "x.csv", |p| {
        fs::write(p, b"new bytes\n").unwrap()
    });
    wait_dead(&mut beta, "beta to die at its failpoint");
    assert!(
        beta.log().contains("receiver.placing_failed.recorded"),
        "{}",
        beta.log()
    );
    let mut beta = rig.beta("new", "");
    beta.start();
    let rx = final_row(&beta, "receive");
    assert_eq!(rx["status"], "receive_failed", "{rx}\n{}", beta.log());
    assert_eq!(rx["error_code"], "file_exists", "{rx}\n{}", beta.log());
    let tx = final_row(&alpha, "send");
    assert_eq!(tx["error_code"], "file_exists", "{tx}");
    assert_eq!(
        fs::read(rig.inbox.join("x.csv")).unwrap(),
        b"already here\n"
    );
    wait_until(WAIT, "the leftover partial file to go", || {
        rig.partials().is_empty()
    });
    let tid = rx["transfer_id"].as_str().unwrap().to_string();
    wait_until(WAIT, "the failure hook", || {
        hook_runs(&rig.hooks).contains(&format!("{tid} receive_failed"))
    });
    assert_eq!(hook_runs(&rig.hooks), vec![format!("{tid} receive_failed")]);
}

/// Chunk `idx`, of 64 KiB, of the transfer of `data` from alpha to beta.
fn chunk(tid: &TransferId, data: &[u8], idx: u64) -> Message {
    forge::chunk(tid, ("alpha", "beta"), "late.bin", data, (idx, 64 << 10))
}

fn publish(rt: &tokio::runtime::Runtime, broker: &BrokerProcess, msg: Message) {
    forge::publish_as(rt, broker, ("alpha", "beta"), msg);
}

/// Defect: an expiry removed the partial file before it recorded the
/// expiry. A crash in between left the transfer `receiving` with its first
/// chunk recorded and its bytes gone: when the sender's last chunk came, the
/// file was assembled around a hole and failed as `sha256_mismatch`.
#[test]
fn an_expiry_is_recorded_before_its_partial_file_goes() {
    let rig = Rig::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ttl = "    partial_ttl: 2s\n";
    let mut beta = rig
        .beta("new", ttl)
        .env("HAKOBU_FAILPOINT", "receiver.expire.recorded");
    beta.start();
    let tid = TransferId::new();
    let data: Vec<u8> = (0..(64 << 10) + 1000).map(|i| (i % 251) as u8).collect();
    publish(&rt, &rig.broker, chunk(&tid, &data, 0));
    wait_dead(&mut beta, "beta to die at its expiry failpoint");
    assert!(
        beta.log().contains("receiver.expire.recorded"),
        "{}",
        beta.log()
    );
    let mut beta = rig.beta("new", ttl);
    beta.start();
    // The sender comes back with the rest, before the next expiry round.
    publish(&rt, &rig.broker, chunk(&tid, &data, 1));
    let rx = final_row(&beta, "receive");
    assert_eq!(rx["error_code"], "transfer_expired", "{rx}\n{}", beta.log());
    assert!(!beta.log().contains("sha256_mismatch"), "{}", beta.log());
    assert!(!rig.inbox.join("late.bin").exists());
    wait_until(WAIT, "the leftover partial file to go", || {
        rig.partials().is_empty()
    });
    wait_until(WAIT, "the failure hook", || {
        hook_runs(&rig.hooks).contains(&format!("{tid} receive_failed"))
    });
    assert_eq!(
        hook_runs(&rig.hooks).len(),
        1,
        "{:?}",
        hook_runs(&rig.hooks)
    );
}

/// A success hook that writes what `hakobu history` says of its own transfer
/// while it runs (to `during.N`), and exits 3 while `fail` exists.
fn observing_hook(dir: &Path, config: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join("observe.sh");
    let script = format!(
        "#!/bin/sh\nd={d}\nn=$(ls $d | grep -c '^during') \n\"{bin}\" history -c \"{cfg}\" --json | grep \"$HAKOBU_TRANSFER_ID\" | grep '\"receive\"' > \"$d/during.$n\"\n[ -e \"$d/fail\" ] && exit 3\nexit 0\n",
        d = dir.display(),
        bin = common::bin(),
        cfg = config.display(),
    );
    fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Defect: `hakobu rerun` ran the hook without recording `hook_running`
/// first (a rerun cut off left no trace), and afterwards set the status
/// whatever the row said by then, leaving the old error code on a transfer
/// it called received.
#[test]
fn rerun_records_hook_running_first_and_settles_its_own_row() {
    let rig = Rig::new();
    let dir = rig.tmp.path().join("solo");
    let config = dir.join("solo.yaml");
    let obs = rig.tmp.path().join("observe");
    let hook = observing_hook(&obs, &config);
    fs::write(obs.join("fail"), b"").unwrap();
    let yaml = format!(
        "node: solo\nstate_dir: state\n{broker}send:\n  - file_id: DATA\n    outbox: {outbox}\n    to: [ solo ]\n    ready: {{ stable_for: 200ms }}\nreceive:\n  - file_id: DATA\n    from: [ solo ]\n    inbox: {inbox}\n    on_success: [ \"{hook}\" ]\n",
        broker = rig.broker.section(),
        outbox = rig.outbox.display(),
        inbox = rig.inbox.display(),
        hook = hook.display(),
    );
    let mut solo = Agent::new("solo", &dir, &yaml);
    solo.start();
    common::drop_file(&rig.outbox, "r.csv", |p| fs::write(p, b"1,2\n").unwrap());
    let rx = final_row(&solo, "receive");
    assert_eq!(rx["status"], "hook_failed", "{rx}");
    wait_until(WAIT, "the receipt to be sent", || {
        solo.history()
            .iter()
            .any(|r| r["direction"] == "receive" && r["receipt_sent"] == true)
    });
    let tid = rx["transfer_id"].as_str().unwrap().to_string();
    fs::remove_file(obs.join("fail")).unwrap();
    let out = solo.cli(&["rerun", &tid]);
    assert!(
        out.status.success(),
        "rerun: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let during: Value =
        serde_json::from_str(fs::read_to_string(obs.join("during.1")).unwrap().trim()).unwrap();
    assert_eq!(
        during["status"], "hook_running",
        "while the rerun's hook ran: {during}"
    );
    let after = solo
        .history()
        .into_iter()
        .find(|r| r["direction"] == "receive")
        .unwrap();
    assert_eq!(after["status"], "received", "{after}");
    assert_eq!(after["hook_exit"], 0, "{after}");
    assert!(after["error_code"].is_null(), "{after}");
    // A transfer id this node never saw is a usage error.
    let out = solo.cli(&["rerun", "0190f6c4-0000-7000-8000-000000000001"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Defect: a crash between the rename that claims an outbox file for a
/// request and the rows that record it left the file in the spool with no
/// row at the next start; a profile without `to` had no one to record it
/// for, so it stayed there, invisible, for good. Now the claim is undone:
/// the file is back in the outbox (with its done marker) and the next
/// request sends it.
#[test]
fn a_request_claim_cut_short_by_a_crash_goes_back_to_the_outbox() {
    let rig = Rig::new();
    let alpha_yaml = format!(
        "node: alpha\nstate_dir: state\n{broker}send:\n  - file_id: DATA\n    outbox: {outbox}\n    requests_from: [ beta ]\n    ready: {{ done_marker: .done }}\n",
        broker = rig.broker.section(),
        outbox = rig.outbox.display(),
    );
    let alpha_dir = rig.tmp.path().join("alpha");
    let mut crashing = Agent::new("alpha", &alpha_dir, &alpha_yaml)
        .env("HAKOBU_FAILPOINT", "sender.claim.renamed");
    let mut beta = rig.beta("new", "");
    beta.start();
    crashing.start();
    fs::create_dir_all(&rig.outbox).unwrap();
    fs::write(rig.outbox.join("box.csv"), b"id\n1\n").unwrap();
    fs::write(rig.outbox.join("box.csv.done"), b"").unwrap();
    let asked = beta.cli(&["request", "--file-id", "DATA", "--from", "alpha"]);
    assert!(asked.status.success(), "{asked:?}");
    wait_dead(&mut crashing, "alpha to die between the claim and its rows");
    assert!(dir_names(&rig.outbox).is_empty(), "not claimed");

    let mut alpha = Agent::new("alpha", &alpha_dir, &alpha_yaml);
    alpha.start();
    wait_until(WAIT, "the file back in the outbox", || {
        dir_names(&rig.outbox) == ["box.csv", "box.csv.done"]
    });
    assert!(alpha.history().is_empty(), "recorded for no one");
    let o = beta.cli(&[
        "request",
        "--file-id",
        "DATA",
        "--from",
        "alpha",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}\n{}", alpha.log());
    assert_eq!(fs::read(rig.inbox.join("box.csv")).unwrap(), b"id\n1\n");
}
