//! hakobu: a file-transfer integration hub. An agent on every server sends
//! files dropped into outboxes through a broker to the agents of other
//! servers, which verify them, place them atomically and run hooks.
//!
//! # Layout
//! - [`config`]: the YAML configuration, read and validated once.
//! - [`domain`]: node names, file ids, transfer ids and file names, each
//!   checked once where it enters.
//! - [`sender`]: watch an outbox → claim into the spool → publish chunks →
//!   receipt → hook → `after_send`; one file per stage.
//! - [`receiver`]: ingest → commit → verify → place → complete (hooks) →
//!   receipt, and recovery; one file per stage.
//! - [`transform`]: the one place a transfer's bytes may change on the way.
//! - [`dispatch`]: decodes what arrives on a node's queue and routes it.
//! - [`broker`]: the broker trait and its backends; only they know a broker protocol.
//! - [`wire`]: the message format; only it turns messages into bytes.
//! - [`coalesce`]: publishes what waits for the same node as one broker
//!   message (small files, receipts).
//! - [`store`]: the SQLite state database: history and the exactly-once ledger.
//! - [`hooks`]: the hook runner; only it starts hook commands.
//! - [`chain_cmd`]: `hakobu history --chain`, the job flow across servers.
//! - [`error_code`]: the one table of the stable error codes users see.
//! - [`durable`]: fsync/rename helpers for files the agent places or moves.
//! - [`keys`]: node keys for end-to-end encryption (`hakobu keygen`).
//! - [`secret`]: secret files (credentials, tokens, keys): read only when
//!   private, created 0600.
//! - [`agent`]: `hakobu run`, wiring the above together, and its lifecycle.
//! - [`rerun`]: `hakobu rerun`, a settled transfer's hook again.
//! - [`actions`]: rerun, resend and queue a copy, shared by the command
//!   line and the web console, each refusal with its error code.
//! - [`error_help`]: each error code's sentence and what to do about it.
//! - [`cli`]: the command line.
//! - [`progress`]: the terminal's view of a transfer waited for (`--wait`).
//! - [`broker_cmd`]: `hakobu broker`: the embedded broker alone, `add-node`, `status`.
//! - [`request_cmd`]: `hakobu request` (pull), and `hakobu send` of a profile's `source`.
//! - [`http`]: the HTTP endpoint: web console, REST API, `/metrics` (token).
//! - [`metrics`]: the figures `/metrics` exposes.
//! - [`failpoint`]: crash points for tests.
//! - [`logging`]: the log subscriber: text or JSON lines (`--log-format`).
//! - [`status_cmd`]: `hakobu status`: in flight, awaiting receipts, recent failures.
//! - [`generate_cmd`]: `hakobu generate`: completions and man pages for packaging.

pub mod actions;
pub mod agent;
pub mod broker;
pub mod broker_cmd;
pub mod chain_cmd;
pub mod cli;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod dispatch;
pub mod domain;
pub mod durable;
pub mod error_code;
pub mod error_help;
pub mod failpoint;
pub mod generate_cmd;
pub mod hooks;
pub mod http;
pub mod keys;
pub mod logging;
pub mod metrics;
pub mod progress;
pub mod receiver;
pub mod request_cmd;
pub mod rerun;
pub mod retry_log;
pub mod secret;
pub mod sender;
pub mod status_cmd;
pub mod store;
pub mod transform;
pub mod wire;
