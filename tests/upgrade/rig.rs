//! The rig of `tests/upgrade.rs`: the previous release's binary (built once
//! by `tests/previous-release.sh`), agents on the test cluster configured in
//! YAML that both releases read, their history read through their own
//! binary (a newer one would migrate an older agent's database under it),
//! hook runs counted per transfer, and files checked byte for byte.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Agent, bin, hook_runs, recording_hook, sha256_file};

pub const WAIT: Duration = Duration::from_secs(120);
/// Chunks small enough that a few MiB make a multi-chunk transfer.
pub const CHUNK: &str = "256KiB";

/// The previous release's `hakobu`: `HAKOBU_PREVIOUS_BIN` (tests/run.sh
/// builds it before the cluster starts), or built now. A clone without that
/// commit fails here, loudly: the suite cannot run without it.
pub fn previous() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = match std::env::var_os("HAKOBU_PREVIOUS_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let out = Command::new(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/previous-release.sh"
                ))
                .stderr(Stdio::inherit())
                .output()
                .expect("run tests/previous-release.sh");
                assert!(
                    out.status.success(),
                    "tests/previous-release.sh could not provide the previous release (see above)"
                );
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        // Release 0.1 has no `hakobu status`: a binary that has one is not it.
        let status = Command::new(&bin)
            .args(["status", "--help"])
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
        assert!(
            !status.status.success(),
            "{} knows `hakobu status`: it is not release 0.1",
            bin.display()
        );
        bin
    })
}

/// This build's binary.
pub fn current() -> &'static Path {
    Path::new(bin())
}

pub fn figures(line: &str) {
    // Straight to stderr: the harness captures print! of passing tests.
    let _ = writeln!(std::io::stderr(), "figures: {line}");
}

/// Agents in one directory, sharing one recording hook and a `broker:`
/// section; each node's outboxes and inboxes are `NODE/outbox/FILE_ID` and
/// `NODE/inbox/FILE_ID`.
pub struct Net {
    pub root: PathBuf,
    pub hooks: PathBuf,
    hook: PathBuf,
    broker: String,
}

impl Net {
    pub fn new(root: &Path, broker: String) -> Net {
        let hooks = root.join("hooks");
        let hook = recording_hook(&hooks, "hook.sh");
        Net {
            root: root.to_path_buf(),
            hooks,
            hook,
            broker,
        }
    }

    /// An agent (not started) running `program`: `sends` are `(file_id,
    /// to)`, `receives` `(file_id, from)`, every profile with the hook for
    /// success and failure.
    pub fn agent(
        &self,
        node: &str,
        sends: &[(&str, &str)],
        receives: &[(&str, &str)],
        program: &Path,
    ) -> Agent {
        let hook = self.hook.display();
        let mut yaml = format!(
            "node: {node}\nstate_dir: {}\n{}",
            self.root.join(node).join("state").display(),
            self.broker
        );
        if !sends.is_empty() {
            yaml.push_str("send:\n");
        }
        for (file_id, to) in sends {
            yaml.push_str(&format!(
                "  - file_id: {file_id}\n    outbox: {}\n    to: [ {to} ]\n    ready: {{ stable_for: 300ms }}\n    chunk_size: {CHUNK}\n    on_success: [ \"{hook}\", \"{{file_name}}\" ]\n    on_failure: [ \"{hook}\", \"{{file_name}}\" ]\n",
                self.outbox(node, file_id).display()
            ));
        }
        if !receives.is_empty() {
            yaml.push_str("receive:\n");
        }
        for (file_id, from) in receives {
            yaml.push_str(&format!(
                "  - file_id: {file_id}\n    from: [ {from} ]\n    inbox: {}\n    on_success: [ \"{hook}\", \"{{path}}\" ]\n    on_failure: [ \"{hook}\", \"{{file_name}}\" ]\n",
                self.inbox(node, file_id).display()
            ));
        }
        let mut agent = Agent::new(node, &self.root.join(node), &yaml);
        agent.set_program(program);
        agent
    }

    pub fn outbox(&self, node: &str, file_id: &str) -> PathBuf {
        self.root.join(node).join("outbox").join(file_id)
    }

    pub fn inbox(&self, node: &str, file_id: &str) -> PathBuf {
        self.root.join(node).join("inbox").join(file_id)
    }

    /// Hook runs per `(transfer id, event)`.
    pub fn runs(&self) -> BTreeMap<(String, String), usize> {
        let mut runs = BTreeMap::new();
        for line in hook_runs(&self.hooks) {
            if let Some((tid, event)) = line.split_once(' ') {
                *runs
                    .entry((tid.to_string(), event.to_string()))
                    .or_insert(0) += 1;
            }
        }
        runs
    }

    /// Runs beyond the first of any transfer's event.
    pub fn duplicate_hooks(&self) -> usize {
        self.runs().values().map(|n| n - 1).sum()
    }
}

/// The agent's rows on one side (`send`, `receive`), read by its own binary.
pub fn rows(agent: &Agent, direction: &str) -> Vec<Value> {
    agent
        .history()
        .into_iter()
        .filter(|r| r["direction"] == direction)
        .collect()
}

/// The status of the agent's row for `file_name` on `direction`, if any.
pub fn status_of(agent: &Agent, direction: &str, file_name: &str) -> Option<String> {
    rows(agent, direction)
        .iter()
        .find(|r| r["file_name"] == file_name)
        .and_then(|r| r["status"].as_str().map(String::from))
}

/// Waits for `f`, failing with `what` and the agents' logs after `WAIT`.
pub fn wait_for(agents: &[&Agent], what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > WAIT {
            let logs: Vec<String> = agents
                .iter()
                .map(|a| format!("--- {} ---\n{}", a.node, a.log()))
                .collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Files that must arrive: where, and their SHA-256.
#[derive(Default)]
pub struct Expected(pub Vec<(PathBuf, String)>);

impl Expected {
    /// Drops `name` of `size` bytes (pattern `seed`) into `outbox`, and
    /// expects it at `inbox/name`.
    pub fn add(&mut self, outbox: &Path, inbox: &Path, name: &str, size: u64, seed: u64) {
        let tmp = outbox.parent().unwrap().join(format!(".{name}.src"));
        fs::create_dir_all(outbox).unwrap();
        crate::common::write_pattern(&tmp, size, seed);
        self.0.push((inbox.join(name), sha256_file(&tmp)));
        fs::rename(&tmp, outbox.join(name)).unwrap();
    }

    /// `(lost, corrupted)`: files not at their place, files there with
    /// other bytes.
    pub fn check(&self) -> (usize, usize) {
        let lost = self.0.iter().filter(|(p, _)| !p.is_file()).count();
        let corrupted = self
            .0
            .iter()
            .filter(|(p, sha)| p.is_file() && sha256_file(p) != *sha)
            .count();
        (lost, corrupted)
    }

    pub fn all_placed(&self) -> bool {
        self.0.iter().all(|(p, _)| p.is_file())
    }
}
