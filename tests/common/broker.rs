//! `hakobu broker` processes for tests: started on a free loopback port,
//! killed by pid when dropped; the secrets of the nodes that use them, made
//! once with `hakobu broker add-node` (agents get theirs at start).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{bin, wait_until};

/// The `hakobu broker` processes this test process started: address → data.
pub(super) static BROKERS: std::sync::Mutex<BTreeMap<String, PathBuf>> =
    std::sync::Mutex::new(BTreeMap::new());

/// The secret of `node` on the broker with data directory `data`: made once
/// (`hakobu broker add-node`), then the same for every caller.
pub fn node_secret(data: &Path, node: &str) -> String {
    static SECRETS: std::sync::Mutex<BTreeMap<(PathBuf, String), String>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut secrets = SECRETS.lock().unwrap_or_else(|p| p.into_inner());
    secrets
        .entry((data.to_path_buf(), node.to_string()))
        .or_insert_with(|| {
            let out = Command::new(bin())
                .args(["broker", "add-node", "--data"])
                .arg(data)
                .arg(node)
                .output()
                .expect("run hakobu broker add-node");
            assert!(
                out.status.success(),
                "add-node failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .clone()
}

/// Writes a secret file, mode 0600.
pub fn write_secret(path: &Path, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, secret).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// A `hakobu broker` process on a free loopback port, with its data in `dir`.
pub struct BrokerProcess {
    pub addr: String,
    data: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

impl BrokerProcess {
    pub fn start(dir: &Path) -> BrokerProcess {
        Self::start_with(dir, &[])
    }

    /// A broker with extra command-line arguments (`--max-connections 8`).
    pub fn start_with(dir: &Path, args: &[&str]) -> BrokerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut b = BrokerProcess {
            addr: format!("127.0.0.1:{port}"),
            data: dir.join("broker-data"),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        b.restart();
        BROKERS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(b.addr.clone(), b.data.clone());
        b
    }

    pub fn data(&self) -> &Path {
        &self.data
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    /// `node`'s credentials on this broker (the same an agent gets).
    pub fn credentials(&self, node: &str) -> hakobu::broker::embedded::Credentials {
        hakobu::broker::embedded::Credentials {
            node: node.to_string(),
            secret: node_secret(&self.data, node),
        }
    }

    /// (Re)starts the broker on the same address and data, and waits for it.
    pub fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(bin())
            .args(["broker", "--listen", &self.addr, "--data"])
            .arg(&self.data)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_until(Duration::from_secs(10), "the broker to listen", || {
            std::net::TcpStream::connect(&self.addr).is_ok()
        });
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }

    /// The `broker:` section that makes agents use this broker.
    pub fn section(&self) -> String {
        format!("broker:\n  embedded: {{ connect: \"{}\" }}\n", self.addr)
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
