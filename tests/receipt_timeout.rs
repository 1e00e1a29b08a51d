//! Receivers gone for days (issue 15): a send profile's `receipt_timeout`.
//! Two real agents on a real `hakobu broker`; the receiver is killed (-9,
//! by pid) before the file is dropped. After the timeout the sender's
//! failure hook runs once with `HAKOBU_ERROR_CODE=receipt_timeout`, the file
//! stays in the spool, history, status and the console show the wait; a
//! sender killed
//! and restarted does not run the hook again; once the receiver runs again
//! its late receipt settles the transfer (success hook, `after_send`), and
//! history shows it sent.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    Agent, BrokerProcess, drop_file, hook_env, hook_runs, recording_hook, sha256_file, unique,
    wait_until, write_pattern,
};
use serde_json::Value;

const TIMEOUT_S: u64 = 2;

fn row(agent: &Agent, tid: &str) -> Value {
    agent
        .history()
        .into_iter()
        .find(|r| r["direction"] == "send" && r["transfer_id"] == tid)
        .unwrap_or_else(|| panic!("no send row for {tid}"))
}

fn runs_of(hooks: &Path, tid: &str, event: &str) -> usize {
    let line = format!("{tid} {event}");
    hook_runs(hooks).iter().filter(|l| **l == line).count()
}

fn text(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn absolute(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

#[test]
fn failure_hook_once_after_receipt_timeout_then_the_late_receipt_settles_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let broker = BrokerProcess::start(&root.join("broker"));
    let (a, b) = (unique("rta"), unique("rtb"));
    let hooks = root.join("hooks");
    let hook = recording_hook(&hooks, "rec.sh");

    let mut beta = Agent::new(
        &b,
        &root.join("beta"),
        &format!(
            "node: {b}\nstate_dir: state\n{}receive:\n  - file_id: RT\n    from: [ {a} ]\n    inbox: inbox\n",
            broker.section()
        ),
    );
    // Up once (its queue exists), then gone.
    beta.start();
    beta.kill9();

    let (http, console) = common::http::http_section();
    let mut alpha = Agent::new(
        &a,
        &root.join("alpha"),
        &format!(
            "node: {a}\nstate_dir: state\n{http}{}send:\n  - file_id: RT\n    outbox: outbox\n    to: [ {b} ]\n    \
             ready: {{ stable_for: 200ms }}\n    after_send: delete\n    receipt_timeout: {TIMEOUT_S}s\n    \
             on_success: [ \"{h}\" ]\n    on_failure: [ \"{h}\" ]\n",
            broker.section(),
            h = hook.display()
        ),
    );
    alpha.start();
    let src = root.join("a.bin");
    write_pattern(&src, 300 << 10, 15);
    let digest = sha256_file(&src);
    drop_file(&alpha.dir.join("outbox"), "a.bin", |p| {
        fs::copy(&src, p).unwrap();
    });

    let mut tid = String::new();
    wait_until(
        Duration::from_secs(60),
        "the transfer to await its receipt",
        || match alpha.with_status("awaiting_receipt").first() {
            Some(r) => {
                tid = r["transfer_id"].as_str().unwrap().to_string();
                true
            }
            None => false,
        },
    );
    let waiting = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "the receipt_timeout failure hook",
        || runs_of(&hooks, &tid, "send_failed") == 1,
    );
    let hook_after = waiting.elapsed();
    assert!(
        hook_after >= Duration::from_secs(TIMEOUT_S - 1),
        "the hook ran {hook_after:?} after the wait began, before receipt_timeout {TIMEOUT_S}s"
    );
    let env = hook_env(&hooks, &tid, "send_failed");
    assert_eq!(
        env.get("HAKOBU_ERROR_CODE").map(String::as_str),
        Some("receipt_timeout"),
        "{env:?}"
    );
    assert_eq!(
        env.get("HAKOBU_EVENT").map(String::as_str),
        Some("send_failed")
    );
    assert_eq!(env.get("HAKOBU_PEER"), Some(&b));
    let sentence = env.get("HAKOBU_ERROR").cloned().unwrap_or_default();
    assert!(sentence.contains("No receipt from"), "{sentence}");

    // Still waiting: the file in the spool, the wait in history and status.
    let r = row(&alpha, &tid);
    assert_eq!(r["status"], "awaiting_receipt", "{r}");
    assert_eq!(r["error_code"], "receipt_timeout", "{r}");
    assert!(r["receipt_timeout_at"].is_i64(), "{r}");
    assert!(
        r["awaiting_receipt_secs"].as_u64().unwrap() >= TIMEOUT_S - 1,
        "{r}"
    );
    let spooled = absolute(&alpha.dir, r["path"].as_str().unwrap());
    assert_eq!(sha256_file(&spooled), digest, "the spooled copy stays");
    let history = text(alpha.cli(&["history"]));
    let line = history
        .lines()
        .find(|l| l.contains(&tid))
        .expect("the transfer in history");
    assert!(
        line.contains("awaiting receipt for") && line.contains("past receipt_timeout"),
        "{line}"
    );
    let status = text(alpha.cli(&["status"]));
    assert!(
        status
            .lines()
            .any(|l| l.contains(&tid) && l.contains("past receipt_timeout")),
        "{status}"
    );

    let console = console.with_token_file(&alpha.dir.join("state/http.token"));
    for page in ["/".to_string(), format!("/transfers/{tid}")] {
        let answer = console.get(&page);
        assert_eq!(answer.status, 200, "{page}: {}", answer.body);
        assert!(
            answer.body.contains("past receipt_timeout")
                && answer.body.contains("awaiting receipt for"),
            "the console's {page} shows the wait past receipt_timeout:\n{}",
            answer.body
        );
    }

    // A restart (kill -9) does not run the hook again.
    alpha.kill9();
    alpha.start();
    std::thread::sleep(Duration::from_secs(TIMEOUT_S + 2));
    assert_eq!(
        runs_of(&hooks, &tid, "send_failed"),
        1,
        "{:?}",
        hook_runs(&hooks)
    );
    assert_eq!(row(&alpha, &tid)["status"], "awaiting_receipt");

    // The receiver returns: its late receipt settles the transfer.
    let back = Instant::now();
    beta.start();
    wait_until(
        Duration::from_secs(60),
        "the late receipt to settle it",
        || row(&alpha, &tid)["status"] == "sent",
    );
    let settled_in = back.elapsed();
    wait_until(Duration::from_secs(20), "the success hook", || {
        runs_of(&hooks, &tid, "sent") == 1
    });
    let r = row(&alpha, &tid);
    assert!(r["error_code"].is_null(), "a success clears the code: {r}");
    assert!(r["awaiting_receipt_secs"].is_null(), "{r}");
    assert_eq!(r["delivered"], true);
    wait_until(Duration::from_secs(20), "after_send: delete", || {
        !spooled.exists()
    });
    let placed = beta.dir.join("inbox/a.bin");
    assert_eq!(
        sha256_file(&placed),
        digest,
        "the file arrived byte for byte"
    );
    let history = text(alpha.cli(&["history"]));
    let line = history.lines().find(|l| l.contains(&tid)).unwrap();
    assert!(
        line.contains(" sent ") && !line.contains("awaiting receipt"),
        "{line}"
    );
    let failed = runs_of(&hooks, &tid, "send_failed");
    let sent = runs_of(&hooks, &tid, "sent");
    assert_eq!((failed, sent), (1, 1), "{:?}", hook_runs(&hooks));
    println!(
        "figures: receipt_timeout {TIMEOUT_S}s, failure hook after {:.1}s waiting, failure hooks {failed} (after a kill -9 restart), \
         success hooks {sent}, late receipt settled {:.1}s after the receiver returned, lost 0, corrupted 0",
        hook_after.as_secs_f64(),
        settled_in.as_secs_f64()
    );
}

/// A queue that reaches `max_queue` while its receiver is away (the embedded
/// broker hosted by the sender, 1 MiB, filled by a first file of 700 KiB):
/// the publishes that do not fit are
/// parked, the sender waits and says so in its log; once the receiver runs,
/// the queue drains, publishing goes on (said too) and every file arrives.
#[test]
fn a_full_queue_makes_the_sender_wait_say_so_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (a, b) = (unique("mqa"), unique("mqb"));
    let port = common::http::free_port();
    let mut alpha = Agent::new(
        &a,
        &root.join("alpha"),
        &format!(
            "node: {a}\nstate_dir: state\nbroker:\n  embedded: {{ listen: \"127.0.0.1:{port}\", max_queue: 1MiB }}\n\
             send:\n  - file_id: MQ\n    outbox: outbox\n    to: [ {b} ]\n    ready: {{ stable_for: 200ms }}\n"
        ),
    );
    alpha.start();
    let mut digests = Vec::new();
    for i in 0..3 {
        let src = root.join(format!("f{i}.bin"));
        write_pattern(&src, 700 << 10, 40 + i);
        digests.push(sha256_file(&src));
        drop_file(&alpha.dir.join("outbox"), &format!("f{i}.bin"), |p| {
            fs::copy(&src, p).unwrap();
        });
        if i == 0 {
            // The first fills the queue (publishes that reach the broker
            // in one batch are stored together, so the others come after).
            wait_until(Duration::from_secs(60), "f0.bin in the queue", || {
                alpha.with_status("awaiting_receipt").len() == 1
            });
        }
    }
    let waiting = Instant::now();
    while !alpha.log().contains("error_code=broker_unresponsive") {
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "the sender did not say it waits within 60s: {:?}\n{}",
            alpha.history(),
            alpha.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let said_after = waiting.elapsed();
    assert!(
        !alpha.with_status("sending").is_empty(),
        "a file waits for room: {:?}",
        alpha.history()
    );

    // The receiver, enrolled on alpha's broker, comes.
    let secret = common::node_secret(&alpha.dir.join("state/broker"), &b);
    let beta_dir = root.join("beta");
    fs::create_dir_all(beta_dir.join("state")).unwrap();
    common::write_secret(&beta_dir.join("state/broker.secret"), &secret);
    let mut beta = Agent::new(
        &b,
        &beta_dir,
        &format!(
            "node: {b}\nstate_dir: state\nbroker:\n  embedded: {{ connect: \"127.0.0.1:{port}\" }}\n\
             receive:\n  - file_id: MQ\n    from: [ {a} ]\n    inbox: inbox\n"
        ),
    );
    let back = Instant::now();
    beta.start();
    wait_until(Duration::from_secs(60), "all three sent", || {
        alpha.with_status("sent").len() == 3
    });
    let drained_in = back.elapsed();
    for (i, d) in digests.iter().enumerate() {
        let placed = beta.dir.join(format!("inbox/f{i}.bin"));
        assert_eq!(&sha256_file(&placed), d, "f{i}.bin byte for byte");
    }
    assert!(alpha.log().contains("answers again"), "{}", alpha.log());
    println!(
        "figures: max_queue 1MiB, 3 files of 700 KiB to an absent receiver: waiting said after {:.1}s, \
         all 3 sent {:.1}s after the receiver started, lost 0, corrupted 0",
        said_after.as_secs_f64(),
        drained_in.as_secs_f64()
    );
}
