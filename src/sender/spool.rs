//! The spool (`state_dir/spool`): where a claimed file lives until every
//! receiver has settled it. Its layout is known here and nowhere else:
//! `spool/<file_id>/<transfer_id>.<name>`, one flat directory per file id
//! (no directory to create, flush and remove per file). A name too long to
//! take the transfer id in front keeps a directory of its own,
//! `spool/<file_id>/<transfer_id>/<name>`, the layout of earlier versions,
//! which is still read. Hidden entries are copies in progress.

use std::io;
use std::path::{Path, PathBuf};

use super::watch::ignored;
use crate::domain::{FileId, TransferId};

/// The longest file name the filesystems hakobu runs on take, in bytes.
const NAME_MAX: usize = 255;

/// A file in the spool: its transfer id, its name (as it will arrive) and
/// where it is.
#[derive(Clone)]
pub struct Spooled {
    pub tid: TransferId,
    pub name: String,
    pub path: PathBuf,
}

#[derive(Clone)]
pub struct Spool {
    dir: PathBuf,
}

impl Spool {
    pub fn new(dir: PathBuf) -> Spool {
        Spool { dir }
    }

    /// The directory of one file id's spooled files.
    pub fn dir_of(&self, file_id: &FileId) -> PathBuf {
        self.dir.join(file_id)
    }

    /// Where a file claimed as `tid` under `name` is spooled.
    pub fn path_of(&self, file_id: &FileId, tid: &TransferId, name: &str) -> PathBuf {
        let dir = self.dir_of(file_id);
        if tid.len() + 1 + name.len() <= NAME_MAX {
            dir.join(format!("{tid}.{name}"))
        } else {
            dir.join(tid).join(name)
        }
    }

    /// True for a path inside the spool (not yet moved by `after_send`).
    pub fn holds(&self, path: &Path) -> bool {
        path.starts_with(&self.dir)
    }

    /// The spooled files of one file id. An old-layout directory holding
    /// nothing is removed.
    pub fn entries(&self, file_id: &FileId) -> Vec<Spooled> {
        let Ok(entries) = std::fs::read_dir(self.dir_of(file_id)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| spooled_entry(&e))
            .collect()
    }

    /// Removes the directory of its own that a spooled file with a long
    /// name (or from an earlier version) has; files in the flat layout have
    /// none.
    pub fn remove_transfer_dir(&self, file: &Path) -> io::Result<()> {
        let Some(dir) = file.parent() else {
            return Ok(());
        };
        if dir.parent().and_then(Path::parent) != Some(self.dir.as_path()) {
            return Ok(());
        }
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Copies `src` into the spool as a new transfer that will arrive as
    /// `name`: under a hidden name first, fsynced, then renamed, so that the
    /// agent never sees half a copy.
    pub fn copy_in(&self, file_id: &FileId, src: &Path, name: &str) -> io::Result<Spooled> {
        self.copy_in_as(file_id, src, name, TransferId::new())
    }

    /// [`Spool::copy_in`] as the transfer `tid`.
    pub fn copy_in_as(
        &self,
        file_id: &FileId,
        src: &Path,
        name: &str,
        tid: TransferId,
    ) -> io::Result<Spooled> {
        let dst = self.path_of(file_id, &tid, name);
        let dir = dst.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{tid}.tmp"));
        std::fs::copy(src, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        crate::durable::rename_durable(&tmp, &dst)?;
        Ok(Spooled {
            tid,
            name: name.to_string(),
            path: dst,
        })
    }
}

/// Why a spooled file may not be read for sending.
#[derive(Debug)]
pub enum SourceError {
    Io(io::Error),
    /// Not a regular file with one link (see [`open_source`]).
    Unsafe(&'static str),
}

/// Opens a spooled file to send it: never through a link (`O_NOFOLLOW`),
/// never blocking on a special file, and only a regular file with one link.
pub fn open_source(path: &Path) -> Result<std::fs::File, SourceError> {
    use nix::libc::{ELOOP, O_CLOEXEC, O_NOFOLLOW, O_NONBLOCK};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(ELOOP) => SourceError::Unsafe("is a link"),
            _ => SourceError::Io(e),
        })?;
    let meta = f.metadata().map_err(SourceError::Io)?;
    if !meta.is_file() {
        return Err(SourceError::Unsafe("is not a regular file"));
    }
    if meta.nlink() != 1 {
        return Err(SourceError::Unsafe("has other hard links"));
    }
    Ok(f)
}

/// The transfer id and file name of a spool entry `<transfer_id>.<name>`.
fn parse_entry(entry: &str) -> Option<(TransferId, &str)> {
    let (tid, name) = entry.split_at_checked(36)?;
    let name = name.strip_prefix('.')?;
    let tid = TransferId::parse(tid).ok()?;
    (!name.is_empty()).then_some((tid, name))
}

/// The spooled file of an entry of a file id's directory: a file
/// `<transfer_id>.<name>`, or a directory `<transfer_id>` holding `<name>`
/// (one holding nothing else is removed). Hidden entries are skipped.
fn spooled_entry(entry: &std::fs::DirEntry) -> Option<Spooled> {
    let entry_name = entry.file_name().to_string_lossy().into_owned();
    if !entry.file_type().ok()?.is_dir() {
        let (tid, name) = parse_entry(&entry_name)?;
        return Some(Spooled {
            tid,
            name: name.to_string(),
            path: entry.path(),
        });
    }
    let tid = TransferId::parse(&entry_name).ok()?;
    let name = std::fs::read_dir(entry.path()).ok().and_then(|d| {
        d.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| !ignored(n))
    });
    let Some(name) = name else {
        let _ = std::fs::remove_dir(entry.path());
        return None;
    };
    Some(Spooled {
        path: entry.path().join(&name),
        tid,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_paths_are_flat_unless_the_name_is_too_long() {
        let spool = Spool::new(PathBuf::from("/s"));
        let sales = FileId::parse("sales").unwrap();
        let tid = TransferId::parse("0190f6c4-0000-7000-8000-000000000001").unwrap();
        let flat = spool.path_of(&sales, &tid, "a.b.csv");
        assert_eq!(flat, Path::new("/s/sales").join(format!("{tid}.a.b.csv")));
        let entry = flat.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_entry(entry), Some((tid.clone(), "a.b.csv")));
        let long = "x".repeat(230);
        assert_eq!(
            spool.path_of(&sales, &tid, &long),
            Path::new("/s/sales").join(&tid).join(&long)
        );
        for other in [
            ".a.tmp",
            "a.csv",
            tid.as_str(),
            &format!("{tid}."),
            &format!("{tid}xa"),
        ] {
            assert_eq!(parse_entry(other), None, "{other}");
        }
        assert!(spool.holds(&flat));
        assert!(!spool.holds(Path::new("/sent/a.b.csv")));
    }

    #[test]
    fn a_copy_appears_whole_under_its_spool_name() {
        let d = tempfile::tempdir().unwrap();
        let spool = Spool::new(d.path().join("spool"));
        let src = d.path().join("src.csv");
        std::fs::write(&src, b"1,2\n").unwrap();
        let id = FileId::parse("SALES").unwrap();
        let s = spool.copy_in(&id, &src, "sales.csv").unwrap();
        assert_eq!(std::fs::read(&s.path).unwrap(), b"1,2\n");
        let listed = spool.entries(&id);
        assert_eq!(listed.len(), 1, "no temporary left beside it");
        assert_eq!(
            (&listed[0].tid, listed[0].name.as_str()),
            (&s.tid, "sales.csv")
        );
    }

    #[test]
    fn a_source_is_opened_only_as_a_regular_file_with_one_link() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        assert!(open_source(&f).is_ok());
        let l = d.path().join("l");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        assert!(matches!(open_source(&l), Err(SourceError::Unsafe(_))));
        std::fs::hard_link(&f, d.path().join("h")).unwrap();
        assert!(matches!(open_source(&f), Err(SourceError::Unsafe(_))));
        assert!(matches!(open_source(d.path()), Err(SourceError::Unsafe(_))));
    }
}
