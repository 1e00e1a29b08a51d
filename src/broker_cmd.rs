//! `hakobu broker`: the embedded broker alone (`--listen ADDR --data DIR`),
//! and its administration: `add-node` gives a node its credentials,
//! `status` shows the queues' depth and the nodes the broker accepts.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::broker::embedded::credentials;
use crate::broker::embedded::server::{self, Limits};
use crate::config::{BrokerConfig, Config, parse_size};
use crate::domain::NodeName;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BrokerArgs {
    #[command(subcommand)]
    command: Option<BrokerCommand>,
    /// Address to listen on (loopback unless --tls-cert or --insecure).
    #[arg(long)]
    listen: Option<String>,
    /// The broker's data directory: messages, and the `users` file.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Bytes a queue may hold before its publishers wait.
    #[arg(long, default_value = "1GiB")]
    max_queue: String,
    /// Bytes all queues may hold before publishes are refused (and retried).
    #[arg(long, default_value = "8GiB")]
    max_disk: String,
    /// Bytes the dead-letter queue keeps; the oldest go first.
    #[arg(long, default_value = "256MiB")]
    max_dead_letter: String,
    /// Authenticated connections at once.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Authenticated connections of any one node at once.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS_PER_NODE)]
    max_connections_per_node: usize,
    /// A connection silent this long is closed (clients ping every 20s).
    #[arg(long, default_value = "90s")]
    idle_timeout: String,
    /// Listen beyond loopback in plain text.
    #[arg(long)]
    insecure: bool,
    /// Serve TLS with this certificate (PEM, with its chain); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM, mode 0600).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BrokerCommand {
    /// Give NODE a new secret (replacing any it had): printed, or written to
    /// --output (mode 0600) for the node's `embedded.secret_file`.
    AddNode {
        /// The broker's data directory (`hakobu broker --data`).
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        data: Option<PathBuf>,
        /// Or the configuration of the agent that hosts the broker.
        #[arg(short, long)]
        config: Option<PathBuf>,
        node: String,
        /// Write the secret to this new file instead of printing it.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// The queues' depth (the dead-letter queue's too) and the nodes.
    Status {
        #[arg(long, conflicts_with = "config", required_unless_present = "config")]
        data: Option<PathBuf>,
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
}

/// A failure and its exit code (2 usage or configuration, 1 otherwise).
pub type Failure = (u8, anyhow::Error);

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    (2, e.into())
}

pub async fn run(args: BrokerArgs) -> Result<(), Failure> {
    match args.command {
        Some(BrokerCommand::AddNode {
            data,
            config,
            node,
            output,
        }) => {
            let data = data_dir(data, config)?;
            let node = NodeName::parse(&node).map_err(|e| usage(anyhow::anyhow!("{e}")))?;
            add_node(&data, &node, output.as_deref()).map_err(|e| (1, e))
        }
        Some(BrokerCommand::Status { data, config }) => {
            let data = data_dir(data, config)?;
            let report = server::status::report(&data).map_err(|e| (1, e.into()))?;
            print!("{report}");
            Ok(())
        }
        None => serve(args).await,
    }
}

/// The data directory given, or that of the agent hosting the broker.
fn data_dir(data: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(d) = data {
        return Ok(d);
    }
    let file = config.ok_or_else(|| usage(anyhow::anyhow!("give --data DIR or -c FILE")))?;
    let cfg = Config::load(&file).map_err(usage)?;
    match &cfg.broker {
        BrokerConfig::Embedded(e) if e.listen.is_some() => Ok(cfg.broker_data_dir()),
        _ => Err(usage(anyhow::anyhow!(
            "{}: this agent does not host the embedded broker (broker.embedded.listen)",
            file.display()
        ))),
    }
}

fn add_node(data: &Path, node: &NodeName, output: Option<&Path>) -> anyhow::Result<()> {
    let Some(out) = output else {
        let secret = credentials::add_node(data, node)?;
        println!("{secret}");
        return Ok(());
    };
    // The file first: a node is never left without the secret it was given.
    let secret = credentials::new_secret()?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::secret::create(out, &secret)?;
    if let Err(e) = credentials::ensure(data, node, &secret) {
        let _ = std::fs::remove_file(out);
        return Err(e.into());
    }
    println!(
        "node {node}: secret written to {} (mode 0600); name it in {node}'s broker.embedded.secret_file (or move it to its state_dir/broker.secret)",
        out.display()
    );
    Ok(())
}

/// The embedded broker alone, until SIGINT or SIGTERM.
async fn serve(args: BrokerArgs) -> Result<(), Failure> {
    let (Some(listen), Some(data)) = (args.listen, args.data) else {
        return Err(usage(anyhow::anyhow!(
            "give --listen ADDR and --data DIR (or a subcommand: add-node, status)"
        )));
    };
    let size =
        |flag: &str, v: &str| parse_size(v).map_err(|e| usage(anyhow::anyhow!("{flag}: {e}")));
    let limits = Limits {
        max_queue: size("--max-queue", &args.max_queue)?,
        max_disk: size("--max-disk", &args.max_disk)?,
        max_dead_letter: size("--max-dead-letter", &args.max_dead_letter)?,
        max_connections: args.max_connections.max(2),
        max_connections_per_node: args.max_connections_per_node.max(2),
        idle_timeout: crate::config::parse_duration(&args.idle_timeout)
            .map_err(|e| usage(anyhow::anyhow!("--idle-timeout: {e}")))?,
    };
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert_file), Some(key_file)) => Some(server::ServerTls {
            cert_file,
            key_file,
        }),
        _ => None,
    };
    let running = server::start_tls(&listen, &data, limits, args.insecure, tls.as_ref())
        .await
        .map_err(usage)?;
    println!("hakobu broker listening on {}", running.addr);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| (1, e.into()))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
