//! The hook runner: the only place that starts hook commands and builds their
//! environment. Commands come from configuration alone; values from messages
//! reach a hook only as whole argv elements or environment variables.
//! `retry.rs` runs a hook again, after a backoff, while it fails.

mod retry;
mod slot;

pub use retry::run_retrying;
pub use slot::Slot;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;

use crate::config::HookSpec;
use crate::domain::NodeName;
use crate::error_code::ErrorCode;
use crate::store::{HookRun, ReceiveRow, SendRow, Transfer};

/// What happened, as `HAKOBU_EVENT` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Received,
    ReceiveFailed,
    Sent,
    SendFailed,
    /// A send profile's `before_send` job, before the file is read.
    BeforeSend,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Received => "received",
            Event::ReceiveFailed => "receive_failed",
            Event::Sent => "sent",
            Event::SendFailed => "send_failed",
            Event::BeforeSend => "before_send",
        }
    }
}

/// The transfer's context, handed to every hook of one event.
#[derive(Debug, Clone)]
pub struct HookContext {
    pub event: Event,
    pub node: String,
    pub peer: String,
    pub file_id: String,
    pub transfer_id: String,
    pub file_name: String,
    /// The file's path on this node (inbox on the receiver, spool on the sender).
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub started_at: String,
    pub finished_at: String,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub meta: BTreeMap<String, String>,
    /// Which run of the hook this is, from 1 (`HAKOBU_ATTEMPT`; a hook's
    /// `retry:` runs it again).
    pub attempt: u32,
    /// With `convert:`: the digest of the file as placed, and its lines.
    pub placed_sha256: Option<String>,
    pub records: Option<u64>,
}

impl HookContext {
    /// A received transfer's context: `HAKOBU_PATH` is its inbox name,
    /// empty when it was not placed.
    pub fn for_received(row: &ReceiveRow, node: &NodeName, event: Event) -> Self {
        let path = row.path.as_deref().map(Path::to_string_lossy);
        Self::for_transfer(row, path.as_deref().unwrap_or_default(), node, event)
    }

    /// A sent transfer's context: `HAKOBU_PATH` is the spooled file (or
    /// where `after_send` moved it).
    pub fn for_sent(row: &SendRow, node: &NodeName, event: Event) -> Self {
        Self::for_transfer(row, &row.path.to_string_lossy(), node, event)
    }

    /// The context of a transfer as its ledger row records it, with `path`
    /// the file on this node. The error variables are set for the failure
    /// events only.
    fn for_transfer(row: &Transfer, path: &str, node: &NodeName, event: Event) -> Self {
        let failed = matches!(event, Event::ReceiveFailed | Event::SendFailed);
        HookContext {
            event,
            node: node.to_string(),
            peer: row.peer.to_string(),
            file_id: row.file_id.to_string(),
            transfer_id: row.transfer_id.to_string(),
            file_name: row.file_name.clone(),
            path: path.to_string(),
            size: row.size,
            sha256: row.sha256.clone().unwrap_or_default(),
            started_at: row.started_at.clone(),
            finished_at: row
                .finished_at
                .clone()
                .unwrap_or_else(crate::clock::now_rfc3339),
            error_code: row.error_code.clone().filter(|_| failed),
            error: row.error.clone().filter(|_| failed),
            meta: row.meta.clone(),
            attempt: 1,
            placed_sha256: row.placed_sha256.clone(),
            records: row.records,
        }
    }
}

#[derive(Debug, Clone)]
pub struct HookOutcome {
    /// The command (argv[0]), to name it in messages.
    pub program: String,
    /// The exit code; `None` when killed by a signal or never started.
    pub exit: Option<i32>,
    pub timed_out: bool,
    pub duration: Duration,
    /// The end of what the hook printed, for history.
    pub tail: String,
    /// Runs of the hook this outcome ends (its `retry:`), from 1.
    pub attempts: u32,
}

impl HookOutcome {
    pub fn ok(&self) -> bool {
        self.exit == Some(0)
    }

    /// What history keeps of this run.
    pub fn record(&self) -> HookRun {
        HookRun {
            exit: self.exit,
            ms: self.duration.as_millis() as u64,
            tail: self.tail.clone(),
            attempts: self.attempts,
        }
    }

    /// A stable code for a failed hook.
    pub fn error_code(&self) -> ErrorCode {
        if self.timed_out {
            ErrorCode::HookTimeout
        } else {
            ErrorCode::HookFailed
        }
    }

    /// A failed run's code and sentence, as history and receipts carry them.
    pub fn failure(&self) -> (ErrorCode, String) {
        let sentence = match self.attempts {
            0 | 1 => self.describe(),
            n => format!(
                "{} (run {n} of {n}: its retries are used up)",
                self.describe()
            ),
        };
        (self.error_code(), sentence)
    }

    pub fn describe(&self) -> String {
        let argv0 = &self.program;
        match (self.timed_out, self.exit) {
            (true, _) => format!(
                "hook {argv0} timed out after {:?} and was killed; raise its timeout or make it faster",
                self.duration
            ),
            (false, Some(code)) => {
                format!("hook {argv0} exited with code {code}; see its log for the output")
            }
            (false, None) => format!(
                "hook {argv0} did not finish (killed by a signal or could not start); see its log"
            ),
        }
    }
}

const TAIL_BYTES: u64 = 2048;

/// Runs a hook in a process group of its own, its output appended to
/// `log`; a timeout kills the group. Each run is counted for `/metrics`
/// (its event, outcome and duration).
pub async fn run(spec: &HookSpec, ctx: &HookContext, log: &Path) -> HookOutcome {
    let outcome = run_uncounted(spec, ctx, log).await;
    let result = match (outcome.timed_out, outcome.ok()) {
        (true, _) => "timeout",
        (false, true) => "ok",
        (false, false) => "failed",
    };
    crate::metrics::registry::global().hook_ran(ctx.event.as_str(), result, outcome.duration);
    outcome
}

async fn run_uncounted(spec: &HookSpec, ctx: &HookContext, log: &Path) -> HookOutcome {
    let started = Instant::now();
    let program = spec.argv[0].clone();
    let failed = |message: String| HookOutcome {
        program: program.clone(),
        exit: None,
        timed_out: false,
        duration: started.elapsed(),
        tail: message,
        attempts: ctx.attempt,
    };
    // Creating a file waits on the filesystem: off the async workers.
    let path = log.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
        let offset = f.seek(SeekFrom::End(0)).unwrap_or(0);
        Ok::<_, std::io::Error>((f, offset))
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    let (out, offset) = match opened {
        Ok(opened) => opened,
        Err(e) => return failed(format!("cannot open hook log {}: {e}", log.display())),
    };
    let err = match out.try_clone() {
        Ok(f) => f,
        Err(e) => return failed(format!("cannot open hook log {}: {e}", log.display())),
    };
    let mut cmd = command(spec, ctx);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot start hook {}: {e}", spec.argv[0])),
    };
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let (exit, timed_out) = match tokio::time::timeout(spec.timeout, child.wait()).await {
        Ok(Ok(status)) => (status.code(), false),
        Ok(Err(_)) => (None, false),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            (None, true)
        }
    };
    let duration = started.elapsed();
    let path = log.to_path_buf();
    let tail = tokio::task::spawn_blocking(move || tail_of(&path, offset))
        .await
        .unwrap_or_default();
    HookOutcome {
        program,
        exit,
        timed_out,
        duration,
        tail,
        attempts: ctx.attempt,
    }
}

fn command(spec: &HookSpec, ctx: &HookContext) -> Command {
    let mut cmd = if spec.shell {
        // In a shell, values travel as variables, never as text the shell parses.
        let line = spec
            .argv
            .iter()
            .map(|a| substitute(a, |v| shell_var(v).to_string()))
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(line);
        c
    } else {
        let argv: Vec<String> = spec
            .argv
            .iter()
            // An argument cannot hold NUL: a hostile name must not stop the hook from starting.
            .map(|a| substitute(a, |v| value(ctx, v).replace('\0', "\u{FFFD}")))
            .collect();
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        c
    };
    for (k, v) in environment(ctx) {
        cmd.env(k, v);
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    cmd
}

/// The `HAKOBU_*` variables of SPEC.md.
pub fn environment(ctx: &HookContext) -> Vec<(String, String)> {
    let mut env = vec![
        ("HAKOBU_EVENT".to_string(), ctx.event.as_str().to_string()),
        ("HAKOBU_NODE".into(), ctx.node.clone()),
        ("HAKOBU_PEER".into(), ctx.peer.clone()),
        ("HAKOBU_FILE_ID".into(), ctx.file_id.clone()),
        ("HAKOBU_TRANSFER_ID".into(), ctx.transfer_id.clone()),
        ("HAKOBU_FILE_NAME".into(), ctx.file_name.clone()),
        ("HAKOBU_PATH".into(), ctx.path.clone()),
        ("HAKOBU_SIZE".into(), ctx.size.to_string()),
        ("HAKOBU_SHA256".into(), ctx.sha256.clone()),
        ("HAKOBU_STARTED_AT".into(), ctx.started_at.clone()),
        ("HAKOBU_FINISHED_AT".into(), ctx.finished_at.clone()),
        ("HAKOBU_ATTEMPT".into(), ctx.attempt.to_string()),
    ];
    if let Some(code) = &ctx.error_code {
        env.push(("HAKOBU_ERROR_CODE".into(), code.clone()));
    }
    if let Some(error) = &ctx.error {
        env.push(("HAKOBU_ERROR".into(), error.clone()));
    }
    if let Some(records) = ctx.records {
        env.push(("HAKOBU_RECORDS".into(), records.to_string()));
    }
    if let Some(placed) = &ctx.placed_sha256 {
        env.push(("HAKOBU_PLACED_SHA256".into(), placed.clone()));
    }
    for (k, v) in &ctx.meta {
        env.push((format!("HAKOBU_META_{}", meta_key(k)), v.clone()));
    }
    // Environment values cannot hold NUL; a value with one is dropped whole.
    env.retain(|(_, v)| !v.contains('\0'));
    env
}

/// `HAKOBU_META_` suffix for a metadata key: upper case, other characters as `_`.
pub fn meta_key(k: &str) -> String {
    k.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn value<'a>(ctx: &'a HookContext, name: &str) -> &'a str {
    match name {
        "path" => &ctx.path,
        "file_id" => &ctx.file_id,
        "transfer_id" => &ctx.transfer_id,
        "file_name" => &ctx.file_name,
        "peer" => &ctx.peer,
        _ => "",
    }
}

fn shell_var(name: &str) -> &'static str {
    match name {
        "path" => "\"$HAKOBU_PATH\"",
        "file_id" => "\"$HAKOBU_FILE_ID\"",
        "transfer_id" => "\"$HAKOBU_TRANSFER_ID\"",
        "file_name" => "\"$HAKOBU_FILE_NAME\"",
        "peer" => "\"$HAKOBU_PEER\"",
        _ => "",
    }
}

/// Replaces `{name}` placeholders in one argument; the result stays one argument.
fn substitute(arg: &str, with: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if is_placeholder(&after[..close]) => {
                out.push_str(&with(&after[..close]));
                rest = &after[close + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The placeholders a `shell: true` command line holds inside quotes. Each
/// placeholder becomes a double-quoted variable (`"$HAKOBU_PATH"`); inside
/// the user's own quotes that would end their quoting and leave the value
/// open to word splitting and globbing, so configuration refuses it.
pub fn quoted_placeholders(line: &str) -> Vec<String> {
    #[derive(PartialEq)]
    enum Quote {
        None,
        Single,
        Double,
    }
    let mut found = Vec::new();
    let mut state = Quote::None;
    let mut chars = line.char_indices();
    while let Some((i, c)) = chars.next() {
        match (&state, c) {
            (Quote::None | Quote::Double, '\\') => {
                chars.next();
            }
            (Quote::None, '\'') => state = Quote::Single,
            (Quote::None, '"') => state = Quote::Double,
            (Quote::Single, '\'') | (Quote::Double, '"') => state = Quote::None,
            (Quote::Single | Quote::Double, '{') => {
                let after = &line[i + 1..];
                if let Some(close) = after.find('}') {
                    if is_placeholder(&after[..close]) {
                        found.push(after[..close].to_string());
                    }
                }
            }
            _ => {}
        }
    }
    found
}

fn is_placeholder(name: &str) -> bool {
    matches!(
        name,
        "path" | "file_id" | "transfer_id" | "file_name" | "peer"
    )
}

fn tail_of(log: &Path, from: u64) -> String {
    let Ok(mut f) = std::fs::File::open(log) else {
        return String::new();
    };
    let end = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let start = end.saturating_sub(TAIL_BYTES).max(from);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.take(TAIL_BYTES).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The log file of one transfer's hooks for one event.
pub fn log_path(log_dir: &Path, transfer_id: &str, event: Event) -> PathBuf {
    log_dir.join(format!("{transfer_id}.{}.log", event.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A context for tests (here and in `retry.rs`): a name made to break
    /// a shell.
    pub(super) fn ctx() -> HookContext {
        HookContext {
            event: Event::Received,
            node: "beta".into(),
            peer: "alpha".into(),
            file_id: "F".into(),
            transfer_id: "T".into(),
            file_name: "a b; rm -rf x.csv".into(),
            path: "/in/a b; rm -rf x.csv".into(),
            size: 3,
            sha256: "ab".into(),
            started_at: "s".into(),
            finished_at: "f".into(),
            error_code: None,
            error: None,
            meta: BTreeMap::from([("batch-no".into(), "7".into())]),
            attempt: 1,
            placed_sha256: None,
            records: None,
        }
    }

    fn spec(argv: &[&str], shell: bool, timeout: Duration) -> HookSpec {
        HookSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout,
            shell,
            env: BTreeMap::new(),
            cwd: None,
            retry: crate::config::Retry::ONCE,
        }
    }

    #[test]
    fn placeholders_stay_one_argument() {
        assert_eq!(
            substitute("--in={path}", |v| value(&ctx(), v).to_string()),
            "--in=/in/a b; rm -rf x.csv"
        );
        assert_eq!(substitute("{nope} {", |_| "X".into()), "{nope} {");
    }

    #[test]
    fn placeholders_inside_shell_quotes_are_found() {
        assert!(quoted_placeholders("cp {path} /archive/ && echo done").is_empty());
        assert!(quoted_placeholders("echo \\\"{path}").is_empty());
        assert!(quoted_placeholders("echo '\"' {path}").is_empty());
        assert_eq!(quoted_placeholders("echo \"{file_name}\""), ["file_name"]);
        assert_eq!(quoted_placeholders("echo 'x {path} y' {peer}"), ["path"]);
        assert_eq!(quoted_placeholders("echo \"it's {peer}\""), ["peer"]);
        assert!(quoted_placeholders("echo '{unknown}'").is_empty());
    }

    #[tokio::test]
    async fn runs_with_environment_and_captures_output() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("h.log");
        let s = spec(
            &[
                "/bin/sh",
                "-c",
                "printf '%s|%s|%s' \"$1\" \"$HAKOBU_EVENT\" \"$HAKOBU_META_BATCH_NO\"; exit 3",
                "sh",
                "{file_name}",
            ],
            false,
            Duration::from_secs(10),
        );
        let o = run(&s, &ctx(), &log).await;
        assert_eq!(o.exit, Some(3));
        assert_eq!(o.tail, "a b; rm -rf x.csv|received|7");
    }

    #[tokio::test]
    async fn shell_mode_passes_values_as_variables() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("h.log");
        let s = spec(
            &["printf", "'<%s>'", "{file_name}"],
            true,
            Duration::from_secs(10),
        );
        let o = run(&s, &ctx(), &log).await;
        assert!(o.ok(), "{o:?}");
        assert_eq!(o.tail, "<a b; rm -rf x.csv>");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("h.log");
        let pidfile = d.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let s = spec(
            &["/bin/sh", "-c", &script],
            false,
            Duration::from_millis(500),
        );
        let o = run(&s, &ctx(), &log).await;
        assert!(o.timed_out);
        assert_eq!(o.error_code(), ErrorCode::HookTimeout);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild must be gone (or a zombie about to be reaped by init).
        std::thread::sleep(Duration::from_millis(200));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "grandchild still alive: {stat}"
        );
    }
}
