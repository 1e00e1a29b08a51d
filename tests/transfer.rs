//! End to end on the real three-node RabbitMQ cluster: files dropped into
//! alpha's outbox arrive in beta's inbox byte for byte, and the hooks run once
//! with the full context.

mod common;

use std::fs;
use std::time::Duration;

use common::{Pair, PairOpts, hook_env, hook_runs, sha256_file, wait_until, write_pattern};

fn rfc3339(s: &str) -> bool {
    humantime::parse_rfc3339(s).is_ok()
}

#[test]
fn one_file_arrives_and_hooks_see_the_full_context() {
    let mut p = Pair::new(PairOpts::default());
    p.start();
    let body = "id,amount\n1,100\n2,250\n";
    common::drop_file(&p.outbox, "sales.csv", |t| fs::write(t, body).unwrap());
    p.wait_sent(1, Duration::from_secs(60));

    let placed = p.inbox.join("sales.csv");
    assert_eq!(fs::read_to_string(&placed).unwrap(), body);
    let sha = sha256_file(&placed);

    let row = &p.beta.history()[0];
    let tid = row["transfer_id"].as_str().unwrap().to_string();
    assert_eq!(row["status"], "received");
    assert_eq!(row["sha256"], sha);
    assert_eq!(row["hook_exit"], 0);

    // The receiver's success hook: every variable, field by field.
    let env = hook_env(&p.hooks, &tid, "received");
    assert_eq!(env["HAKOBU_EVENT"], "received");
    assert_eq!(env["HAKOBU_NODE"], p.beta.node);
    assert_eq!(env["HAKOBU_PEER"], p.alpha.node);
    assert_eq!(env["HAKOBU_FILE_ID"], p.file_id);
    assert_eq!(env["HAKOBU_TRANSFER_ID"], tid);
    assert_eq!(env["HAKOBU_FILE_NAME"], "sales.csv");
    assert_eq!(env["HAKOBU_PATH"], placed.display().to_string());
    assert_eq!(env["HAKOBU_SIZE"], body.len().to_string());
    assert_eq!(env["HAKOBU_SHA256"], sha);
    assert!(rfc3339(&env["HAKOBU_STARTED_AT"]), "{env:?}");
    assert!(rfc3339(&env["HAKOBU_FINISHED_AT"]), "{env:?}");
    assert!(!env.contains_key("HAKOBU_ERROR_CODE"), "{env:?}");
    assert!(!env.contains_key("HAKOBU_ERROR"), "{env:?}");
    // {path} arrived as one argument.
    let args = fs::read_to_string(p.hooks.join(format!("{tid}.received.args"))).unwrap();
    assert_eq!(args.trim_end(), placed.display().to_string());

    // The sender's hook ran after the receipt, with the same transfer.
    let sent = hook_env(&p.hooks, &tid, "sent");
    assert_eq!(sent["HAKOBU_EVENT"], "sent");
    assert_eq!(sent["HAKOBU_NODE"], p.alpha.node);
    assert_eq!(sent["HAKOBU_PEER"], p.beta.node);
    assert_eq!(sent["HAKOBU_SHA256"], sha);

    // Exactly one run of each, and the spool is empty (after_send: delete).
    let runs = hook_runs(&p.hooks);
    assert_eq!(runs, vec![format!("{tid} received"), format!("{tid} sent")]);
    assert!(
        fs::read_dir(&p.outbox).unwrap().next().is_none(),
        "outbox not emptied"
    );
    let spool = p.alpha.dir.join("state/spool").join(&p.file_id);
    assert_eq!(
        fs::read_dir(&spool).unwrap().count(),
        0,
        "spool not cleaned"
    );
    let sent_row = &p.alpha.history()[0];
    assert_eq!(sent_row["remote_path"], placed.display().to_string());
    assert_eq!(sent_row["remote_hook_exit"], 0);
}

#[test]
fn a_50_mib_file_arrives_intact() {
    let mut p = Pair::new(PairOpts::default());
    p.start();
    let src = p.tmp.path().join("big.bin");
    write_pattern(&src, 50 << 20, 7);
    let want = sha256_file(&src);
    common::drop_file(&p.outbox, "big.bin", |t| fs::rename(&src, t).unwrap());
    p.wait_sent(1, Duration::from_secs(180));
    assert_eq!(sha256_file(&p.inbox.join("big.bin")), want);
    assert_eq!(
        hook_runs(&p.hooks)
            .iter()
            .filter(|l| l.ends_with(" received"))
            .count(),
        1
    );
    // No partial file is left behind.
    let partial = p.inbox.join(".hakobu-partial");
    assert_eq!(fs::read_dir(&partial).map(|d| d.count()).unwrap_or(0), 0);
}

#[test]
fn two_hundred_small_files_all_arrive() {
    let mut p = Pair::new(PairOpts::default());
    p.start();
    let staging = p.tmp.path().join("staging");
    fs::create_dir_all(&staging).unwrap();
    let mut want = Vec::new();
    for i in 0..200u64 {
        let name = format!("f{i:03}.dat");
        let src = staging.join(&name);
        write_pattern(&src, (i * 97) % 20_000, i);
        want.push((name, sha256_file(&src)));
    }
    fs::create_dir_all(&p.outbox).unwrap();
    for (name, _) in &want {
        fs::rename(staging.join(name), p.outbox.join(name)).unwrap();
    }
    p.wait_sent(200, Duration::from_secs(240));
    assert_eq!(p.inbox_files().len(), 200);
    for (name, sha) in &want {
        assert_eq!(&sha256_file(&p.inbox.join(name)), sha, "{name}");
    }
    let runs = hook_runs(&p.hooks);
    let received: std::collections::HashSet<_> =
        runs.iter().filter(|l| l.ends_with(" received")).collect();
    assert_eq!(received.len(), 200);
    assert_eq!(
        runs.iter().filter(|l| l.ends_with(" received")).count(),
        200,
        "a hook ran twice"
    );
}

#[test]
fn done_marker_sends_only_after_the_marker_and_removes_it() {
    let mut p = Pair::new(PairOpts {
        ready: Some("{ done_marker: \".done\" }".into()),
        ..Default::default()
    });
    p.start();
    fs::create_dir_all(&p.outbox).unwrap();
    fs::write(p.outbox.join("orders.csv"), "a,b\n").unwrap();
    fs::write(p.outbox.join("ignored.tmp"), "x").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        p.alpha.history().is_empty(),
        "sent before the marker appeared"
    );
    fs::write(p.outbox.join("orders.csv.done"), "").unwrap();
    p.wait_sent(1, Duration::from_secs(60));
    assert_eq!(p.inbox_files(), vec!["orders.csv"]);
    assert!(
        !p.outbox.join("orders.csv.done").exists(),
        "marker not removed"
    );
    assert!(
        p.outbox.join("ignored.tmp").exists(),
        "an ignored name was touched"
    );
}

#[test]
fn one_shot_send_with_meta_waits_for_the_receipt() {
    let mut p = Pair::new(PairOpts::default());
    p.start();
    let src = p.tmp.path().join("report.txt");
    fs::write(&src, "hello\n").unwrap();
    let out = p.alpha.cli(&[
        "send",
        "--file-id",
        &p.file_id,
        src.to_str().unwrap(),
        "--meta",
        "batch=7",
        "--wait",
    ]);
    assert!(
        out.status.success(),
        "send --wait failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tid = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    let env = hook_env(&p.hooks, &tid, "received");
    assert_eq!(env["HAKOBU_META_BATCH"], "7");
    assert_eq!(
        fs::read_to_string(p.inbox.join("report.txt")).unwrap(),
        "hello\n"
    );
    assert!(src.exists(), "send must not consume the user's file");
}

/// `hakobu send --wait FILE` (and `extra` arguments) to `p`'s beta, in the
/// background; its output is read once it has exited.
fn send_wait(p: &Pair, name: &str, extra: &[&str]) -> std::process::Child {
    let src = p.tmp.path().join(name);
    fs::write(&src, format!("{name}\n")).unwrap();
    std::process::Command::new(common::bin())
        .args(["send", "-c"])
        .arg(&p.alpha.config)
        .args(["--file-id", &p.file_id, "--wait"])
        .args(extra)
        .arg(&src)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start hakobu send --wait")
}

/// Waits up to `limit` for `child` to exit; its output, or None (killed).
fn exited_within(mut child: std::process::Child, limit: Duration) -> Option<std::process::Output> {
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

#[test]
fn send_wait_gives_up_when_the_agent_is_gone_not_when_it_restarts() {
    // Beta is not started: no receipt comes while alpha is killed.
    let mut p = Pair::new(PairOpts::default());
    p.alpha.start();
    // --timeout: given up on, the transfer goes on waiting for its receipt.
    let out = exited_within(
        send_wait(&p, "early.txt", &["--timeout", "2s"]),
        Duration::from_secs(60),
    )
    .expect("send --wait --timeout 2s still waiting after 60 s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "stdout: {stdout}");
    // Its row as it stood (queued, sending or awaiting_receipt), with the code.
    let timed_out = |l: &str| l.starts_with(&p.beta.node) && l.ends_with(" request_timeout");
    assert!(stdout.lines().any(timed_out), "stdout: {stdout}");
    let child = send_wait(&p, "first.txt", &[]);
    wait_until(
        Duration::from_secs(60),
        "both transfers to await their receipts",
        || p.alpha.with_status("awaiting_receipt").len() == 2,
    );
    p.alpha.kill9();
    // With the agent gone for good, --wait would otherwise poll for ever.
    let out = exited_within(child, Duration::from_secs(60))
        .expect("send --wait still waiting 60 s after its agent was killed");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    // The receiver's row, as at every end of --wait: PEER STATUS CODE.
    let row = format!("{} awaiting_receipt agent_stopped", p.beta.node);
    assert!(stdout.lines().any(|l| l == row), "stdout: {stdout}");
    assert!(stderr.contains("nothing is lost"), "stderr: {stderr}");

    // An agent restarted at once (as its service manager does) is waited for.
    p.alpha.start();
    let child = send_wait(&p, "second.txt", &[]);
    wait_until(
        Duration::from_secs(60),
        "the three transfers to await their receipts",
        || p.alpha.with_status("awaiting_receipt").len() == 3,
    );
    p.alpha.kill9();
    p.alpha.start();
    p.beta.start();
    let out = exited_within(child, Duration::from_secs(120))
        .expect("send --wait across an agent restart did not end");
    assert!(
        out.status.success(),
        "send --wait across a restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The transfers given up on by their commands were not lost.
    p.wait_sent(3, Duration::from_secs(60));
    for name in ["early.txt", "first.txt"] {
        assert_eq!(
            fs::read_to_string(p.inbox.join(name)).unwrap(),
            format!("{name}\n")
        );
    }
}

#[test]
fn mode_new_refuses_to_overwrite_and_both_failure_hooks_run() {
    let mut p = Pair::new(PairOpts::default());
    p.start();
    common::drop_file(&p.outbox, "daily.csv", |t| fs::write(t, "first\n").unwrap());
    p.wait_sent(1, Duration::from_secs(60));
    common::drop_file(&p.outbox, "daily.csv", |t| {
        fs::write(t, "second\n").unwrap()
    });
    wait_until(
        Duration::from_secs(60),
        "the second transfer to fail",
        || !p.alpha.with_status("send_failed").is_empty(),
    );
    assert_eq!(
        fs::read_to_string(p.inbox.join("daily.csv")).unwrap(),
        "first\n"
    );
    let failed = &p.alpha.with_status("send_failed")[0];
    assert_eq!(failed["error_code"], "file_exists");
    let tid = failed["transfer_id"].as_str().unwrap();
    wait_until(Duration::from_secs(10), "the sender's failure hook", || {
        hook_env(&p.hooks, tid, "send_failed").contains_key("HAKOBU_ERROR")
    });
    let env = hook_env(&p.hooks, tid, "send_failed");
    assert_eq!(env["HAKOBU_ERROR_CODE"], "file_exists");
    let rx = hook_env(&p.hooks, tid, "receive_failed");
    assert_eq!(rx["HAKOBU_ERROR_CODE"], "file_exists");
    // The refused file stays in the sender's spool for `hakobu resend`.
    assert!(std::path::Path::new(failed["path"].as_str().unwrap()).exists());
}

#[test]
fn multicast_delivers_to_every_receiver_then_settles_the_spool() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (a, b, g) = (
        common::unique("alpha"),
        common::unique("beta"),
        common::unique("gamma"),
    );
    let hooks = root.join("hooks");
    let hook = common::recording_hook(&hooks, "hook.sh");
    let receiver = |node: &str| {
        format!(
            "node: {node}\nstate_dir: {r}/{node}/state\n{broker}receive:\n  - file_id: MULTI\n    from: [ {a} ]\n    inbox: {r}/{node}/inbox\n    on_success: [ \"{hook}\" ]\n",
            r = root.display(),
            broker = common::rabbit_broker(2),
            hook = hook.display(),
        )
    };
    let sender = format!(
        "node: {a}\nstate_dir: {r}/{a}/state\n{broker}send:\n  - file_id: MULTI\n    outbox: {r}/outbox\n    to: [ {b}, {g} ]\n    ready: {{ stable_for: 200ms }}\n    after_send: {{ move_to: {r}/sent }}\n    on_success: [ \"{hook}\" ]\n",
        r = root.display(),
        broker = common::rabbit_broker(0),
        hook = hook.display(),
    );
    let mut beta = common::Agent::new(&b, &root.join(&b), &receiver(&b));
    let mut gamma = common::Agent::new(&g, &root.join(&g), &receiver(&g));
    let mut alpha = common::Agent::new(&a, &root.join(&a), &sender);
    beta.start();
    gamma.start();
    alpha.start();
    common::drop_file(&root.join("outbox"), "all.txt", |t| {
        fs::write(t, "to everyone\n").unwrap()
    });
    wait_until(Duration::from_secs(60), "both receipts", || {
        alpha.with_status("sent").len() == 2
    });
    for node in [&b, &g] {
        assert_eq!(
            fs::read_to_string(root.join(node).join("inbox/all.txt")).unwrap(),
            "to everyone\n"
        );
    }
    // The spooled file moved to `sent` once, after both receipts.
    let moved = root.join("sent/all.txt").display().to_string();
    wait_until(
        Duration::from_secs(10),
        "after_send and its history",
        || root.join("sent/all.txt").exists() && alpha.history().iter().all(|r| r["path"] == moved),
    );
    let h = alpha.history();
    let tids: std::collections::HashSet<_> = h.iter().map(|r| r["transfer_id"].clone()).collect();
    assert_eq!(tids.len(), 1, "one transfer, two peers: {h:?}");
    let runs = hook_runs(&hooks);
    assert_eq!(runs.iter().filter(|l| l.ends_with(" received")).count(), 2);
    assert_eq!(runs.iter().filter(|l| l.ends_with(" sent")).count(), 2);
}
