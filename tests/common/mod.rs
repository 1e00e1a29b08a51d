//! Test harness: real `hakobu` agents as child processes, real files, real
//! hooks, and the real three-node RabbitMQ cluster that `tests/run.sh` starts
//! (its URLs in `HAKOBU_TEST_AMQP_URLS`). Each test uses node names of its
//! own, so tests share the cluster without seeing each other's queues.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub mod attacker;
pub mod broker;
pub mod fault;
pub mod forge;
pub mod http;
pub mod rabbit;
pub mod rogue;
pub mod tmpfs;
pub mod webdriver;

#[allow(unused_imports)]
pub use broker::{BrokerProcess, node_secret, write_secret};
#[allow(unused_imports)]
pub use rabbit::{amqps_urls, client_cert, node_broker, node_urls, node_users};

/// The cluster's AMQP URLs. A test that needs the cluster and finds none fails:
/// a suite that silently checks nothing is worse than a red one.
pub fn amqp_urls() -> Vec<String> {
    three_urls("HAKOBU_TEST_AMQP_URLS", "the three cluster nodes")
}

/// The three comma-separated URLs in the environment variable `var`
/// (tests/run.sh exports them); a test that finds none fails, naming `what`.
pub fn three_urls(var: &str, what: &str) -> Vec<String> {
    let urls: Vec<String> = std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(
        urls.len(),
        3,
        "{var} must list {what}: run the tests with tests/run.sh"
    );
    urls
}

/// A node name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_hakobu")
}

/// Polls `f` every 50 ms until it holds; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Writes `size` bytes of a deterministic, incompressible pattern.
pub fn write_pattern(path: &Path, size: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::File::create(path).unwrap());
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = size;
    let mut buf = [0u8; 8192];
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// Drops a file into an outbox the way users should: written elsewhere, then
/// renamed in, so that it is complete when it appears.
pub fn drop_file(outbox: &Path, name: &str, write: impl FnOnce(&Path)) -> PathBuf {
    fs::create_dir_all(outbox).unwrap();
    let tmp = outbox.join(format!(".{name}.writing"));
    write(&tmp);
    let dst = outbox.join(name);
    fs::rename(&tmp, &dst).unwrap();
    dst
}

/// A hook script that records each run: one line `TRANSFER_ID EVENT` in
/// `runs.log`, and the full HAKOBU_* environment in `<transfer>.<event>.env`.
pub fn recording_hook(dir: &Path, name: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    let script = format!(
        "#!/bin/sh\n\
         out={dir}\n\
         env | grep '^HAKOBU_' | sort > \"$out/$HAKOBU_TRANSFER_ID.$HAKOBU_EVENT.env\"\n\
         printf '%s\\n' \"$@\" > \"$out/$HAKOBU_TRANSFER_ID.$HAKOBU_EVENT.args\"\n\
         echo \"$HAKOBU_TRANSFER_ID $HAKOBU_EVENT\" >> \"$out/runs.log\"\n\
         if [ -n \"${{HOOK_SLEEP:-}}\" ]; then sleep \"$HOOK_SLEEP\"; fi\n\
         exit \"${{HOOK_EXIT:-0}}\"\n",
        dir = dir.display()
    );
    fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Lines of a recording hook's `runs.log`.
pub fn hook_runs(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("runs.log"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// The `HAKOBU_*` environment a recording hook saw.
pub fn hook_env(dir: &Path, transfer_id: &str, event: &str) -> BTreeMap<String, String> {
    let text =
        fs::read_to_string(dir.join(format!("{transfer_id}.{event}.env"))).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One agent process with its own directory and configuration.
pub struct Agent {
    pub node: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    child: Option<Child>,
    extra_env: Vec<(String, String)>,
    /// The network namespace it runs in (`ip netns exec`, which execs: the
    /// child's pid is the agent's).
    netns: Option<String>,
    /// The `hakobu` binary it runs (this build's unless a test says:
    /// tests/upgrade.rs runs the previous release's).
    program: PathBuf,
}

impl Agent {
    /// Writes `yaml` as the agent's configuration (in `dir`) without starting it.
    pub fn new(node: &str, dir: &Path, yaml: &str) -> Agent {
        fs::create_dir_all(dir).unwrap();
        let config = dir.join(format!("{node}.yaml"));
        fs::write(&config, yaml).unwrap();
        Agent {
            node: node.to_string(),
            dir: dir.to_path_buf(),
            config,
            child: None,
            extra_env: Vec::new(),
            netns: None,
            program: PathBuf::from(bin()),
        }
    }

    /// Runs the agent in network namespace `ns` from its next start.
    pub fn set_netns(&mut self, ns: &str) {
        self.netns = Some(ns.to_string());
    }

    /// Runs `program` instead of this build's binary, from the next start
    /// (and for `cli`): an upgrade is a restart onto another binary.
    pub fn set_program(&mut self, program: &Path) {
        self.program = program.to_path_buf();
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.extra_env.push((k.to_string(), v.to_string()));
        self
    }

    /// Starts the agent and waits until it is up: it holds its state
    /// directory and consumes its queue.
    pub fn start(&mut self) -> &mut Self {
        let started_before = self.log().matches("Agent running.").count();
        self.spawn();
        wait_until(Duration::from_secs(60), "the agent to start", || {
            self.log().matches("Agent running.").count() > started_before
        });
        self
    }

    /// Starts the agent without waiting for it to be up.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent {} already running", self.node);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.node)))
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.arg("run")
            .arg("-c")
            .arg(&self.config)
            .current_dir(&self.dir);
        cmd.env("HAKOBU_LOG", "info,lapin=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.enrol();
        self.child = Some(cmd.spawn().expect("start hakobu run"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// A value of the configuration's top level (`node`, `state_dir`).
    fn top_level(&self, key: &str) -> Option<String> {
        let yaml = fs::read_to_string(&self.config).ok()?;
        yaml.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(|v| v.trim().trim_matches('"').to_string())
    }

    /// Where the agent keeps its secret for the embedded broker by default.
    pub fn secret_path(&self) -> PathBuf {
        let state = self.top_level("state_dir").expect("a state_dir line");
        self.dir.join(state).join("broker.secret")
    }

    /// An agent that connects to a `hakobu broker` this test started gets
    /// its credentials from that broker, as an operator would with
    /// `hakobu broker add-node`, unless it has a secret already.
    fn enrol(&self) {
        let yaml = fs::read_to_string(&self.config).unwrap_or_default();
        let Some(node) = self.top_level("node") else {
            return;
        };
        let brokers = broker::BROKERS.lock().unwrap_or_else(|p| p.into_inner());
        for (addr, data) in brokers.iter() {
            if !yaml.contains(&format!("connect: \"{addr}\"")) {
                continue;
            }
            let path = self.secret_path();
            if path.exists() {
                return;
            }
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            let secret = node_secret(data, &node);
            write_secret(&path, &secret);
        }
    }

    /// `kill -9` by pid, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }

    /// SIGTERM by pid, and waits for the agent to finish its drain and
    /// exit; panics (with its log) when it is still running after 60 s.
    pub fn term(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while matches!(c.try_wait(), Ok(None)) {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "agent {} still running 60 s after SIGTERM:\n{}",
                    self.node,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process runs (it exits on a fatal error).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where its stdout and stderr go.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.log", self.node))
    }

    /// Runs a `hakobu` subcommand against this agent's configuration; one
    /// still running after `CLI_LIMIT` (a `send --wait` whose receipt never
    /// comes) is killed and the test fails, naming it, instead of hanging CI.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(&self.program);
        cmd.arg(args[0])
            .arg("-c")
            .arg(&self.config)
            .args(&args[1..])
            .current_dir(&self.dir);
        output_within(
            &mut cmd,
            CLI_LIMIT,
            &format!("{}'s hakobu {args:?}", self.node),
        )
    }

    /// History rows (`hakobu history --json`).
    pub fn history(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["history", "--limit", "100000", "--json"]);
        assert!(
            out.status.success(),
            "history failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("history JSON line"))
            .collect()
    }

    /// History rows in a given status.
    pub fn with_status(&self, status: &str) -> Vec<serde_json::Value> {
        self.history()
            .into_iter()
            .filter(|r| r["status"] == status)
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The `broker:` section for the test cluster, URLs starting at node `first` (0-based).
pub fn rabbit_broker(first: usize) -> String {
    let urls = amqp_urls();
    let ordered: Vec<String> = (0..3)
        .map(|i| format!("\"{}\"", urls[(first + i) % 3]))
        .collect();
    // One broker user (`hakobu`) for every test's nodes: names unique per
    // test cost no user each. tests/security_rabbitmq.rs uses node users.
    format!(
        "broker:\n  rabbitmq:\n    urls: [ {} ]\n    confirm_timeout: 20s\n    verify_sender: false\n",
        ordered.join(", ")
    )
}

/// The cluster control script, with the environment tests/run.sh exported.
pub fn cluster(args: &[&str]) -> String {
    let script = std::env::var("HAKOBU_RMQ_CLUSTER").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/rabbitmq/local-cluster.sh"
        )
        .to_string()
    });
    let out = Command::new(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run local-cluster.sh");
    assert!(
        out.status.success(),
        "local-cluster.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A sender/receiver pair on the test cluster, in one temporary directory.
pub struct Pair {
    pub tmp: tempfile::TempDir,
    pub alpha: Agent,
    pub beta: Agent,
    pub outbox: PathBuf,
    pub inbox: PathBuf,
    pub hooks: PathBuf,
    pub file_id: String,
}

/// Options for [`Pair::new`]: extra YAML lines for the send and receive profiles.
#[derive(Default)]
pub struct PairOpts {
    pub send_extra: String,
    pub receive_extra: String,
    /// The first URL each agent tries (0-based), to control which node it uses.
    pub alpha_first: usize,
    pub beta_first: usize,
    /// The send profile's `ready:` value; default `{ stable_for: 300ms }`.
    pub ready: Option<String>,
    /// The whole `broker:` section for both agents; default the test cluster.
    pub broker: Option<String>,
}

impl Pair {
    pub fn new(opts: PairOpts) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let a = unique("alpha");
        let b = unique("beta");
        let file_id = "DATA".to_string();
        let hooks = root.join("hooks");
        let hook = recording_hook(&hooks, "hook.sh");
        let outbox = root.join("alpha/outbox");
        let inbox = root.join("beta/inbox");
        let alpha_yaml = format!(
            "node: {a}\nstate_dir: {root}/alpha/state\n{broker}send:\n  - file_id: {file_id}\n    outbox: {outbox}\n    to: [ {b} ]\n    ready: {ready}\n    on_success: [ \"{hook}\", \"{{file_name}}\" ]\n    on_failure: [ \"{hook}\", \"{{file_name}}\" ]\n{extra}",
            root = root.display(),
            broker = opts
                .broker
                .clone()
                .unwrap_or_else(|| rabbit_broker(opts.alpha_first)),
            outbox = outbox.display(),
            hook = hook.display(),
            extra = opts.send_extra,
            ready = opts.ready.as_deref().unwrap_or("{ stable_for: 300ms }"),
        );
        let beta_yaml = format!(
            "node: {b}\nstate_dir: {root}/beta/state\n{broker}receive:\n  - file_id: {file_id}\n    from: [ {a} ]\n    inbox: {inbox}\n    on_success: {{ run: [ \"{hook}\", \"{{path}}\" ], timeout: 5m }}\n    on_failure: [ \"{hook}\", \"{{file_name}}\" ]\n{extra}",
            root = root.display(),
            broker = opts
                .broker
                .clone()
                .unwrap_or_else(|| rabbit_broker(opts.beta_first)),
            inbox = inbox.display(),
            hook = hook.display(),
            extra = opts.receive_extra,
        );
        let alpha = Agent::new(&a, &root.join("alpha"), &alpha_yaml);
        let beta = Agent::new(&b, &root.join("beta"), &beta_yaml);
        Pair {
            tmp,
            alpha,
            beta,
            outbox,
            inbox,
            hooks,
            file_id,
        }
    }

    pub fn start(&mut self) {
        self.beta.start();
        self.alpha.start();
    }

    /// Waits until `n` transfers are `sent` on alpha, failing fast if any fails.
    pub fn wait_sent(&self, n: usize, limit: Duration) {
        wait_until(limit, &format!("{n} transfers sent"), || {
            let h = self.alpha.history();
            let failed: Vec<_> = h
                .iter()
                .filter(|r| {
                    r["status"] != "sent"
                        && r["status"].as_str().is_some_and(|s| s.contains("fail"))
                })
                .collect();
            assert!(
                failed.is_empty(),
                "a transfer failed: {failed:?}\nalpha log:\n{}\nbeta log:\n{}",
                self.alpha.log(),
                self.beta.log()
            );
            h.iter().filter(|r| r["status"] == "sent").count() >= n
        });
    }

    /// Files under the inbox (not the partial directory), by name.
    pub fn inbox_files(&self) -> Vec<String> {
        visible_names(&self.inbox)
    }
}

/// The names in `dir`, sorted (none when it does not exist).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The names in `dir` that are not hidden, sorted.
pub fn visible_names(dir: &Path) -> Vec<String> {
    let mut names = dir_names(dir);
    names.retain(|n| !n.starts_with('.'));
    names
}

/// How long one `hakobu` command of a test may run.
pub const CLI_LIMIT: Duration = Duration::from_secs(300);

/// `cmd.output()`, but a command still running after `limit` is killed
/// (by its `Child`, before it is reaped) and the test panics with what it
/// printed so far.
pub fn output_within(cmd: &mut Command, limit: Duration, what: &str) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hakobu");
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for hakobu") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (out.join().unwrap(), err.join().unwrap());
            panic!(
                "{what} still running after {limit:?}, killed:\n{}{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs `cmd` (a command that must refuse to start) and returns its
/// stderr: panics, naming `what`, if it is still running after 20 s or
/// exits 0.
pub fn must_refuse_to_start(cmd: &mut Command, what: &str) -> String {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} started");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{what}: exited 0: {err}");
    err
}
