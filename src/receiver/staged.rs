//! The file about to be placed, and the whole-file step before placing:
//! the verified partial file (`<tid>.part`), or, with `convert:`, the file
//! converted from it into `<tid>.conv` beside it in `.hakobu-partial`
//! (created `O_EXCL|O_NOFOLLOW` 0600 like every partial file, flushed before
//! it may be placed). The received file stays until the converted one is
//! placed, so a crash at any point redoes the conversion from it: the
//! inbox never holds a half-converted file, and recovery needs no new
//! status (`placing` records the converted file's inode).

use std::fs::{self, File};
use std::path::Path;

use super::error::ReceiveError;
use super::partial::{self, Dirs};
use crate::config::ReceiveProfile;
use crate::domain::TransferId;
use crate::store::ReceiveRow;
use crate::transform::Transform;

/// The inbox name of `row`'s file under profile `p`'s `name:`.
pub fn inbox_name(row: &ReceiveRow, p: &ReceiveProfile) -> Result<String, ReceiveError> {
    if p.name.is_default() {
        return Ok(row.file_name.clone());
    }
    p.name
        .render(row, &crate::clock::local_date())
        .map(|n| n.to_string())
        .map_err(ReceiveError::BadReceiveName)
}

/// A verified partial file about to be placed: its inbox and partial
/// directory open, its name there, its descriptor (checked: a regular file
/// of the agent's own, one link) and its inode.
pub struct Staged {
    pub(super) dirs: Dirs,
    pub(super) name: String,
    pub(super) file: File,
    pub(super) ino: u64,
}

impl Staged {
    /// Opens the partial file of `tid` in `inbox` without following links.
    /// Two links are accepted only when the second is the inbox name
    /// `target` itself: mode `new` linked it before a crash.
    pub fn open(inbox: &Path, tid: &TransferId, target: &str) -> Result<Staged, ReceiveError> {
        let dirs = partial::open_dirs(inbox, false)?;
        let name = partial::name_of(tid);
        let file = partial::open_raw(&dirs, &name, false)?;
        let st = match partial::check_file(&file, &name, 1) {
            Ok(st) => st,
            Err(e) => {
                let st = partial::check_file(&file, &name, 2).map_err(|_| e)?;
                let linked = partial::stat_in_inbox(&dirs, target)?
                    .is_some_and(|t| t.st_ino == st.st_ino && t.st_dev == st.st_dev);
                if !linked {
                    return Err(ReceiveError::UnsafeInbox(format!(
                        "the partial file {name} has another link"
                    )));
                }
                st
            }
        };
        Ok(Staged {
            dirs,
            name,
            file,
            ino: st.st_ino,
        })
    }

    /// The whole-file step of the transform stage on the verified file:
    /// with `convert:`, the file to place becomes the converted one (any
    /// leftover of an earlier try removed first), with its digest and line
    /// count; otherwise the file stays as it is.
    pub fn finish(
        self,
        transform: &Transform,
    ) -> Result<(Staged, Option<(String, u64)>), ReceiveError> {
        let Some(spec) = transform.conversion() else {
            return Ok((self, None));
        };
        let tid = self.name.trim_end_matches(".part");
        let name = format!("{tid}.conv");
        let io = |what: &'static str| move |e| ReceiveError::from_io(what, e);
        partial::remove_at(&self.dirs, &name).map_err(io("removing an earlier conversion"))?;
        let out = partial::open_file(&self.dirs, &name, true)?;
        let mut src = self.file;
        let mut writer = std::io::BufWriter::with_capacity(1 << 20, &out);
        let converted =
            crate::transform::convert::convert(spec, &mut src, &mut writer).map_err(|e| match e {
                crate::transform::convert::ConvertError::Io(e) => {
                    ReceiveError::from_io("converting the file", e)
                }
                e => ReceiveError::ConversionFailed(e.to_string()),
            });
        drop(writer);
        let converted = match converted {
            Ok(c) => c,
            Err(e) => {
                let _ = partial::remove_at(&self.dirs, &name);
                return Err(e);
            }
        };
        crate::failpoint::hit("receiver.convert.written");
        out.sync_all().map_err(io("flushing the converted file"))?;
        let st = partial::check_file(&out, &name, 1)?;
        Ok((
            Staged {
                dirs: self.dirs,
                name,
                file: out,
                ino: st.st_ino,
            },
            Some((converted.sha256, converted.records)),
        ))
    }

    /// Gives the file the profile's `file_mode`, exactly (the umask plays no part).
    pub(super) fn chmod(&self, file_mode: u32) -> Result<(), ReceiveError> {
        use std::os::unix::fs::PermissionsExt;
        self.file
            .set_permissions(fs::Permissions::from_mode(file_mode))
            .map_err(|e| ReceiveError::from_io("setting the file's mode", e))
    }
}
