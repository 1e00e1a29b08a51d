//! `--log-format json` (and HAKOBU_LOG_FORMAT=json): a real transfer through
//! an agent hosting the embedded broker, sending to itself with hooks on both
//! sides; every line the agent logs parses as one JSON object, and every line
//! that names the transfer carries its id in the top-level field
//! `transfer_id`. Without the option the log stays text.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::http::free_port;
use common::{bin, drop_file, recording_hook, wait_until};

fn config(dir: &Path, port: u16) -> String {
    let hook = recording_hook(&dir.join("hooks"), "record.sh");
    format!(
        r#"node: logs
state_dir: state
broker:
  embedded: {{ listen: "127.0.0.1:{port}" }}
send:
  - file_id: LOGS
    outbox: outbox
    to: [ logs ]
    ready: {{ stable_for: 200ms }}
    after_send: keep
    on_success: [ "{hook}" ]
receive:
  - file_id: LOGS
    from: [ logs ]
    inbox: inbox
    on_success: [ "{hook}" ]
"#,
        hook = hook.display()
    )
}

fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let log = fs::File::create(dir.join("agent.log")).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .args(["run", "-c", "logs.yaml"])
        .current_dir(dir)
        .env_remove("HAKOBU_LOG_FORMAT")
        .env("HAKOBU_LOG", "info,lapin=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start hakobu run")
}

fn stop(mut child: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the agent stopped with {status}");
}

/// Runs one transfer with the agent started with `args`/`env`; returns the
/// transfer id and the agent's log.
fn one_transfer(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    fs::write(dir.path().join("logs.yaml"), config(dir.path(), port)).unwrap();
    let mut child = spawn(dir.path(), args, env);
    let log = || fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    wait_until(Duration::from_secs(60), "the agent to start", || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "agent exited:\n{}",
            log()
        );
        log().contains("Agent running.")
    });
    drop_file(&dir.path().join("outbox"), "report.csv", |p| {
        fs::write(p, "a,b\n1,2\n").unwrap()
    });
    let runs = dir.path().join("hooks/runs.log");
    wait_until(Duration::from_secs(60), "both hooks to run", || {
        assert!(
            child.try_wait().unwrap().is_none(),
            "agent exited:\n{}",
            log()
        );
        let runs = fs::read_to_string(&runs).unwrap_or_default();
        runs.contains(" received") && runs.contains(" sent")
    });
    let tid = fs::read_to_string(&runs)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    stop(child);
    (tid, log())
}

fn check_json(tid: &str, log: &str) {
    let mut about = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\nlog:\n{log}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        for key in ["timestamp", "level", "message"] {
            assert!(obj.contains_key(key), "no `{key}` in {line}");
        }
        if line.contains(tid) {
            assert_eq!(
                obj.get("transfer_id").and_then(|t| t.as_str()),
                Some(tid),
                "a line naming the transfer without it as `transfer_id`: {line}"
            );
            about.push(obj["message"].as_str().unwrap().to_string());
        }
    }
    // The flow, both sides, each line with the id.
    for message in [
        "Claimed.",
        "Published; awaiting the receipt.",
        "Receiving.",
        "Placed.",
        "Success hook finished.",
        "Receipt sent.",
        "Receipt.",
    ] {
        assert!(
            about.iter().any(|m| m == message),
            "no `{message}` line with transfer_id {tid}; lines about it: {about:?}\nlog:\n{log}"
        );
    }
}

#[test]
fn log_format_json_flag_gives_json_lines_with_the_transfer_id() {
    let (tid, log) = one_transfer(&["--log-format", "json"], &[]);
    check_json(&tid, &log);
}

#[test]
fn hakobu_log_format_env_gives_json_lines_with_the_transfer_id() {
    let (tid, log) = one_transfer(&[], &[("HAKOBU_LOG_FORMAT", "json")]);
    check_json(&tid, &log);
}

#[test]
fn default_log_stays_text() {
    let (tid, log) = one_transfer(&[], &[]);
    assert!(log.contains("Placed."), "{log}");
    for line in log.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_err(),
            "a JSON line in the default text log: {line}"
        );
    }
    let placed = log
        .lines()
        .find(|l| l.contains("Placed."))
        .unwrap_or_else(|| panic!("no Placed. line:\n{log}"));
    assert!(
        placed.contains(&format!("transfer_id={tid}")),
        "the text line names the transfer: {placed}"
    );
}

#[test]
fn an_unknown_log_format_is_a_usage_error() {
    let out = Command::new(bin())
        .args(["--log-format", "xml", "check", "-c", "none.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("text") && err.contains("json"), "{err}");
}
