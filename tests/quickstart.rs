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

/// A copy of the repository's `profiles/` and `hooks/` in `work`, with the
/// password files the RabbitMQ profiles name (from `secrets`, or made up).
fn copy_profiles(work: &Path, secrets: Option<&Path>) {
    for sub in ["profiles", "hooks"] {
        fs::create_dir_all(work.join(sub)).unwrap();
        for e in fs::read_dir(Path::new(ROOT).join(sub)).unwrap().flatten() {
            fs::copy(e.path(), work.join(sub).join(e.file_name())).unwrap();
        }
    }
    let dir = work.join("var/rabbitmq");
    fs::create_dir_all(&dir).unwrap();
    for node in ["alpha", "beta"] {
        let file = dir.join(format!("{node}.password"));
        match secrets {
            Some(s) => {
                fs::copy(s.join(format!("{node}.password")), &file).unwrap();
            }
            None => fs::write(&file, "not-a-real-password\n").unwrap(),
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    }
}

#[test]
fn every_example_profile_validates() {
    let dir = tempfile::tempdir().unwrap();
    copy_profiles(dir.path(), None);
    let mut n = 0;
    for entry in fs::read_dir(dir.path().join("profiles")).unwrap().flatten() {
        let out = Command::new(common::bin())
            .arg("check")
            .arg("-c")
            .arg(entry.path())
            .current_dir(dir.path())
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

/// The two-node example as README tells it: `local-cluster.sh up` made the
/// users `alpha` and `beta` (tests/run.sh's cluster did, their passwords in
/// `$HAKOBU_RMQ_BASE/secrets`), and profiles/alpha.yaml and beta.yaml, as
/// shipped but for the cluster's ports, carry a file from alpha to beta
/// with `verify_sender` on.
#[test]
fn two_node_profiles_deliver_through_the_cluster_as_their_own_users() {
    let urls = common::amqp_urls();
    let base = std::env::var("HAKOBU_RMQ_BASE")
        .expect("HAKOBU_RMQ_BASE names the test cluster: run the tests with tests/run.sh");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    copy_profiles(work, Some(&Path::new(&base).join("secrets")));
    let port = |u: &str| {
        u.rsplit_once(':')
            .unwrap()
            .1
            .split('/')
            .next()
            .unwrap()
            .to_string()
    };
    let mut agents = Vec::new();
    for node in ["beta", "alpha"] {
        let mut yaml = fs::read_to_string(work.join(format!("profiles/{node}.yaml"))).unwrap();
        for (i, default) in ["5672", "5673", "5674"].iter().enumerate() {
            yaml = yaml.replace(
                &format!("127.0.0.1:{default}/"),
                &format!("127.0.0.1:X{}/", port(&urls[i])),
            );
        }
        yaml = yaml.replace("127.0.0.1:X", "127.0.0.1:");
        assert!(
            !yaml.contains("verify_sender:"),
            "the example relies on the default"
        );
        let mut agent = common::Agent::new(node, work, &yaml);
        agent.start();
        agents.push(agent);
    }
    let name = format!("sales-{}.csv", std::process::id());
    common::drop_file(&work.join("var/alpha/outbox/sales"), &name, |t| {
        fs::write(t, "a,b\n1,2\n").unwrap()
    });
    let placed = work.join("var/beta/inbox/sales").join(&name);
    common::wait_until(Duration::from_secs(60), "the file in beta's inbox", || {
        placed.exists()
    });
    assert_eq!(fs::read_to_string(&placed).unwrap(), "a,b\n1,2\n");
    common::wait_until(Duration::from_secs(30), "alpha's receipt", || {
        work.join("var/alpha/sent").join(&name).exists()
    });
    for a in &mut agents {
        assert!(a.alive(), "{} died:\n{}", a.node, a.log());
        assert!(!a.log().contains("sender_mismatch"), "{}", a.log());
    }
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
    copy_profiles(work, None);
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
