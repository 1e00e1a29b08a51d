//! The embedded broker's credentials: one per node. A node's secret is 32
//! random bytes from the operating system (64 hex characters), kept by the
//! agent in a secret file (mode 0600, `crate::secret`). The broker keeps only
//! the SHA-256 of each secret, in `DATA/users` (mode 0600, one `node hex`
//! line per node), and compares digests in constant time. A plain digest is
//! enough because the secret is random and 256 bits long: there is nothing
//! to guess a dictionary for.
//!
//! `hakobu broker add-node` and an agent hosting the broker write the users
//! file under `DATA/users.lock`; a running broker sees a change at the next
//! hello (it rereads the file when its size, inode or modification time
//! changed).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::NodeName;
use crate::secret::SecretError;

/// The users file inside the broker's data directory.
pub const USERS_FILE: &str = "users";
/// A users file larger than this is not one (about 35,000 nodes).
const MAX_USERS_FILE: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("cannot use the broker's users file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the broker's users file {path} is damaged at line {line}; fix or remove that line and add the node again with `hakobu broker add-node`"
    )]
    Malformed { path: PathBuf, line: usize },
    #[error("the operating system gave no random bytes: {0}")]
    Random(String),
}

/// A fresh secret: 32 random bytes, hex.
pub fn new_secret() -> Result<String, CredentialError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| CredentialError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The nodes a broker accepts, by the digest of their secrets.
#[derive(Debug, Default, Clone)]
pub struct Users(BTreeMap<String, [u8; 32]>);

impl Users {
    /// Reads `DATA/users`; no file means no nodes. Refuses a file its group
    /// or others may access.
    pub fn load(data: &Path) -> Result<Users, CredentialError> {
        let path = data.join(USERS_FILE);
        let io = |source| CredentialError::Io {
            path: path.clone(),
            source,
        };
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Users::default()),
            Err(e) => return Err(io(e)),
        };
        let meta = f.metadata().map_err(io)?;
        crate::secret::check_private(&path, &meta, MAX_USERS_FILE)?;
        let mut text = String::new();
        Read::by_ref(&mut f)
            .take(MAX_USERS_FILE)
            .read_to_string(&mut text)
            .map_err(io)?;
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let malformed = || CredentialError::Malformed {
                path: path.clone(),
                line: i + 1,
            };
            let (node, hash) = line.split_once(' ').ok_or_else(malformed)?;
            let node = NodeName::parse(node).map_err(|_| malformed())?;
            let hash: [u8; 32] = hex::decode(hash.trim())
                .ok()
                .and_then(|h| h.try_into().ok())
                .ok_or_else(malformed)?;
            users.insert(node.as_str().to_string(), hash);
        }
        Ok(Users(users))
    }

    /// True when `secret` is `node`'s. Takes the same time whether or not
    /// the node exists and however much of the secret is right.
    pub fn check(&self, node: &str, secret: &str) -> bool {
        let given = digest(secret);
        match self.0.get(node) {
            Some(want) => bool::from(want.ct_eq(&given)),
            None => {
                let _ = [0u8; 32].ct_eq(&given);
                false
            }
        }
    }

    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    fn write(&self, data: &Path) -> Result<(), CredentialError> {
        let path = data.join(USERS_FILE);
        let tmp = data.join("users.tmp");
        let io = |source| CredentialError::Io {
            path: path.clone(),
            source,
        };
        crate::durable::remove_if_exists(&tmp).map_err(io)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        let mut text = String::from("# hakobu embedded broker: node sha256(secret)\n");
        for (node, hash) in &self.0 {
            text.push_str(&format!("{node} {}\n", hex::encode(hash)));
        }
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        crate::durable::fsync_dir(data).map_err(io)
    }
}

/// Creates the broker's data directory, mode 0700, if it is missing.
pub fn create_data_dir(data: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data)
}

/// Runs `f` on the users file under `DATA/users.lock`, and writes what it
/// returns.
fn update(data: &Path, f: impl FnOnce(&mut Users)) -> Result<(), CredentialError> {
    let io = |source| CredentialError::Io {
        path: data.to_path_buf(),
        source,
    };
    create_data_dir(data).map_err(io)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(data.join("users.lock"))
        .map_err(io)?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io(e.into()))?;
    let mut users = Users::load(data)?;
    f(&mut users);
    users.write(data)
}

/// Gives `node` a new secret (replacing any it had) and returns it.
pub fn add_node(data: &Path, node: &NodeName) -> Result<String, CredentialError> {
    let secret = new_secret()?;
    update(data, |u| {
        u.0.insert(node.as_str().to_string(), digest(&secret));
    })?;
    Ok(secret)
}

/// Makes `secret` `node`'s, unless it already is (an agent hosting the
/// broker registers its own credential this way at every start).
pub fn ensure(data: &Path, node: &NodeName, secret: &str) -> Result<(), CredentialError> {
    if Users::load(data)?.check(node, secret) {
        return Ok(());
    }
    update(data, |u| {
        u.0.insert(node.as_str().to_string(), digest(secret));
    })
}

/// What identifies a version of the users file: inode, size, modification time.
type Stamp = (u64, u64, i64, i64);

/// The users file as the running broker sees it: reread when it changed.
pub struct UsersCache {
    data: PathBuf,
    state: Mutex<(Option<Stamp>, Arc<Users>)>,
}

impl UsersCache {
    pub fn new(data: &Path) -> Result<UsersCache, CredentialError> {
        let cache = UsersCache {
            data: data.to_path_buf(),
            state: Mutex::new((None, Arc::default())),
        };
        cache.current()?;
        Ok(cache)
    }

    /// The users now; an unreadable or exposed file accepts nobody.
    pub fn current(&self) -> Result<Arc<Users>, CredentialError> {
        let path = self.data.join(USERS_FILE);
        let stamp = std::fs::metadata(&path)
            .ok()
            .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()));
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0.is_none() || st.0 != stamp {
            let users = Users::load(&self.data)?;
            *st = (stamp, Arc::new(users));
        }
        Ok(st.1.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_added_checked_and_replaced() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("broker");
        let alpha = NodeName::parse("alpha").unwrap();
        let s1 = add_node(&data, &alpha).unwrap();
        assert_eq!(s1.len(), 64);
        let users = Users::load(&data).unwrap();
        assert!(users.check("alpha", &s1));
        assert!(!users.check("alpha", "guess"));
        assert!(!users.check("beta", &s1));
        let text = std::fs::read_to_string(data.join(USERS_FILE)).unwrap();
        assert!(!text.contains(&s1), "the users file holds digests only");
        let mode = std::fs::metadata(data.join(USERS_FILE)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s2 = add_node(&data, &alpha).unwrap();
        let users = Users::load(&data).unwrap();
        assert!(users.check("alpha", &s2) && !users.check("alpha", &s1));
        ensure(&data, &alpha, "chosen").unwrap();
        assert!(Users::load(&data).unwrap().check("alpha", "chosen"));
        std::fs::set_permissions(
            data.join(USERS_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            Users::load(&data),
            Err(CredentialError::Secret(SecretError::Exposed { .. }))
        ));
    }
}
