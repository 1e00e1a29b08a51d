//! Retries (issue 13 item 5), on the real cluster and on the embedded
//! broker: a hook's `retry:` (a hook that fails once, one that always
//! fails) and a send profile's `retry:` (a receiver's full disk that
//! clears, one that does not, a refusal that is not transient).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tmpfs::Tmpfs;
use common::{
    Agent, BrokerProcess, Pair, PairOpts, drop_file, hook_env, hook_runs, rabbit_broker,
    sha256_file, unique, wait_until, write_pattern,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Embedded,
    Rabbit,
}

/// The broker of one test: a `hakobu broker` process, or the cluster.
struct Backend(Option<BrokerProcess>);

impl Backend {
    fn new(kind: Kind, dir: &Path) -> Backend {
        match kind {
            Kind::Embedded => Backend(Some(BrokerProcess::start(dir))),
            Kind::Rabbit => {
                common::amqp_urls();
                Backend(None)
            }
        }
    }

    fn section(&self) -> String {
        match &self.0 {
            Some(b) => b.section(),
            None => rabbit_broker(0),
        }
    }
}

/// A hook that appends `EVENT ATTEMPT` to `attempts.log` on each run and
/// fails while `HAKOBU_ATTEMPT` is below `$PASS_FROM` (never, when unset).
fn attempt_hook(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join("attempt.sh");
    let script = format!(
        "#!/bin/sh\n\
         echo \"$HAKOBU_TRANSFER_ID $HAKOBU_EVENT $HAKOBU_ATTEMPT\" >> {dir}/attempts.log\n\
         [ -n \"${{PASS_FROM:-}}\" ] && [ \"$HAKOBU_ATTEMPT\" -ge \"$PASS_FROM\" ] && exit 0\n\
         echo \"not yet (run $HAKOBU_ATTEMPT)\"\n\
         exit 3\n",
        dir = dir.display()
    );
    fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `EVENT ATTEMPT` lines of [`attempt_hook`]'s log for one transfer.
fn attempts(dir: &Path, tid: &str) -> Vec<String> {
    fs::read_to_string(dir.join("attempts.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{tid} ")))
        .map(String::from)
        .collect()
}

/// alpha sends `DATA` to beta; both success hooks are [`attempt_hook`]
/// with `retry: { attempts: 3, backoff: BACKOFF }`, passing from run
/// `pass_from`.
struct HookRig {
    tmp: tempfile::TempDir,
    alpha: Agent,
    beta: Agent,
    outbox: PathBuf,
    inbox: PathBuf,
    hooks: PathBuf,
    _backend: Backend,
}

impl HookRig {
    fn start(kind: Kind, pass_from: Option<u32>, backoff: &str) -> HookRig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let backend = Backend::new(kind, &root);
        let (a, b) = (unique("alpha"), unique("beta"));
        let hooks = root.join("hooks");
        let hook = attempt_hook(&hooks);
        let (outbox, inbox) = (root.join("alpha/outbox"), root.join("beta/inbox"));
        let env = pass_from.map_or(String::new(), |n| {
            format!(", env: {{ PASS_FROM: \"{n}\" }}")
        });
        let on_success = format!(
            "{{ run: [ \"{}\" ], retry: {{ attempts: 3, backoff: {backoff} }}{env} }}",
            hook.display()
        );
        let alpha_yaml = format!(
            "node: {a}\nstate_dir: {root}/alpha/state\n{broker}send:\n  - file_id: DATA\n    outbox: {outbox}\n    to: [ {b} ]\n    ready: {{ stable_for: 300ms }}\n    on_success: {on_success}\n",
            root = root.display(),
            broker = backend.section(),
            outbox = outbox.display(),
        );
        let beta_yaml = format!(
            "node: {b}\nstate_dir: {root}/beta/state\n{broker}receive:\n  - file_id: DATA\n    from: [ {a} ]\n    inbox: {inbox}\n    on_success: {on_success}\n",
            root = root.display(),
            broker = backend.section(),
            inbox = inbox.display(),
        );
        let mut alpha = Agent::new(&a, &root.join("alpha"), &alpha_yaml);
        let mut beta = Agent::new(&b, &root.join("beta"), &beta_yaml);
        beta.start();
        alpha.start();
        HookRig {
            tmp,
            alpha,
            beta,
            outbox,
            inbox,
            hooks,
            _backend: backend,
        }
    }

    fn logs(&self) -> String {
        format!(
            "alpha log:\n{}\nbeta log:\n{}",
            self.alpha.log(),
            self.beta.log()
        )
    }
}

/// The one row of `agent`'s history once it is final.
fn final_row(agent: &Agent, what: &str, logs: &dyn Fn() -> String) -> Value {
    let mut row = Value::Null;
    wait_until(WAIT, what, || {
        let h = agent.history();
        assert!(h.len() <= 1, "one transfer expected: {h:?}\n{}", logs());
        row = h.into_iter().next().unwrap_or(Value::Null);
        let status = row["status"].as_str().unwrap_or("");
        matches!(
            status,
            "sent"
                | "send_failed"
                | "received"
                | "receive_failed"
                | "hook_failed"
                | "hook_interrupted"
        )
    });
    row
}

/// A success hook that fails once, then succeeds, on both sides: the
/// transfer is `received` and `sent`, each hook ran twice with
/// `HAKOBU_ATTEMPT` 1 then 2, and history records 2 runs and exit 0.
fn hook_fails_once_then_succeeds(kind: Kind) {
    let rig = HookRig::start(kind, Some(2), "1s");
    let body = b"id,amount\n1,100\n";
    drop_file(&rig.outbox, "once.csv", |p| fs::write(p, body).unwrap());
    let logs = || rig.logs();
    let tx = final_row(&rig.alpha, "alpha's transfer final", &logs);
    let rx = final_row(&rig.beta, "beta's transfer final", &logs);
    assert_eq!(rx["status"], "received", "{rx}\n{}", logs());
    assert_eq!(tx["status"], "sent", "{tx}\n{}", logs());
    let tid = rx["transfer_id"].as_str().unwrap().to_string();
    for row in [&rx, &tx] {
        assert_eq!(row["hook_attempts"], 2, "{row}");
        assert_eq!(row["hook_exit"], 0, "{row}");
        assert_eq!(row["attempt"], 1, "{row}");
    }
    assert_eq!(
        attempts(&rig.hooks, &tid),
        ["received 1", "received 2", "sent 1", "sent 2"]
    );
    assert_eq!(fs::read(rig.inbox.join("once.csv")).unwrap(), body);
    // The hook's log holds both runs and hakobu's line between them.
    let log = fs::read_to_string(
        rig.tmp
            .path()
            .join(format!("beta/state/logs/{tid}.received.log")),
    )
    .unwrap_or_default();
    assert!(
        log.contains("not yet (run 1)") && log.contains("hakobu: run 1 of 3 failed"),
        "beta's hook log: {log:?}"
    );
}

/// A success hook that always fails, `attempts: 3`: `hook_failed` after
/// exactly 3 runs on each side, and history says so.
fn hook_always_fails(kind: Kind) {
    let rig = HookRig::start(kind, None, "1s");
    drop_file(&rig.outbox, "never.csv", |p| fs::write(p, b"x\n").unwrap());
    let logs = || rig.logs();
    let rx = final_row(&rig.beta, "beta's transfer final", &logs);
    let tx = final_row(&rig.alpha, "alpha's transfer final", &logs);
    let tid = rx["transfer_id"].as_str().unwrap().to_string();
    assert_eq!(rx["status"], "hook_failed", "{rx}\n{}", logs());
    assert_eq!(rx["error_code"], "hook_failed", "{rx}");
    assert!(
        rx["error"].as_str().unwrap_or("").contains("run 3 of 3"),
        "{rx}"
    );
    assert_eq!(
        (rx["hook_attempts"].clone(), rx["hook_exit"].clone()),
        (3.into(), 3.into())
    );
    // The receiver's success hook failed: the sender hears a failure and
    // its (success) hook does not run; the receipt carries the exit code.
    assert_eq!(tx["status"], "send_failed", "{tx}");
    assert_eq!(tx["error_code"], "hook_failed", "{tx}");
    assert_eq!(
        attempts(&rig.hooks, &tid),
        ["received 1", "received 2", "received 3"]
    );
}

/// The agent stopped (SIGTERM) while a hook waits for its next run: the
/// stop ends the wait at once (the log says so), no further run starts,
/// and the next start records the transfer `hook_interrupted` with the one
/// run it had.
fn stop_between_hook_runs(kind: Kind) {
    let mut rig = HookRig::start(kind, None, "1h");
    drop_file(&rig.outbox, "stop.csv", |p| fs::write(p, b"x\n").unwrap());
    let mut tid = String::new();
    wait_until(WAIT, "beta's first failed run recorded", || {
        let h = rig.beta.history();
        match h.first() {
            Some(r) if r["status"] == "hook_running" && r["hook_attempts"] == 1 => {
                tid = r["transfer_id"].as_str().unwrap().to_string();
                true
            }
            _ => false,
        }
    });
    let pid = nix::unistd::Pid::from_raw(rig.beta.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until(WAIT, "beta to stop", || !rig.beta.alive());
    assert!(
        rig.beta.log().contains("left for the next start"),
        "{}",
        rig.logs()
    );
    rig.beta.kill9();
    rig.beta.start();
    let logs = || rig.logs();
    let rx = final_row(&rig.beta, "beta's transfer final", &logs);
    assert_eq!(rx["status"], "hook_interrupted", "{rx}\n{}", logs());
    assert_eq!(rx["error_code"], "hook_interrupted", "{rx}");
    assert_eq!(rx["hook_attempts"], 1, "{rx}");
    assert_eq!(attempts(&rig.hooks, &tid), ["received 1"]);
}

/// A `DATA` pair whose send profile has `retry:` and whose receiver's inbox
/// is a small tmpfs, filled (but for 1 MiB) by a file of the test's own.
struct DiskRig {
    p: Pair,
    filler: PathBuf,
    _tmpfs: Tmpfs,
    _backend: Backend,
    _dir: tempfile::TempDir,
}

impl DiskRig {
    fn start(kind: Kind, retry: &str) -> DiskRig {
        let dir = tempfile::tempdir().unwrap();
        let backend = Backend::new(kind, dir.path());
        let p = Pair::new(PairOpts {
            send_extra: format!("    retry: {retry}\n"),
            broker: Some(backend.section()),
            ..Default::default()
        });
        let tmpfs = Tmpfs::mount_or_fail(&p.inbox, "8m");
        let filler = p.inbox.join(".filler");
        write_pattern(&filler, 7 << 20, 9);
        let mut rig = DiskRig {
            p,
            filler,
            _tmpfs: tmpfs,
            _backend: backend,
            _dir: dir,
        };
        rig.p.start();
        rig
    }

    fn logs(&self) -> String {
        format!(
            "alpha log:\n{}\nbeta log:\n{}",
            self.p.alpha.log(),
            self.p.beta.log()
        )
    }
}

/// The receiver's disk is full for the first try (`disk_full`), then space
/// is freed: a later try of the same transfer is placed, byte for byte;
/// history shows that try's number on both sides, and the sender's
/// failure hook never ran.
fn disk_full_then_freed(kind: Kind) {
    let rig = DiskRig::start(kind, "{ attempts: 5, backoff: 2s }");
    let p = &rig.p;
    drop_file(&p.outbox, "big.bin", |f| write_pattern(f, 2 << 20, 7));
    // The first try fails on beta with the transient code...
    let mut tid = String::new();
    wait_until(WAIT, "beta's first try to fail disk_full", || {
        let h = p.beta.history();
        match h.first() {
            Some(r) if r["status"] == "receive_failed" => {
                assert_eq!(r["error_code"], "disk_full", "{r}\n{}", rig.logs());
                tid = r["transfer_id"].as_str().unwrap().to_string();
                true
            }
            _ => false,
        }
    });
    // ...and alpha queues the next try rather than failing the transfer.
    wait_until(WAIT, "alpha to queue the next try", || {
        p.alpha
            .history()
            .first()
            .is_some_and(|r| r["attempt"].as_u64() >= Some(2))
    });
    fs::remove_file(&rig.filler).unwrap();
    let logs = || rig.logs();
    let tx = final_row(&p.alpha, "alpha's transfer final", &logs);
    let rx = final_row(&p.beta, "beta's transfer final", &logs);
    assert_eq!(tx["status"], "sent", "{tx}\n{}", logs());
    assert_eq!(rx["status"], "received", "{rx}\n{}", logs());
    assert_eq!(tx["transfer_id"], tid.as_str());
    let tries = tx["attempt"].as_u64().unwrap();
    assert!(tries >= 2, "{tx}");
    assert_eq!(rx["attempt"], tries, "{rx}");
    assert_eq!(tx["error_code"], Value::Null, "{tx}");
    // Spooled source pattern = placed file.
    let placed = p.inbox.join("big.bin");
    let expect = p.tmp.path().join("expect.bin");
    write_pattern(&expect, 2 << 20, 7);
    assert_eq!(sha256_file(&placed), sha256_file(&expect));
    let runs = hook_runs(&p.hooks);
    assert!(
        !runs.contains(&format!("{tid} send_failed")),
        "the sender's failure hook ran: {runs:?}"
    );
    wait_until(WAIT, "both success hooks", || {
        let runs = hook_runs(&p.hooks);
        runs.contains(&format!("{tid} sent")) && runs.contains(&format!("{tid} received"))
    });
    // `hakobu history` (text) shows the try.
    let out = p.alpha.cli(&["history"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().next().unwrap_or("").contains("TRY"), "{text}");
}

/// The disk stays full: after the last of 2 tries the transfer fails
/// `disk_full`, and the sender's failure hook runs once, after beta failed
/// the second try; the spooled file stays for `hakobu resend`.
fn retries_exhausted(kind: Kind) {
    let rig = DiskRig::start(kind, "{ attempts: 2, backoff: 1s }");
    let p = &rig.p;
    drop_file(&p.outbox, "big.bin", |f| write_pattern(f, 2 << 20, 8));
    let logs = || rig.logs();
    let tx = final_row(&p.alpha, "alpha's transfer final", &logs);
    assert_eq!(tx["status"], "send_failed", "{tx}\n{}", logs());
    assert_eq!(tx["error_code"], "disk_full", "{tx}");
    assert_eq!(tx["attempt"], 2, "{tx}");
    let tid = tx["transfer_id"].as_str().unwrap().to_string();
    wait_until(WAIT, "the sender's failure hook", || {
        hook_runs(&p.hooks).contains(&format!("{tid} send_failed"))
    });
    let rx = final_row(&p.beta, "beta's transfer final", &logs);
    assert_eq!(rx["attempt"], 2, "{rx}");
    let runs = hook_runs(&p.hooks);
    let ours: Vec<&String> = runs.iter().filter(|l| l.starts_with(&tid)).collect();
    // beta's failure hook for each failed try, then alpha's, once, last.
    assert_eq!(
        ours,
        [
            &format!("{tid} receive_failed"),
            &format!("{tid} receive_failed"),
            &format!("{tid} send_failed")
        ],
        "{runs:?}"
    );
    let env = hook_env(&p.hooks, &tid, "send_failed");
    assert_eq!(
        env.get("HAKOBU_ERROR_CODE").map(String::as_str),
        Some("disk_full")
    );
    let spool = p.tmp.path().join("alpha/state/spool");
    assert!(
        walk(&spool)
            .iter()
            .any(|f| f.to_string_lossy().ends_with(".big.bin")),
        "the spooled file is gone"
    );
}

/// A code that is not transient (`file_too_large`) fails at once: one try.
fn not_transient_fails_at_once(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::new(kind, dir.path());
    let mut p = Pair::new(PairOpts {
        send_extra: "    retry: { attempts: 3, backoff: 1s }\n".into(),
        receive_extra: "    max_size: 1KiB\n".into(),
        broker: Some(backend.section()),
        ..Default::default()
    });
    p.start();
    drop_file(&p.outbox, "large.csv", |f| write_pattern(f, 4096, 3));
    let logs = || format!("alpha log:\n{}\nbeta log:\n{}", p.alpha.log(), p.beta.log());
    let tx = final_row(&p.alpha, "alpha's transfer final", &logs);
    assert_eq!(tx["status"], "send_failed", "{tx}\n{}", logs());
    assert_eq!(tx["error_code"], "file_too_large", "{tx}");
    assert_eq!(tx["attempt"], 1, "{tx}");
    let tid = tx["transfer_id"].as_str().unwrap().to_string();
    wait_until(WAIT, "the sender's failure hook", || {
        hook_runs(&p.hooks).contains(&format!("{tid} send_failed"))
    });
    let rx = final_row(&p.beta, "beta's transfer final", &logs);
    assert_eq!(rx["attempt"], 1, "{rx}");
    assert!(
        !p.alpha.log().contains("sent again after the backoff"),
        "{}",
        logs()
    );
}

/// The receiver keeps a transfer's tries apart (a rogue publisher as the
/// sender, on the cluster): try 1 fails (`sha256_mismatch`); try 2 of the
/// same transfer id starts it again and is placed, its receipt naming try
/// 2; a chunk of try 1 delivered after that, with other bytes, is ignored:
/// the placed file, the row and the receipts stay as they were.
#[test]
fn the_receiver_keeps_a_transfers_tries_apart() {
    use common::rogue::{Rig, new_tid, sha256, trailer};
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    let tid = new_tid();
    let body = b"id,amount\n1,100\n".to_vec();
    let mut first = rig.header(&from, &tid, "tries.csv", &body);
    first.last = trailer(sha256(b"not the body"));
    rig.inject_chunk(first, &body);
    let r1 = rig.receipt(&from, &tid);
    assert!(!r1.ok && r1.attempt == 1, "{r1:?}");
    assert_eq!(r1.error_code.as_deref(), Some("sha256_mismatch"));

    let mut second = rig.header(&from, &tid, "tries.csv", &body);
    second.attempt = Some(2);
    rig.inject_chunk(second, &body);
    let r2 = rig.receipt(&from, &tid);
    assert!(r2.ok && r2.attempt == 2, "{r2:?}\n{}", rig.log_tail());
    let placed = rig.inbox.join("tries.csv");
    assert_eq!(fs::read(&placed).unwrap(), body);

    // A chunk of try 1 again, with other bytes of the same length.
    let stale_body = b"id,amount\n9,999\n".to_vec();
    let mut stale = rig.header(&from, &tid, "tries.csv", &stale_body);
    stale.attempt = Some(1);
    rig.inject_chunk(stale, &stale_body);
    wait_until(WAIT, "the stale chunk to be ignored", || {
        rig.agent.log().contains("Ignoring a chunk of another try")
    });
    rig.good_transfer_works();
    assert_eq!(fs::read(&placed).unwrap(), body);
    let row = rig.final_row(&tid);
    assert_eq!(
        (row["status"].clone(), row["attempt"].clone()),
        ("received".into(), 2.into())
    );
    assert_eq!(
        rig.runs_of(&tid),
        [format!("{tid} receive_failed"), format!("{tid} received")]
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn hook_fails_once_then_succeeds_cluster() {
    hook_fails_once_then_succeeds(Kind::Rabbit);
}

#[test]
fn hook_fails_once_then_succeeds_embedded() {
    hook_fails_once_then_succeeds(Kind::Embedded);
}

#[test]
fn hook_always_fails_cluster() {
    hook_always_fails(Kind::Rabbit);
}

#[test]
fn hook_always_fails_embedded() {
    hook_always_fails(Kind::Embedded);
}

#[test]
fn stop_between_hook_runs_cluster() {
    stop_between_hook_runs(Kind::Rabbit);
}

#[test]
fn stop_between_hook_runs_embedded() {
    stop_between_hook_runs(Kind::Embedded);
}

#[test]
fn send_retry_disk_full_then_freed_cluster() {
    disk_full_then_freed(Kind::Rabbit);
}

#[test]
fn send_retry_disk_full_then_freed_embedded() {
    disk_full_then_freed(Kind::Embedded);
}

#[test]
fn send_retries_exhausted_cluster() {
    retries_exhausted(Kind::Rabbit);
}

#[test]
fn send_retries_exhausted_embedded() {
    retries_exhausted(Kind::Embedded);
}

#[test]
fn send_retry_skips_a_code_that_is_not_transient_cluster() {
    not_transient_fails_at_once(Kind::Rabbit);
}

#[test]
fn send_retry_skips_a_code_that_is_not_transient_embedded() {
    not_transient_fails_at_once(Kind::Embedded);
}
