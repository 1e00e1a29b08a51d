//! RabbitMQ node users for the security suite: a user per node with a
//! node's narrow permissions (`local-cluster.sh user`), the URLs and
//! `broker:` sections that log in as it, the cluster's TLS side, and the
//! agents and clients tests/security_rabbitmq.rs attacks with.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Agent, amqp_urls, cluster};
use hakobu::config::amqp_url::with_password;

pub const WAIT: Duration = Duration::from_secs(60);
pub const FILE_ID: &str = "DATA";

/// Creates a RabbitMQ user for each of `nodes` with a node's narrow
/// permissions (`local-cluster.sh user`); returns their password files.
pub fn node_users(nodes: &[&str]) -> Vec<PathBuf> {
    let mut args = vec!["user"];
    args.extend_from_slice(nodes);
    cluster(&args).lines().map(PathBuf::from).collect()
}

/// The test cluster's URLs with `user` instead of the administrator and no
/// password (the agent takes it from `password_file`), starting at `first`.
pub fn node_urls(user: &str, first: usize) -> Vec<String> {
    let urls = amqp_urls();
    (0..3)
        .map(|i| {
            let u = &urls[(first + i) % 3];
            let (scheme, rest) = u.split_once("://").unwrap();
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{user}@{host}")
        })
        .collect()
}

/// The `broker:` section for `node` logging in as its own user, password
/// from `password_file`, `verify_sender` on (the default).
pub fn node_broker(node: &str, password_file: &Path) -> String {
    let urls: Vec<String> = node_urls(node, 0)
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect();
    format!(
        "broker:\n  rabbitmq:\n    urls: [ {} ]\n    confirm_timeout: 20s\n    password_file: {}\n",
        urls.join(", "),
        password_file.display()
    )
}

/// The cluster's amqps URLs (tests/run.sh exports them), and its TLS
/// directory; a test that needs them and finds none fails.
pub fn amqps_urls() -> (Vec<String>, PathBuf) {
    let urls = super::three_urls("HAKOBU_TEST_AMQPS_URLS", "the cluster's three amqps URLs");
    let dir = PathBuf::from(std::env::var("HAKOBU_RMQ_TLS_DIR").expect(
        "HAKOBU_RMQ_TLS_DIR must name the cluster's TLS directory: run the tests with tests/run.sh",
    ));
    (urls, dir)
}

/// A client certificate and key for `node` (CN = node), signed by the
/// test CA in `tls_dir` (tests/certs.sh): `(cert, key)`.
pub fn client_cert(tls_dir: &Path, node: &str) -> (PathBuf, PathBuf) {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/certs.sh"))
        .arg(tls_dir)
        .arg(node)
        .output()
        .expect("run tests/certs.sh");
    assert!(
        out.status.success(),
        "tests/certs.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        tls_dir.join(format!("{node}.pem")),
        tls_dir.join(format!("{node}.key")),
    )
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A node's URL with its password in it, for a test-side client.
pub fn login_url(node: &str, password_file: &Path) -> String {
    let pw = fs::read_to_string(password_file).unwrap();
    with_password(&node_urls(node, 0)[0], pw.trim())
}

/// A receiving agent `b` that accepts `FILE_ID` from `from`, logging in as itself.
pub fn receiver(root: &Path, b: &str, pw: &Path, from: &str) -> Agent {
    let yaml = format!(
        "node: {b}\nstate_dir: {root}/{b}/state\n{broker}receive:\n  - file_id: {FILE_ID}\n    from: [ {from} ]\n    inbox: {root}/{b}/inbox\n",
        root = root.display(),
        broker = node_broker(b, pw),
    );
    Agent::new(b, &root.join(b), &yaml)
}

/// A sending agent: node `a` sending `FILE_ID` to `to`, with `broker` as its section.
pub fn sender(root: &Path, a: &str, broker: &str, to: &str) -> Agent {
    let yaml = format!(
        "node: {a}\nstate_dir: {root}/{a}/state\n{broker}send:\n  - file_id: {FILE_ID}\n    outbox: {root}/{a}/outbox\n    to: [ {to} ]\n    ready: {{ stable_for: 300ms }}\n",
        root = root.display(),
    );
    Agent::new(a, &root.join(a), &yaml)
}

/// `wait_until`, with the agents' logs in the failure message.
pub fn wait_for(agents: &[&Agent], what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        if start.elapsed() > WAIT {
            let logs: Vec<String> = agents
                .iter()
                .map(|a| format!("--- {} ---\n{}", a.node, a.log()))
                .collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `agent` and waits until it consumes its queue, which it declares
/// first: a node's queue exists once its agent has run (other nodes' users
/// may not create it).
pub fn start_consuming(agent: &mut Agent) {
    let before = agent.log().matches("Consuming.").count();
    agent.start();
    wait_for(&[agent], "the agent to consume its queue", || {
        agent.log().matches("Consuming.").count() > before
    });
}

pub fn outbox(root: &Path, a: &str) -> PathBuf {
    root.join(a).join("outbox")
}

/// The files in a sender's spool for `FILE_ID`.
pub fn spooled(root: &Path, a: &str) -> Vec<String> {
    super::dir_names(&root.join(a).join("state/spool").join(FILE_ID))
}

/// Runs `hakobu ARGS -c CONFIG` from `dir`: (exit code, stdout + stderr).
pub fn hakobu(dir: &Path, args: &[&str], config: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(super::bin())
        .args(args)
        .arg("-c")
        .arg(config)
        .current_dir(dir)
        .output()
        .unwrap();
    code_and_text(&out)
}

/// A command's exit code, and its stdout then stderr as one text.
pub fn code_and_text(out: &std::process::Output) -> (Option<i32>, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}
