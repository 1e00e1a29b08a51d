//! Memory bounded whatever the backlog (issue 15). Thousands of files
//! dropped at once while the embedded broker is hung (SIGSTOP): the sender
//! claims a bounded window of them and leaves the rest in the outbox
//! instead of taking them all into memory; after SIGCONT every file
//! arrives, byte for byte, each hook once, and neither agent's peak RSS
//! passes 64 MiB. A hook slower than the files arrive, on the receiving or
//! on the sending side: at most 256 run at once, the rest of the files (or
//! receipts) wait in the broker. The benchmark
//! (`benches/run.sh`, `backlog`) measures the memory at 100,000 files.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fault::Stopped;
use common::{Agent, BrokerProcess, Pair, PairOpts, hook_runs, unique, visible_names, wait_until};

const FILES: usize = 5_000;
/// What the sender may take from the outbox while nothing is confirmed:
/// one claim (1,024) for the publishers of its priority (256) and one more
/// that waits for them (`src/sender/backlog.rs`, `watch.rs`).
const CLAIMED_AT_MOST: usize = 1280;
const RSS_LIMIT_KIB: u64 = 64 << 10;

/// The peak resident set of a process (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status")
}

/// The 4 KiB body of file `i`: its number, repeated.
fn body(i: usize) -> Vec<u8> {
    let line = format!("{i:08}\n");
    line.as_bytes().iter().copied().cycle().take(4096).collect()
}

/// Writes `n` files into `outbox`, then all their `.done` markers (the
/// files dropped at once); returns when the first marker was written.
fn drop_all(outbox: &Path, n: usize) -> Instant {
    fs::create_dir_all(outbox).unwrap();
    for i in 0..n {
        fs::write(outbox.join(format!("s{i}.dat")), body(i)).unwrap();
    }
    let t0 = Instant::now();
    for i in 0..n {
        fs::write(outbox.join(format!("s{i}.dat.done")), b"").unwrap();
    }
    t0
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |d| d.count())
}

#[test]
fn thousands_of_files_wait_on_disk_not_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path());
    let mut p = Pair::new(PairOpts {
        broker: Some(broker.section()),
        ready: Some("{ done_marker: \".done\" }".into()),
        ..Default::default()
    });
    p.start();
    let spool = p.alpha.dir.join("state/spool").join(&p.file_id);

    // Nothing is confirmed while the broker is stopped.
    let stopped = Stopped::stop(broker.pid());
    let stage = p.tmp.path().join("stage");
    fs::create_dir_all(&stage).unwrap();
    for i in 0..FILES {
        fs::write(stage.join(format!("f{i}.dat")), body(i)).unwrap();
    }
    let t0 = Instant::now();
    for i in 0..FILES {
        let name = format!("f{i}.dat");
        fs::rename(stage.join(&name), p.outbox.join(&name)).unwrap();
    }
    for i in 0..FILES {
        fs::write(p.outbox.join(format!("f{i}.dat.done")), b"").unwrap();
    }
    // The sender claims what it may, then waits: the spool stops growing.
    let (mut last, mut still_since) = (usize::MAX, Instant::now());
    wait_until(Duration::from_secs(60), "the spool to stop growing", || {
        let n = count_files(&spool);
        if n != last {
            (last, still_since) = (n, Instant::now());
        }
        n > 0 && still_since.elapsed() >= Duration::from_secs(3)
    });
    let claimed = count_files(&spool);
    let left = visible_names(&p.outbox)
        .iter()
        .filter(|n| n.ends_with(".dat"))
        .count();
    assert!(
        claimed <= CLAIMED_AT_MOST,
        "{claimed} files claimed while nothing could be published (at most {CLAIMED_AT_MOST}: the rest wait in the outbox)"
    );
    assert_eq!(
        claimed + left,
        FILES,
        "every file in the spool or the outbox"
    );

    drop(stopped);
    let resumed = Instant::now();
    wait_until(Duration::from_secs(600), "every file placed", || {
        visible_names(&p.inbox).len() >= FILES
    });
    p.wait_sent(FILES, Duration::from_secs(300));
    let all_sent = t0.elapsed();

    let mut corrupted = 0;
    for i in 0..FILES {
        if fs::read(p.inbox.join(format!("f{i}.dat"))).ok() != Some(body(i)) {
            corrupted += 1;
        }
    }
    let mut hooks: BTreeMap<String, usize> = BTreeMap::new();
    for l in hook_runs(&p.hooks) {
        *hooks.entry(l).or_default() += 1;
    }
    let received = hooks.keys().filter(|l| l.ends_with(" received")).count();
    let dup = hooks.values().filter(|&&n| n > 1).count();
    let (send_kib, recv_kib) = (peak_rss_kib(p.alpha.pid()), peak_rss_kib(p.beta.pid()));
    println!(
        "figures: backlog: {FILES} files dropped at once on a hung broker, {claimed} claimed meanwhile, all placed {:.1}s after SIGCONT ({:.1}s in all), peak RSS sender {:.1} MiB, receiver {:.1} MiB, lost {}, corrupted {corrupted}, duplicate hooks {dup}",
        resumed.elapsed().as_secs_f64(),
        all_sent.as_secs_f64(),
        send_kib as f64 / 1024.0,
        recv_kib as f64 / 1024.0,
        FILES - visible_names(&p.inbox).len().min(FILES),
    );
    assert_eq!(corrupted, 0, "files placed with other bytes");
    assert_eq!(received, FILES, "one success hook per file on the receiver");
    assert_eq!(dup, 0, "a hook ran twice");
    for (who, kib) in [("sender", send_kib), ("receiver", recv_kib)] {
        assert!(
            kib <= RSS_LIMIT_KIB,
            "the {who}'s peak RSS is {kib} KiB (limit {RSS_LIMIT_KIB} KiB)"
        );
    }
}

/// The receiver's completions at once (`src/receiver/mod.rs`), and the
/// sender's receipts settling at once (`src/sender/receipt.rs`).
const COMPLETING_MAX: usize = 256;
const SETTLING_MAX: usize = 256;

/// A success hook that takes a second, 600 files dropped at once: the
/// receiver runs at most 256 hooks at once (each hook counts the others
/// running as it starts), and every file is placed with one hook.
#[test]
fn a_slow_hook_runs_at_most_256_at_once() {
    slow_hooks("receiver", 1, COMPLETING_MAX);
}

/// The same with a 3 s hook on the sender, run for each receipt, the
/// receiver started only once all 600 transfers await their receipt (so
/// that the receipts come in a burst, about 200 a second): at most 256 at
/// once, the other receipts waiting in the broker. (Before the bound, a
/// task per receipt: all hooks at once, and a sender restarted with
/// 100,000 receipts to drain peaked at 82 to 98 MiB.)
#[test]
fn a_slow_sender_hook_runs_at_most_256_at_once() {
    slow_hooks("sender", 3, SETTLING_MAX);
}

/// 600 files, a success hook of `secs` seconds on `side`'s profile; at
/// most `limit` hooks side by side.
fn slow_hooks(side: &str, secs: u32, limit: usize) {
    const N: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let broker = BrokerProcess::start(root);
    let (a, b) = (unique("alpha"), unique("beta"));
    let runs = root.join("runs");
    fs::create_dir_all(&runs).unwrap();
    let hook = root.join("slow-hook.sh");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\nd={runs}\ntouch \"$d/running.$$\"\nls \"$d\" | grep -c '^running\\.' >> \"$d/side-by-side.log\"\nsleep {secs}\nrm -f \"$d/running.$$\"\necho \"$HAKOBU_TRANSFER_ID\" >> \"$d/done.log\"\n",
            runs = runs.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let (outbox, inbox) = (root.join("outbox"), root.join("inbox"));
    let on_success = format!(
        "    on_success: {{ run: [ \"{hook}\" ], timeout: 1m }}\n",
        hook = hook.display()
    );
    let (send_hook, receive_hook) = match side {
        "sender" => (on_success.as_str(), ""),
        _ => ("", on_success.as_str()),
    };
    let mut alpha = Agent::new(
        &a,
        &root.join("alpha"),
        &format!(
            "node: {a}\nstate_dir: state\n{broker}send:\n  - file_id: SLOW\n    outbox: {outbox}\n    to: [ {b} ]\n    ready: {{ done_marker: \".done\" }}\n{send_hook}",
            broker = broker.section(),
            outbox = outbox.display()
        ),
    );
    let mut beta = Agent::new(
        &b,
        &root.join("beta"),
        &format!(
            "node: {b}\nstate_dir: state\n{broker}receive:\n  - file_id: SLOW\n    from: [ {a} ]\n    inbox: {inbox}\n{receive_hook}",
            broker = broker.section(),
            inbox = inbox.display()
        ),
    );
    let burst = side == "sender";
    if !burst {
        beta.start();
    }
    alpha.start();
    let t0 = drop_all(&outbox, N);
    if burst {
        wait_until(
            Duration::from_secs(120),
            "every file awaiting its receipt",
            || alpha.with_status("awaiting_receipt").len() >= N,
        );
        beta.start();
    }
    let lines = |name: &str| -> Vec<String> {
        fs::read_to_string(runs.join(name))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    };
    wait_until(Duration::from_secs(120), "every slow hook to end", || {
        lines("done.log").len() >= N
    });
    let took = t0.elapsed();
    let most = lines("side-by-side.log")
        .iter()
        .filter_map(|l| l.trim().parse::<usize>().ok())
        .max()
        .unwrap_or(0);
    let done = lines("done.log");
    let distinct: std::collections::BTreeSet<&String> = done.iter().collect();
    let corrupted = (0..N)
        .filter(|&i| fs::read(inbox.join(format!("s{i}.dat"))).ok() != Some(body(i)))
        .count();
    println!(
        "figures: slow {side} hooks: {N} files, a {secs} s hook, at most {most} hooks at once (limit {limit}), all done in {:.1}s, lost {}, corrupted {corrupted}, duplicate hooks {}",
        took.as_secs_f64(),
        N - distinct.len().min(N),
        done.len() - distinct.len()
    );
    assert!(most <= limit, "{most} {side} hooks ran at once");
    assert!(most >= 2, "hooks ran one at a time: {most}");
    assert_eq!(corrupted, 0);
    assert_eq!((done.len(), distinct.len()), (N, N), "one hook per file");
}

/// A received file sent on by its hook with `hakobu send --wait` (HULFT's
/// post-receive job with a synchronous send), 1,500 files dropped at once:
/// the hooks hold every completion slot while they wait for the next
/// node's receipts, so the transfers after them must wait where they do
/// not hold up those receipts. Before, they waited unacked in the broker,
/// the consumer's prefetch filled, no receipt came through, and every hook
/// waited out its timeout (35 of 1,500 files sent on, then none for a
/// minute).
#[test]
fn hooks_that_send_on_and_wait_get_their_receipts() {
    const N: usize = 1_500;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let broker = BrokerProcess::start(root);
    let (a, b, c) = (unique("alpha"), unique("beta"), unique("gamma"));
    let (outbox, inbox_b, inbox_c) = (root.join("outbox"), root.join("in-b"), root.join("in-c"));
    let forward = root.join("forward.sh");
    let section = broker.section();
    let mut alpha = Agent::new(
        &a,
        &root.join("alpha"),
        &format!(
            "node: {a}\nstate_dir: state\n{section}send:\n  - file_id: IN\n    outbox: {}\n    to: [ {b} ]\n    ready: {{ done_marker: \".done\" }}\n",
            outbox.display()
        ),
    );
    let mut beta = Agent::new(
        &b,
        &root.join("beta"),
        &format!(
            "node: {b}\nstate_dir: state\n{section}receive:\n  - file_id: IN\n    from: [ {a} ]\n    inbox: {}\n    on_success: {{ run: [ \"{}\" ], timeout: 10m }}\nsend:\n  - file_id: ON\n    outbox: {}\n    to: [ {c} ]\n",
            inbox_b.display(),
            forward.display(),
            root.join("on-outbox").display()
        ),
    );
    // Bounded: `send --wait` outlives a beta killed when the test fails
    // (before its fix, 256 of them polled on for good).
    fs::write(
        &forward,
        format!(
            "#!/bin/sh\ntimeout 300 {bin} send -c {cfg} --file-id ON \"$HAKOBU_PATH\" --wait >/dev/null && echo \"$HAKOBU_TRANSFER_ID\" >> {done}\n",
            bin = common::bin(),
            cfg = beta.config.display(),
            done = root.join("forwarded.log").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&forward, fs::Permissions::from_mode(0o755)).unwrap();
    let mut gamma = Agent::new(
        &c,
        &root.join("gamma"),
        &format!(
            "node: {c}\nstate_dir: state\n{section}receive:\n  - file_id: ON\n    from: [ {b} ]\n    inbox: {}\n",
            inbox_c.display()
        ),
    );
    gamma.start();
    beta.start();
    alpha.start();
    let t0 = drop_all(&outbox, N);
    let forwarded = || {
        fs::read_to_string(root.join("forwarded.log"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let mut last = (0, Instant::now());
    wait_until(Duration::from_secs(300), "every file sent on", || {
        let n = forwarded();
        if n != last.0 {
            last = (n, Instant::now());
        }
        assert!(
            last.1.elapsed() < Duration::from_secs(60),
            "stuck: {n} of {N} files sent on, none for 60 s (beta placed {}, gamma {})",
            count_files(&inbox_b),
            count_files(&inbox_c)
        );
        n >= N
    });
    let corrupted = (0..N)
        .filter(|&i| fs::read(inbox_c.join(format!("s{i}.dat"))).ok() != Some(body(i)))
        .count();
    let n = forwarded();
    println!(
        "figures: sent on by hooks with --wait: {N} files dropped at once, {n} sent on by beta's hooks in {:.1}s, lost {}, corrupted {corrupted}",
        t0.elapsed().as_secs_f64(),
        N - count_files(&inbox_c).min(N)
    );
    assert_eq!(corrupted, 0);
    assert_eq!(n, N, "one hook run per file");
}
