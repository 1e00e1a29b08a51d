//! The flusher: the thread that fsyncs for the core. It takes one batch at a
//! time and reports back through the core's own command channel (holding it
//! weakly, so that it never keeps a stopped broker's channel open), so the
//! core appends the next batch while this one is flushed.

use tokio::sync::mpsc;

use super::core::{Cmd, Confirms};
use crate::broker::embedded::log::Dirty;

pub(super) struct Flusher(pub(super) std::sync::mpsc::Sender<(Dirty, Confirms)>);

impl Flusher {
    pub(super) fn start(core: mpsc::WeakUnboundedSender<Cmd>) -> std::io::Result<Flusher> {
        let (tx, rx) = std::sync::mpsc::channel::<(Dirty, Confirms)>();
        std::thread::Builder::new()
            .name("hakobu-broker-sync".into())
            .spawn(move || {
                while let Ok((dirty, confirms)) = rx.recv() {
                    let result = dirty.sync().map_err(|e| e.to_string());
                    let Some(core) = core.upgrade() else { return };
                    if core.send(Cmd::Synced { result, confirms }).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Flusher(tx))
    }
}
