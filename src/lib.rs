//! hakobu: a file-transfer integration hub. An agent on every server sends
//! files dropped into outboxes through a broker to the agents of other
//! servers, which verify them, place them atomically and run hooks.
//!
//! # Layout
//! - [`config`]: the YAML configuration, read and validated once.
//! - [`sender`]: watch an outbox → claim into the spool → publish chunks →
//!   await the receipt → hooks → `after_send`.
//! - [`receiver`]: consume → assemble → verify → place → record → hooks → receipt.
//! - [`broker`]: the broker trait and its backends; only they know a broker protocol.
//! - [`wire`]: the message format; only it turns messages into bytes.
//! - [`coalesce`]: publishes what waits for the same node as one broker
//!   message (small files, receipts).
//! - [`store`]: the SQLite state database: history and the exactly-once ledger.
//! - [`hooks`]: the hook runner; only it starts hook commands.
//! - [`durable`]: fsync/rename helpers every placed or checkpointed file goes through.
//! - [`agent`]: `hakobu run`, wiring the above together.
//! - [`cli`]: the command line.

pub mod agent;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod durable;
pub mod hooks;
pub mod receiver;
pub mod sender;
pub mod store;
pub mod wire;
