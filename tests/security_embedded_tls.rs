//! TLS for the embedded broker (issue 12, item 4, embedded side): a real
//! `hakobu broker` process serving TLS with a certificate from a private CA
//! (`tests/certs.sh`, openssl), real agents trusting that CA, and clients
//! that must be refused: a plain-text one (run as `nobody` with a node's
//! real credentials, through `security_embedded/attacker.rs`), one that
//! trusts another CA, and a broker whose key file its group may read.
//! The broker listens on 127.0.0.1 only.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::attacker::open_dir;
use common::{Agent, BrokerProcess, drop_file, sha256_file, unique, wait_until, write_pattern};
use hakobu::broker::Broker;
use hakobu::broker::embedded::{Embedded, tls};

#[path = "security_embedded/attacker.rs"]
#[allow(dead_code)]
mod attacker;

const WAIT: Duration = Duration::from_secs(60);

/// A private CA and a server certificate for 127.0.0.1 in `dir`; fails
/// loudly without openssl.
fn certs(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/certs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .expect("run tests/certs.sh");
    assert!(
        out.status.success(),
        "tests/certs.sh failed (openssl is needed; tests/run.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

/// A TLS broker and agents alpha (sends DATA to beta) and beta.
struct Rig {
    tmp: tempfile::TempDir,
    certs: PathBuf,
    broker: BrokerProcess,
    alpha: String,
    beta: String,
}

impl Rig {
    fn new() -> Rig {
        let tmp = open_dir("hakobu-tls-");
        let certs = certs(&tmp.path().join("certs"));
        let (cert, key) = (certs.join("server.pem"), certs.join("server.key"));
        let broker = BrokerProcess::start_with(
            tmp.path(),
            &[
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        );
        Rig {
            tmp,
            certs,
            broker,
            alpha: unique("alpha"),
            beta: unique("beta"),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn section(&self) -> String {
        format!(
            "broker:\n  embedded: {{ connect: \"{}\", tls: {{ ca_file: \"{}\" }} }}\n",
            self.broker.addr,
            self.certs.join("ca.pem").display()
        )
    }

    fn alpha(&self) -> Agent {
        let yaml = format!(
            "node: {a}\nstate_dir: state\n{broker}send:\n  - file_id: DATA\n    outbox: {outbox}\n    to: [ {b} ]\n    ready: {{ stable_for: 200ms }}\n    after_send: delete\n",
            a = self.alpha,
            b = self.beta,
            broker = self.section(),
            outbox = self.path("outbox").display(),
        );
        Agent::new(&self.alpha, &self.path("alpha"), &yaml)
    }

    fn beta(&self) -> Agent {
        let yaml = format!(
            "node: {b}\nstate_dir: state\n{broker}receive:\n  - file_id: DATA\n    from: [ {a} ]\n    inbox: {inbox}\n",
            a = self.alpha,
            b = self.beta,
            broker = self.section(),
            inbox = self.path("inbox").display(),
        );
        Agent::new(&self.beta, &self.path("beta"), &yaml)
    }

    /// A client of the broker trusting the CA in `certs`.
    fn client(&self, node: &str, certs: &Path) -> Embedded {
        let tls = tls::Client::new(&certs.join("ca.pem"), "127.0.0.1").unwrap();
        Embedded::new(&self.broker.addr, self.broker.credentials(node), 1).with_tls(Some(tls))
    }
}

/// A file crosses the TLS broker between two agents byte for byte.
#[test]
fn a_file_crosses_the_tls_broker_byte_for_byte() {
    let rig = Rig::new();
    let mut beta = rig.beta();
    beta.start();
    let mut alpha = rig.alpha();
    alpha.start();
    // The pattern is deterministic: the same bytes written aside.
    let aside = rig.path("aside.bin");
    write_pattern(&aside, 3 << 20, 7);
    drop_file(&rig.path("outbox"), "ledger.bin", |p| {
        write_pattern(p, 3 << 20, 7)
    });
    let got = rig.path("inbox/ledger.bin");
    wait_until(WAIT, "the file in beta's inbox", || got.exists());
    assert_eq!(
        sha256_file(&got),
        sha256_file(&aside),
        "the file changed on its way"
    );
}

/// A plain-text client with a node's real credentials (run as `nobody`)
/// gets no welcome and no message: the broker speaks only TLS. Before TLS
/// the same hello was welcomed and beta's message delivered.
#[test]
fn a_plain_client_is_refused() {
    let rig = Rig::new();
    let secret = rig.broker.credentials(&rig.beta).secret;
    let steal = || {
        attacker::Attack::new("steal", &rig.broker.addr)
            .acting_as(&rig.beta, &secret)
            .set("QUEUE", &format!("hakobu.node.{}", rig.beta))
            .run()
    };
    let r = steal();
    assert_ne!(r.get("hello"), "welcome", "a plain hello was welcomed");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = rig.client(&rig.alpha, &rig.certs);
        let confirm = c.publish(&rig.beta, Bytes::from_static(b"payroll")).await;
        confirm.unwrap().await.unwrap();
        // In this process too: a plain client's publish fails.
        let plain = Embedded::new(&rig.broker.addr, rig.broker.credentials(&rig.alpha), 1);
        let e = plain
            .publish(&rig.beta, Bytes::from_static(b"forged"))
            .await
            .err()
            .expect("a plain-text publish was accepted");
        eprintln!("plain client: {e}");
    });
    let r = steal();
    assert_ne!(r.get("hello"), "welcome", "a plain hello was welcomed");
    assert_eq!(r.num("delivered"), 0, "a plain client got beta's message");
    assert_eq!(r.num("delivered_without_hello"), 0);
    // The message is still there, for beta over TLS.
    rt.block_on(async {
        let c = rig.client(&rig.beta, &rig.certs);
        let mut rx = c.subscribe(&rig.beta).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("beta's message over TLS")
            .unwrap();
        assert_eq!(&d.payload[..], b"payroll");
        d.acker.ack().await.unwrap();
    });
}

/// A client that trusts another CA refuses the broker (it could be anyone),
/// with a sentence naming its ca_file.
#[test]
fn a_client_trusting_another_ca_is_refused() {
    let rig = Rig::new();
    let other = certs(&rig.path("other-ca"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = rig.client(&rig.alpha, &other);
        let e = c
            .publish(&rig.beta, Bytes::from_static(b"payroll"))
            .await
            .err()
            .expect("a client trusting another CA published");
        let e = e.to_string();
        assert!(e.contains("ca_file"), "{e}");
        assert!(e.contains("other-ca"), "{e}");
    });
}

/// The broker refuses to start with a key file its group may read, and
/// says how to fix it.
#[test]
fn a_group_readable_tls_key_is_refused_at_start() {
    let tmp = open_dir("hakobu-tls-key-");
    let certs = certs(&tmp.path().join("certs"));
    let key = tmp.path().join("exposed.key");
    std::fs::copy(certs.join("server.key"), &key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = common::must_refuse_to_start(
        Command::new(common::bin())
            .args(["broker", "--listen", "127.0.0.1:0", "--data"])
            .arg(tmp.path().join("data"))
            .arg("--tls-cert")
            .arg(certs.join("server.pem"))
            .arg("--tls-key")
            .arg(&key),
        "the broker, with a key file its group may read,",
    );
    assert!(err.contains("chmod 600"), "{err}");
}

/// An agent hosting the broker with TLS serves it and uses it over TLS
/// itself; a node trusting the CA sends it a file byte for byte.
#[test]
fn an_agent_hosting_the_broker_with_tls_receives_a_file() {
    let tmp = open_dir("hakobu-tls-host-");
    let certs = certs(&tmp.path().join("certs"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let (hub, node) = (unique("hub"), unique("node"));
    let ca = certs.join("ca.pem").display().to_string();
    let hub_yaml = format!(
        "node: {hub}\nstate_dir: state\nbroker:\n  embedded: {{ listen: \"{addr}\", tls: {{ cert_file: \"{cert}\", key_file: \"{key}\", ca_file: \"{ca}\" }} }}\nreceive:\n  - file_id: DATA\n    from: [ {node} ]\n    inbox: {inbox}\n",
        cert = certs.join("server.pem").display(),
        key = certs.join("server.key").display(),
        inbox = tmp.path().join("inbox").display(),
    );
    let mut hub_agent = Agent::new(&hub, &tmp.path().join("hub"), &hub_yaml);
    hub_agent.start();
    let node_yaml = format!(
        "node: {node}\nstate_dir: state\nbroker:\n  embedded: {{ connect: \"{addr}\", tls: {{ ca_file: \"{ca}\" }} }}\nsend:\n  - file_id: DATA\n    outbox: {outbox}\n    to: [ {hub} ]\n    ready: {{ stable_for: 200ms }}\n    after_send: delete\n",
        outbox = tmp.path().join("outbox").display(),
    );
    let mut node_agent = Agent::new(&node, &tmp.path().join("node"), &node_yaml);
    let secret = common::node_secret(&tmp.path().join("hub/state/broker"), &node);
    let path = node_agent.secret_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    common::write_secret(&path, &secret);
    node_agent.start();
    let aside = tmp.path().join("aside.bin");
    write_pattern(&aside, 1 << 20, 3);
    drop_file(&tmp.path().join("outbox"), "report.bin", |p| {
        write_pattern(p, 1 << 20, 3)
    });
    let got = tmp.path().join("inbox/report.bin");
    wait_until(WAIT, "the file in the hub's inbox", || got.exists());
    assert_eq!(sha256_file(&got), sha256_file(&aside));
}
