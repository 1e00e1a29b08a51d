//! Issue 12, items 2, 3 and 8: symlink and hard link tricks on either side,
//! modes at rest, configuration mistakes that lose data. Each attack is made
//! by a second, unprivileged process (`nobody`, tests/common/attacker.rs)
//! against the real `hakobu` binary running as root, with the embedded
//! broker (`hakobu broker`); chunks are published by the test itself where
//! an attack must land exactly between two of them. Each test failed on the
//! code before its fix.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hakobu::domain::TransferId;
use hakobu::wire::Message;
use serde_json::Value;

use common::attacker::{let_nobody_write, nobody, open_dir, sh_as_nobody};
use common::{Agent, BrokerProcess, dir_names, forge, recording_hook, wait_until};

const WAIT: Duration = Duration::from_secs(60);
const CHUNK: u64 = 64 << 10;

/// A broker, a receiving agent `beta` (and a sending agent `alpha` when a
/// test needs one), every directory where `nobody` can reach it.
struct Rig {
    root: tempfile::TempDir,
    broker: BrokerProcess,
    hooks: PathBuf,
    outbox: PathBuf,
    inbox: PathBuf,
}

impl Rig {
    fn new() -> Rig {
        nobody();
        let root = open_dir("hakobu-secfs-");
        let broker = BrokerProcess::start(root.path());
        let hooks = root.path().join("hooks");
        recording_hook(&hooks, "hook.sh");
        let (outbox, inbox) = (root.path().join("outbox"), root.path().join("inbox"));
        Rig {
            root,
            broker,
            hooks,
            outbox,
            inbox,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn alpha(&self, extra: &str) -> Agent {
        let hook = self.hooks.join("hook.sh");
        let yaml = format!(
            "node: alpha\nstate_dir: state\n{broker}send:\n  - file_id: DATA\n    outbox: {outbox}\n    to: [ beta ]\n    on_failure: [ \"{hook}\" ]\n{extra}",
            broker = self.broker.section(),
            outbox = self.outbox.display(),
            hook = hook.display(),
        );
        Agent::new("alpha", &self.path("alpha"), &yaml)
    }

    fn beta(&self, mode: &str, extra: &str) -> Agent {
        let hook = self.hooks.join("hook.sh");
        let yaml = format!(
            "node: beta\nstate_dir: state\n{broker}receive:\n  - file_id: DATA\n    from: [ alpha ]\n    inbox: {inbox}\n    mode: {mode}\n    on_success: [ \"{hook}\", \"{{path}}\" ]\n    on_failure: [ \"{hook}\" ]\n{extra}",
            broker = self.broker.section(),
            inbox = self.inbox.display(),
            hook = hook.display(),
        );
        Agent::new("beta", &self.path("beta"), &yaml)
    }
}

/// Chunk `idx` of a transfer of `data` named `name` from alpha to beta.
fn chunk(tid: &TransferId, name: &str, data: &[u8], idx: u64) -> Message {
    forge::chunk(tid, ("alpha", "beta"), name, data, (idx, CHUNK))
}

/// Publishes as alpha, the sender beta's profile accepts (the chunks say
/// `from: alpha`, and the embedded broker stamps the authenticated node).
fn publish(rt: &tokio::runtime::Runtime, b: &BrokerProcess, msg: Message) {
    forge::publish_as(rt, b, ("alpha", "beta"), msg);
}

/// Sends the whole of `data` as `name`, chunk by chunk.
fn send_all(rig: &Rig, rt: &tokio::runtime::Runtime, tid: &TransferId, name: &str, data: &[u8]) {
    let count = (data.len() as u64).div_ceil(CHUNK).max(1);
    for idx in 0..count {
        publish(rt, &rig.broker, chunk(tid, name, data, idx));
    }
}

/// The agent's row of `direction` for `tid`, once it is final.
fn final_row(agent: &Agent, direction: &str, tid: Option<&str>) -> Value {
    let mut row = Value::Null;
    wait_until(
        WAIT,
        &format!("{}'s {direction} row to settle", agent.node),
        || {
            row = agent
                .history()
                .into_iter()
                .find(|r| {
                    r["direction"] == direction
                        && tid.is_none_or(|t| r["transfer_id"] == t)
                        && [
                            "received",
                            "receive_failed",
                            "hook_failed",
                            "sent",
                            "send_failed",
                        ]
                        .iter()
                        .any(|s| r["status"] == *s)
                })
                .unwrap_or(Value::Null);
            !row.is_null()
        },
    );
    row
}

fn ok(out: std::process::Output) {
    assert!(
        out.status.success(),
        "the attacker's command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A root-owned directory nobody may read but not write, as /etc would be.
fn victim_dir(rig: &Rig) -> PathBuf {
    let v = rig.path("victim");
    fs::create_dir_all(&v).unwrap();
    fs::set_permissions(&v, fs::Permissions::from_mode(0o755)).unwrap();
    v
}

/// A root-only file (0600) with a recognisable content.
fn secret_file(rig: &Rig) -> (PathBuf, Vec<u8>) {
    let s = rig.path("secret.txt");
    let content = format!("TOP-SECRET-{}\n", std::process::id()).into_bytes();
    fs::write(&s, &content).unwrap();
    fs::set_permissions(&s, fs::Permissions::from_mode(0o600)).unwrap();
    (s, content)
}

fn data(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Every regular file under `dir`, recursively, links not followed.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if m.is_dir() {
            out.extend(files_under(&e.path()));
        } else if m.is_file() {
            out.push(e.path());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Attack: `.hakobu-partial` planted as a link to a directory of the
/// attacker's choice before the first chunk. The receiver, as root, wrote
/// the partial file there (and placed it from there).
#[test]
fn a_partial_directory_planted_as_a_link_is_refused() {
    let rig = Rig::new();
    let_nobody_write(&rig.inbox);
    let loot = rig.path("loot");
    let_nobody_write(&loot);
    ok(sh_as_nobody(&format!(
        "ln -s {} {}/.hakobu-partial",
        loot.display(),
        rig.inbox.display()
    )));
    let mut beta = rig.beta("new", "");
    beta.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tid = TransferId::new();
    let body = data(100_000, 1);
    send_all(&rig, &rt, &tid, "a.csv", &body);
    let rx = final_row(&beta, "receive", Some(tid.as_str()));
    assert_eq!(rx["error_code"], "unsafe_inbox", "{rx}\n{}", beta.log());
    assert!(dir_names(&loot).is_empty(), "written through the link");
    assert!(!rig.inbox.join("a.csv").exists());
    assert!(
        fs::symlink_metadata(rig.inbox.join(".hakobu-partial"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the planted link is left alone"
    );
}

/// Attack: `.hakobu-partial` created by the attacker as a directory of
/// theirs before the agent made it, then a link planted at the partial
/// file's name between two chunks. The receiver wrote the second chunk
/// through the link into a root-owned file.
#[test]
fn a_partial_directory_the_attacker_owns_is_refused() {
    let rig = Rig::new();
    let_nobody_write(&rig.inbox);
    let (victim, original) = secret_file(&rig);
    let partial_dir = rig.inbox.join(".hakobu-partial");
    ok(sh_as_nobody(&format!(
        "mkdir -m 777 {}",
        partial_dir.display()
    )));
    let mut beta = rig.beta("new", "");
    beta.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tid = TransferId::new();
    let body = data(3 * CHUNK as usize, 2);
    publish(&rt, &rig.broker, chunk(&tid, "b.bin", &body, 0));
    // The first chunk is in (or refused): either way the row exists.
    wait_until(WAIT, "the first chunk", || {
        beta.history()
            .iter()
            .any(|r| r["transfer_id"] == tid.as_str())
    });
    ok(sh_as_nobody(&format!(
        "ln -sf {} {}/{tid}.part",
        victim.display(),
        partial_dir.display()
    )));
    publish(&rt, &rig.broker, chunk(&tid, "b.bin", &body, 1));
    publish(&rt, &rig.broker, chunk(&tid, "b.bin", &body, 2));
    let rx = final_row(&beta, "receive", Some(tid.as_str()));
    assert!(
        fs::read(&victim).unwrap() == original,
        "written through the link into a root-owned file"
    );
    assert_eq!(rx["error_code"], "unsafe_inbox", "{rx}\n{}", beta.log());
    assert!(!rig.inbox.join("b.bin").exists());
}

/// Attack: the agent's own `.hakobu-partial` renamed away between two
/// chunks and replaced by a link to a root-owned directory. The receiver
/// followed the link for the next chunks.
#[test]
fn a_partial_directory_swapped_between_chunks_is_refused() {
    let rig = Rig::new();
    let_nobody_write(&rig.inbox);
    let victim = victim_dir(&rig);
    let mut beta = rig.beta("new", "");
    beta.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tid = TransferId::new();
    let body = data(3 * CHUNK as usize, 3);
    publish(&rt, &rig.broker, chunk(&tid, "c.bin", &body, 0));
    wait_until(WAIT, "the first chunk", || {
        beta.with_status("receiving")
            .iter()
            .any(|r| r["transfer_id"] == tid.as_str())
    });
    let partial_dir = rig.inbox.join(".hakobu-partial");
    ok(sh_as_nobody(&format!(
        "mv {p} {inbox}/stolen && ln -s {v} {p}",
        p = partial_dir.display(),
        inbox = rig.inbox.display(),
        v = victim.display()
    )));
    publish(&rt, &rig.broker, chunk(&tid, "c.bin", &body, 1));
    publish(&rt, &rig.broker, chunk(&tid, "c.bin", &body, 2));
    let rx = final_row(&beta, "receive", Some(tid.as_str()));
    assert!(
        dir_names(&victim).is_empty(),
        "written through the link: {:?}",
        dir_names(&victim)
    );
    assert_eq!(rx["error_code"], "unsafe_inbox", "{rx}\n{}", beta.log());
    assert!(!rig.inbox.join("c.bin").exists());
}

/// Attack: mode `append` with a link planted at the inbox name, to a
/// root-only file. The receiver copied the file behind the link into the
/// inbox, readable by the attacker.
#[test]
fn append_refuses_a_link_at_the_inbox_name() {
    let rig = Rig::new();
    let_nobody_write(&rig.inbox);
    let (secret, content) = secret_file(&rig);
    ok(sh_as_nobody(&format!(
        "ln -s {} {}/d.log",
        secret.display(),
        rig.inbox.display()
    )));
    let mut beta = rig.beta("append", "");
    beta.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tid = TransferId::new();
    send_all(&rig, &rt, &tid, "d.log", b"appended line\n");
    let rx = final_row(&beta, "receive", Some(tid.as_str()));
    for f in files_under(&rig.inbox) {
        assert!(
            !contains(&fs::read(&f).unwrap(), &content),
            "the secret was copied into {}",
            f.display()
        );
    }
    assert!(fs::read(&secret).unwrap() == content);
    assert_eq!(rx["error_code"], "unsafe_inbox", "{rx}\n{}", beta.log());
    assert!(
        fs::symlink_metadata(rig.inbox.join("d.log"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// Attack: mode `generations` with a link planted at the inbox name. The
/// receiver rotated the link into `name.1` and placed the file.
#[test]
fn generations_refuses_a_link_at_the_inbox_name() {
    let rig = Rig::new();
    let_nobody_write(&rig.inbox);
    let (secret, content) = secret_file(&rig);
    ok(sh_as_nobody(&format!(
        "ln -s {} {}/e.csv",
        secret.display(),
        rig.inbox.display()
    )));
    let mut beta = rig.beta("generations", "    keep: 3\n");
    beta.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tid = TransferId::new();
    send_all(&rig, &rt, &tid, "e.csv", b"generation\n");
    let rx = final_row(&beta, "receive", Some(tid.as_str()));
    assert_eq!(rx["error_code"], "unsafe_inbox", "{rx}\n{}", beta.log());
    assert!(!rig.inbox.join("e.csv.1").exists(), "the link was rotated");
    assert!(fs::read(&secret).unwrap() == content);
}

/// Attack: the claim race. The attacker drops a harmless file and its
/// marker, then swaps the file for a link to a root-only file, over and
/// over, so that the agent's claim renames the link it did not check into
/// the spool. The secret's bytes must never reach the inbox; a swapped
/// claim fails as `unsafe_source` and runs the sender's failure hook.
#[test]
fn the_claim_race_never_sends_a_file_behind_a_link() {
    let rig = Rig::new();
    let_nobody_write(&rig.outbox);
    let att = rig.path("att");
    let_nobody_write(&att);
    let (secret, content) = secret_file(&rig);
    let mut beta = rig.beta("replace", "");
    beta.start();
    let mut alpha = rig.alpha("    ready: { done_marker: \".done\" }\n    after_send: delete\n");
    alpha.start();
    let script = format!(
        "i=0; while [ $i -lt 150 ]; do \
           printf 'harmless %s\\n' $i > {att}/r && mv -f {att}/r {o}/f.csv && : > {o}/f.csv.done; \
           ln -s {s} {att}/l && mv -f {att}/l {o}/f.csv; \
           i=$((i+1)); \
         done",
        att = att.display(),
        o = rig.outbox.display(),
        s = secret.display(),
    );
    let start = Instant::now();
    let mut unsafe_seen = 0;
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(90) {
        rounds += 1;
        ok(sh_as_nobody(&script));
        std::thread::sleep(Duration::from_millis(1500));
        for f in files_under(&rig.inbox) {
            assert!(
                !contains(&fs::read(&f).unwrap_or_default(), &content),
                "the secret arrived in {} (round {rounds})\n{}",
                f.display(),
                alpha.log()
            );
        }
        unsafe_seen = alpha
            .history()
            .iter()
            .filter(|r| r["error_code"] == "unsafe_source")
            .count();
        if unsafe_seen > 0 && rounds >= 2 {
            break;
        }
    }
    assert!(
        unsafe_seen > 0,
        "the race was never hit in {rounds} rounds: this test proved nothing\n{}",
        alpha.log()
    );
    // The failure hook ran for a refused claim.
    let failed = alpha
        .history()
        .into_iter()
        .find(|r| r["error_code"] == "unsafe_source")
        .unwrap();
    let tid = failed["transfer_id"].as_str().unwrap().to_string();
    wait_until(WAIT, "the sender's failure hook", || {
        common::hook_runs(&rig.hooks).contains(&format!("{tid} send_failed"))
    });
    // Nothing of the secret is left in the spool either.
    for f in files_under(&rig.path("alpha/state/spool")) {
        assert!(!contains(&fs::read(&f).unwrap(), &content));
    }
    assert!(fs::read(&secret).unwrap() == content);
}

/// A file with a second hard link is refused at claim: its content could
/// belong to someone else than whoever put the name in the outbox.
#[test]
fn a_file_with_another_hard_link_is_not_sent() {
    let rig = Rig::new();
    let mut beta = rig.beta("new", "");
    beta.start();
    let mut alpha = rig.alpha("    ready: { stable_for: 200ms }\n    after_send: keep\n");
    alpha.start();
    fs::create_dir_all(&rig.outbox).unwrap();
    let other = rig.path("elsewhere.csv");
    fs::write(&other, b"linked\n").unwrap();
    fs::hard_link(&other, rig.outbox.join("g.csv")).unwrap();
    let tx = final_row(&alpha, "send", None);
    assert_eq!(tx["error_code"], "unsafe_source", "{tx}\n{}", alpha.log());
    assert!(!rig.inbox.join("g.csv").exists());
    assert_eq!(fs::read(&other).unwrap(), b"linked\n");
}

/// Modes at rest: the state directory and spool 0700 (an existing one is
/// tightened), the broker's data directory 0700, placed files in the
/// profile's `file_mode` (default 0600), partial directory 0700.
#[test]
fn modes_at_rest() {
    let rig = Rig::new();
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    let state = rig.path("beta/state");
    fs::create_dir_all(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
    let mut beta = rig.beta("new", "");
    beta.start();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("spool")), 0o700);
    assert_eq!(mode(&rig.path("broker-data")), 0o700);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tid = TransferId::new();
    send_all(&rig, &rt, &tid, "h.csv", b"default mode\n");
    let rx = final_row(&beta, "receive", Some(tid.as_str()));
    assert_eq!(rx["status"], "received", "{rx}\n{}", beta.log());
    assert_eq!(mode(&rig.inbox.join("h.csv")), 0o600);
    assert_eq!(mode(&rig.inbox.join(".hakobu-partial")), 0o700);
    drop(beta);
    let mut beta = rig.beta("new", "    file_mode: \"0640\"\n");
    beta.start();
    let tid = TransferId::new();
    send_all(&rig, &rt, &tid, "i.csv", b"group may read\n");
    let rx = final_row(&beta, "receive", Some(tid.as_str()));
    assert_eq!(rx["status"], "received", "{rx}\n{}", beta.log());
    assert_eq!(mode(&rig.inbox.join("i.csv")), 0o640);
}

/// `hakobu check` refuses an inbox inside an outbox (the agent would send
/// what it receives, forever), naming the file and line.
#[test]
fn check_refuses_an_inbox_inside_an_outbox() {
    let rig = Rig::new();
    let yaml = format!(
        "node: beta\nstate_dir: state\n{broker}send:\n  - file_id: OUT\n    outbox: {root}/box\n    to: [ alpha ]\nreceive:\n  - file_id: DATA\n    from: [ alpha ]\n    inbox: {root}/box/in\n",
        broker = rig.broker.section(),
        root = rig.root.path().display(),
    );
    let agent = Agent::new("beta", &rig.path("beta"), &yaml);
    let out = agent.cli(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "check accepted it: {err}");
    assert!(err.contains("beta.yaml:12"), "{err}");
    assert!(err.contains("receive[0].inbox"), "{err}");
}

/// A link at the inbox path made by root (an operator's layout) is
/// followed: the file lands in the directory it names. Before, every
/// transfer into such an inbox failed with `unsafe_inbox`.
#[test]
fn an_inbox_reached_through_roots_own_link_receives() {
    let mut rig = Rig::new();
    let real = rig.path("real-inbox");
    fs::create_dir_all(&real).unwrap();
    let link = rig.path("inbox-link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    rig.inbox = link;
    let mut beta = rig.beta("new", "");
    beta.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tid = TransferId::new();
    let body = data(100_000, 7);
    send_all(&rig, &rt, &tid, "l.csv", &body);
    let rx = final_row(&beta, "receive", Some(tid.as_str()));
    assert_eq!(rx["status"], "received", "{rx}\n{}", beta.log());
    assert_eq!(fs::read(real.join("l.csv")).unwrap(), body);
}

/// Attack: the inbox path lies in a directory `nobody` may write (a shared
/// drop area), and `nobody` makes it a link to a directory of theirs
/// before the agent creates it. The link is not followed.
#[test]
fn an_inbox_link_planted_by_another_user_is_refused() {
    let mut rig = Rig::new();
    let drop_area = rig.path("drop");
    let_nobody_write(&drop_area);
    let loot = rig.path("loot");
    let_nobody_write(&loot);
    let link = drop_area.join("inbox");
    ok(sh_as_nobody(&format!(
        "ln -s {} {}",
        loot.display(),
        link.display()
    )));
    rig.inbox = link;
    let mut beta = rig.beta("new", "");
    beta.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tid = TransferId::new();
    send_all(&rig, &rt, &tid, "m.csv", &data(100_000, 8));
    let rx = final_row(&beta, "receive", Some(tid.as_str()));
    assert_eq!(rx["error_code"], "unsafe_inbox", "{rx}\n{}", beta.log());
    assert!(
        rx["error"]
            .as_str()
            .unwrap()
            .contains("a link owned by uid"),
        "{rx}"
    );
    assert!(dir_names(&loot).is_empty(), "written through the link");
}
