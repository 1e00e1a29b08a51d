//! Hung, not dead: a broker that stops answering (SIGSTOP, as a frozen VM
//! does) without closing its connections. A RabbitMQ node hung under a
//! sender and a receiver: both notice by the AMQP heartbeat, move to the
//! next node, and every file arrives while the node is still stopped;
//! after SIGCONT nothing comes twice. The embedded broker hung: the agents
//! wait, say so, and finish after SIGCONT. A receiving agent stopped
//! mid-file: another pair carries on. Whatever happens, the stopped
//! process gets its SIGCONT (the cluster is shared with the next tests).
//! The tests run one at a time; each prints a `figures:` line.

mod common;

use std::fs;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::fault::{Stopped, delivered, sent_none_failed};
use common::{Pair, PairOpts, cluster, sha256_file, wait_until, write_pattern};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drops `n` files of `size` bytes named `prefix-i.bin`; returns (name, sha256).
fn drop_files(p: &Pair, prefix: &str, n: usize, size: u64) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i}.bin");
            let src = p.tmp.path().join(&name);
            write_pattern(&src, size, 100 + i as u64);
            let want = sha256_file(&src);
            common::drop_file(&p.outbox, &name, |t| fs::rename(&src, t).unwrap());
            (name, want)
        })
        .collect()
}

/// `local-cluster.sh status`: three nodes running, no partition.
fn cluster_healthy() -> bool {
    let script = std::env::var("HAKOBU_RMQ_CLUSTER").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/rabbitmq/local-cluster.sh"
        )
        .into()
    });
    std::process::Command::new(script)
        .arg("status")
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

fn figures(line: &str) {
    // Straight to stderr: the harness captures print! of passing tests.
    let _ = writeln!(std::io::stderr(), "figures: {line}");
}

/// The node both agents use is stopped while files go through it: the
/// heartbeat makes both leave it, and everything arrives while it is
/// still stopped; after SIGCONT it rejoins and nothing comes twice.
#[test]
fn rabbitmq_node_hung_under_sender_and_receiver() {
    let _g = serial();
    // A node restarted by an earlier suite may still be booting; waiting
    // here, not later: the node must hang while the files are under way.
    wait_until(
        Duration::from_secs(120),
        "the cluster whole",
        cluster_healthy,
    );
    // Node 2 carries what matters: beta consumes there (its first URL),
    // and alpha publishes there (its consumer takes its first URL, node 1,
    // and its publishing connection the next one).
    let mut p = Pair::new(PairOpts {
        alpha_first: 0,
        beta_first: 1,
        ..Default::default()
    });
    p.start();
    let warm = drop_files(&p, "warm", 1, 1 << 10);
    p.wait_sent(1, Duration::from_secs(60));
    let files = drop_files(&p, "hung", 6, 16 << 20);
    wait_until(Duration::from_secs(60), "beta to start receiving", || {
        !p.beta.with_status("receiving").is_empty()
    });
    let (beta_consuming, alpha_connected) = (
        p.beta.log().matches("Consuming.").count(),
        p.alpha.log().matches("Connected to RabbitMQ").count(),
    );
    let pid: u32 = cluster(&["pid", "2"]).parse().expect("node pid");
    let stopped = Stopped::stop(pid);
    let t0 = Instant::now();
    let (mut beta_moved, mut alpha_moved) = (None, None);
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(
            Duration::from_secs(60),
            "every file to arrive while node 2 is stopped",
            || {
                if beta_moved.is_none()
                    && p.beta.log().matches("Consuming.").count() > beta_consuming
                {
                    beta_moved = Some(t0.elapsed());
                }
                if alpha_moved.is_none()
                    && p.alpha.log().matches("Connected to RabbitMQ").count() > alpha_connected
                {
                    alpha_moved = Some(t0.elapsed());
                }
                sent_none_failed(&p) == files.len() + 1
            },
        )
    }));
    if let Err(e) = waited {
        let _ = writeln!(
            std::io::stderr(),
            "--- alpha ---\n{}\n--- beta ---\n{}\n--- beta history ---\n{:?}",
            p.alpha.log(),
            p.beta.log(),
            p.beta.history()
        );
        std::panic::resume_unwind(e);
    }
    let done = t0.elapsed();
    // Still stopped: the transfers did not wait for the node.
    let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.split(' ').nth(2) == Some("T"),
        "node 2 was not stopped all along: {state}"
    );
    let mut all = warm.clone();
    all.extend(files.iter().cloned());
    let (bad_stopped, dup_stopped) = delivered(&p, &all);
    drop(stopped);
    let t1 = Instant::now();
    let back = std::panic::catch_unwind(|| {
        wait_until(
            Duration::from_secs(90),
            "node 2 back in the cluster",
            cluster_healthy,
        )
    });
    if let Err(e) = back {
        // Leave the shared cluster whole for the next tests, then fail.
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        cluster(&["start", "2"]);
        std::panic::resume_unwind(e);
    }
    let rejoin = t1.elapsed();
    // Whatever the node held (unconfirmed publishes, unacked deliveries)
    // comes back now: give it time to, then check again.
    std::thread::sleep(Duration::from_secs(10));
    let (bad, dup) = delivered(&p, &all);
    figures(&format!(
        "hung[rabbitmq node]: {} files, receiver moved in {:.1}s, sender moved in {:.1}s, all placed {:.1}s after SIGSTOP, node rejoined {:.1}s after SIGCONT, {} lost or corrupted, {} duplicate hooks",
        all.len(),
        beta_moved.map_or(-1.0, |d| d.as_secs_f64()),
        alpha_moved.map_or(-1.0, |d| d.as_secs_f64()),
        done.as_secs_f64(),
        rejoin.as_secs_f64(),
        bad_stopped.max(bad),
        dup_stopped.max(dup),
    ));
    assert_eq!((bad_stopped, dup_stopped), (0, 0));
    assert_eq!((bad, dup), (0, 0));
    assert!(
        alpha_moved.is_some(),
        "alpha never left the hung node:\n{}",
        p.alpha.log()
    );
    assert!(
        beta_moved.is_some(),
        "beta never left the hung node:\n{}",
        p.beta.log()
    );
    assert!(
        p.beta.log().contains("heartbeat"),
        "beta left the node, but not for its heartbeat:\n{}",
        p.beta.log()
    );
}

/// The embedded broker stopped in the middle of a transfer, and a second
/// file dropped meanwhile: the sender says it waits (`broker_unresponsive`),
/// nothing fails, and after SIGCONT both files arrive once.
#[test]
fn embedded_broker_hung_then_resumed() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let broker = common::BrokerProcess::start(dir.path());
    let mut p = Pair::new(PairOpts {
        broker: Some(broker.section()),
        ..Default::default()
    });
    p.start();
    let mut files = drop_files(&p, "first", 1, 64 << 20);
    wait_until(Duration::from_secs(60), "beta to start receiving", || {
        !p.beta.with_status("receiving").is_empty()
    });
    let stopped = Stopped::stop(broker.pid());
    let t0 = Instant::now();
    files.extend(drop_files(&p, "second", 1, 4 << 20));
    wait_until(Duration::from_secs(60), "alpha to say it waits", || {
        p.alpha.log().contains("error_code=broker_unresponsive")
    });
    let said = t0.elapsed();
    assert!(
        p.alpha
            .log()
            .contains("confirmed nothing for a while; waiting"),
        "{}",
        p.alpha.log()
    );
    // Hung for a while longer: nobody gives up, nothing is placed.
    std::thread::sleep(Duration::from_secs(5));
    assert!(p.alpha.alive() && p.beta.alive(), "an agent exited");
    let h = p.alpha.history();
    assert!(
        !h.iter()
            .any(|r| r["status"].as_str().is_some_and(|s| s.contains("fail"))),
        "a transfer failed while the broker was stopped: {h:?}"
    );
    let stopped_for = t0.elapsed();
    drop(stopped);
    let t1 = Instant::now();
    p.wait_sent(2, Duration::from_secs(120));
    let resumed = t1.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let (bad, dup) = delivered(&p, &files);
    figures(&format!(
        "hung[embedded broker]: {} files, sender said it waits {:.1}s after SIGSTOP, stopped {:.1}s, all placed {:.1}s after SIGCONT, {} lost or corrupted, {} duplicate hooks",
        files.len(),
        said.as_secs_f64(),
        stopped_for.as_secs_f64(),
        resumed.as_secs_f64(),
        bad,
        dup,
    ));
    assert_eq!((bad, dup), (0, 0));
    assert!(
        p.alpha.log().contains("The embedded broker answers again."),
        "{}",
        p.alpha.log()
    );
}

/// A receiving agent stopped in the middle of a large file: another pair
/// on the same broker carries on meanwhile, and the large file completes
/// once the agent gets SIGCONT (placed once, hook once).
#[test]
fn receiver_hung_mid_file_others_carry_on() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    // The broker closes a connection silent for 25 s: the stopped agent's,
    // whose deliveries then wait for it in the queue.
    let broker = common::BrokerProcess::start_with(dir.path(), &["--idle-timeout", "25s"]);
    let opts = || PairOpts {
        broker: Some(broker.section()),
        ..Default::default()
    };
    let (mut big, mut other) = (Pair::new(opts()), Pair::new(opts()));
    big.start();
    other.start();
    let big_files = drop_files(&big, "big", 1, 150 << 20);
    wait_until(Duration::from_secs(60), "beta to start receiving", || {
        !big.beta.with_status("receiving").is_empty()
    });
    let stopped = Stopped::stop(big.beta.pid());
    let t0 = Instant::now();
    let small = drop_files(&other, "small", 4, 1 << 20);
    other.wait_sent(4, Duration::from_secs(60));
    let others_done = t0.elapsed();
    let (bad_other, dup_other) = delivered(&other, &small);
    // Stopped past the broker's idle timeout: its connection is closed.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(t0.elapsed()));
    assert!(
        big.inbox_files().is_empty(),
        "the stopped receiver placed its file"
    );
    let stopped_for = t0.elapsed();
    drop(stopped);
    let t1 = Instant::now();
    big.wait_sent(1, Duration::from_secs(180));
    let resumed = t1.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let (bad, dup) = delivered(&big, &big_files);
    figures(&format!(
        "hung[receiving agent]: {} files, the other pair's {} placed {:.1}s after SIGSTOP, stopped {:.1}s, the 150 MiB file placed {:.1}s after SIGCONT, {} lost or corrupted, {} duplicate hooks",
        small.len() + big_files.len(),
        small.len(),
        others_done.as_secs_f64(),
        stopped_for.as_secs_f64(),
        resumed.as_secs_f64(),
        bad + bad_other,
        dup + dup_other,
    ));
    assert_eq!((bad + bad_other, dup + dup_other), (0, 0));
    assert!(
        big.beta.log().contains("Consumer lost the embedded broker"),
        "the broker kept the stopped agent's connection:\n{}",
        big.beta.log()
    );
}
