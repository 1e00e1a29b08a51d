//! A tmpfs mounted for a test (a full disk on demand): `tests/chaos.rs`'s
//! receiver disk full, `tests/retry.rs`'s transient failure. Needs root.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// A tmpfs mounted at a directory, unmounted (lazily) when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `dir`; the OS error if it cannot.
    pub fn mount(dir: &Path, size: &str) -> std::io::Result<Tmpfs> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        fs::create_dir_all(dir)?;
        let src = CString::new("tmpfs").unwrap();
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let data = CString::new(format!("size={size},mode=0755")).unwrap();
        // SAFETY: every pointer is a valid NUL-terminated string that lives
        // across the call.
        let rc = unsafe {
            nix::libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc == 0 {
            Ok(Tmpfs(dir.to_path_buf()))
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Tmpfs {
    /// [`Tmpfs::mount`], or the test fails: a disk-full scenario that cannot
    /// run must not pass as if it had (run the suite as root, as
    /// `tests/run.sh` in CI does).
    pub fn mount_or_fail(dir: &Path, size: &str) -> Tmpfs {
        Tmpfs::mount(dir, size).unwrap_or_else(|e| {
            panic!(
                "cannot mount a {size} tmpfs at {}: {e}; this scenario needs root (or CAP_SYS_ADMIN) and is never skipped",
                dir.display()
            )
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        let target = std::ffi::CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        let rc = unsafe { nix::libc::umount2(target.as_ptr(), nix::libc::MNT_DETACH) };
        if rc != 0 {
            let _ = writeln!(
                std::io::stderr(),
                "cannot unmount the tmpfs at {}: {}",
                self.0.display(),
                std::io::Error::last_os_error()
            );
        }
    }
}
