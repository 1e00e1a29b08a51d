//! Faults with real processes: agents and RabbitMQ nodes killed with
//! `kill -9` by pid in the middle of transfers. Every test asserts the file
//! arrived byte for byte and the success hook ran exactly once. The tests in
//! this file run one at a time: some take a cluster node away.

mod common;

use std::fs;
use std::sync::Mutex;
use std::time::Duration;

use common::{Pair, PairOpts, cluster, hook_runs, sha256_file, wait_until, write_pattern};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn received_runs(p: &Pair) -> usize {
    hook_runs(&p.hooks)
        .iter()
        .filter(|l| l.ends_with(" received"))
        .count()
}

/// A big file queued while beta is down; beta is killed mid-assembly,
/// restarted, and completes the transfer from where its ledger stood.
#[test]
fn receiver_killed_mid_transfer_resumes_after_restart() {
    let _g = serial();
    let mut p = Pair::new(PairOpts::default());
    p.alpha.start();
    let src = p.tmp.path().join("big.bin");
    write_pattern(&src, 120 << 20, 3);
    let want = sha256_file(&src);
    common::drop_file(&p.outbox, "big.bin", |t| fs::rename(&src, t).unwrap());
    wait_until(
        Duration::from_secs(120),
        "alpha to publish every chunk",
        || !p.alpha.with_status("awaiting_receipt").is_empty(),
    );
    p.beta.start();
    wait_until(Duration::from_secs(60), "beta to start assembling", || {
        !p.beta.with_status("receiving").is_empty()
    });
    p.beta.kill9();
    let partial = p.inbox.join(".hakobu-partial");
    assert!(
        fs::read_dir(&partial).unwrap().count() == 1,
        "expected a partial file mid-transfer"
    );
    assert!(
        p.inbox_files().is_empty(),
        "a file appeared under an inbox name before it was complete"
    );
    p.beta.start();
    p.wait_sent(1, Duration::from_secs(180));
    assert_eq!(sha256_file(&p.inbox.join("big.bin")), want);
    assert_eq!(received_runs(&p), 1);
    assert_eq!(p.inbox_files(), vec!["big.bin"]);
}

/// beta dies while its success hook runs: after the restart, history says
/// `hook_interrupted`, the hook is not run again by itself, and `hakobu rerun`
/// runs it on demand.
#[test]
fn receiver_killed_during_hook_is_not_rerun_silently() {
    let _g = serial();
    let mut p = Pair::new(PairOpts::default());
    p.beta = common::Agent::new(
        &p.beta.node.clone(),
        &p.beta.dir.clone(),
        &fs::read_to_string(&p.beta.config).unwrap(),
    )
    .env("HOOK_SLEEP", "30");
    p.start();
    common::drop_file(&p.outbox, "slow.csv", |t| fs::write(t, "x\n").unwrap());
    wait_until(Duration::from_secs(60), "the hook to start", || {
        received_runs(&p) == 1
    });
    p.beta.kill9();
    p.beta.start();
    wait_until(
        Duration::from_secs(60),
        "hook_interrupted in history",
        || !p.beta.with_status("hook_interrupted").is_empty(),
    );
    // The sender hears of it as a failure with the same code.
    wait_until(Duration::from_secs(60), "the sender to settle", || {
        !p.alpha.with_status("send_failed").is_empty()
    });
    assert_eq!(
        p.alpha.with_status("send_failed")[0]["error_code"],
        "hook_interrupted"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        received_runs(&p),
        1,
        "the hook ran again without being asked"
    );
    let tid = p.beta.with_status("hook_interrupted")[0]["transfer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = std::process::Command::new(common::bin())
        .args(["rerun", "-c"])
        .arg(&p.beta.config)
        .arg(&tid)
        .env("HOOK_SLEEP", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rerun failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(received_runs(&p), 2);
    assert_eq!(p.beta.history()[0]["status"], "received");
}

/// One RabbitMQ node of three killed with `kill -9` during a 200 MiB
/// transfer: the agents fail over, the file arrives intact, the hook runs once.
#[test]
fn rabbitmq_node_killed_during_200_mib_transfer() {
    let _g = serial();
    // Both agents start on node 2, so the node killed carries their traffic.
    let mut p = Pair::new(PairOpts {
        alpha_first: 1,
        beta_first: 1,
        ..Default::default()
    });
    p.start();
    let src = p.tmp.path().join("huge.bin");
    write_pattern(&src, 200 << 20, 11);
    let want = sha256_file(&src);
    common::drop_file(&p.outbox, "huge.bin", |t| fs::rename(&src, t).unwrap());
    wait_until(Duration::from_secs(60), "beta to start receiving", || {
        !p.beta.with_status("receiving").is_empty()
    });
    let pid: i32 = cluster(&["pid", "2"]).parse().expect("node pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        p.wait_sent(1, Duration::from_secs(300));
    }));
    // Bring the node back whatever happened, for the tests after this one.
    cluster(&["start", "2"]);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert_eq!(sha256_file(&p.inbox.join("huge.bin")), want);
    assert_eq!(received_runs(&p), 1);
    assert_eq!(p.inbox_files(), vec!["huge.bin"]);
    // The kill really hit the transfer's path: beta's consumer had to fail over.
    assert!(
        p.beta.log().contains("Consumer lost its broker connection"),
        "beta never failed over:\n{}",
        p.beta.log()
    );
}

/// The embedded broker killed with `kill -9` in the middle of a transfer and
/// started again: the transfer completes, nothing lost, the hook run once.
#[test]
fn embedded_broker_killed_mid_transfer() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = common::BrokerProcess::start(dir.path());
    let mut p = Pair::new(PairOpts {
        broker: Some(broker.section()),
        ..Default::default()
    });
    p.start();
    let src = p.tmp.path().join("big.bin");
    write_pattern(&src, 100 << 20, 5);
    let want = sha256_file(&src);
    common::drop_file(&p.outbox, "big.bin", |t| fs::rename(&src, t).unwrap());
    wait_until(Duration::from_secs(60), "beta to start receiving", || {
        !p.beta.with_status("receiving").is_empty()
    });
    broker.kill9();
    std::thread::sleep(Duration::from_millis(500));
    broker.restart();
    p.wait_sent(1, Duration::from_secs(180));
    assert_eq!(sha256_file(&p.inbox.join("big.bin")), want);
    assert_eq!(received_runs(&p), 1);
    assert_eq!(p.inbox_files(), vec!["big.bin"]);
    assert!(
        p.beta.log().contains("Consumer lost the embedded broker"),
        "beta never noticed the crash"
    );
}

/// A sender killed for good mid-transfer: after the profile's partial_ttl the
/// receiver expires the transfer, removes the partial file and runs the
/// failure hook; nothing appears under an inbox name.
#[test]
fn abandoned_transfer_expires_and_its_partial_is_removed() {
    let _g = serial();
    let mut p = Pair::new(PairOpts {
        receive_extra: "    partial_ttl: 3s\n".into(),
        ..Default::default()
    });
    p.start();
    let src = p.tmp.path().join("big.bin");
    write_pattern(&src, 150 << 20, 9);
    common::drop_file(&p.outbox, "big.bin", |t| fs::rename(&src, t).unwrap());
    wait_until(Duration::from_secs(60), "beta to start receiving", || {
        !p.beta.with_status("receiving").is_empty()
    });
    p.alpha.kill9();
    wait_until(Duration::from_secs(60), "the transfer to expire", || {
        !p.beta.with_status("receive_failed").is_empty()
    });
    let row = &p.beta.with_status("receive_failed")[0];
    assert_eq!(row["error_code"], "transfer_expired");
    let tid = row["transfer_id"].as_str().unwrap();
    wait_until(Duration::from_secs(10), "the failure hook", || {
        common::hook_env(&p.hooks, tid, "receive_failed")
            .get("HAKOBU_ERROR_CODE")
            .map(String::as_str)
            == Some("transfer_expired")
    });
    let partial = p.inbox.join(".hakobu-partial");
    assert_eq!(
        fs::read_dir(&partial).map(|d| d.count()).unwrap_or(0),
        0,
        "partial file left behind"
    );
    assert!(p.inbox_files().is_empty());
}

/// Placing makes only the inbox name durable, so a crash right after it can
/// leave the partial file's old name as a second link to the placed file.
/// The next start removes such leftovers (the placed file stays), and keeps
/// the partial files of transfers it does not know (they may still arrive).
#[test]
fn leftover_partial_links_are_removed_at_start() {
    let mut p = Pair::new(PairOpts::default());
    p.start();
    common::drop_file(&p.outbox, "a.csv", |t| fs::write(t, "x\n").unwrap());
    p.wait_sent(1, Duration::from_secs(60));
    let tid = p.beta.history()[0]["transfer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let placed = p.inbox.join("a.csv");
    let partials = p.inbox.join(".hakobu-partial");
    let leftover = partials.join(format!("{tid}.part"));
    fs::hard_link(&placed, &leftover).unwrap();
    let unknown = partials.join("0190f6c4-0000-7000-8000-00000000abcd.part");
    fs::write(&unknown, "half").unwrap();
    p.beta.kill9();
    p.beta.start();
    wait_until(Duration::from_secs(10), "the leftover link to go", || {
        !leftover.exists()
    });
    assert_eq!(fs::read_to_string(&placed).unwrap(), "x\n");
    assert!(
        unknown.exists(),
        "an unknown transfer's partial file was removed"
    );
}
