//! The inbox and its partial files, reached without following links. An
//! inbox is often a drop zone other local users may write, while the agent
//! may run as root: every step here works on descriptors, never on a path
//! another user could redirect.
//!
//! - The inbox is opened `O_DIRECTORY|O_NOFOLLOW`; a link at its path is
//!   followed once when root or the agent's user owns the link.
//! - `<inbox>/.hakobu-partial` is created mode 0700 and opened
//!   `O_DIRECTORY|O_NOFOLLOW` relative to the inbox; it must be a directory
//!   owned by the agent's user that neither group nor others may write (a
//!   wider mode without write bits is tightened to 0700), else the transfer
//!   fails with `unsafe_inbox`. Nobody else can then create, replace or
//!   link a name inside it.
//! - A partial file is created once, `O_CREAT|O_EXCL|O_NOFOLLOW`, mode
//!   0600, relative to that directory, and later opened `O_NOFOLLOW`; each
//!   open checks the descriptor: a regular file of the agent's user with
//!   one link.
//! - Placement (`place.rs`) renames or links between the two directory
//!   descriptors (`renameat`, `linkat`).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{FileStat, Mode as Perm, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Uid, UnlinkatFlags, unlinkat};

use super::error::ReceiveError;
use super::ingest::PARTIAL_DIR;
use crate::domain::TransferId;

const DIR: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// An inbox and its partial directory, both open.
pub struct Dirs {
    pub inbox: OwnedFd,
    pub partial: OwnedFd,
}

/// The name of `tid`'s partial file inside the partial directory.
pub fn name_of(tid: &TransferId) -> String {
    format!("{tid}.part")
}

fn io_err(what: &str, e: Errno) -> ReceiveError {
    ReceiveError::from_io(what, io::Error::from(e))
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// Opens `inbox` (created when missing) and, when `create`, makes its
/// partial directory if missing; then opens and checks the partial
/// directory.
pub fn open_dirs(inbox: &Path, create: bool) -> Result<Dirs, ReceiveError> {
    let inbox_fd = open_inbox(inbox, create)?;
    if create {
        match mkdirat(&inbox_fd, PARTIAL_DIR, Perm::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io_err("creating the partial directory", e)),
        }
    }
    let partial = open_partial_dir(&inbox_fd, inbox)?;
    Ok(Dirs {
        inbox: inbox_fd,
        partial,
    })
}

/// Opens the inbox directory, created when missing and `create`. A link at
/// its path is followed only when root or the agent's user owns the link
/// (whoever made it could have configured the path itself), and only to a
/// directory that is not a link again; any other link fails with
/// `unsafe_inbox`.
fn open_inbox(inbox: &Path, create: bool) -> Result<OwnedFd, ReceiveError> {
    let unsafe_inbox =
        |why: &str| ReceiveError::UnsafeInbox(format!("the inbox {} {why}", inbox.display()));
    let opened = match openat(AT_FDCWD, inbox, DIR, Perm::empty()) {
        Err(Errno::ENOENT) if create => {
            std::fs::create_dir_all(inbox)
                .map_err(|e| ReceiveError::from_io("creating the inbox", e))?;
            openat(AT_FDCWD, inbox, DIR, Perm::empty())
        }
        // A link there fails O_DIRECTORY|O_NOFOLLOW with ENOTDIR (or ELOOP).
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let (parent, link) = trusted_link(inbox).map_err(|e| match e {
                LinkError::Untrusted(uid) => unsafe_inbox(&format!(
                    "is a link owned by uid {uid}, neither root nor the agent's user"
                )),
                LinkError::NotALink => unsafe_inbox("is not a directory"),
                LinkError::Os(e) => io_err("reading the link at the inbox", e),
            })?;
            openat(&parent, link.as_os_str(), DIR, Perm::empty())
        }
        other => other,
    };
    opened.map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => unsafe_inbox("is a link or not a directory"),
        e => io_err("opening the inbox", e),
    })
}

enum LinkError {
    Untrusted(u32),
    NotALink,
    Os(Errno),
}

/// The symbolic link at `path`, read through a descriptor of the link
/// itself so that its owner and its target belong to the same link: the
/// directory that holds it (targets are relative to it) and the target.
fn trusted_link(path: &Path) -> Result<(OwnedFd, std::ffi::OsString), LinkError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or(LinkError::Os(Errno::EINVAL))?;
    let dir = openat(
        AT_FDCWD,
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Perm::empty(),
    )
    .map_err(LinkError::Os)?;
    let link = openat(
        &dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Perm::empty(),
    )
    .map_err(LinkError::Os)?;
    let st = fstat(&link).map_err(LinkError::Os)?;
    if kind(&st) != SFlag::S_IFLNK {
        return Err(LinkError::NotALink);
    }
    if st.st_uid != 0 && st.st_uid != Uid::effective().as_raw() {
        return Err(LinkError::Untrusted(st.st_uid));
    }
    let target = nix::fcntl::readlinkat(&link, "").map_err(LinkError::Os)?;
    Ok((dir, target))
}

fn open_partial_dir(inbox_fd: &OwnedFd, inbox: &Path) -> Result<OwnedFd, ReceiveError> {
    let unsafe_dir = |why: &str| {
        ReceiveError::UnsafeInbox(format!("{} {why}", inbox.join(PARTIAL_DIR).display()))
    };
    let fd = openat(inbox_fd, PARTIAL_DIR, DIR, Perm::empty()).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => unsafe_dir("is a link or not a directory"),
        e => io_err("opening the partial directory", e),
    })?;
    let st = fstat(&fd).map_err(|e| io_err("reading the partial directory", e))?;
    if st.st_uid != Uid::effective().as_raw() {
        return Err(unsafe_dir(&format!(
            "belongs to uid {}, not to the agent's user",
            st.st_uid
        )));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_dir(&format!(
            "has mode {mode:04o}: its group or others may write it"
        )));
    }
    if mode != 0o700 {
        fchmod(&fd, Perm::from_bits_truncate(0o700))
            .map_err(|e| io_err("tightening the partial directory", e))?;
    }
    Ok(fd)
}

/// Checks an open partial (or staging) file: a regular file of the agent's
/// user with `links` links.
pub fn check_file(f: &File, name: &str, links: u64) -> Result<FileStat, ReceiveError> {
    let st = fstat(f.as_fd()).map_err(|e| io_err("reading the partial file", e))?;
    if kind(&st) != SFlag::S_IFREG
        || st.st_uid != Uid::effective().as_raw()
        || st.st_nlink as u64 != links
    {
        return Err(ReceiveError::UnsafeInbox(format!(
            "the partial file {name} is not a regular file of the agent's own with {links} link(s)"
        )));
    }
    Ok(st)
}

/// Opens `name` in the partial directory for reading and writing without
/// following a link; with `create`, creates it (mode 0600) if missing.
/// Checked: a regular file of the agent's own with one link.
pub fn open_file(dirs: &Dirs, name: &str, create: bool) -> Result<File, ReceiveError> {
    let f = open_raw(dirs, name, create)?;
    check_file(&f, name, 1)?;
    Ok(f)
}

/// [`open_file`] without the check of what was opened (the caller checks).
pub fn open_raw(dirs: &Dirs, name: &str, create: bool) -> Result<File, ReceiveError> {
    let flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let opened = match openat(&dirs.partial, name, flags, Perm::empty()) {
        Err(Errno::ENOENT) if create => {
            let excl = flags | OFlag::O_CREAT | OFlag::O_EXCL;
            match openat(&dirs.partial, name, excl, Perm::from_bits_truncate(0o600)) {
                Ok(fd) => {
                    // The umask may only have narrowed it: exactly 0600.
                    fchmod(&fd, Perm::from_bits_truncate(0o600))
                        .map_err(|e| io_err("creating the partial file", e))?;
                    Ok(fd)
                }
                // Created since: open what is there, and check it.
                Err(Errno::EEXIST) => openat(&dirs.partial, name, flags, Perm::empty()),
                Err(e) => Err(e),
            }
        }
        other => other,
    };
    let fd = opened.map_err(|e| match e {
        Errno::ELOOP | Errno::ENXIO => {
            ReceiveError::UnsafeInbox(format!("a link or a device is at the partial file {name}"))
        }
        e => io_err("opening the partial file", e),
    })?;
    Ok(File::from(fd))
}

/// Opens the partial file of `partial_path` (`<inbox>/.hakobu-partial/<name>`).
pub fn open_path(partial_path: &Path) -> Result<File, ReceiveError> {
    let (inbox, name) = split(partial_path)?;
    let dirs = open_dirs(inbox, false)?;
    open_file(&dirs, name, false)
}

fn split(partial_path: &Path) -> Result<(&Path, &str), ReceiveError> {
    let name = partial_path.file_name().and_then(|n| n.to_str());
    let inbox = partial_path.parent().and_then(Path::parent);
    match (inbox, name) {
        (Some(inbox), Some(name)) => Ok((inbox, name)),
        _ => Err(ReceiveError::Io(format!(
            "not a partial file: {}",
            partial_path.display()
        ))),
    }
}

/// Removes `name` from the partial directory (a missing one is no error),
/// never through a link.
pub fn remove_at(dirs: &Dirs, name: &str) -> io::Result<()> {
    match unlinkat(&dirs.partial, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes the partial file of `tid` from `inbox`, if the partial directory
/// is safe to use; a partial directory that is not is left alone.
pub fn remove(inbox: &Path, tid: &TransferId) -> io::Result<()> {
    match open_dirs(inbox, false) {
        Ok(dirs) => {
            remove_at(&dirs, &format!("{tid}.conv"))?;
            remove_at(&dirs, &name_of(tid))
        }
        // No partial directory, or one that is not ours: nothing of ours to remove.
        Err(_) => Ok(()),
    }
}

/// Removes the partial file at `partial_path` (`<inbox>/.hakobu-partial/<name>`)
/// as [`remove`] does.
pub fn remove_path(partial_path: &Path) -> io::Result<()> {
    let Ok((inbox, name)) = split(partial_path) else {
        return Ok(());
    };
    match open_dirs(inbox, false) {
        Ok(dirs) => {
            // And the file converted from it, if any (`staged.rs`).
            if let Some(tid) = name.strip_suffix(".part") {
                remove_at(&dirs, &format!("{tid}.conv"))?;
            }
            remove_at(&dirs, name)
        }
        Err(_) => Ok(()),
    }
}

/// What is at `name` in the inbox, links not followed: `None` when nothing.
pub fn stat_in_inbox(dirs: &Dirs, name: &str) -> Result<Option<FileStat>, ReceiveError> {
    match fstatat(&dirs.inbox, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(io_err("reading the inbox", e)),
    }
}

/// True for a regular file's stat.
pub fn is_regular(st: &FileStat) -> bool {
    kind(st) == SFlag::S_IFREG
}

/// Flushes a directory's entries through its descriptor.
pub fn fsync_dir(fd: &OwnedFd) -> io::Result<()> {
    nix::unistd::fsync(fd).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_partial_directory_is_created_private_and_a_link_refused() {
        let d = tempfile::tempdir().unwrap();
        let inbox = d.path().join("inbox");
        let dirs = open_dirs(&inbox, true).unwrap();
        let meta = std::fs::metadata(inbox.join(PARTIAL_DIR)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        let f = open_file(&dirs, "t.part", true).unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o7777, 0o600);
        // A link planted at a partial file's name is not followed.
        let target = d.path().join("target");
        std::fs::write(&target, b"x").unwrap();
        std::os::unix::fs::symlink(&target, inbox.join(PARTIAL_DIR).join("l.part")).unwrap();
        let e = open_file(&dirs, "l.part", true).unwrap_err();
        assert_eq!(e.code(), crate::error_code::ErrorCode::UnsafeInbox, "{e}");
        // A second link to a partial file makes it unsafe.
        std::fs::hard_link(inbox.join(PARTIAL_DIR).join("t.part"), d.path().join("h")).unwrap();
        assert!(open_file(&dirs, "t.part", false).is_err());
        // The partial directory itself replaced by a link.
        std::fs::rename(inbox.join(PARTIAL_DIR), d.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(d.path().join("moved"), inbox.join(PARTIAL_DIR)).unwrap();
        let e = open_dirs(&inbox, true).err().unwrap();
        assert_eq!(e.code(), crate::error_code::ErrorCode::UnsafeInbox, "{e}");
        // A writable partial directory is refused, a readable one tightened.
        std::fs::remove_file(inbox.join(PARTIAL_DIR)).unwrap();
        std::fs::create_dir(inbox.join(PARTIAL_DIR)).unwrap();
        let set = |m| {
            std::fs::set_permissions(inbox.join(PARTIAL_DIR), std::fs::Permissions::from_mode(m))
                .unwrap()
        };
        set(0o777);
        assert!(open_dirs(&inbox, true).is_err());
        set(0o755);
        open_dirs(&inbox, true).unwrap();
        let meta = std::fs::metadata(inbox.join(PARTIAL_DIR)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
    }
}
