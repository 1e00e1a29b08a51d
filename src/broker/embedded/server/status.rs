//! `hakobu broker status --data DIR`: what the broker's data directory holds
//! now, read from disk without disturbing a running broker: each queue's
//! depth (the dead-letter queue's among them) and the nodes it accepts.

use std::fmt::Write;
use std::path::Path;

use crate::broker::DEAD_LETTER_QUEUE;
use crate::broker::embedded::credentials::{CredentialError, Users};
use crate::broker::embedded::log;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read the broker's data directory {0}: {1}")]
    Data(std::path::PathBuf, std::io::Error),
    #[error(transparent)]
    Credentials(#[from] CredentialError),
}

/// The report, one line per queue, then the nodes.
pub fn report(data: &Path) -> Result<String, StatusError> {
    let segments = data.join("segments");
    if !data.is_dir() {
        return Err(StatusError::Data(
            data.to_path_buf(),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such directory: is this a broker's --data directory?",
            ),
        ));
    }
    // A broker that never ran here has no segments yet: no messages.
    let queues = if segments.is_dir() {
        log::census(&segments).map_err(|e| StatusError::Data(data.to_path_buf(), e))?
    } else {
        Default::default()
    };
    let users = Users::load(data)?;
    let mut out = String::new();
    let _ = writeln!(out, "{:<40} {:>10} {:>14}", "queue", "messages", "bytes");
    let dead = queues.get(DEAD_LETTER_QUEUE).copied().unwrap_or((0, 0));
    for (q, (n, bytes)) in queues.iter().filter(|(q, _)| *q != DEAD_LETTER_QUEUE) {
        let q = q.escape_debug().to_string();
        let _ = writeln!(out, "{q:<40} {n:>10} {bytes:>14}");
    }
    let _ = writeln!(out, "{DEAD_LETTER_QUEUE:<40} {:>10} {:>14}", dead.0, dead.1);
    let nodes: Vec<&str> = users.nodes().collect();
    let _ = writeln!(
        out,
        "nodes: {}",
        if nodes.is_empty() {
            "(none)".to_string()
        } else {
            nodes.join(", ")
        }
    );
    Ok(out)
}
