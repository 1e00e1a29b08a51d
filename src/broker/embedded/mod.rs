//! The embedded backend: a single-node durable broker built into the binary
//! (`server/`), and the client agents use to reach it (`client.rs`), over
//! the framed protocol of `frame.rs`. Only this folder knows those frames.
//!
//! # Layout
//! - `client.rs`: [`Embedded`], the `Broker` trait for this backend.
//! - `frame.rs`: the protocol's versioned, length-delimited frames.
//! - `server/`: the broker: listener, core, flusher.
//! - `log.rs`: its storage, segment files with sidecar ack files.
//! - `credentials.rs`: one secret per node; the broker's users file.
//! - `tls.rs`: the optional TLS layer (rustls) under the frames.

mod client;
pub mod credentials;
pub mod frame;
mod log;
pub mod server;
pub mod tls;

pub use client::{Credentials, Embedded};
