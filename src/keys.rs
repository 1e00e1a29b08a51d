//! Node keys for end-to-end encryption: this node's age X25519 private key
//! (made by `hakobu keygen`, kept in a secret file, mode 0600) and the
//! public keys (`age1...`) of the nodes it encrypts to, by node name. The
//! [`Keyring`] also remembers the data keys it has unwrapped, so that a
//! transfer's chunks cost one age decryption, not one each.
//!
//! The private key file is an age identity file: comment lines (`#`) and
//! one `AGE-SECRET-KEY-1...` line, so that the `age` tool reads it too.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use age::secrecy::ExposeSecret;
use age::x25519::{Identity, Recipient};

use crate::domain::NodeName;
use crate::secret::{self, SecretError};

/// Data keys a keyring remembers at most; past that it forgets them all
/// (each is unwrapped again, from any chunk of its transfer, when needed).
const REMEMBERED: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(
        "the private key file {0} holds no age private key (AGE-SECRET-KEY-1...); make one with `hakobu keygen`"
    )]
    NotAKey(PathBuf),
    #[error(
        "this node has no private key: set keys.private_key_file (made by `hakobu keygen`) to receive encrypted files"
    )]
    NoPrivateKey,
    /// The first reading's error, as it was reported.
    #[error("{0}")]
    Unreadable(String),
}

/// Parses a public key as configured in `keys.peers`.
pub fn parse_public_key(text: &str) -> Result<Recipient, String> {
    Recipient::from_str(text).map_err(|_| {
        "not an age public key (age1...); `hakobu keygen` on that node prints its key".to_string()
    })
}

/// A new private key; returns the identity file's text and the public key.
pub fn generate(comment: &str) -> (String, String) {
    let identity = Identity::generate();
    let public = identity.to_public().to_string();
    let text = format!(
        "# {comment}\n# public key: {public}\n{}",
        identity.to_string().expose_secret()
    );
    (text, public)
}

/// Reads the private key file (refused when its group or others may read
/// it, see [`secret::read`]).
pub fn read_identity(path: &Path) -> Result<Identity, KeyError> {
    let text = secret::read(path)?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| Identity::from_str(l).ok())
        .ok_or_else(|| KeyError::NotAKey(path.to_path_buf()))
}

/// This node's keys: built from the configuration, the private key read on
/// first use (the agent reads it at start, so that a bad file stops it there).
pub struct Keyring {
    private_key_file: Option<PathBuf>,
    identity: OnceLock<Result<Identity, String>>,
    peers: BTreeMap<NodeName, Recipient>,
    /// Data keys unwrapped so far, by the wrapped key's text.
    unwrapped: Mutex<HashMap<String, [u8; 32]>>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private key; public keys are not secret.
        f.debug_struct("Keyring")
            .field("private_key_file", &self.private_key_file)
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Default for Keyring {
    fn default() -> Self {
        Keyring::new(None, BTreeMap::new())
    }
}

impl Keyring {
    pub fn new(private_key_file: Option<PathBuf>, peers: BTreeMap<NodeName, Recipient>) -> Self {
        Keyring {
            private_key_file,
            identity: OnceLock::new(),
            peers,
            unwrapped: Mutex::new(HashMap::new()),
        }
    }

    pub fn private_key_file(&self) -> Option<&Path> {
        self.private_key_file.as_deref()
    }

    /// The public key configured for `node`.
    pub fn peer(&self, node: &NodeName) -> Option<&Recipient> {
        self.peers.get(node)
    }

    /// This node's private key, read once.
    pub fn identity(&self) -> Result<&Identity, KeyError> {
        let Some(path) = &self.private_key_file else {
            return Err(KeyError::NoPrivateKey);
        };
        self.identity
            .get_or_init(|| read_identity(path).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| KeyError::Unreadable(e.clone()))
    }

    /// Checks, at start, that the private key (when configured) can be read.
    pub fn check(&self) -> Result<(), KeyError> {
        match &self.private_key_file {
            Some(_) => self.identity().map(|_| ()),
            None => Ok(()),
        }
    }

    /// A data key unwrapped before from `wrapped`.
    pub(crate) fn remembered(&self, wrapped: &str) -> Option<[u8; 32]> {
        self.unwrapped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(wrapped)
            .copied()
    }

    pub(crate) fn remember(&self, wrapped: &str, key: [u8; 32]) {
        let mut m = self.unwrapped.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= REMEMBERED {
            m.clear();
        }
        m.insert(wrapped.to_string(), key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_generated_key_reads_back_and_an_exposed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let (text, public) = generate("test");
        secret::create(&path, &text).unwrap();
        let id = read_identity(&path).unwrap();
        assert_eq!(id.to_public().to_string(), public);
        assert!(parse_public_key(&public).is_ok());
        assert!(parse_public_key("age1nope").is_err());
        let ring = Keyring::new(Some(path.clone()), BTreeMap::new());
        ring.check().unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let Err(e) = read_identity(&path) else {
            panic!("an exposed key file was read")
        };
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(!e.to_string().contains("AGE-SECRET-KEY"), "{e}");
        let other = dir.path().join("other");
        secret::create(&other, "# only a comment").unwrap();
        assert!(matches!(read_identity(&other), Err(KeyError::NotAKey(_))));
        assert!(matches!(
            Keyring::default().identity(),
            Err(KeyError::NoPrivateKey)
        ));
    }

    fn parse(extra: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let yaml = format!(
            "node: alpha\nstate_dir: /tmp/x\nbroker: {{ embedded: {{ connect: \"127.0.0.1:1\" }} }}\n{extra}"
        );
        crate::config::Config::parse(Path::new("a.yaml"), &yaml)
    }

    #[test]
    fn the_configuration_names_the_line_of_a_key_mistake() {
        let (_, public) = generate("t");
        let send = "send:\n  - file_id: X\n    outbox: /tmp/o\n    to: [ beta, gamma ]\n    encrypt: true\n";
        let ok = parse(&format!(
            "{send}keys:\n  peers:\n    beta: \"{public}\"\n    gamma: \"{public}\"\n"
        ))
        .unwrap();
        assert!(ok.send[0].encrypt);
        assert!(ok.keys.peer(&NodeName::parse("gamma").unwrap()).is_some());
        let e = parse(&format!("{send}keys:\n  peers:\n    beta: \"{public}\"\n")).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(8), "send[0].encrypt"),
            "{e}"
        );
        assert!(e.message.contains("`gamma`"), "{e}");
        let e = parse(&format!(
            "{send}keys:\n  peers:\n    beta: \"{public}\"\n    gamma: \"age1x\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(12), "keys.peers.gamma"),
            "{e}"
        );
        let e = parse(&format!(
            "{send}keys:\n  peers:\n    \"no/de\": \"{public}\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "keys.peers.no/de", "{e}");
        let recv = "receive:\n  - file_id: X\n    from: [ beta ]\n    inbox: /tmp/i\n    require_encryption: true\n";
        let e = parse(recv).unwrap_err();
        assert_eq!(
            (e.line, e.key.as_str()),
            (Some(8), "receive[0].require_encryption"),
            "{e}"
        );
        let ok = parse(&format!("{recv}keys: {{ private_key_file: k.key }}\n")).unwrap();
        assert!(ok.receive[0].require_encryption);
        assert!(ok.keys.private_key_file().unwrap().is_absolute());
        // Unknown keys are refused, as everywhere.
        assert!(parse(&format!("{recv}keys: {{ private_key: k.key }}\n")).is_err());
    }
}
