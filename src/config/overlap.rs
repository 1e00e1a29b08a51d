//! Directories that must not overlap: mistakes that lose data or loop
//! forever, refused when the configuration is read (so by `hakobu check`),
//! each naming the file, the line and the key.
//!
//! - an inbox equal to or inside an outbox: the agent would send what it
//!   receives, again and again;
//! - an outbox inside an inbox, or a `move_to` directory inside an outbox;
//! - the state directory equal to or inside an inbox or an outbox (the agent
//!   would send, or other users reach, its database and spool), or an
//!   inbox or outbox inside the state directory's own parts (`spool/`,
//!   `logs/`, `broker/`); an inbox or outbox elsewhere under the state
//!   directory (`var/beta/inbox`, the README's layout) is fine;
//! - two receive profiles sharing an inbox with different `mode` or
//!   `file_mode`.
//!
//! Paths are compared after resolving links where they exist (the longest
//! existing ancestor is canonicalised), lexically beyond that.

use std::path::{Component, Path, PathBuf};

use super::validate::Validator;
use super::{AfterSend, ConfigError, ReceiveProfile, SendProfile};

impl Validator<'_> {
    pub(super) fn overlaps(
        &self,
        state_dir: &Path,
        send: &[SendProfile],
        receive: &[ReceiveProfile],
    ) -> Result<(), ConfigError> {
        let state = resolved(state_dir);
        // A profile without an outbox (a `source` only) watches nothing.
        let outboxes: Vec<Option<PathBuf>> = send
            .iter()
            .map(|s| s.outbox.as_deref().map(resolved))
            .collect();
        let inboxes: Vec<PathBuf> = receive.iter().map(|r| resolved(&r.inbox)).collect();
        for (i, inbox) in inboxes.iter().enumerate() {
            let key = format!("receive[{i}].inbox");
            for (j, outbox) in outboxes.iter().enumerate() {
                let Some(outbox) = outbox else { continue };
                if inbox.starts_with(outbox) {
                    return Err(self.err(&key, format!(
                        "the inbox is send[{j}]'s outbox or inside it: every file received would be sent again, forever; give it a directory of its own"
                    )));
                }
                if outbox.starts_with(inbox) {
                    return Err(self.err(&format!("send[{j}].outbox"), format!(
                        "the outbox is inside receive[{i}]'s inbox: received files and partial files would be sent; give it a directory of its own"
                    )));
                }
            }
            if state.starts_with(inbox) || in_state_parts(&state, inbox) {
                return Err(self.err(&key, "the inbox and the state directory overlap: received files would mix with the agent's database and spool; give each a directory of its own"));
            }
            for (j, other) in inboxes.iter().enumerate().take(i) {
                let (a, b) = (&receive[j], &receive[i]);
                if other == inbox && (a.mode != b.mode || a.file_mode != b.file_mode) {
                    return Err(self.err(&format!("receive[{i}].mode"), format!(
                        "receive[{j}] shares this inbox with another mode or file_mode: a file of one profile would be placed by the other's rule; give each its own inbox or the same mode"
                    )));
                }
            }
        }
        for (j, (outbox, s)) in outboxes.iter().zip(send).enumerate() {
            let in_state = |o: &PathBuf| state.starts_with(o) || in_state_parts(&state, o);
            if outbox.as_ref().is_some_and(in_state) {
                return Err(self.err(&format!("send[{j}].outbox"), "the outbox and the state directory overlap: the agent would send its own database and spool; give each a directory of its own"));
            }
            if let AfterSend::MoveTo(dir) = &s.after_send {
                let dir = resolved(dir);
                if let Some(k) = outboxes
                    .iter()
                    .position(|o| o.as_ref().is_some_and(|o| dir.starts_with(o)))
                {
                    return Err(self.err(&format!("send[{j}].after_send"), format!(
                        "move_to is send[{k}]'s outbox or inside it: every sent file would be sent again; move it elsewhere"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// True when `dir` is inside one of the agent's own parts of `state`.
fn in_state_parts(state: &Path, dir: &Path) -> bool {
    ["spool", "logs", "broker"]
        .iter()
        .any(|part| dir.starts_with(state.join(part)))
}

/// `p` with `.` and `..` resolved lexically, then its longest existing
/// ancestor canonicalised (links resolved) and the rest appended.
pub(super) fn resolved(p: &Path) -> PathBuf {
    let mut lexical = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::CurDir => {}
            c => lexical.push(c),
        }
    }
    let mut rest = Vec::new();
    let mut base = lexical.as_path();
    loop {
        if let Ok(real) = base.canonicalize() {
            return rest.iter().rev().fold(real, |acc, c| acc.join(c));
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                base = parent;
            }
            _ => return lexical,
        }
    }
}
