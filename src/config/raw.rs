//! The configuration file exactly as written: serde types that reject unknown
//! keys. Nothing here is checked beyond its YAML shape; `validate.rs` turns
//! these into the checked types the rest of the agent uses.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// This agent's node name, unique in the cluster.
    pub node: String,
    /// History database, spool, logs.
    pub state_dir: PathBuf,
    /// Which broker carries the messages.
    pub broker: RawBroker,
    /// Send profiles.
    #[serde(default)]
    pub send: Vec<RawSend>,
    /// Receive profiles.
    #[serde(default)]
    pub receive: Vec<RawReceive>,
    /// Silences the warning an agent running as root logs at start.
    pub run_as_root: Option<bool>,
    /// End-to-end encryption: this node's private key, peers' public keys.
    pub keys: Option<RawKeys>,
    /// The agent's rate cap, all send profiles together (`10MiB/s`).
    pub bandwidth: Option<String>,
    /// The HTTP endpoint: web console, REST API, `/metrics` (off unless set).
    pub http: Option<RawHttp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// `host:port` to listen on, such as 127.0.0.1:9810.
    pub listen: String,
    /// The token every page and API call needs (mode 0600; default
    /// `state_dir/http.token`, created on the first start).
    pub token_file: Option<PathBuf>,
    /// Serve `/metrics` without the token (loopback only).
    pub metrics_open: Option<bool>,
    /// Required beyond loopback: the endpoint's certificate and key.
    pub tls: Option<RawHttpTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    /// This node's age private key (`hakobu keygen`), mode 0600.
    pub private_key_file: Option<PathBuf>,
    /// Public keys (`age1...`) of the nodes this one encrypts to, by node name.
    pub peers: Option<BTreeMap<String, String>>,
}

/// Exactly one of the two backends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBroker {
    pub rabbitmq: Option<RawRabbitmq>,
    pub embedded: Option<RawEmbedded>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRabbitmq {
    /// One URL per cluster node; a connection takes one and fails over to the next.
    pub urls: Vec<String>,
    /// How long a publish may wait for the broker's confirm (default 30s).
    pub confirm_timeout: Option<String>,
    /// The AMQP heartbeat, whole seconds (default 5s; 0 is refused).
    pub heartbeat: Option<String>,
    /// Unacknowledged deliveries a consumer holds at most (default 32).
    pub prefetch: Option<u16>,
    /// Deliveries of one message before the broker dead-letters it (default 20).
    pub delivery_limit: Option<u32>,
    /// Unconfirmed bytes a sender keeps in flight per transfer (default 8MiB).
    pub window: Option<String>,
    /// Refuse chunks whose `from` is not the broker user that published them
    /// (each node logs in as a user named after itself).
    pub verify_sender: Option<bool>,
    /// Bytes a node's queue may hold before publishes to it are refused and
    /// retried (RabbitMQ `x-max-length-bytes`). Every agent must agree.
    pub max_queue: Option<String>,
    /// The node's password, read from this file (mode 0600) and put into
    /// URLs written without one.
    pub password_file: Option<PathBuf>,
    /// TLS for `amqps://` URLs: a private CA, a client certificate.
    pub tls: Option<RawRabbitTls>,
    /// `external`: log in with the client certificate's CN (no password).
    pub auth_mechanism: Option<String>,
    /// Allow plain `amqp://` to a host beyond loopback.
    pub insecure: Option<bool>,
    /// Bytes the dead-letter queue keeps at most (default 1GiB); the oldest
    /// dead letters go first.
    pub dead_letter_max: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRabbitTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmbedded {
    /// Bytes a queue may hold before its publishers wait (default 1GiB).
    pub max_queue: Option<String>,
    pub listen: Option<String>,
    pub connect: Option<String>,
    /// This node's secret for the broker (default `state_dir/broker.secret`);
    /// `token_file` is the name it had before each node had its own.
    #[serde(alias = "token_file")]
    pub secret_file: Option<PathBuf>,
    /// Stored bytes of all queues beyond which the hosted broker refuses
    /// publishes, which senders retry (default 8GiB).
    pub max_disk: Option<String>,
    /// Bytes the hosted broker's dead-letter queue keeps (default 256MiB).
    pub max_dead_letter: Option<String>,
    /// Authenticated connections the hosted broker accepts at once (default 256).
    pub max_connections: Option<usize>,
    /// Of those, connections of any one node at once (default 32).
    pub max_connections_per_node: Option<usize>,
    /// Allow a plain-text connection beyond loopback.
    pub insecure: Option<bool>,
    /// TLS: the hosted broker's `cert_file`/`key_file`; the CA a client
    /// trusts (`ca_file`) and the name it expects (`server_name`).
    pub tls: Option<RawEmbeddedTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmbeddedTls {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSend {
    pub file_id: String,
    /// A directory watched for files to send; optional beside `source`.
    pub outbox: Option<PathBuf>,
    /// A registered file, sent as a copy (`hakobu send` without a path, or
    /// a request).
    pub source: Option<PathBuf>,
    pub include: Option<Vec<String>>,
    /// May be empty when `requests_from` names who may ask.
    #[serde(default)]
    pub to: Vec<String>,
    /// Nodes that may ask for this file (`hakobu request`).
    pub requests_from: Option<Vec<String>>,
    /// A job run before the file is read for sending (HULFT's pre-send job).
    pub before_send: Option<RawHook>,
    pub ready: Option<RawReady>,
    pub after_send: Option<RawAfterSend>,
    pub on_success: Option<RawHook>,
    pub on_failure: Option<RawHook>,
    /// Bytes per chunk message, 64KiB to 8MiB (default 512KiB).
    pub chunk_size: Option<String>,
    /// Seal chunk bodies for the receiving nodes' public keys (`keys.peers`).
    pub encrypt: Option<bool>,
    /// Send again a transfer whose receipt carries a transient code.
    pub retry: Option<RawRetry>,
    /// Code conversion into the spool before sending.
    pub convert: Option<RawConvert>,
    /// Compress chunk bodies: `zstd` or `{ zstd: LEVEL }`.
    pub compress: Option<RawCompress>,
    /// 1..9, higher first (default 5).
    pub priority: Option<u8>,
    /// This profile's rate cap (`10MiB/s`).
    pub bandwidth: Option<String>,
    /// The failure hook runs once a transfer has waited this long for its
    /// receipt (`2d`); absent: no limit.
    pub receipt_timeout: Option<String>,
}

/// `retry: { attempts: N, backoff: 30s }`, on a hook or a send profile.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Runs in all, the first included (1 to 100).
    pub attempts: u32,
    /// The wait before the second run; doubled before each next (default 30s).
    pub backoff: Option<String>,
}

/// `convert: { from, to, newline, on_error, bom }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConvert {
    pub from: String,
    pub to: String,
    pub newline: Option<String>,
    pub on_error: Option<String>,
    pub bom: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawCompress {
    Word(String),
    Level(RawZstdLevel),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawZstdLevel {
    pub zstd: i32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReady {
    pub stable_for: Option<String>,
    pub done_marker: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawAfterSend {
    Word(String),
    Move(RawMoveTo),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMoveTo {
    pub move_to: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawHook {
    Argv(Vec<String>),
    Full(RawHookFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHookFull {
    pub run: Vec<String>,
    pub timeout: Option<String>,
    pub shell: Option<bool>,
    pub env: Option<BTreeMap<String, String>>,
    pub cwd: Option<PathBuf>,
    /// Runs again a hook that failed (non-zero exit or timeout).
    pub retry: Option<RawRetry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReceive {
    pub file_id: String,
    pub from: Vec<String>,
    pub inbox: PathBuf,
    pub mode: Option<String>,
    /// Generations kept in `generations` mode (default 7).
    pub keep: Option<u32>,
    pub max_size: Option<String>,
    /// A transfer no chunk has reached for this long is failed and its
    /// partial file removed (default 24h).
    pub partial_ttl: Option<String>,
    pub on_success: Option<RawHook>,
    pub on_failure: Option<RawHook>,
    /// Refuse chunks that are not sealed for this node (`encryption_required`).
    pub require_encryption: Option<bool>,
    /// Permissions of placed files, octal: `"0640"` (default 0600).
    pub file_mode: Option<RawFileMode>,
    /// Code conversion between verify and place.
    pub convert: Option<RawConvert>,
    /// The inbox name, a template (default `"{file_name}"`).
    pub name: Option<String>,
}

/// An octal mode, written as a string (`"0640"`) or a number (`640`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawFileMode {
    Number(u64),
    Text(String),
}
