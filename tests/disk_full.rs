//! Full disks beyond the inbox (issue 15): the sending agent's own disk
//! (outbox, spool and state database on one filesystem) fills while files
//! wait to be sent. Real agents on a `hakobu broker` process, a real tmpfs
//! (root: the scenario fails rather than skips without it).

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::tmpfs::Tmpfs;
use common::{
    Agent, BrokerProcess, hook_runs, recording_hook, sha256_file, wait_until, write_pattern,
};

/// Fills the filesystem of `dir` with one file until it is full; returns it.
fn fill(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    let block = vec![0x5au8; 64 << 10];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Smaller writes take the last free pages.
    while f.write_all(&[0u8; 512]).is_ok() {}
    path
}

#[test]
fn sender_disk_full_then_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let broker = BrokerProcess::start(t);
    let fs_dir = t.join("alpha/fs");
    let _tmpfs = Tmpfs::mount_or_fail(&fs_dir, "24m");
    let outbox = fs_dir.join("outbox");
    fs::create_dir_all(&outbox).unwrap();
    let hooks = t.join("hooks");
    let hook = recording_hook(&hooks, "hook.sh");
    let alpha_yaml = format!(
        "node: alpha\nstate_dir: {state}\n{broker}send:\n  - file_id: DATA\n    outbox: {outbox}\n    to: [ beta ]\n    ready: {{ done_marker: \".done\" }}\n    on_success: [ \"{hook}\" ]\n    on_failure: [ \"{hook}\" ]\n",
        state = fs_dir.join("state").display(),
        broker = broker.section(),
        outbox = outbox.display(),
        hook = hook.display(),
    );
    let inbox = t.join("inbox");
    let beta_yaml = format!(
        "node: beta\nstate_dir: state\n{broker}receive:\n  - file_id: DATA\n    from: [ alpha ]\n    inbox: {inbox}\n",
        broker = broker.section(),
        inbox = inbox.display(),
    );
    let mut alpha = Agent::new("alpha", &t.join("alpha"), &alpha_yaml);
    let mut beta = Agent::new("beta", &t.join("beta"), &beta_yaml);
    alpha.start();
    beta.start();
    let mark = |name: &str| fs::write(outbox.join(format!("{name}.done")), b"").unwrap();
    write_pattern(&outbox.join("warm.bin"), 1000, 1);
    mark("warm.bin");
    wait_until(Duration::from_secs(60), "the first file", || {
        inbox.join("warm.bin").exists()
    });

    // Files written, then the disk fills, then their markers appear.
    let names = ["a.bin", "b.bin", "c.bin"];
    for (i, n) in names.iter().enumerate() {
        write_pattern(&outbox.join(n), 2 << 20, 10 + i as u64);
    }
    let want: Vec<String> = names.iter().map(|n| sha256_file(&outbox.join(n))).collect();
    let filler = fill(&fs_dir);
    for n in names {
        mark(n);
    }
    let full_since = Instant::now();
    // The claim cannot be recorded: said with disk_full, and nothing else
    // is claimed or sent meanwhile.
    wait_until(Duration::from_secs(30), "alpha to say disk_full", || {
        alpha.log().lines().any(|l| {
            l.contains("Cannot record claimed files") && l.contains("error_code=disk_full")
        })
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        names.iter().all(|n| !inbox.join(n).exists()),
        "nothing is sent unrecorded"
    );
    let told = alpha
        .log()
        .lines()
        .filter(|l| l.contains("Cannot record claimed files"))
        .count();
    assert_eq!(told, 1, "said once, not at every try:\n{}", alpha.log());

    // Space returns: every file goes, once, without a restart.
    fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    wait_until(
        Duration::from_secs(60),
        "every file once space returns",
        || names.iter().all(|n| inbox.join(n).exists()),
    );
    let resumed = freed.elapsed();
    for (n, w) in names.iter().zip(&want) {
        assert_eq!(&sha256_file(&inbox.join(n)), w, "{n}");
    }
    wait_until(Duration::from_secs(30), "the files' success hooks", || {
        hook_runs(&hooks).len() == 1 + names.len()
    });

    // A receipt that comes while the disk is full is recorded once there is
    // room, without a reconnect.
    beta.kill9();
    write_pattern(&outbox.join("d.bin"), 1 << 20, 20);
    mark("d.bin");
    wait_until(
        Duration::from_secs(30),
        "d.bin to await its receipt",
        || !alpha.with_status("awaiting_receipt").is_empty(),
    );
    let filler = fill(&fs_dir);
    beta.start();
    wait_until(Duration::from_secs(30), "d.bin at beta", || {
        inbox.join("d.bin").exists()
    });
    std::thread::sleep(Duration::from_secs(3));
    let receipt_failed = alpha
        .log()
        .lines()
        .any(|l| l.contains("recording a receipt") && l.contains("disk_full"));
    fs::remove_file(&filler).unwrap();
    wait_until(
        Duration::from_secs(60),
        "d.bin sent and its hook run",
        || {
            alpha
                .history()
                .iter()
                .filter(|r| r["file_name"] == "d.bin")
                .all(|r| r["status"] == "sent")
                && hook_runs(&hooks).len() == 2 + names.len()
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hook_runs(&hooks).len(), 2 + names.len(), "each hook once");
    eprintln!(
        "figures: claims waited {:.1} s on a full disk, all {} sent {:.1} s after space returned; a receipt on a full disk: {}",
        (freed - full_since).as_secs_f64(),
        names.len(),
        resumed.as_secs_f64(),
        if receipt_failed {
            "refused, then recorded"
        } else {
            "recorded at once (the WAL had room)"
        }
    );
}
