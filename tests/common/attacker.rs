//! The unprivileged attacker: commands run as `nobody` through `setpriv`, so
//! that a security test attacks the real agent from a second process that
//! has no rights beyond those the test grants it (a directory it may write,
//! a port it may reach). A machine that cannot run the attacker fails the
//! test loudly: an attack that was not tried has not been repelled.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// `nobody`'s uid, after checking that this process can switch to it.
pub fn nobody() -> u32 {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "the security suite runs as root, so that it can attack as the unprivileged user `nobody`"
    );
    let out = Command::new("id")
        .args(["-u", "nobody"])
        .output()
        .expect("run id -u nobody");
    assert!(out.status.success(), "this machine has no user `nobody`");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a uid for nobody")
}

/// A command that runs `program` as `nobody` (group `nogroup`, no
/// supplementary groups).
pub fn as_nobody(program: impl AsRef<std::ffi::OsStr>) -> Command {
    nobody();
    assert!(
        Path::new("/usr/bin/setpriv").exists() || Path::new("/bin/setpriv").exists(),
        "setpriv (util-linux) is needed to attack as nobody"
    );
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]);
    c.arg(program);
    c
}

/// Runs `script` with `/bin/sh -c` as `nobody`; the output, whatever the status.
pub fn sh_as_nobody(script: &str) -> Output {
    as_nobody("/bin/sh")
        .args(["-c", script])
        .output()
        .expect("start setpriv")
}

/// A fresh directory that `nobody` may enter and list (0755, under /tmp):
/// the repository's checkout may sit where nobody cannot reach.
pub fn open_dir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Makes `dir` writable by `nobody` (mode 0777, like a shared drop folder
/// whose other users the agent must not trust).
pub fn let_nobody_write(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// The `hakobu` binary copied where `nobody` may run it.
pub fn hakobu_for_nobody() -> PathBuf {
    static COPY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = COPY.get_or_init(|| {
        let d = open_dir("hakobu-bin-");
        let p = d.path().join("hakobu");
        std::fs::copy(super::bin(), &p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        (d, p)
    });
    path.clone()
}
