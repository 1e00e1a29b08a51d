//! The agent's configuration: read once, validated once, then handed around as
//! checked types. Only this module knows YAML.

pub mod amqp_url;
mod embedded_tls;
mod locate;
mod overlap;
mod rabbitmq;
mod raw;
mod units;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use locate::LineIndex;
use raw::RawConfig;
use validate::Validator;

pub use units::{parse_duration, parse_size};

use crate::domain::{FileId, NodeName};
pub use crate::receiver::name::NameTemplate;
pub use crate::transform::convert::{Charset, Convert, Newline, OnError};

/// Bounds on the chunk size: RabbitMQ 4.x refuses messages over 16 MiB.
pub const MIN_CHUNK: u64 = 64 * 1024;
pub const MAX_CHUNK: u64 = 8 * 1024 * 1024;
pub const DEFAULT_CHUNK: u64 = 512 * 1024;
/// A send profile's `priority:` when it names none (1..9, higher first).
pub const DEFAULT_PRIORITY: u8 = 5;

/// A configuration error, naming the file, the line and the key.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {key}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub node: NodeName,
    pub state_dir: PathBuf,
    pub broker: BrokerConfig,
    pub send: Vec<SendProfile>,
    pub receive: Vec<ReceiveProfile>,
    /// Running as root is meant: no warning at start.
    pub run_as_root: bool,
    /// This node's private key (loaded on first use) and its peers' public
    /// keys, for end-to-end encryption; empty when `keys:` is absent.
    pub keys: std::sync::Arc<crate::keys::Keyring>,
    /// The agent's rate cap in bytes a second (`bandwidth:` at the top).
    pub bandwidth: Option<u64>,
    /// The HTTP endpoint (`http:`), off when `None`.
    pub http: Option<HttpConfig>,
}

/// `http:`: where the console, the REST API and `/metrics` listen.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: std::net::SocketAddr,
    /// The bearer token's file (mode 0600).
    pub token_file: PathBuf,
    /// `/metrics` without the token (only allowed on loopback).
    pub metrics_open: bool,
    /// The endpoint's certificate and key file (required beyond loopback).
    pub tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub enum BrokerConfig {
    Rabbitmq(RabbitmqConfig),
    Embedded(EmbeddedConfig),
}

#[derive(Clone)]
pub struct RabbitmqConfig {
    /// With the password of `password_file` put in: never print one whole
    /// (`amqp_url::redact_url`).
    pub urls: Vec<String>,
    pub confirm_timeout: Duration,
    /// The AMQP heartbeat: a connection that hears nothing for two of
    /// them is closed and the agent moves to the next URL.
    pub heartbeat: Duration,
    pub prefetch: u16,
    pub delivery_limit: u32,
    pub window: u64,
    /// A chunk's `from` must equal the AMQP `user_id` the broker validated.
    pub verify_sender: bool,
    pub max_queue: Option<u64>,
    /// TLS files for `amqps://` URLs.
    pub tls: Option<RabbitTls>,
    /// Log in with SASL EXTERNAL: the client certificate's CN is the user.
    pub auth_external: bool,
    /// `x-max-length-bytes` of the dead-letter queue.
    pub dead_letter_max: u64,
}

/// PEM files: the CA that signed the broker's certificate (added to the
/// system's roots), and this node's certificate and private key (0600).
#[derive(Debug, Clone, Default)]
pub struct RabbitTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

pub const DEFAULT_DEAD_LETTER_MAX: u64 = 1 << 30;

/// Short enough that a hung node is left within ten seconds, long enough
/// that a busy but alive node (RabbitMQ sends heartbeats from a process of
/// their own) is never taken for a hung one.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

impl RabbitmqConfig {
    /// The defaults of the configuration file, for `urls`.
    pub fn with_urls(urls: Vec<String>) -> Self {
        RabbitmqConfig {
            urls,
            confirm_timeout: Duration::from_secs(30),
            heartbeat: DEFAULT_HEARTBEAT,
            prefetch: 32,
            delivery_limit: 20,
            window: 8 << 20,
            verify_sender: true,
            max_queue: None,
            tls: None,
            auth_external: false,
            dead_letter_max: DEFAULT_DEAD_LETTER_MAX,
        }
    }
}

/// Passwords stay out of debug output too.
impl std::fmt::Debug for RabbitmqConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| amqp_url::redact_url(u)).collect();
        f.debug_struct("RabbitmqConfig")
            .field("urls", &urls)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("prefetch", &self.prefetch)
            .field("delivery_limit", &self.delivery_limit)
            .field("window", &self.window)
            .field("verify_sender", &self.verify_sender)
            .field("max_queue", &self.max_queue)
            .field("tls", &self.tls)
            .field("auth_external", &self.auth_external)
            .field("dead_letter_max", &self.dead_letter_max)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// The hosted broker's limits (`max_queue`, `max_disk`, ...).
    pub limits: crate::broker::embedded::server::Limits,
    pub listen: Option<String>,
    pub connect: Option<String>,
    /// This node's secret; `None` means `state_dir/broker.secret`.
    pub secret_file: Option<PathBuf>,
    /// Plain text beyond loopback is accepted.
    pub insecure: bool,
    /// The hosted broker's certificate and key (`tls.cert_file`, `key_file`).
    pub server_tls: Option<crate::broker::embedded::server::ServerTls>,
    /// The CA this node trusts for the broker (`tls.ca_file`), and the name
    /// the broker's certificate must carry (`tls.server_name`, default the
    /// host of the address).
    pub client_tls: Option<(PathBuf, String)>,
}

#[derive(Debug, Clone)]
pub struct SendProfile {
    pub file_id: FileId,
    /// Watched for files to send; `None` for a profile with a `source` only.
    pub outbox: Option<PathBuf>,
    /// A registered file sent as a copy (the source stays).
    pub source: Option<PathBuf>,
    /// Nodes that may ask for this file with `hakobu request`.
    pub requests_from: Vec<NodeName>,
    /// Run before the file is read for sending, `HAKOBU_PATH` naming it.
    pub before_send: Option<HookSpec>,
    /// Glob patterns; empty means every name that is not ignored.
    pub include: Vec<glob::Pattern>,
    pub to: Vec<NodeName>,
    pub ready: Ready,
    pub after_send: AfterSend,
    pub on_success: Option<HookSpec>,
    pub on_failure: Option<HookSpec>,
    pub chunk_size: u64,
    /// Chunk bodies sealed for each receiving node (`keys.peers`).
    pub encrypt: bool,
    /// A transfer whose receipt carries a transient code is sent again.
    pub retry: Retry,
    /// Code conversion into the spool before sending.
    pub convert: Option<Convert>,
    /// Chunk bodies compressed with zstd at this level (`compress:`).
    pub compress: Option<i32>,
    /// 1..9, higher is published first (`priority:`, default 5).
    pub priority: u8,
    /// This profile's rate cap in bytes a second (`bandwidth:`).
    pub bandwidth: Option<u64>,
    /// How long a transfer may wait for its receipt before the failure
    /// hook runs (once) with `receipt_timeout`; `None`: for ever.
    pub receipt_timeout: Option<Duration>,
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
    pub file_id: FileId,
    pub from: Vec<NodeName>,
    pub inbox: PathBuf,
    pub mode: Mode,
    pub max_size: u64,
    /// Permissions of a placed file, exactly (the umask plays no part);
    /// default 0600.
    pub file_mode: u32,
    /// An unfinished transfer idle this long expires.
    pub partial_ttl: Duration,
    pub on_success: Option<HookSpec>,
    pub on_failure: Option<HookSpec>,
    /// Plain (unsealed) chunks fail their transfer with `encryption_required`.
    pub require_encryption: bool,
    /// Code conversion between verify and place.
    pub convert: Option<Convert>,
    /// The inbox name a file takes (`name:`, default `{file_name}`).
    pub name: NameTemplate,
}

/// How a verified file takes its place in the inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fail with `file_exists` when the name is taken.
    New,
    /// Atomically rename over an existing file.
    Replace,
    /// The existing file's bytes and then the new ones, built beside the
    /// inbox and renamed over the name: a reader sees the old file or the
    /// whole new one, never a half-appended one.
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
    /// A failing run is run again, after a backoff, up to `attempts` runs.
    pub retry: Retry,
}

/// How often something is tried, and the wait between tries: `backoff`
/// before the second, doubled before each next, at most [`Retry::MAX_DELAY`]
/// (or `backoff` itself, when that is longer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Tries in all, the first included; 1 means no retry.
    pub attempts: u32,
    pub backoff: Duration,
}

impl Retry {
    /// Once, as without a `retry:` key.
    pub const ONCE: Retry = Retry {
        attempts: 1,
        backoff: DEFAULT_RETRY_BACKOFF,
    };
    /// The longest wait the doubling reaches.
    pub const MAX_DELAY: Duration = Duration::from_secs(3600);
    /// The most tries a `retry:` key may ask for.
    pub const MAX_ATTEMPTS: u32 = 100;

    /// The wait after try `done` (1-based) failed, before the next.
    pub fn delay(&self, done: u32) -> Duration {
        let factor = 1u32 << done.saturating_sub(1).min(20);
        let cap = Self::MAX_DELAY.max(self.backoff);
        self.backoff.saturating_mul(factor).min(cap)
    }
}

const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(30);
const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);
const DEFAULT_STABLE_FOR: Duration = Duration::from_secs(2);
const DEFAULT_FILE_MODE: u32 = 0o600;
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
            // serde quotes what was written: a URL given as a string
            // instead of a list would print its password.
            let (key, message) = split_serde_error(&amqp_url::redact_text(&e.to_string()));
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

    /// True for nodes this configuration names, in a `from` or a `to`.
    pub fn knows(&self, node: &str) -> bool {
        self.receive
            .iter()
            .any(|p| p.from.iter().any(|f| f == node))
            || self.send.iter().any(|p| p.to.iter().any(|t| t == node))
            || self
                .send
                .iter()
                .any(|p| p.requests_from.iter().any(|t| t == node))
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("history.sqlite")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    /// True when a chunk's sender must be the broker-authenticated user.
    pub fn verify_sender(&self) -> bool {
        match &self.broker {
            BrokerConfig::Rabbitmq(r) => r.verify_sender,
            // The embedded broker always authenticates and stamps publishers.
            BrokerConfig::Embedded(_) => true,
        }
    }

    /// This node's secret for the embedded broker.
    pub fn embedded_secret_file(&self) -> PathBuf {
        match &self.broker {
            BrokerConfig::Embedded(EmbeddedConfig {
                secret_file: Some(f),
                ..
            }) => f.clone(),
            _ => self.state_dir.join("broker.secret"),
        }
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

#[cfg(test)]
mod tests;
