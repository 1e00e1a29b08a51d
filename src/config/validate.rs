//! Validation: the configuration file as written (`raw.rs`) turned into
//! the checked types the rest of the agent uses. Every error names the
//! file, the line and the key.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::locate::LineIndex;
use super::raw::{
    RawAfterSend, RawBroker, RawConfig, RawFileMode, RawHook, RawKeys, RawReady, RawReceive,
    RawSend,
};
use super::*;
use crate::keys::Keyring;

mod http;
mod options;

/// The shortest wait before a send profile's next try.
const MIN_SEND_BACKOFF: Duration = Duration::from_secs(1);
/// The bounds of a send profile's `receipt_timeout`.
const MIN_RECEIPT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_RECEIPT_TIMEOUT: Duration = Duration::from_secs(365 * 86_400);

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) index: &'a LineIndex,
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl Validator<'_> {
    pub(super) fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: self.index.line_of(key),
            key: key.to_string(),
            message: message.into(),
        }
    }

    pub(super) fn config(&mut self, raw: RawConfig) -> Result<Config> {
        let node = self.node("node", &raw.node)?;
        let broker = self.broker(&node, raw.broker)?;
        let send = raw
            .send
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.send(&format!("send[{i}]"), s))
            .collect::<Result<Vec<_>>>()?;
        let receive = raw
            .receive
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.receive(&format!("receive[{i}]"), r))
            .collect::<Result<Vec<_>>>()?;
        self.unique("send", send.iter().map(|p| p.file_id.as_str()))?;
        self.unique("receive", receive.iter().map(|p| p.file_id.as_str()))?;
        if send.is_empty() && receive.is_empty() {
            return Err(self.err("send", "no send and no receive profile: nothing to do"));
        }
        let state_dir = absolute(&raw.state_dir);
        self.overlaps(&state_dir, &send, &receive)?;
        let keys = self.keys(raw.keys, &send, &receive)?;
        let http = raw.http.map(|h| self.http(h, &state_dir)).transpose()?;
        Ok(Config {
            file: self.file.to_path_buf(),
            node,
            state_dir,
            broker,
            send,
            receive,
            run_as_root: raw.run_as_root.unwrap_or(false),
            keys,
            bandwidth: self.rate("bandwidth", raw.bandwidth.as_deref())?,
            http,
        })
    }

    fn node(&self, key: &str, value: &str) -> Result<NodeName> {
        NodeName::parse(value)
            .map_err(|_| self.err(key, format!("`{value}` must be {}", NodeName::RULE)))
    }

    fn file_id(&self, key: &str, value: &str) -> Result<FileId> {
        FileId::parse(value)
            .map_err(|_| self.err(key, format!("`{value}` must be {}", FileId::RULE)))
    }

    fn nodes(&self, key: &str, values: &[String]) -> Result<Vec<NodeName>> {
        values
            .iter()
            .enumerate()
            .map(|(i, n)| self.node(&format!("{key}[{i}]"), n))
            .collect()
    }

    fn unique<'s>(&self, section: &str, ids: impl Iterator<Item = &'s str>) -> Result<()> {
        let mut seen = HashSet::new();
        for (i, id) in ids.enumerate() {
            if !seen.insert(id) {
                return Err(self.err(
                    &format!("{section}[{i}].file_id"),
                    format!("file id `{id}` appears twice in `{section}`"),
                ));
            }
        }
        Ok(())
    }

    fn broker(&self, node: &NodeName, raw: RawBroker) -> Result<BrokerConfig> {
        match (raw.rabbitmq, raw.embedded) {
            (Some(r), None) => self.rabbitmq(node, r).map(BrokerConfig::Rabbitmq),
            (None, Some(e)) => {
                for (key, addr) in [("listen", &e.listen), ("connect", &e.connect)] {
                    let Some(addr) = addr else { continue };
                    let Ok(sock) = addr.parse::<std::net::SocketAddr>() else {
                        return Err(self.err(
                            &format!("broker.embedded.{key}"),
                            format!("`{addr}` is not an address such as 127.0.0.1:7800"),
                        ));
                    };
                    if !sock.ip().is_loopback() && e.insecure != Some(true) && e.tls.is_none() {
                        return Err(self.err(
                            &format!("broker.embedded.{key}"),
                            "beyond loopback the embedded broker's traffic (secrets and files) is plain text; use 127.0.0.1, add `tls:` (cert_file and key_file to listen, ca_file to connect), or set `insecure: true` on a network you trust",
                        ));
                    }
                }
                if e.listen.is_some() == e.connect.is_some() {
                    return Err(self.err(
                        "broker.embedded",
                        "give exactly one of `listen: ADDR` (host the broker here) or `connect: ADDR`",
                    ));
                }
                let (server_tls, client_tls) = self.embedded_tls(&e)?;
                let mut limits = crate::broker::embedded::server::Limits::default();
                for (key, value, field) in [
                    ("max_queue", &e.max_queue, &mut limits.max_queue),
                    ("max_disk", &e.max_disk, &mut limits.max_disk),
                    (
                        "max_dead_letter",
                        &e.max_dead_letter,
                        &mut limits.max_dead_letter,
                    ),
                ] {
                    if let Some(v) = value {
                        *field = self.size(&format!("broker.embedded.{key}"), v)?;
                    }
                }
                for (key, value, field) in [
                    (
                        "max_connections",
                        e.max_connections,
                        &mut limits.max_connections,
                    ),
                    (
                        "max_connections_per_node",
                        e.max_connections_per_node,
                        &mut limits.max_connections_per_node,
                    ),
                ] {
                    match value {
                        Some(n) if n < 2 => {
                            return Err(self.err(
                                &format!("broker.embedded.{key}"),
                                "must be at least 2 (an agent uses two connections)",
                            ));
                        }
                        Some(n) => *field = n,
                        None => {}
                    }
                }
                Ok(BrokerConfig::Embedded(EmbeddedConfig {
                    limits,
                    listen: e.listen,
                    connect: e.connect,
                    secret_file: e.secret_file.map(|p| absolute(&p)),
                    insecure: e.insecure.unwrap_or(false),
                    server_tls,
                    client_tls,
                }))
            }
            _ => Err(self.err("broker", "give exactly one of `rabbitmq:` or `embedded:`")),
        }
    }

    fn send(&self, key: &str, raw: RawSend) -> Result<SendProfile> {
        let file_id = self.file_id(&format!("{key}.file_id"), &raw.file_id)?;
        let requests_from = match &raw.requests_from {
            Some(nodes) => self.nodes(&format!("{key}.requests_from"), nodes)?,
            None => Vec::new(),
        };
        if raw.to.is_empty() && requests_from.is_empty() {
            return Err(self.err(
                &format!("{key}.to"),
                "name at least one receiving node in `to`, or the nodes that may ask for the file in `requests_from`",
            ));
        }
        let to = self.nodes(&format!("{key}.to"), &raw.to)?;
        if raw.outbox.is_none() && raw.source.is_none() {
            return Err(self.err(
                &format!("{key}.outbox"),
                "give an `outbox: DIR` to watch, a `source: FILE` to send as a copy, or both",
            ));
        }
        if let Some(src) = &raw.source {
            if src.as_os_str().is_empty() || src.file_name().is_none() {
                return Err(self.err(
                    &format!("{key}.source"),
                    "a source is a file's path, such as /var/export/sales.csv",
                ));
            }
            let name = src.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if crate::domain::FileName::parse(name).is_err() {
                return Err(self.err(
                    &format!("{key}.source"),
                    "the source's file name is the name the receiver gets: a plain base name, no leading dot or dash, no control character",
                ));
            }
        }
        let include = raw
            .include
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, g)| {
                glob::Pattern::new(g).map_err(|e| {
                    self.err(&format!("{key}.include[{i}]"), format!("bad pattern: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ready = match raw.ready {
            None => Ready::StableFor(DEFAULT_STABLE_FOR),
            Some(RawReady {
                stable_for: Some(d),
                done_marker: None,
            }) => Ready::StableFor(self.duration(&format!("{key}.ready.stable_for"), &d)?),
            Some(RawReady {
                stable_for: None,
                done_marker: Some(m),
            }) => {
                if m.is_empty() || m.contains('/') || m.contains('\0') {
                    return Err(self.err(
                        &format!("{key}.ready.done_marker"),
                        "a marker is a file name suffix such as `.done`",
                    ));
                }
                Ready::DoneMarker(m)
            }
            Some(_) => {
                return Err(self.err(
                    &format!("{key}.ready"),
                    "give exactly one of `stable_for: 2s` or `done_marker: \".done\"`",
                ));
            }
        };
        let after_send = match raw.after_send {
            None => AfterSend::Delete,
            Some(RawAfterSend::Word(w)) if w == "delete" => AfterSend::Delete,
            Some(RawAfterSend::Word(w)) if w == "keep" => AfterSend::Keep,
            Some(RawAfterSend::Word(w)) => {
                return Err(self.err(
                    &format!("{key}.after_send"),
                    format!("`{w}` is not one of delete, keep, {{ move_to: DIR }}"),
                ));
            }
            Some(RawAfterSend::Move(m)) => AfterSend::MoveTo(absolute(&m.move_to)),
        };
        let chunk_size = match &raw.chunk_size {
            None => DEFAULT_CHUNK,
            Some(c) => {
                let n = self.size(&format!("{key}.chunk_size"), c)?;
                if !(MIN_CHUNK..=MAX_CHUNK).contains(&n) {
                    return Err(self.err(
                        &format!("{key}.chunk_size"),
                        "must be between 64KiB and 8MiB",
                    ));
                }
                n
            }
        };
        Ok(SendProfile {
            on_success: self.hook(&format!("{key}.on_success"), raw.on_success)?,
            on_failure: self.hook(&format!("{key}.on_failure"), raw.on_failure)?,
            before_send: self.hook(&format!("{key}.before_send"), raw.before_send)?,
            file_id,
            outbox: raw.outbox.as_deref().map(absolute),
            source: raw.source.as_deref().map(absolute),
            requests_from,
            include,
            to,
            ready,
            after_send,
            chunk_size,
            encrypt: raw.encrypt.unwrap_or(false),
            retry: self.retry(&format!("{key}.retry"), raw.retry, MIN_SEND_BACKOFF)?,
            convert: self.convert(&format!("{key}.convert"), raw.convert)?,
            compress: self.compress(&format!("{key}.compress"), raw.compress)?,
            priority: match raw.priority {
                None => DEFAULT_PRIORITY,
                Some(p) if (1..=9).contains(&p) => p,
                Some(_) => {
                    return Err(self.err(
                        &format!("{key}.priority"),
                        "a priority is 1 to 9; higher is more urgent (HULFT's runs the other way)",
                    ));
                }
            },
            bandwidth: self.rate(&format!("{key}.bandwidth"), raw.bandwidth.as_deref())?,
            receipt_timeout: match raw.receipt_timeout.as_deref() {
                None => None,
                Some(t) => Some(self.receipt_timeout(&format!("{key}.receipt_timeout"), t)?),
            },
        })
    }

    /// A `receipt_timeout:` between one second and a year.
    fn receipt_timeout(&self, key: &str, text: &str) -> Result<Duration> {
        let d = self.duration(key, text)?;
        if !(MIN_RECEIPT_TIMEOUT..=MAX_RECEIPT_TIMEOUT).contains(&d) {
            return Err(self.err(
                key,
                "a receipt_timeout is 1s to 365d (such as 2d or 12h); leave it out to wait for ever",
            ));
        }
        Ok(d)
    }

    fn receive(&self, key: &str, raw: RawReceive) -> Result<ReceiveProfile> {
        let file_id = self.file_id(&format!("{key}.file_id"), &raw.file_id)?;
        if raw.from.is_empty() {
            return Err(self.err(&format!("{key}.from"), "name at least one sending node"));
        }
        let from = self.nodes(&format!("{key}.from"), &raw.from)?;
        let mode = match raw.mode.as_deref().unwrap_or("new") {
            "new" => Mode::New,
            "replace" => Mode::Replace,
            "append" => Mode::Append,
            "generations" => {
                let keep = raw.keep.unwrap_or(7);
                if !(1..=1000).contains(&keep) {
                    return Err(self.err(
                        &format!("{key}.keep"),
                        "keep between 1 and 1000 generations",
                    ));
                }
                Mode::Generations(keep)
            }
            other => {
                return Err(self.err(
                    &format!("{key}.mode"),
                    format!("`{other}` is not one of new, replace, append, generations"),
                ));
            }
        };
        if raw.keep.is_some() && !matches!(mode, Mode::Generations(_)) {
            return Err(self.err(
                &format!("{key}.keep"),
                "`keep` applies only to mode: generations",
            ));
        }
        let max_size = match &raw.max_size {
            Some(s) => self.size(&format!("{key}.max_size"), s)?,
            None => u64::MAX,
        };
        Ok(ReceiveProfile {
            on_success: self.hook(&format!("{key}.on_success"), raw.on_success)?,
            on_failure: self.hook(&format!("{key}.on_failure"), raw.on_failure)?,
            file_id,
            from,
            inbox: absolute(&raw.inbox),
            mode,
            max_size,
            file_mode: match &raw.file_mode {
                Some(m) => self.file_mode(&format!("{key}.file_mode"), m)?,
                None => DEFAULT_FILE_MODE,
            },
            partial_ttl: match &raw.partial_ttl {
                Some(t) => self.duration(&format!("{key}.partial_ttl"), t)?,
                None => DEFAULT_PARTIAL_TTL,
            },
            require_encryption: raw.require_encryption.unwrap_or(false),
            convert: self.convert(&format!("{key}.convert"), raw.convert)?,
            name: match &raw.name {
                None => NameTemplate::default(),
                Some(t) => {
                    NameTemplate::parse(t).map_err(|e| self.err(&format!("{key}.name"), e))?
                }
            },
        })
    }

    /// The `keys:` section: peers' public keys parsed, and every node an
    /// encrypting profile sends to has one; a profile that requires
    /// encryption needs this node's private key.
    fn keys(
        &self,
        raw: Option<RawKeys>,
        send: &[SendProfile],
        receive: &[ReceiveProfile],
    ) -> Result<Arc<Keyring>> {
        let raw = raw.unwrap_or(RawKeys {
            private_key_file: None,
            peers: None,
        });
        let mut peers = BTreeMap::new();
        for (name, key) in raw.peers.unwrap_or_default() {
            let at = format!("keys.peers.{name}");
            let node = self.node(&at, &name)?;
            let recipient =
                crate::keys::parse_public_key(key.trim()).map_err(|e| self.err(&at, e))?;
            peers.insert(node, recipient);
        }
        for (i, p) in send.iter().enumerate().filter(|(_, p)| p.encrypt) {
            if let Some(n) = p.to.iter().find(|n| !peers.contains_key(*n)) {
                return Err(self.err(
                    &format!("send[{i}].encrypt"),
                    format!("node `{n}` has no public key in keys.peers; run `hakobu keygen` on {n} and add the key it prints"),
                ));
            }
        }
        let private_key_file = raw.private_key_file.map(|p| absolute(&p));
        if private_key_file.is_none() {
            if let Some(i) = receive.iter().position(|p| p.require_encryption) {
                return Err(self.err(
                    &format!("receive[{i}].require_encryption"),
                    "needs this node's private key: set keys.private_key_file (made by `hakobu keygen`)",
                ));
            }
        }
        Ok(Arc::new(Keyring::new(private_key_file, peers)))
    }

    /// A hook key holds one hook, or none.
    fn hook(&self, key: &str, raw: Option<RawHook>) -> Result<Option<HookSpec>> {
        let Some(raw) = raw else {
            return Ok(None);
        };
        let (argv, timeout, shell, env, cwd, retry) = match raw {
            RawHook::Argv(argv) => (argv, None, None, None, None, None),
            RawHook::Full(f) => (f.run, f.timeout, f.shell, f.env, f.cwd, f.retry),
        };
        let retry = self.retry(&format!("{key}.retry"), retry, Duration::ZERO)?;
        if argv.is_empty() || argv[0].is_empty() {
            return Err(self.err(
                key,
                "a hook needs a command: [ \"hooks/import.sh\", \"{path}\" ]",
            ));
        }
        for (i, arg) in argv.iter().enumerate() {
            self.placeholders(&format!("{key}[{i}]"), arg)?;
        }
        if shell == Some(true) {
            if let Some(name) = crate::hooks::quoted_placeholders(&argv.join(" ")).first() {
                return Err(self.err(
                    key,
                    format!(
                        "{{{name}}} is inside quotes in a shell hook; write it bare, hakobu passes it quoted (\"$HAKOBU_{}\")",
                        name.to_ascii_uppercase()
                    ),
                ));
            }
        }
        let timeout = match timeout {
            Some(t) => self.duration(&format!("{key}.timeout"), &t)?,
            None => DEFAULT_HOOK_TIMEOUT,
        };
        let env = env.unwrap_or_default();
        for name in env.keys() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(self.err(
                    &format!("{key}.env"),
                    format!("`{name}` is not a variable name"),
                ));
            }
        }
        let mut argv = argv;
        // A relative program path such as hooks/import.sh is resolved now, so
        // that a hook's own `cwd` does not change which program runs.
        if !shell.unwrap_or(false) && argv[0].contains('/') {
            argv[0] = absolute(Path::new(&argv[0])).display().to_string();
        }
        Ok(Some(HookSpec {
            argv,
            timeout,
            shell: shell.unwrap_or(false),
            env,
            cwd: cwd.map(|c| absolute(&c)),
            retry,
        }))
    }

    fn placeholders(&self, key: &str, arg: &str) -> Result<()> {
        let mut rest = arg;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else { break };
            let name = &after[..close];
            if !PLACEHOLDERS.contains(&name) {
                return Err(self.err(
                    key,
                    format!("unknown placeholder `{{{name}}}`; use one of {{path}} {{file_id}} {{transfer_id}} {{file_name}} {{peer}}"),
                ));
            }
            rest = &after[close + 1..];
        }
        Ok(())
    }

    /// An octal mode for placed files: permission bits only, and never
    /// writable by others.
    fn file_mode(&self, key: &str, raw: &RawFileMode) -> Result<u32> {
        let text = match raw {
            RawFileMode::Number(n) => n.to_string(),
            RawFileMode::Text(t) => t.trim().to_string(),
        };
        let digits = text.strip_prefix("0o").unwrap_or(&text);
        let mode = u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                self.err(
                    key,
                    format!(
                        "`{text}` is not an octal mode such as \"0640\" (permission bits only)"
                    ),
                )
            })?;
        if mode & 0o002 != 0 {
            return Err(self.err(
                key,
                format!("mode {mode:04o} lets any local user change a received file before its hook reads it; drop the others' write bit"),
            ));
        }
        Ok(mode)
    }

    pub(super) fn duration(&self, key: &str, text: &str) -> Result<Duration> {
        parse_duration(text).map_err(|m| self.err(key, m))
    }

    pub(super) fn size(&self, key: &str, text: &str) -> Result<u64> {
        parse_size(text).map_err(|m| self.err(key, m))
    }
}

/// Relative paths are taken from the directory the agent starts in.
pub(super) fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}
