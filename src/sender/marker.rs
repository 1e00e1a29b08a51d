//! The done marker's content (issue 14, the job flow). Under `ready: {
//! done_marker: ".done" }` a file is ready when `NAME.done` appears beside
//! it; the marker may be empty, or carry lines of `key=value`, of which
//! `parent=<transfer id>` links the file to the transfer that made it (a
//! hook writes `parent=$HAKOBU_TRANSFER_ID`). Other keys are ignored, for
//! later use. A parent that is not a transfer id is logged with
//! `bad_parent_id` and the file is sent all the same, without a parent: a
//! link that is wrong must not stop the business flow it would describe.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use tracing::warn;

use crate::domain::TransferId;
use crate::error_code::ErrorCode;

/// Most bytes of a marker read: a marker is a line or two.
const MAX_MARKER: u64 = 4096;

/// The parent a marker names, if any. The marker is opened without
/// following a link and read only when it is a regular file, at most
/// [`MAX_MARKER`] bytes.
pub(super) fn parent_of(marker: &Path) -> Option<TransferId> {
    let text = read(marker)?;
    let value = text
        .lines()
        .filter_map(|l| l.trim().split_once('='))
        .find(|(k, _)| k.trim() == "parent")
        .map(|(_, v)| v.trim().to_string())?;
    match TransferId::parse(&value) {
        Ok(id) => Some(id),
        Err(e) => {
            warn!(message = "The done marker names a parent that is not a transfer id; the file is sent without a parent. Write `parent=$HAKOBU_TRANSFER_ID` in the marker.",
                marker = %marker.display(), parent = %crate::domain::escape_text(&value),
                error = %e, error_code = %ErrorCode::BadParentId);
            None
        }
    }
}

fn read(marker: &Path) -> Option<String> {
    // An empty marker (the usual one) costs one lstat, no open.
    let seen = std::fs::symlink_metadata(marker).ok()?;
    if !seen.is_file() || seen.len() == 0 {
        return None;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(marker)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_MARKER).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_names_its_parent_or_none() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("a.csv.done");
        let id = TransferId::new();
        for (text, want) in [
            (String::new(), None),
            (format!("parent={id}\n"), Some(id.clone())),
            (format!("note=x\n  parent = {id}  \n"), Some(id.clone())),
            ("parent=../../etc\n".to_string(), None),
            ("parent=\n".to_string(), None),
        ] {
            std::fs::write(&m, &text).unwrap();
            assert_eq!(parent_of(&m), want, "{text:?}");
        }
        std::fs::remove_file(&m).unwrap();
        assert_eq!(parent_of(&m), None, "no marker");
        let target = d.path().join("t");
        std::fs::write(&target, format!("parent={id}")).unwrap();
        std::os::unix::fs::symlink(&target, &m).unwrap();
        assert_eq!(parent_of(&m), None, "a link is not followed");
    }
}
