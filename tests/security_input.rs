//! Network input that reaches hooks and terminals, attacked with the rogue
//! publisher (`common::rogue`) on the real cluster: a flood of forged
//! transfers must not become a flood of alerts; metadata and a start time
//! that would smuggle lines or terminal controls into a hook's environment
//! or `hakobu history` are refused; and the command line and `hakobu check`
//! refuse the same mistakes before anything is sent.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;

use common::rogue::*;
use common::{bin, hook_env, hook_runs, wait_until};

/// Matches `src/receiver/alert_limit.rs`: failure hooks of refused
/// transfers per minute.
const ALERTS_PER_MINUTE: usize = 10;

/// A node may not send this profile's files; it sends many anyway. Every
/// transfer is refused, recorded and answered, but the failure hook (the
/// operator's alert) runs a bounded number of times and the log says how
/// many were suppressed. Without the limit, each forged message started one
/// hook process.
#[test]
fn a_flood_of_refused_transfers_runs_a_bounded_number_of_alerts() {
    let mut rig = Rig::new();
    let from = rig.other_sender.clone();
    rig.listen_as(&from);
    let flood = 4 * ALERTS_PER_MINUTE;
    let mut tids = Vec::new();
    for i in 0..flood {
        let tid = new_tid();
        let body = format!("forged {i}\n").into_bytes();
        rig.inject_chunk(rig.header(&from, &tid, &format!("f{i}.txt"), &body), &body);
        tids.push(tid);
    }
    for tid in &tids {
        rig.expect_failed_row(&from, tid, "sender_not_allowed");
        let r = rig.receipt(&from, tid);
        assert_eq!(r.error_code.as_deref(), Some("sender_not_allowed"));
    }
    wait_until(WAIT, "the suppressed alerts to be logged", || {
        rig.agent.log().contains("alerts_suppressed")
    });
    let runs = hook_runs(&rig.hooks);
    assert_eq!(
        runs.len(),
        ALERTS_PER_MINUTE,
        "failure hooks of a flood of {flood} refused transfers: {runs:?}"
    );
    assert!(
        runs.iter().all(|l| l.ends_with(" receive_failed")),
        "{runs:?}"
    );
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

/// Metadata becomes `HAKOBU_META_*` variables. A value with a newline
/// smuggles a line into every consumer of the environment (the recording
/// hook here writes `env` to a file, as a hook that logs its context does);
/// two keys that differ in case fight over one variable. Both are refused
/// with `bad_metadata`, and the failure hook sees none of the metadata.
#[test]
fn metadata_that_would_break_the_hook_environment_is_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let cases: [BTreeMap<String, String>; 4] = [
        BTreeMap::from([("note".into(), "x\nHAKOBU_PATH=/etc/shadow".into())]),
        BTreeMap::from([("batch".into(), "1".into()), ("BATCH".into(), "2".into())]),
        BTreeMap::from([("a-b".into(), "1".into())]),
        BTreeMap::from([("title".into(), "\u{1b}]0;pwned\u{7}".into())]),
    ];
    let mut tids = Vec::new();
    for (i, meta) in cases.iter().enumerate() {
        let tid = new_tid();
        let body = format!("meta {i}\n").into_bytes();
        let mut h = rig.header(&from, &tid, &format!("m{i}.txt"), &body);
        h.last.as_mut().unwrap().meta = meta.clone();
        rig.inject_chunk(h, &body);
        tids.push(tid);
    }
    for tid in &tids {
        rig.expect_refused(&from, tid, "bad_metadata", true);
        let env = hook_env(&rig.hooks, tid, "receive_failed");
        assert_eq!(
            env.get("HAKOBU_PATH").map(String::as_str),
            Some(""),
            "{env:?}"
        );
        assert!(
            !env.keys().any(|k| k.starts_with("HAKOBU_META_")),
            "refused metadata reached the hook: {env:?}"
        );
    }
    // Good metadata still travels.
    let tid = new_tid();
    let body = b"good meta\n".to_vec();
    let mut h = rig.header(&from, &tid, "good-meta.txt", &body);
    h.last.as_mut().unwrap().meta = BTreeMap::from([("batch_no".into(), "7".into())]);
    rig.inject_chunk(h, &body);
    assert_eq!(rig.final_row(&tid)["status"], "received");
    let env = hook_env(&rig.hooks, &tid, "received");
    assert_eq!(
        env.get("HAKOBU_META_BATCH_NO").map(String::as_str),
        Some("7")
    );
    rig.placed.push("good-meta.txt".into());
    let refused: Vec<&str> = tids.iter().map(String::as_str).collect();
    rig.finish(&refused);
}

/// The start time travels from the sender's clock into history and into
/// `HAKOBU_STARTED_AT`: text that is not a timestamp is refused.
#[test]
fn a_start_time_that_is_not_a_timestamp_is_refused() {
    let mut rig = Rig::new();
    let from = rig.allowed.clone();
    rig.listen_as(&from);
    let tid = new_tid();
    let body = b"clock\n".to_vec();
    let mut h = rig.header(&from, &tid, "clock.txt", &body);
    h.last.as_mut().unwrap().started_at = "2026-01-01\u{1b}[2J\nHAKOBU_X=1".into();
    rig.inject_chunk(h, &body);
    rig.expect_refused(&from, &tid, "inconsistent_chunk", true);
    let row = rig.final_row(&tid);
    assert!(
        !row["started_at"].as_str().unwrap_or("").contains('\u{1b}'),
        "{row}"
    );
    rig.finish(&[&tid]);
}

/// The same rules hold before anything is sent: `hakobu send --meta` and
/// `hakobu check` refuse, with exit code 2 and a sentence.
#[test]
fn the_command_line_refuses_unsafe_metadata_and_quoted_shell_placeholders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let config = |on_success: &str| {
        format!(
            "node: alpha\nstate_dir: {root}/state\nbroker:\n  embedded: {{ listen: \"127.0.0.1:0\" }}\nsend:\n  - file_id: DATA\n    outbox: {root}/outbox\n    to: [ beta ]\nreceive:\n  - file_id: BACK\n    from: [ beta ]\n    inbox: {root}/inbox\n    on_success: {on_success}\n",
            root = root.display()
        )
    };
    let file = root.join("alpha.yaml");
    let data = root.join("data.txt");
    fs::write(&data, "x\n").unwrap();
    fs::write(&file, config("[ \"/bin/true\", \"{path}\" ]")).unwrap();
    for meta in ["note=a\nb", "batch=1", "a-b=1", "t=\u{202E}x"] {
        let mut args = vec!["send", "-c", file.to_str().unwrap(), "--file-id", "DATA"];
        args.extend(["--meta", meta]);
        if meta == "batch=1" {
            args.extend(["--meta", "BATCH=2"]);
        }
        args.push(data.to_str().unwrap());
        let out = Command::new(bin()).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--meta {meta:?}: {stderr}");
        assert!(stderr.contains("--meta"), "{stderr}");
    }
    fs::write(
        &file,
        config("{ run: [ \"echo 'got {file_name}' >> log\" ], shell: true }"),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["check", "-c", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("receive[0].on_success") && stderr.contains("inside quotes"),
        "{stderr}"
    );
}
