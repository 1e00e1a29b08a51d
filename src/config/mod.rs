//! The agent's configuration: read once, validated once, then handed around as
//! checked types. Only this module knows YAML.

mod locate;
mod raw;
mod units;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use locate::LineIndex;
use raw::{RawAfterSend, RawBroker, RawConfig, RawHook, RawReady, RawReceive, RawSend};

pub use units::{parse_duration, parse_size};

/// Bounds on the chunk size: RabbitMQ 4.x refuses messages over 16 MiB.
pub const MIN_CHUNK: u64 = 64 * 1024;
pub const MAX_CHUNK: u64 = 8 * 1024 * 1024;
pub const DEFAULT_CHUNK: u64 = 512 * 1024;

/// A configuration error, naming the file, the line and the key.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {key}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub const fn code(&self) -> &'static str {
        "config_invalid"
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub node: String,
    pub state_dir: PathBuf,
    pub broker: BrokerConfig,
    pub send: Vec<SendProfile>,
    pub receive: Vec<ReceiveProfile>,
}

#[derive(Debug, Clone)]
pub enum BrokerConfig {
    Rabbitmq(RabbitmqConfig),
    Embedded(EmbeddedConfig),
}

#[derive(Debug, Clone)]
pub struct RabbitmqConfig {
    pub urls: Vec<String>,
    pub confirm_timeout: Duration,
    pub prefetch: u16,
    pub delivery_limit: u32,
    pub window: u64,
    /// A chunk's `from` must equal the AMQP `user_id` the broker validated.
    pub verify_sender: bool,
    pub max_queue: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    pub max_queue: u64,
    pub listen: Option<String>,
    pub connect: Option<String>,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct SendProfile {
    pub file_id: String,
    pub outbox: PathBuf,
    /// Glob patterns; empty means every name that is not ignored.
    pub include: Vec<glob::Pattern>,
    pub to: Vec<String>,
    pub ready: Ready,
    pub after_send: AfterSend,
    pub on_success: Vec<HookSpec>,
    pub on_failure: Vec<HookSpec>,
    pub chunk_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    StableFor(Duration),
    DoneMarker(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterSend {
    Delete,
    Keep,
    MoveTo(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ReceiveProfile {
    pub file_id: String,
    pub from: Vec<String>,
    pub inbox: PathBuf,
    pub mode: Mode,
    pub max_size: u64,
    /// An unfinished transfer idle this long expires.
    pub partial_ttl: Duration,
    pub on_success: Vec<HookSpec>,
    pub on_failure: Vec<HookSpec>,
}

/// How a verified file takes its place in the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fail with `file_exists` when the name is taken.
    New,
    /// Atomically rename over an existing file.
    Replace,
    /// Append to the existing file, then fsync.
    Append,
    /// Keep the last N as `name.1` … `name.N`.
    Generations(u32),
}

/// A command to run on an event; commands come only from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    pub argv: Vec<String>,
    pub timeout: Duration,
    pub shell: bool,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
}

const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);
const DEFAULT_STABLE_FOR: Duration = Duration::from_secs(2);
const DEFAULT_PARTIAL_TTL: Duration = Duration::from_secs(24 * 3600);
const PLACEHOLDERS: [&str; 5] = ["path", "file_id", "transfer_id", "file_name", "peer"];

impl Config {
    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            line: None,
            key: "-".into(),
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Self::parse(file, &text)
    }

    /// Validates `text` as the contents of `file`.
    pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
        let index = LineIndex::build(text);
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| {
            let (key, message) = split_serde_error(&e.to_string());
            ConfigError {
                file: file.to_path_buf(),
                line: e.location().map(|l| l.line()),
                key,
                message,
            }
        })?;
        let mut v = Validator {
            file,
            index: &index,
        };
        v.config(raw)
    }

    pub fn send_profile(&self, file_id: &str) -> Option<&SendProfile> {
        self.send.iter().find(|p| p.file_id == file_id)
    }

    pub fn receive_profile(&self, file_id: &str) -> Option<&ReceiveProfile> {
        self.receive.iter().find(|p| p.file_id == file_id)
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("history.sqlite")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    /// True when a chunk's sender must be the broker-authenticated user.
    pub fn verify_sender(&self) -> bool {
        matches!(&self.broker, BrokerConfig::Rabbitmq(r) if r.verify_sender)
    }

    /// Where an agent that hosts the embedded broker keeps its messages.
    pub fn broker_data_dir(&self) -> PathBuf {
        self.state_dir.join("broker")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
}

/// serde_yaml writes "send[0]: unknown field `x`, expected ... at line 3 column 5":
/// the key path first, the position last. The line is reported separately.
fn split_serde_error(text: &str) -> (String, String) {
    let (key, rest) = match text.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => (path.to_string(), rest),
        _ => ("-".to_string(), text),
    };
    let message = match rest.rfind(" at line ") {
        Some(i) => &rest[..i],
        None => rest,
    };
    // Name the unknown key itself, not only the map holding it.
    let key = match message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split_once('`'))
    {
        Some((field, _)) if key == "-" => field.to_string(),
        Some((field, _)) => format!("{key}.{field}"),
        None => key,
    };
    (key, message.to_string())
}

/// True for node names and file ids: 1–50 characters from `[A-Za-z0-9_.-]`.
pub fn is_valid_id(s: &str) -> bool {
    (1..=50).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && s != "."
        && s != ".."
}

struct Validator<'a> {
    file: &'a Path,
    index: &'a LineIndex,
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl Validator<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: self.index.line_of(key),
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn config(&mut self, raw: RawConfig) -> Result<Config> {
        self.id("node", &raw.node)?;
        let broker = self.broker(raw.broker)?;
        let send = raw
            .send
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.send(&format!("send[{i}]"), s))
            .collect::<Result<Vec<_>>>()?;
        let receive = raw
            .receive
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.receive(&format!("receive[{i}]"), r))
            .collect::<Result<Vec<_>>>()?;
        self.unique("send", send.iter().map(|p| p.file_id.as_str()))?;
        self.unique("receive", receive.iter().map(|p| p.file_id.as_str()))?;
        if send.is_empty() && receive.is_empty() {
            return Err(self.err("send", "no send and no receive profile: nothing to do"));
        }
        Ok(Config {
            file: self.file.to_path_buf(),
            node: raw.node,
            state_dir: absolute(&raw.state_dir),
            broker,
            send,
            receive,
        })
    }

    fn id(&self, key: &str, value: &str) -> Result<()> {
        if is_valid_id(value) {
            Ok(())
        } else {
            Err(self.err(
                key,
                format!("`{value}` must be 1–50 characters from A-Z a-z 0-9 _ . -"),
            ))
        }
    }

    fn unique<'s>(&self, section: &str, ids: impl Iterator<Item = &'s str>) -> Result<()> {
        let mut seen = HashSet::new();
        for (i, id) in ids.enumerate() {
            if !seen.insert(id) {
                return Err(self.err(
                    &format!("{section}[{i}].file_id"),
                    format!("file id `{id}` appears twice in `{section}`"),
                ));
            }
        }
        Ok(())
    }

    fn broker(&self, raw: RawBroker) -> Result<BrokerConfig> {
        match (raw.rabbitmq, raw.embedded) {
            (Some(r), None) => {
                if r.urls.is_empty() {
                    return Err(self.err("broker.rabbitmq.urls", "list at least one amqp:// URL"));
                }
                for (i, url) in r.urls.iter().enumerate() {
                    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                        return Err(self.err(
                            &format!("broker.rabbitmq.urls[{i}]"),
                            "a URL must start with amqp:// or amqps://",
                        ));
                    }
                }
                let confirm_timeout = match &r.confirm_timeout {
                    Some(t) => self.duration("broker.rabbitmq.confirm_timeout", t)?,
                    None => Duration::from_secs(30),
                };
                let window = match &r.window {
                    Some(w) => self.size("broker.rabbitmq.window", w)?,
                    None => 8 << 20,
                };
                // A receiver acks a chunk only once it is on disk and
                // recorded, so it holds one batch being committed while the
                // next arrives: 16 x 512 KiB left the consumer behind the
                // publisher on the test cluster, 32 kept up.
                let prefetch = r.prefetch.unwrap_or(32);
                if prefetch == 0 {
                    return Err(self.err("broker.rabbitmq.prefetch", "must be at least 1"));
                }
                Ok(BrokerConfig::Rabbitmq(RabbitmqConfig {
                    urls: r.urls,
                    confirm_timeout,
                    prefetch,
                    delivery_limit: r.delivery_limit.unwrap_or(20),
                    window: window.max(MAX_CHUNK),
                    verify_sender: r.verify_sender.unwrap_or(false),
                    max_queue: r
                        .max_queue
                        .as_deref()
                        .map(|m| self.size("broker.rabbitmq.max_queue", m))
                        .transpose()?,
                }))
            }
            (None, Some(e)) => {
                for (key, addr) in [("listen", &e.listen), ("connect", &e.connect)] {
                    let Some(addr) = addr else { continue };
                    let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
                        return Err(self.err(
                            &format!("broker.embedded.{key}"),
                            format!("`{addr}` is not an address such as 127.0.0.1:7800"),
                        ));
                    };
                    if key == "listen" && !sock.ip().is_loopback() && e.token_file.is_none() {
                        return Err(self.err(
                            "broker.embedded.listen",
                            "listening beyond loopback needs a token_file, or any host could connect",
                        ));
                    }
                }
                if e.listen.is_some() == e.connect.is_some() {
                    return Err(self.err(
                        "broker.embedded",
                        "give exactly one of `listen: ADDR` (host the broker here) or `connect: ADDR`",
                    ));
                }
                Ok(BrokerConfig::Embedded(EmbeddedConfig {
                    max_queue: match &e.max_queue {
                        Some(m) => self.size("broker.embedded.max_queue", m)?,
                        None => crate::broker::embedded::server::DEFAULT_MAX_QUEUE,
                    },
                    listen: e.listen,
                    connect: e.connect,
                    token_file: e.token_file.map(|p| absolute(&p)),
                }))
            }
            _ => Err(self.err("broker", "give exactly one of `rabbitmq:` or `embedded:`")),
        }
    }

    fn send(&self, key: &str, raw: RawSend) -> Result<SendProfile> {
        self.id(&format!("{key}.file_id"), &raw.file_id)?;
        if raw.to.is_empty() {
            return Err(self.err(&format!("{key}.to"), "name at least one receiving node"));
        }
        for (i, node) in raw.to.iter().enumerate() {
            self.id(&format!("{key}.to[{i}]"), node)?;
        }
        let include = raw
            .include
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, g)| {
                glob::Pattern::new(g).map_err(|e| {
                    self.err(&format!("{key}.include[{i}]"), format!("bad pattern: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ready = match raw.ready {
            None => Ready::StableFor(DEFAULT_STABLE_FOR),
            Some(RawReady {
                stable_for: Some(d),
                done_marker: None,
            }) => Ready::StableFor(self.duration(&format!("{key}.ready.stable_for"), &d)?),
            Some(RawReady {
                stable_for: None,
                done_marker: Some(m),
            }) => {
                if m.is_empty() || m.contains('/') || m.contains('\0') {
                    return Err(self.err(
                        &format!("{key}.ready.done_marker"),
                        "a marker is a file name suffix such as `.done`",
                    ));
                }
                Ready::DoneMarker(m)
            }
            Some(_) => {
                return Err(self.err(
                    &format!("{key}.ready"),
                    "give exactly one of `stable_for: 2s` or `done_marker: \".done\"`",
                ));
            }
        };
        let after_send = match raw.after_send {
            None => AfterSend::Delete,
            Some(RawAfterSend::Word(w)) if w == "delete" => AfterSend::Delete,
            Some(RawAfterSend::Word(w)) if w == "keep" => AfterSend::Keep,
            Some(RawAfterSend::Word(w)) => {
                return Err(self.err(
                    &format!("{key}.after_send"),
                    format!("`{w}` is not one of delete, keep, {{ move_to: DIR }}"),
                ));
            }
            Some(RawAfterSend::Move(m)) => AfterSend::MoveTo(absolute(&m.move_to)),
        };
        let chunk_size = match &raw.chunk_size {
            None => DEFAULT_CHUNK,
            Some(c) => {
                let n = self.size(&format!("{key}.chunk_size"), c)?;
                if !(MIN_CHUNK..=MAX_CHUNK).contains(&n) {
                    return Err(self.err(
                        &format!("{key}.chunk_size"),
                        "must be between 64KiB and 8MiB",
                    ));
                }
                n
            }
        };
        Ok(SendProfile {
            on_success: self.hooks(&format!("{key}.on_success"), raw.on_success)?,
            on_failure: self.hooks(&format!("{key}.on_failure"), raw.on_failure)?,
            file_id: raw.file_id,
            outbox: absolute(&raw.outbox),
            include,
            to: raw.to,
            ready,
            after_send,
            chunk_size,
        })
    }

    fn receive(&self, key: &str, raw: RawReceive) -> Result<ReceiveProfile> {
        self.id(&format!("{key}.file_id"), &raw.file_id)?;
        if raw.from.is_empty() {
            return Err(self.err(&format!("{key}.from"), "name at least one sending node"));
        }
        for (i, node) in raw.from.iter().enumerate() {
            self.id(&format!("{key}.from[{i}]"), node)?;
        }
        let mode = match raw.mode.as_deref().unwrap_or("new") {
            "new" => Mode::New,
            "replace" => Mode::Replace,
            "append" => Mode::Append,
            "generations" => {
                let keep = raw.keep.unwrap_or(7);
                if !(1..=1000).contains(&keep) {
                    return Err(self.err(
                        &format!("{key}.keep"),
                        "keep between 1 and 1000 generations",
                    ));
                }
                Mode::Generations(keep)
            }
            other => {
                return Err(self.err(
                    &format!("{key}.mode"),
                    format!("`{other}` is not one of new, replace, append, generations"),
                ));
            }
        };
        if raw.keep.is_some() && !matches!(mode, Mode::Generations(_)) {
            return Err(self.err(
                &format!("{key}.keep"),
                "`keep` applies only to mode: generations",
            ));
        }
        let max_size = match &raw.max_size {
            Some(s) => self.size(&format!("{key}.max_size"), s)?,
            None => u64::MAX,
        };
        Ok(ReceiveProfile {
            on_success: self.hooks(&format!("{key}.on_success"), raw.on_success)?,
            on_failure: self.hooks(&format!("{key}.on_failure"), raw.on_failure)?,
            file_id: raw.file_id,
            from: raw.from,
            inbox: absolute(&raw.inbox),
            mode,
            max_size,
            partial_ttl: match &raw.partial_ttl {
                Some(t) => self.duration(&format!("{key}.partial_ttl"), t)?,
                None => DEFAULT_PARTIAL_TTL,
            },
        })
    }

    /// A hook key holds one hook; an empty key holds none.
    fn hooks(&self, key: &str, raw: Option<RawHook>) -> Result<Vec<HookSpec>> {
        let Some(raw) = raw else {
            return Ok(Vec::new());
        };
        let (argv, timeout, shell, env, cwd) = match raw {
            RawHook::Argv(argv) => (argv, None, None, None, None),
            RawHook::Full(f) => (f.run, f.timeout, f.shell, f.env, f.cwd),
        };
        if argv.is_empty() || argv[0].is_empty() {
            return Err(self.err(
                key,
                "a hook needs a command: [ \"hooks/import.sh\", \"{path}\" ]",
            ));
        }
        for (i, arg) in argv.iter().enumerate() {
            self.placeholders(&format!("{key}[{i}]"), arg)?;
        }
        let timeout = match timeout {
            Some(t) => self.duration(&format!("{key}.timeout"), &t)?,
            None => DEFAULT_HOOK_TIMEOUT,
        };
        let env = env.unwrap_or_default();
        for name in env.keys() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(self.err(
                    &format!("{key}.env"),
                    format!("`{name}` is not a variable name"),
                ));
            }
        }
        let mut argv = argv;
        // A relative program path such as hooks/import.sh is resolved now, so
        // that a hook's own `cwd` does not change which program runs.
        if !shell.unwrap_or(false) && argv[0].contains('/') {
            argv[0] = absolute(Path::new(&argv[0])).display().to_string();
        }
        Ok(vec![HookSpec {
            argv,
            timeout,
            shell: shell.unwrap_or(false),
            env,
            cwd: cwd.map(|c| absolute(&c)),
        }])
    }

    fn placeholders(&self, key: &str, arg: &str) -> Result<()> {
        let mut rest = arg;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else { break };
            let name = &after[..close];
            if !PLACEHOLDERS.contains(&name) {
                return Err(self.err(
                    key,
                    format!("unknown placeholder `{{{name}}}`; use one of {{path}} {{file_id}} {{transfer_id}} {{file_name}} {{peer}}"),
                ));
            }
            rest = &after[close + 1..];
        }
        Ok(())
    }

    fn duration(&self, key: &str, text: &str) -> Result<Duration> {
        parse_duration(text).map_err(|m| self.err(key, m))
    }

    fn size(&self, key: &str, text: &str) -> Result<u64> {
        parse_size(text).map_err(|m| self.err(key, m))
    }
}

/// Relative paths are taken from the directory the agent starts in.
fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: beta
state_dir: var/beta
broker:
  rabbitmq:
    urls: [ "amqp://hakobu:secret@127.0.0.1:5672/%2f" ]
send:
  - file_id: DAILY_SALES
    outbox: var/alpha/outbox/sales
    include: [ "*.csv" ]
    to: [ beta ]
    ready: { stable_for: 2s }
    after_send: { move_to: var/sent }
    on_success: [ "hooks/sent.sh" ]
    on_failure: [ "hooks/alert.sh", "{file_id}" ]
receive:
  - file_id: DAILY_SALES
    from: [ alpha ]
    inbox: var/beta/inbox/sales
    mode: replace
    max_size: 10GiB
    on_success: { run: [ "hooks/import.sh", "{path}" ], timeout: 10m }
    on_failure: { run: [ "hooks/alert.sh" ] }
"#;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(Path::new("t.yaml"), text)
    }

    #[test]
    fn spec_example_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node, "beta");
        let s = &c.send[0];
        assert_eq!(s.ready, Ready::StableFor(Duration::from_secs(2)));
        assert!(matches!(s.after_send, AfterSend::MoveTo(_)));
        assert_eq!(s.on_failure[0].argv[1], "{file_id}");
        let r = &c.receive[0];
        assert_eq!(r.mode, Mode::Replace);
        assert_eq!(r.max_size, 10 << 30);
        assert_eq!(r.on_success[0].timeout, Duration::from_secs(600));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let bad = GOOD.replace("    mode: replace", "    mode: replace\n    colour: blue");
        let e = parse(&bad).unwrap_err();
        assert!(e.message.contains("colour"), "{e}");
        assert_eq!(e.line, Some(21), "{e}");
        assert_eq!(e.key, "receive[0].colour", "{e}");
    }

    #[test]
    fn validation_error_names_line_and_key() {
        let bad = GOOD.replace("mode: replace", "mode: sideways");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.key, "receive[0].mode");
        assert_eq!(e.line, Some(20));
        assert!(
            e.to_string().starts_with("t.yaml:20: receive[0].mode:"),
            "{e}"
        );
    }

    #[test]
    fn rejects_bad_ids_and_placeholders() {
        let e = parse(&GOOD.replace(
            "file_id: DAILY_SALES\n    outbox",
            "file_id: ../x\n    outbox",
        ))
        .unwrap_err();
        assert_eq!(e.key, "send[0].file_id");
        let e = parse(&GOOD.replace("{file_id}", "{nope}")).unwrap_err();
        assert_eq!(e.key, "send[0].on_failure[1]");
        let e =
            parse(&GOOD.replace("stable_for: 2s", "stable_for: 2s, done_marker: x")).unwrap_err();
        assert_eq!(e.key, "send[0].ready");
    }
}
