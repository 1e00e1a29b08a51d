//! What the suites of slow faults (hung processes, partitions, alarms,
//! backlogs) share: a guard for a process stopped with SIGSTOP, one that
//! shows both agents' logs when the test fails, and the check that every
//! file arrived once, byte for byte, with one success hook.

use std::collections::BTreeMap;
use std::path::PathBuf;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{Pair, hook_runs, sha256_file};

/// A process stopped with SIGSTOP (by pid); dropping the guard, also while
/// a failed assertion unwinds, sends SIGCONT.
pub struct Stopped(pub i32);

impl Stopped {
    pub fn stop(pid: u32) -> Stopped {
        let pid = pid as i32;
        kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

/// While it lives, a panic (a failed assertion) prints the last
/// [`LOG_TAIL`] lines of both agents' logs on stderr as it unwinds.
pub struct LogsOnPanic(Vec<(String, PathBuf)>);

/// How many lines of each agent's log a failed test shows.
pub const LOG_TAIL: usize = 200;

impl LogsOnPanic {
    pub fn of(p: &Pair) -> LogsOnPanic {
        LogsOnPanic(
            [&p.alpha, &p.beta]
                .iter()
                .map(|a| (a.node.clone(), a.log_path()))
                .collect(),
        )
    }
}

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (node, path) in &self.0 {
            let log = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- {node}: the last {LOG_TAIL} lines of its log ---\n{}",
                lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
            );
        }
    }
}

/// Hook runs of `event` (`received`, `sent`) by transfer id, from the
/// pair's recording hook.
pub fn hooks_by_transfer(p: &Pair, event: &str) -> BTreeMap<String, usize> {
    let suffix = format!(" {event}");
    let mut m = BTreeMap::new();
    for l in hook_runs(&p.hooks) {
        if let Some(tid) = l.strip_suffix(&suffix) {
            *m.entry(tid.to_string()).or_default() += 1;
        }
    }
    m
}

/// How many of alpha's transfers are `sent`; panics when one has failed
/// (for the wait loops of the fault suites).
pub fn sent_none_failed(p: &Pair) -> usize {
    let h = p.alpha.history();
    let failed: Vec<_> = h
        .iter()
        .filter(|r| r["status"].as_str().is_some_and(|s| s.contains("fail")))
        .collect();
    assert!(failed.is_empty(), "a transfer failed: {failed:?}");
    h.iter().filter(|r| r["status"] == "sent").count()
}

/// Every file of `files` (name, SHA-256) in the inbox byte for byte, nothing
/// else there (asserted), a success hook for every transfer (asserted):
/// returns (lost or corrupted, duplicate hooks), for the figures line.
pub fn delivered(p: &Pair, files: &[(String, String)]) -> (usize, usize) {
    let bad = files
        .iter()
        .filter(|(name, want)| {
            let path = p.inbox.join(name);
            !path.exists() || sha256_file(&path) != *want
        })
        .count();
    let runs = hooks_by_transfer(p, "received");
    let dup = runs.values().map(|n| n.saturating_sub(1)).sum::<usize>();
    let mut names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(p.inbox_files(), names, "the inbox holds other files");
    assert_eq!(
        runs.len(),
        files.len(),
        "a success hook is missing: {runs:?}"
    );
    (bad, dup)
}
