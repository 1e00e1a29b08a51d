//! Compression (`compress: zstd` on a send profile, issue 13 item 4) against
//! the real binary, on the embedded broker (a `hakobu broker` process) and on
//! the real three-node RabbitMQ cluster. A compressible CSV (many chunks, and
//! a small one that travels in a batch) and an incompressible file arrive
//! byte for byte; history's `wire_bytes` shows the CSV smaller on the wire on
//! both sides and the incompressible file at its size. With `encrypt: true`
//! too, chunks are compressed, then sealed, and still arrive. The receiver
//! has no setting for any of it. Refusals of chunks that inflate wrong are in
//! tests/bad_input.rs.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{BrokerProcess, Pair, PairOpts, bin, drop_file, rabbit_broker, write_pattern};

const WAIT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Embedded,
    Rabbit,
}

fn csv(rows: usize) -> Vec<u8> {
    let mut out = b"id,date,branch,amount,status\n".to_vec();
    for i in 0..rows {
        out.extend(
            format!(
                "{i},2026-12-{:02},branch-{:03},{}.{:02},settled\n",
                1 + i % 28,
                i % 211,
                (i * 7919) % 100_000,
                i % 100
            )
            .into_bytes(),
        );
    }
    out
}

/// A pair on the broker of `kind`; the broker process (if any) is returned
/// so that it lives as long as the pair.
fn pair(kind: Kind, dir: &Path, send_extra: &str) -> (Pair, Option<BrokerProcess>) {
    let broker = (kind == Kind::Embedded).then(|| BrokerProcess::start(dir));
    let section = match &broker {
        Some(b) => b.section(),
        None => rabbit_broker(0),
    };
    let p = Pair::new(PairOpts {
        send_extra: format!("    chunk_size: 64KiB\n{send_extra}"),
        broker: Some(section),
        ..Default::default()
    });
    (p, broker)
}

fn row_of(rows: &[serde_json::Value], name: &str) -> serde_json::Value {
    rows.iter()
        .find(|r| r["file_name"] == name)
        .unwrap_or_else(|| panic!("no row for {name}: {rows:?}"))
        .clone()
}

fn wire(r: &serde_json::Value) -> u64 {
    r["wire_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no wire_bytes: {r}"))
}

fn files_arrive_and_the_csv_is_smaller_on_the_wire(kind: Kind, send_extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (mut p, _broker) = pair(kind, dir.path(), send_extra);
    if send_extra.contains("encrypt") {
        give_keys(&p);
    }
    p.start();
    let big = csv(60_000);
    let small = csv(300);
    let originals = dir.path().join("orig");
    fs::create_dir_all(&originals).unwrap();
    write_pattern(&originals.join("random.bin"), 700 * 1024 + 17, 5);
    let random = fs::read(originals.join("random.bin")).unwrap();
    drop_file(&p.outbox, "ledger.csv", |f| fs::write(f, &big).unwrap());
    drop_file(&p.outbox, "small.csv", |f| fs::write(f, &small).unwrap());
    drop_file(&p.outbox, "random.bin", |f| fs::write(f, &random).unwrap());
    p.wait_sent(3, WAIT);
    for (name, data) in [
        ("ledger.csv", &big),
        ("small.csv", &small),
        ("random.bin", &random),
    ] {
        assert_eq!(
            &fs::read(p.inbox.join(name)).unwrap(),
            data,
            "{name} did not arrive byte for byte"
        );
    }
    let sent = p.alpha.history();
    let got = p.beta.history();
    for name in ["ledger.csv", "small.csv"] {
        let (s, r) = (row_of(&sent, name), row_of(&got, name));
        let size = s["size"].as_u64().unwrap();
        assert!(
            wire(&s) * 3 < size,
            "{name}: {} bytes on the wire for {size}: {s}",
            wire(&s)
        );
        assert!(wire(&r) > 0 && wire(&r) <= wire(&s), "{name}: {r} vs {s}");
    }
    let (s, r) = (row_of(&sent, "random.bin"), row_of(&got, "random.bin"));
    let overhead = if send_extra.contains("encrypt") {
        40 * 11
    } else {
        0
    };
    assert_eq!(
        wire(&r),
        random.len() as u64 + overhead,
        "an incompressible file travels as it is: {r}"
    );
    assert!(wire(&s) >= wire(&r), "{s}");
    // The text history shows the column too.
    let out = Command::new(bin())
        .args(["history", "-c"])
        .arg(&p.beta.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().next().unwrap_or("").contains("WIRE"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("ledger.csv")
            && l.contains(&format!(" {} ", wire(&row_of(&got, "ledger.csv"))))),
        "{text}"
    );
}

/// Keys for `encrypt: true`: beta's private key, alpha's copy of its
/// public key (`hakobu keygen`).
fn give_keys(p: &Pair) {
    let key = p.beta.dir.join("node.key");
    let out = Command::new(bin())
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let append = |path: &Path, text: String| {
        let mut yaml = fs::read_to_string(path).unwrap();
        yaml.push_str(&text);
        fs::write(path, yaml).unwrap();
    };
    append(
        &p.alpha.config,
        format!("keys:\n  peers:\n    {}: \"{public}\"\n", p.beta.node),
    );
    append(
        &p.beta.config,
        format!("keys: {{ private_key_file: {} }}\n", key.display()),
    );
}

#[test]
fn compression_on_the_embedded_broker() {
    files_arrive_and_the_csv_is_smaller_on_the_wire(Kind::Embedded, "    compress: zstd\n");
}

#[test]
fn compression_on_the_cluster() {
    files_arrive_and_the_csv_is_smaller_on_the_wire(Kind::Rabbit, "    compress: { zstd: 9 }\n");
}

#[test]
fn compression_and_encryption_on_the_embedded_broker() {
    files_arrive_and_the_csv_is_smaller_on_the_wire(
        Kind::Embedded,
        "    compress: zstd\n    encrypt: true\n",
    );
}

#[test]
fn compression_and_encryption_on_the_cluster() {
    files_arrive_and_the_csv_is_smaller_on_the_wire(
        Kind::Rabbit,
        "    compress: zstd\n    encrypt: true\n",
    );
}

#[test]
fn a_bad_compress_setting_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    for (value, says) in [
        ("gzip", "not a compression"),
        ("{ zstd: 30 }", "between 1"),
        ("{ zstd: 0 }", "between 1"),
    ] {
        let yaml = format!(
            "node: a\nstate_dir: {d}/s\nbroker:\n  embedded: {{ listen: \"127.0.0.1:0\" }}\nsend:\n  - file_id: X\n    outbox: {d}/out\n    to: [ b ]\n    compress: {value}\n",
            d = dir.path().display()
        );
        let cfg = dir.path().join("a.yaml");
        fs::write(&cfg, yaml).unwrap();
        let out = Command::new(bin())
            .args(["check", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: accepted");
        assert!(
            err.contains(says) && err.contains("compress") && err.contains(":9"),
            "{value}: {err}"
        );
    }
}
