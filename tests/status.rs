//! `hakobu status -c FILE` against a running agent (hosting the embedded
//! broker): a transfer in flight with its progress, the same transfer then
//! waiting for the receipt of a node that is not running, and a transfer
//! failed (`file_exists`) with its code and sentence; `--json` and text.

mod common;

use std::fs;
use std::time::Duration;

use common::http::free_port;
use common::{Agent, bin, drop_file, unique, wait_until, write_pattern};
use serde_json::Value;

fn status_json(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn status_text(agent: &Agent) -> String {
    let out = agent.cli(&["status"]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rows<'a>(v: &'a Value, list: &str) -> &'a Vec<Value> {
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no list `{list}` in {v}"))
}

#[test]
fn status_shows_in_flight_awaiting_receipt_and_failed_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let node = unique("st");
    let absent = unique("gone");
    let port = free_port();
    let yaml = format!(
        r#"node: {node}
state_dir: state
broker:
  embedded: {{ listen: "127.0.0.1:{port}" }}
send:
  - file_id: SLOW
    outbox: out-slow
    to: [ {absent} ]
    ready: {{ stable_for: 200ms }}
    bandwidth: 128KiB/s
    chunk_size: 64KiB
  - file_id: DUP
    outbox: out-dup
    to: [ {node} ]
    ready: {{ stable_for: 200ms }}
receive:
  - file_id: DUP
    from: [ {node} ]
    inbox: inbox
    mode: new
"#
    );
    let mut agent = Agent::new(&node, dir.path(), &yaml);
    agent.start();

    // In flight: 1 MiB at 128 KiB/s, to a node that never answers.
    drop_file(&dir.path().join("out-slow"), "big.bin", |p| {
        write_pattern(p, 1 << 20, 7)
    });
    let mut seen = Value::Null;
    wait_until(Duration::from_secs(60), "big.bin in flight", || {
        let v = status_json(&agent);
        let hit = rows(&v, "in_flight")
            .iter()
            .find(|r| r["file_name"] == "big.bin")
            .cloned();
        match hit {
            Some(r) => {
                seen = r;
                true
            }
            None => false,
        }
    });
    assert_eq!(seen["direction"], "send");
    assert_eq!(seen["peer"], absent.as_str());
    assert_eq!(seen["size"], 1 << 20);
    assert!(seen["done"].as_u64().unwrap() <= 1 << 20, "{seen}");
    let tid = seen["transfer_id"].as_str().unwrap().to_string();
    let text = status_text(&agent);
    let line = text
        .lines()
        .find(|l| l.contains(&tid))
        .unwrap_or_else(|| panic!("no line for {tid}:\n{text}"));
    // (It may be waiting for its receipt already, by this second look.)
    if text.contains("In flight (1):") {
        assert!(line.contains("/1048576 bytes ("), "{text}");
    }

    // Then waiting for the receipt the absent node never sends.
    wait_until(
        Duration::from_secs(120),
        "big.bin awaiting its receipt",
        || {
            rows(&status_json(&agent), "awaiting_receipt")
                .iter()
                .any(|r| r["transfer_id"] == tid.as_str())
        },
    );
    let v = status_json(&agent);
    assert!(
        rows(&v, "in_flight")
            .iter()
            .all(|r| r["transfer_id"] != tid.as_str())
    );
    let waiting = rows(&v, "awaiting_receipt")
        .iter()
        .find(|r| r["transfer_id"] == tid.as_str())
        .unwrap();
    assert!(waiting["idle_secs"].is_u64(), "{waiting}");
    assert_eq!(waiting["done"], 1 << 20);
    let text = status_text(&agent);
    assert!(text.contains("Waiting for a receipt (1):"), "{text}");
    let line = text.lines().find(|l| l.contains(&tid)).unwrap();
    assert!(
        line.contains(&format!("to {absent}")) && line.contains("  for "),
        "{line}"
    );

    // Failed: the same name twice into a `mode: new` inbox.
    let out_dup = dir.path().join("out-dup");
    drop_file(&out_dup, "day.csv", |p| fs::write(p, "1\n").unwrap());
    wait_until(Duration::from_secs(60), "the first day.csv placed", || {
        dir.path().join("inbox/day.csv").is_file()
    });
    drop_file(&out_dup, "day.csv", |p| fs::write(p, "2\n").unwrap());
    wait_until(Duration::from_secs(60), "the second day.csv failed", || {
        rows(&status_json(&agent), "failed").len() == 2
    });
    let v = status_json(&agent);
    for r in rows(&v, "failed") {
        assert_eq!(r["error_code"], "file_exists", "{r}");
        assert!(
            !r["error"].as_str().unwrap_or("").is_empty(),
            "no sentence: {r}"
        );
        assert_eq!(r["file_name"], "day.csv");
    }
    let dirs: Vec<&str> = rows(&v, "failed")
        .iter()
        .map(|r| r["direction"].as_str().unwrap())
        .collect();
    assert!(
        dirs.contains(&"send") && dirs.contains(&"receive"),
        "{dirs:?}"
    );
    assert_eq!(v["node"], node.as_str());
    assert!(
        v.get("queues").is_none(),
        "no RabbitMQ queues on the embedded broker: {v}"
    );
    let text = status_text(&agent);
    assert!(text.contains("Failed in the last 24 h (2):"), "{text}");
    assert!(text.contains("file_exists: "), "{text}");
}

#[test]
fn status_watch_refreshes_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let node = unique("sw");
    let port = free_port();
    let yaml = format!(
        "node: {node}\nstate_dir: state\nbroker:\n  embedded: {{ listen: \"127.0.0.1:{port}\" }}\nreceive:\n  - {{ file_id: W, from: [ {node} ], inbox: inbox }}\n"
    );
    let agent = Agent::new(&node, dir.path(), &yaml);
    let mut child = std::process::Command::new(bin())
        .args(["status", "-c"])
        .arg(&agent.config)
        .args(["--watch", "--interval", "100ms", "--json"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        let line = lines.next().expect("a refresh").unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["node"], node.as_str());
        assert!(v["in_flight"].is_array());
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
