//! The Debian package (`packaging/debian/build.sh`, cargo-deb): what it holds
//! (`dpkg-deb -c` / `-I`: a stripped binary, the systemd units, completions,
//! man pages, the example configuration, conf files marked), and, with
//! HAKOBU_TEST_DPKG=1 (tests/run.sh sets it when run as root), the package
//! really installed on this machine with `dpkg -i`: the `hakobu` user, an
//! agent run as that user moving a file from a send profile to a receive
//! profile, then `dpkg --purge` leaving neither the user nor its files.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::http::free_port;
use common::{drop_file, wait_until};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The man pages `hakobu generate man` must produce: the top page and one
/// per visible command (not the hidden `generate`).
const MAN_PAGES: &[&str] = &[
    "hakobu",
    "hakobu-run",
    "hakobu-check",
    "hakobu-history",
    "hakobu-send",
    "hakobu-request",
    "hakobu-rerun",
    "hakobu-resend",
    "hakobu-status",
    "hakobu-broker",
    "hakobu-broker-add-node",
    "hakobu-broker-status",
    "hakobu-keygen",
];

const FILES: &[&str] = &[
    "./usr/bin/hakobu",
    "./usr/lib/systemd/system/hakobu@.service",
    "./usr/lib/systemd/system/hakobu-broker.service",
    "./usr/share/bash-completion/completions/hakobu",
    "./usr/share/zsh/vendor-completions/_hakobu",
    "./usr/share/fish/vendor_completions.d/hakobu.fish",
    "./etc/hakobu/example.yaml",
    "./etc/hakobu/broker.env",
];

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// The .deb, built once per test process by packaging/debian/build.sh.
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let out = stdout(&mut Command::new(
            Path::new(ROOT).join("packaging/debian/build.sh"),
        ));
        let path = out
            .split_whitespace()
            .find(|w| w.ends_with(".deb"))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("build.sh printed no .deb path:\n{out}"));
        assert!(path.is_file(), "{} was not written", path.display());
        path
    })
}

#[test]
fn deb_holds_the_stripped_binary_units_completions_man_pages_and_conf_files() {
    let deb = deb();
    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(deb));
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    for f in FILES {
        assert!(
            names.contains(f),
            "{f} missing from the package:\n{listing}"
        );
    }
    for page in MAN_PAGES {
        let f = format!("./usr/share/man/man1/{page}.1.gz");
        assert!(names.contains(&f.as_str()), "{f} missing:\n{listing}");
    }
    assert!(
        !names.iter().any(|n| n.contains("generate")),
        "the hidden `generate` command has no man page:\n{listing}"
    );
    let bin_line = listing
        .lines()
        .find(|l| l.ends_with(" ./usr/bin/hakobu"))
        .unwrap();
    assert!(bin_line.starts_with("-rwxr-xr-x root/root") || bin_line.starts_with("-rwxr-xr-x 0/0"));

    let info = stdout(Command::new("dpkg-deb").arg("-I").arg(deb));
    assert!(info.contains(" Package: hakobu\n"), "{info}");
    let depends = info
        .lines()
        .find(|l| l.starts_with(" Depends:"))
        .unwrap_or_else(|| panic!("no Depends:\n{info}"));
    assert!(depends.contains("adduser"), "{depends}");
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(
            info.contains(&format!(" {script} ")),
            "no {script}:\n{info}"
        );
    }
    let conffiles = stdout(Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles"));
    let mut conffiles: Vec<&str> = conffiles.lines().collect();
    conffiles.sort();
    assert_eq!(
        conffiles,
        ["/etc/hakobu/broker.env", "/etc/hakobu/example.yaml"]
    );
    let postinst = stdout(Command::new("dpkg-deb").arg("-I").arg(deb).arg("postinst"));
    assert!(
        postinst.contains("adduser --system --group --no-create-home --home /var/lib/hakobu"),
        "{postinst}"
    );

    let x = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(x.path()));
    let bin = x.path().join("usr/bin/hakobu");
    // Stripped: no debugging sections (`.debug_gdb_scripts` is not debug
    // information but a loaded section naming gdb's pretty-printers).
    let sections = stdout(Command::new("readelf").arg("-SW").arg(&bin));
    let debug: Vec<&str> = sections
        .split_whitespace()
        .filter(|w| w.starts_with(".debug") && *w != ".debug_gdb_scripts")
        .collect();
    assert!(debug.is_empty(), "debug sections left: {debug:?}");
    assert!(
        !sections.contains(".symtab"),
        "symbol table left:\n{sections}"
    );
    let file = stdout(Command::new("file").arg(&bin));
    assert!(file.contains(", stripped"), "{file}");
    let version = stdout(Command::new(&bin).arg("--version"));
    assert_eq!(
        version.trim(),
        concat!("hakobu ", env!("CARGO_PKG_VERSION"))
    );

    // The man pages are roff from the clap definitions, gzip'd.
    let man = stdout(
        Command::new("gzip")
            .arg("-dc")
            .arg(x.path().join("usr/share/man/man1/hakobu-send.1.gz")),
    );
    assert!(man.contains(".TH hakobu-send 1"), "{man}");
    assert!(man.contains(r"\fB\-\-file\-id\fR"), "{man}");
    let bash = fs::read_to_string(
        x.path()
            .join("usr/share/bash-completion/completions/hakobu"),
    )
    .unwrap();
    assert!(bash.contains("complete -F _hakobu"), "{bash}");

    // The example configuration validates as shipped.
    let example = x.path().join("etc/hakobu/example.yaml");
    let out = stdout(Command::new(&bin).arg("check").arg("-c").arg(&example));
    assert!(out.contains(": ok (node example"), "{out}");
    // The units name the installed binary and the package's paths.
    let unit = fs::read_to_string(x.path().join("usr/lib/systemd/system/hakobu@.service")).unwrap();
    for line in [
        "ExecStart=/usr/bin/hakobu run -c /etc/hakobu/%i.yaml",
        "User=hakobu",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/hakobu -/srv/hakobu",
        "Restart=on-failure",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "no `{line}` in hakobu@.service"
        );
    }
}

/// `HAKOBU_TEST_DPKG`: 1 installs the package on this machine (root only), 0
/// leaves this test out on purpose; unset is an error, so that the install
/// is never skipped without anyone deciding it.
fn dpkg_wanted() -> bool {
    match std::env::var("HAKOBU_TEST_DPKG").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        other => panic!(
            "HAKOBU_TEST_DPKG is {other:?}: set it to 1 to install the package on this machine with dpkg (as root; tests/run.sh does when run as root), or to 0 to leave the install test out"
        ),
    }
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "hakobu"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("installed"))
        .unwrap_or(false)
}

fn user_exists(name: &str) -> bool {
    Command::new("getent")
        .args(["passwd", name])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Purges the package when the test ends, whichever way it ends.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if installed() {
            let _ = Command::new("dpkg").args(["--purge", "hakobu"]).status();
        }
    }
}

/// `cmd` run as the `hakobu` user and group.
fn as_hakobu(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=hakobu", "--regid=hakobu", "--init-groups", program]);
    c
}

#[test]
fn dpkg_install_runs_an_agent_as_the_hakobu_user_then_purge_removes_it() {
    if !dpkg_wanted() {
        eprintln!("HAKOBU_TEST_DPKG=0: the package is not installed on this machine");
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "HAKOBU_TEST_DPKG=1 needs root (dpkg -i); run as root or set HAKOBU_TEST_DPKG=0"
    );
    assert!(
        !installed() && !user_exists("hakobu") && !Path::new("/etc/hakobu").exists(),
        "hakobu is already installed here (or its user or /etc/hakobu is left): this test would replace it; `dpkg --purge hakobu` first, or set HAKOBU_TEST_DPKG=0"
    );
    let deb = deb();
    let _purge = Purge;
    run(Command::new("dpkg").arg("-i").arg(deb));

    let version = stdout(Command::new("/usr/bin/hakobu").arg("--version"));
    assert_eq!(
        version.trim(),
        concat!("hakobu ", env!("CARGO_PKG_VERSION"))
    );
    let passwd = stdout(Command::new("getent").args(["passwd", "hakobu"]));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields[5], "/var/lib/hakobu", "{passwd}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "not a system user: {passwd}");
    let state = fs::metadata("/var/lib/hakobu").unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(state.uid(), uid);
    assert_eq!(state.mode() & 0o7777, 0o750);
    for unit in ["hakobu-broker.service", "hakobu@.service"] {
        let p = format!("/usr/lib/systemd/system/{unit}");
        let out = run(Command::new("systemd-analyze").args(["verify", "--man=no", &p]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.trim().is_empty(),
            "systemd-analyze verify {unit}:\n{err}"
        );
    }

    // A configuration under /etc/hakobu made from the example, on a port of
    // its own; checked and run as the hakobu user, as hakobu@itest would.
    let port = free_port();
    let example = fs::read_to_string("/etc/hakobu/example.yaml").unwrap();
    assert!(example.contains("listen: 127.0.0.1:7800"));
    let yaml = example
        .replace("node: example", "node: itest")
        .replace("[ example ]", "[ itest ]")
        .replace("/var/lib/hakobu/example", "/var/lib/hakobu/itest")
        .replace("127.0.0.1:7800", &format!("127.0.0.1:{port}"))
        .replace("stable_for: 2s", "stable_for: 200ms");
    fs::write("/etc/hakobu/itest.yaml", yaml).unwrap();
    let out = stdout(as_hakobu("/usr/bin/hakobu").args(["check", "-c", "/etc/hakobu/itest.yaml"]));
    assert!(out.contains("ok (node itest"), "{out}");

    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("agent.log");
    let mut agent = as_hakobu("/usr/bin/hakobu")
        .args(["run", "-c", "/etc/hakobu/itest.yaml"])
        .current_dir("/var/lib/hakobu")
        .stderr(fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let outbox = Path::new("/var/lib/hakobu/itest/outbox");
    let inbox = Path::new("/var/lib/hakobu/itest/inbox");
    let log = || fs::read_to_string(&log_path).unwrap_or_default();
    wait_until(Duration::from_secs(30), "the agent's outbox", || {
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the agent exited:\n{}",
            log()
        );
        outbox.is_dir()
    });
    drop_file(outbox, "orders.csv", |p| {
        fs::write(p, "id,qty\n1,5\n").unwrap();
        fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
    });
    let placed = inbox.join("orders.csv");
    wait_until(Duration::from_secs(60), "orders.csv in the inbox", || {
        assert!(
            agent.try_wait().unwrap().is_none(),
            "agent exited:\n{}",
            log()
        );
        placed.is_file()
    });
    assert_eq!(fs::read_to_string(&placed).unwrap(), "id,qty\n1,5\n");
    let meta = fs::metadata(&placed).unwrap();
    assert_eq!(meta.uid(), uid, "placed by the hakobu user");
    assert_eq!(meta.mode() & 0o777, 0o640);
    wait_until(
        Duration::from_secs(60),
        "history: sent and received",
        || {
            let history = stdout(as_hakobu("/usr/bin/hakobu").args([
                "history",
                "-c",
                "/etc/hakobu/itest.yaml",
                "--json",
            ]));
            history.contains("\"status\":\"sent\"") && history.contains("\"status\":\"received\"")
        },
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.wait().unwrap();
    assert!(status.success(), "agent stopped with {status}:\n{}", log());

    run(Command::new("dpkg").args(["--purge", "hakobu"]));
    assert!(!installed(), "hakobu still installed after the purge");
    assert!(!user_exists("hakobu"), "the hakobu user is left");
    assert!(
        !Command::new("getent")
            .args(["group", "hakobu"])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success(),
        "the hakobu group is left"
    );
    for p in [
        "/usr/bin/hakobu",
        "/var/lib/hakobu",
        "/etc/hakobu",
        "/usr/lib/systemd/system/hakobu@.service",
    ] {
        assert!(!Path::new(p).exists(), "{p} is left after the purge");
    }
}
