//! The README's promises about the shipped configuration: every example in
//! `profiles/` validates, bad configuration is refused with exit code 2 and
//! a file:line: key message, and the quick start works with nothing but the
//! binary: a file dropped in its outbox arrives and the import hook runs.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn every_example_profile_validates() {
    let mut n = 0;
    for entry in fs::read_dir(Path::new(ROOT).join("profiles"))
        .unwrap()
        .flatten()
    {
        let out = Command::new(common::bin())
            .arg("check")
            .arg("-c")
            .arg(entry.path())
            .current_dir(ROOT)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            entry.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        n += 1;
    }
    assert!(
        n >= 3,
        "expected the quick start and the alpha/beta pair in profiles/, found {n}"
    );
}

#[test]
fn bad_configuration_exits_2_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    fs::write(&cfg, "node: a\nstate_dir: s\nbroker:\n  embedded: { listen: 127.0.0.1:7811 }\nreceive:\n  - file_id: X\n    from: [ b ]\n    inbox: in\n    mode: sideways\n").unwrap();
    let out = Command::new(common::bin())
        .arg("check")
        .arg("-c")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:9: receive[0].mode:"), "{err}");
    fs::write(&cfg, "node: a\nstate_dir: s\nbrokr: {}\n").unwrap();
    let out = Command::new(common::bin())
        .arg("run")
        .arg("-c")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.yaml:3: brokr:"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn quick_start_delivers_a_dropped_file_and_runs_the_import_hook() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    // The README's run command, from a copy of the repository's profiles and hooks.
    for sub in ["profiles", "hooks"] {
        fs::create_dir_all(work.join(sub)).unwrap();
        for e in fs::read_dir(Path::new(ROOT).join(sub)).unwrap().flatten() {
            fs::copy(e.path(), work.join(sub).join(e.file_name())).unwrap();
        }
    }
    let mut agent = common::Agent::new(
        "local",
        work,
        &fs::read_to_string(work.join("profiles/quickstart.yaml")).unwrap(),
    );
    agent.start();
    common::wait_until(Duration::from_secs(10), "the embedded broker", || {
        std::net::TcpStream::connect("127.0.0.1:7800").is_ok()
    });
    common::drop_file(&work.join("var/local/outbox"), "hello.csv", |t| {
        fs::write(t, "a,b\n1,2\n").unwrap()
    });
    common::wait_until(Duration::from_secs(30), "the import hook", || {
        work.join("var/import.log").exists()
    });
    assert_eq!(
        fs::read_to_string(work.join("var/local/inbox/hello.csv")).unwrap(),
        "a,b\n1,2\n"
    );
    let log = fs::read_to_string(work.join("var/import.log")).unwrap();
    assert!(
        log.contains("received from=local file_id=QUICKSTART") && log.contains("lines=2"),
        "{log}"
    );
    common::wait_until(Duration::from_secs(10), "after_send", || {
        work.join("var/local/sent/hello.csv").exists()
    });
    assert!(agent.alive());
}
