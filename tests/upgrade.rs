//! Upgrades (issue 15, part 6), with the previous release built from its
//! commit (`tests/previous-release.sh`, cached under `target/`) and run as
//! real processes beside this build, on the test cluster: the embedded
//! broker's own protocol is not kept across releases (its handshake refuses
//! another version), so agents of two releases meet only on RabbitMQ.
//!
//! - A state directory the previous release left mid-work (a queued file, a
//!   file cut off mid-publish, files waiting for receipts, a file half
//!   received) resumes under this release: every file placed once.
//! - An agent of each release exchange files both ways, receipts and hooks.
//! - A rolling restart of three agents onto this release under a stream of
//!   files (SIGTERM twice, `kill -9` once) loses nothing.
//! - A frame of a newer release is dead-lettered with `unsupported_version`.
//! - A configuration of the previous release is checked before the upgrade.
//! - The embedded broker of this release refuses an agent of the previous one.
//!
//! Each scenario prints a `figures:` line.

mod common;
#[path = "upgrade/rig.rs"]
mod rig;

use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{BrokerProcess, amqp_urls, cluster, unique, wait_until};
use rig::{Expected, Net, WAIT, current, figures, previous, rows, status_of, wait_for};

/// One scenario at a time: each runs several agents and a stream of files
/// on a machine of two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The previous release left alpha and beta mid-work; this release takes
/// their state directories over. Phase one, all on the previous release:
/// `first.csv` goes through; beta stops; `s1`, `s2` (to beta) and `l1` (to
/// gamma, never started) wait for receipts; `big.bin` cannot be published
/// whole (beta's queue holds 4 MiB) and is `sending` when alpha is killed;
/// `queued.txt` is queued by `hakobu send` while alpha is down; beta comes
/// back, places `s1` and `s2` (their receipts wait in alpha's queue),
/// takes the first part of `big.bin`, and is killed. Phase two: alpha and
/// beta restart on this release, gamma starts on it: every file placed
/// once, byte for byte, every hook once.
#[test]
fn a_state_directory_of_the_previous_release_resumes() {
    let _g = serial();
    let old = previous();
    let tmp = tempfile::tempdir().unwrap();
    let broker = format!("{}    max_queue: 4MiB\n", cluster_broker());
    let net = Net::new(tmp.path(), broker);
    let (a, b, g) = (unique("up-a"), unique("up-b"), unique("up-g"));
    let mut alpha = net.agent(&a, &[("DATA", &b), ("LATE", &g)], &[], old);
    let mut beta = net.agent(&b, &[], &[("DATA", &a)], old);
    let mut gamma = net.agent(&g, &[], &[("LATE", &a)], current());
    let (data, late) = (net.outbox(&a, "DATA"), net.outbox(&a, "LATE"));
    let (inbox_b, inbox_g) = (net.inbox(&b, "DATA"), net.inbox(&g, "LATE"));
    let mut files = Expected::default();

    beta.start();
    alpha.start();
    files.add(&data, &inbox_b, "first.csv", 2_000, 1);
    wait_for(&[&alpha, &beta], "first.csv sent", || {
        status_of(&alpha, "send", "first.csv").as_deref() == Some("sent")
    });
    beta.term();
    files.add(&data, &inbox_b, "s1.txt", 10_000, 2);
    files.add(&data, &inbox_b, "s2.bin", 300_000, 3);
    files.add(&late, &inbox_g, "l1.bin", 1 << 20, 4);
    wait_for(&[&alpha], "three files awaiting their receipts", || {
        ["s1.txt", "s2.bin", "l1.bin"]
            .iter()
            .all(|n| status_of(&alpha, "send", n).as_deref() == Some("awaiting_receipt"))
    });
    files.add(&data, &inbox_b, "big.bin", 24 << 20, 5);
    wait_for(&[&alpha], "big.bin refused by the full queue", || {
        alpha.log().contains("broker_nack")
    });
    assert_eq!(
        status_of(&alpha, "send", "big.bin").as_deref(),
        Some("sending")
    );
    alpha.kill9();
    let q = tmp.path().join("queued.txt");
    common::write_pattern(&q, 5_000, 6);
    files
        .0
        .push((inbox_b.join("queued.txt"), common::sha256_file(&q)));
    let out = alpha.cli(&[
        "send",
        "--file-id",
        "DATA",
        q.to_str().unwrap(),
        "--meta",
        "k=v",
    ]);
    assert!(
        out.status.success(),
        "the previous release's hakobu send: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        status_of(&alpha, "send", "queued.txt").as_deref(),
        Some("queued")
    );
    beta.start();
    wait_for(&[&beta], "beta to place s1, s2 and begin big.bin", || {
        let r = rows(&beta, "receive");
        let has = |n: &str, s: &str| r.iter().any(|r| r["file_name"] == n && r["status"] == s);
        has("s1.txt", "received") && has("s2.bin", "received") && has("big.bin", "receiving")
    });
    // Let the chunks it holds be written and acked, then cut it off.
    std::thread::sleep(Duration::from_secs(2));
    beta.kill9();
    let half: Vec<_> = rows(&beta, "receive")
        .into_iter()
        .filter(|r| r["status"] == "receiving")
        .collect();
    assert_eq!(half.len(), 1, "big.bin half received");
    let carried: Vec<String> = rows(&alpha, "send")
        .iter()
        .map(|r| {
            format!(
                "{}={}",
                r["file_name"].as_str().unwrap_or(""),
                r["status"].as_str().unwrap_or("")
            )
        })
        .collect();

    // Phase two: this release on the same state directories.
    let upgraded = Instant::now();
    alpha.set_program(current());
    beta.set_program(current());
    alpha.start();
    beta.start();
    gamma.start();
    wait_for(&[&alpha, &beta, &gamma], "every file sent", || {
        let r = rows(&alpha, "send");
        r.len() == 6 && r.iter().all(|r| r["status"] == "sent")
    });
    let settled = upgraded.elapsed();
    let (lost, corrupted) = files.check();
    assert_eq!((lost, corrupted), (0, 0), "files lost or corrupted");
    // The half-received file went on from its partial file, which is gone.
    let partials = common::dir_names(&inbox_b.join(".hakobu-partial"));
    assert!(partials.is_empty(), "leftover partial files: {partials:?}");
    assert_eq!(common::visible_names(&inbox_b).len(), 5);
    // Each transfer's hooks ran once on each side, and none failed.
    let runs = net.runs();
    let count = |event: &str| runs.keys().filter(|(_, e)| e == event).count();
    assert_eq!(count("received"), 6, "received hooks: {runs:?}");
    assert_eq!(count("sent"), 6, "sent hooks: {runs:?}");
    assert_eq!(runs.len(), 12, "no failure hook: {runs:?}");
    assert_eq!(net.duplicate_hooks(), 0, "{runs:?}");
    // The queued row's metadata came through the upgrade.
    let tid = rows(&beta, "receive")
        .into_iter()
        .find(|r| r["file_name"] == "queued.txt")
        .unwrap()["transfer_id"]
        .as_str()
        .unwrap()
        .to_string();
    let env = common::hook_env(&net.hooks, &tid, "received");
    assert_eq!(env.get("HAKOBU_META_K").map(String::as_str), Some("v"));
    figures(&format!(
        "upgrade[state]: 6 files, carried over from the previous release {}, and big.bin half received; all settled {:.1}s after this release started, {lost} lost, {corrupted} corrupted, {} duplicate hooks",
        carried.join(" "),
        settled.as_secs_f64(),
        net.duplicate_hooks()
    ));
}

/// An agent of the previous release and one of this release send each
/// other files (small ones, which travel in batches with receipts, an empty
/// one, multi-chunk ones, and `hakobu send --wait` with metadata): every
/// file placed byte for byte, each receipt settles its sender, every hook once.
#[test]
fn the_previous_release_and_this_one_exchange_files_both_ways() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let net = Net::new(tmp.path(), cluster_broker());
    let (o, n) = (unique("up-old"), unique("up-new"));
    let mut old = net.agent(&o, &[("DATA", &n)], &[("DATA", &n)], previous());
    let mut new = net.agent(&n, &[("DATA", &o)], &[("DATA", &o)], current());
    old.start();
    new.start();
    let start = Instant::now();
    let mut files = Expected::default();
    let sizes = [0u64, 1, 4_000, 70_000, 3 << 20, (5 << 20) + 77];
    for (i, size) in sizes.iter().enumerate() {
        let name = format!("f{i}.bin");
        let seed = 10 + i as u64;
        files.add(
            &net.outbox(&o, "DATA"),
            &net.inbox(&n, "DATA"),
            &name,
            *size,
            seed,
        );
        files.add(
            &net.outbox(&n, "DATA"),
            &net.inbox(&o, "DATA"),
            &name,
            *size,
            seed + 100,
        );
    }
    // One-shot sends that wait for the receipt, with metadata, each way.
    for (from, to, seed) in [(&old, &n, 30), (&new, &o, 31)] {
        let src = tmp.path().join(format!("wait-{seed}.txt"));
        common::write_pattern(&src, 9_000, seed);
        files.0.push((
            net.inbox(to, "DATA").join(format!("wait-{seed}.txt")),
            common::sha256_file(&src),
        ));
        let out = from.cli(&[
            "send",
            "--file-id",
            "DATA",
            src.to_str().unwrap(),
            "--meta",
            "k=v",
            "--wait",
        ]);
        assert!(
            out.status.success(),
            "{}'s hakobu send --wait: {}{}",
            from.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let per_side = sizes.len() + 1;
    wait_for(&[&old, &new], "every file sent both ways", || {
        [&old, &new].iter().all(|a| {
            let r = rows(a, "send");
            r.len() == per_side && r.iter().all(|r| r["status"] == "sent")
        })
    });
    let took = start.elapsed();
    let (lost, corrupted) = files.check();
    assert_eq!((lost, corrupted), (0, 0), "files lost or corrupted");
    for a in [&old, &new] {
        let received = rows(a, "receive");
        assert_eq!(received.len(), per_side);
        assert!(
            received.iter().all(|r| r["status"] == "received"),
            "{received:?}"
        );
    }
    let runs = net.runs();
    let count = |event: &str| runs.keys().filter(|(_, e)| e == event).count();
    assert_eq!(count("received"), 2 * per_side, "{runs:?}");
    assert_eq!(count("sent"), 2 * per_side, "{runs:?}");
    assert_eq!(runs.len(), 4 * per_side, "no failure hook: {runs:?}");
    assert_eq!(net.duplicate_hooks(), 0, "{runs:?}");
    for a in [&old, &new] {
        let with_meta = rows(a, "receive")
            .into_iter()
            .find(|r| r["file_name"].as_str().unwrap_or("").starts_with("wait-"))
            .unwrap();
        let env = common::hook_env(
            &net.hooks,
            with_meta["transfer_id"].as_str().unwrap(),
            "received",
        );
        assert_eq!(
            env.get("HAKOBU_META_K").map(String::as_str),
            Some("v"),
            "{}",
            a.node
        );
    }
    figures(&format!(
        "upgrade[interop]: {per_side} files previous→this release and {per_side} this→previous (0 B to 5 MiB, batches, --wait with metadata) in {:.1}s, {lost} lost, {corrupted} corrupted, {} duplicate hooks",
        took.as_secs_f64(),
        net.duplicate_hooks()
    ));
}

/// Three agents of the previous release, each sending to the next, under a
/// stream of files; each is restarted onto this release in turn (SIGTERM,
/// `kill -9`, SIGTERM) while the others carry on. Every file is placed once,
/// byte for byte; no hook runs twice.
#[test]
fn a_rolling_restart_onto_this_release_under_a_stream_loses_nothing() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let net = Net::new(tmp.path(), cluster_broker());
    let nodes: Vec<String> = (0..3).map(|i| unique(&format!("roll{i}"))).collect();
    let mut agents: Vec<common::Agent> = (0..3)
        .map(|i| {
            let (next, prev) = (&nodes[(i + 1) % 3], &nodes[(i + 2) % 3]);
            net.agent(&nodes[i], &[("DATA", next)], &[("DATA", prev)], previous())
        })
        .collect();
    for a in agents.iter_mut() {
        a.start();
    }
    let files = Mutex::new(Expected::default());
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let mut restarts = Vec::new();
    std::thread::scope(|s| {
        // The stream: a file every 150 ms, round the three outboxes.
        s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let i = (k % 3) as usize;
                let size = [700, 40_000, 600_000, 1_500_000][(k / 3 % 4) as usize];
                files.lock().unwrap().add(
                    &net.outbox(&nodes[i], "DATA"),
                    &net.inbox(&nodes[(i + 1) % 3], "DATA"),
                    &format!("s{k:04}.bin"),
                    size,
                    k,
                );
                k += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        std::thread::sleep(Duration::from_secs(3));
        for (i, a) in agents.iter_mut().enumerate() {
            let down = Instant::now();
            if i == 1 {
                a.kill9();
            } else {
                a.term();
            }
            a.set_program(current());
            a.start();
            restarts.push(format!(
                "{} {:.1}s",
                if i == 1 { "kill -9" } else { "SIGTERM" },
                down.elapsed().as_secs_f64()
            ));
            std::thread::sleep(Duration::from_secs(3));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let files = files.into_inner().unwrap();
    let refs: Vec<&common::Agent> = agents.iter().collect();
    wait_for(&refs, "every file of the stream placed", || {
        files.all_placed()
    });
    // Every transfer settled: sent, or failed only as the spec allows for a
    // hook cut off by kill -9 (hook_interrupted; the file is placed).
    let mut interrupted = 0;
    wait_for(&refs, "every transfer settled", || {
        let mut settled = 0;
        interrupted = 0;
        for a in &agents {
            for r in rows(a, "send") {
                match r["status"].as_str() {
                    Some("sent") => settled += 1,
                    // The receiver's hook cut off (its receipt says so),
                    // or this sender's own.
                    Some("send_failed") if r["error_code"] == "hook_interrupted" => {
                        settled += 1;
                        interrupted += 1;
                    }
                    Some("hook_interrupted") => {
                        settled += 1;
                        interrupted += 1;
                    }
                    Some(s) if s.contains("fail") => panic!("a transfer failed: {r}"),
                    _ => {}
                }
            }
        }
        settled == files.0.len()
    });
    let took = start.elapsed();
    let (lost, corrupted) = files.check();
    assert_eq!((lost, corrupted), (0, 0), "files lost or corrupted");
    let runs = net.runs();
    let received = runs.keys().filter(|(_, e)| e == "received").count();
    assert_eq!(received, files.0.len(), "one received hook per file");
    assert_eq!(net.duplicate_hooks(), 0, "{runs:?}");
    for a in &agents {
        let extra = common::visible_names(&a.dir.join("inbox/DATA"))
            .len()
            .saturating_sub(
                files
                    .0
                    .iter()
                    .filter(|(p, _)| p.starts_with(&a.dir))
                    .count(),
            );
        assert_eq!(extra, 0, "{}: files nobody sent", a.node);
    }
    figures(&format!(
        "upgrade[rolling]: 3 agents restarted one at a time onto this release ({}), {} files in {:.1}s, {lost} lost, {corrupted} corrupted, {} duplicate hooks, {interrupted} hooks interrupted",
        restarts.join(", "),
        files.0.len(),
        took.as_secs_f64(),
        net.duplicate_hooks()
    ));
}

/// Frames of a newer release (another wire version, alone or in a batch)
/// are dead-lettered once each with `unsupported_version` and a sentence
/// that says to upgrade; the agent stays up and keeps receiving.
#[test]
fn a_frame_of_a_newer_release_is_refused_with_unsupported_version() {
    let tmp = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(tmp.path());
    let net = Net::new(tmp.path(), broker.section());
    let (x, b) = (unique("newer"), unique("up-r"));
    let mut receiver = net.agent(&b, &[], &[("DATA", &x)], current());
    receiver.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tid = hakobu::domain::TransferId::new();
    let data = b"from a newer release".to_vec();
    let good = common::forge::chunk(&tid, (&x, &b), "ok.txt", &data, (0, 65536));
    let mut newer = good.encode().to_vec();
    newer[3] = hakobu::wire::VERSION + 1;
    let mut batch = hakobu::wire::Message::batch(vec![good.clone()])
        .encode()
        .to_vec();
    batch[3] = hakobu::wire::VERSION + 1;
    for frame in [newer, batch] {
        rt.block_on(async {
            use hakobu::broker::Broker;
            let client =
                hakobu::broker::embedded::Embedded::new(&broker.addr, broker.credentials(&x), 1);
            client
                .publish(&b, frame.into())
                .await
                .unwrap()
                .await
                .unwrap();
        });
    }
    common::forge::publish_as(&rt, &broker, (&x, &b), good);
    let inbox = net.inbox(&b, "DATA");
    wait_until(WAIT, "the good file placed", || {
        inbox.join("ok.txt").is_file()
    });
    // No redelivery loop: each refused once, and still once a while later.
    std::thread::sleep(Duration::from_secs(2));
    let refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("error_code=unsupported_version"))
            .count()
    };
    let log = receiver.log();
    assert_eq!(refusals(&log), 2, "{log}");
    assert!(log.contains("upgrade this agent"), "{log}");
    assert!(receiver.alive(), "the agent stopped:\n{log}");
    let out = Command::new(common::bin())
        .args(["broker", "status", "--data"])
        .arg(broker.data())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let dead: u64 = text
        .lines()
        .find(|l| l.starts_with("hakobu.dead-letter"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no dead-letter depth in\n{text}"));
    assert_eq!(dead, 2, "{text}");
    assert_eq!(std::fs::read(inbox.join("ok.txt")).unwrap(), data);
    figures(&format!(
        "upgrade[newer frames]: 2 frames of wire version {} dead-lettered once each (unsupported_version), the next file placed, agent up",
        hakobu::wire::VERSION + 1
    ));
}

/// A configuration of the previous release with one broker user for every
/// node and no `verify_sender` (off by default there, on by default now) is
/// refused by this release's `hakobu check`, which says what to set; with
/// `verify_sender: false` both releases accept it.
#[test]
fn a_configuration_of_the_previous_release_is_checked_before_the_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let check = |program: &std::path::Path, yaml: &str| {
        let config = tmp.path().join("node.yaml");
        std::fs::write(&config, yaml).unwrap();
        let out = Command::new(program)
            .arg("check")
            .arg("-c")
            .arg(&config)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let shared = format!(
        "node: alpha\nstate_dir: {}/state\nbroker:\n  rabbitmq:\n    urls: [ \"amqp://hakobu:secret@127.0.0.1:5672/%2f\" ]\nreceive:\n  - file_id: DATA\n    from: [ beta ]\n    inbox: {}/inbox\n",
        tmp.path().display(),
        tmp.path().display()
    );
    let (code, text) = check(previous(), &shared);
    assert_eq!(code, Some(0), "the previous release accepts it: {text}");
    let (code, text) = check(current(), &shared);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("verify_sender: false"), "{text}");
    let explicit = shared.replace("%2f\" ]\n", "%2f\" ]\n    verify_sender: false\n");
    for program in [previous(), current()] {
        let (code, text) = check(program, &explicit);
        assert_eq!(code, Some(0), "{}: {text}", program.display());
    }
}

/// The embedded broker's protocol is not kept across releases: an agent of
/// the previous release is refused at the handshake by this release's
/// broker, and this release's agent by the previous release's broker; both
/// agents log why and what to do.
#[test]
fn the_embedded_broker_and_an_agent_of_another_release_refuse_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    // The previous release's agent, this release's broker.
    let broker = BrokerProcess::start(tmp.path());
    let net = Net::new(tmp.path(), broker.section());
    let node = unique("up-emb");
    let agent = net.agent(&node, &[], &[("DATA", "alpha")], previous());
    let log = tmp.path().join("old.log");
    let mut child = Command::new(previous())
        .args(["run", "-c"])
        .arg(&agent.config)
        .current_dir(&agent.dir)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(tmp.path().join("old.err")).unwrap())
        .spawn()
        .unwrap();
    let refused =
        "protocol version 1 is not supported (this broker speaks 2); run the same hakobu version";
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    let old_err = tmp.path().join("old.err");
    let waited = Instant::now();
    while !read(&old_err).contains(refused) && waited.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(100));
    }
    let old_refused = waited.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    assert!(read(&old_err).contains(refused), "{}", read(&old_err));

    // This release's agent, the previous release's broker.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut old_broker = Command::new(previous())
        .args(["broker", "--listen", &addr, "--data"])
        .arg(tmp.path().join("old-broker"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(WAIT, "the previous release's broker to listen", || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let net = Net::new(
        &tmp.path().join("new"),
        format!("broker:\n  embedded: {{ connect: \"{addr}\" }}\n"),
    );
    let node = unique("up-emb");
    let mut agent = net.agent(&node, &[], &[("DATA", "alpha")], current());
    let secret = agent.secret_path();
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let private = std::fs::Permissions::from_mode(0o700);
    std::fs::set_permissions(secret.parent().unwrap(), private).unwrap();
    common::write_secret(&secret, &"ab".repeat(32));
    let started = Instant::now();
    agent.start();
    let said = "the broker runs another hakobu release (this agent speaks protocol version 2); run the same release on the broker and its agents";
    wait_for(&[&agent], "this release's agent to say why", || {
        agent.log().contains(said)
    });
    let new_refused = started.elapsed();
    let _ = old_broker.kill();
    let _ = old_broker.wait();
    figures(&format!(
        "upgrade[embedded broker]: an agent of the previous release refused by this release's broker in {:.1}s (\"{refused}\"), this release's agent by the previous release's broker in {:.1}s (\"{said}\")",
        old_refused.as_secs_f64(),
        new_refused.as_secs_f64()
    ));
}

/// The test cluster, in a virtual host of this run's own. Release 0.1
/// declares the dead-letter queue without the bound this release gives it,
/// and RabbitMQ refuses a declaration that differs from the queue's
/// (PRECONDITION_FAILED): an agent of release 0.1 cannot work where this
/// release declared that queue first, as the suites before this one do on
/// `/`. In a real upgrade the older agents were there first, and this
/// release uses their queue as it is (it says so); here too, in a vhost
/// where the 0.1 agents start first.
fn cluster_broker() -> String {
    static VHOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let vhost = VHOST.get_or_init(|| {
        let v = format!("hakobu-upgrade-{}", std::process::id());
        cluster(&["ctl", "1", "add_vhost", &v]);
        let user = url_user(&amqp_urls()[0]);
        cluster(&[
            "ctl",
            "1",
            "set_permissions",
            "-p",
            &v,
            &user,
            ".*",
            ".*",
            ".*",
        ]);
        v
    });
    let urls: Vec<String> = amqp_urls()
        .iter()
        .map(|u| {
            let at = u.rfind('@').map_or(0, |i| i + 1);
            let base = match u[at..].find('/') {
                Some(slash) => &u[..at + slash],
                None => u.as_str(),
            };
            format!("\"{base}/{vhost}\"")
        })
        .collect();
    format!(
        "broker:\n  rabbitmq:\n    urls: [ {} ]\n    confirm_timeout: 20s\n    verify_sender: false\n",
        urls.join(", ")
    )
}

/// The user of an `amqp://user:password@host/vhost` URL (percent-decoded
/// only as far as the test cluster's names need).
fn url_user(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let creds = rest.rsplit_once('@').map_or("", |(c, _)| c);
    creds.split(':').next().unwrap_or("").replace("%2D", "-")
}
