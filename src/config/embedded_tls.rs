//! Validation of `broker.embedded.tls`: the hosted broker's certificate and
//! key, the CA a node trusts for the broker and the name it expects.

use super::raw::RawEmbedded;
use super::validate::{Validator, absolute};
use super::*;
use crate::broker::embedded::server::ServerTls;
use crate::broker::embedded::tls::host_of;

type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl Validator<'_> {
    /// The TLS settings of `broker.embedded`: a listening agent needs
    /// `cert_file`, `key_file` and `ca_file` (it connects to its own broker
    /// over TLS too); a connecting one needs `ca_file` only.
    #[allow(clippy::type_complexity)]
    pub(super) fn embedded_tls(
        &self,
        e: &RawEmbedded,
    ) -> Result<(Option<ServerTls>, Option<(PathBuf, String)>)> {
        const K: &str = "broker.embedded.tls";
        let Some(t) = &e.tls else {
            return Ok((None, None));
        };
        let Some(ca) = &t.ca_file else {
            return Err(self.err(
                &format!("{K}.ca_file"),
                "give ca_file: the CA that signed the broker's certificate (the agent hosting the broker connects to it over TLS too)",
            ));
        };
        let server = match (&e.listen, &t.cert_file, &t.key_file) {
            (Some(_), Some(cert), Some(key)) => Some(ServerTls {
                cert_file: absolute(cert),
                key_file: absolute(key),
            }),
            (Some(_), _, _) => {
                return Err(self.err(
                    K,
                    "a broker listening with TLS needs cert_file (its certificate) and key_file (its private key, mode 0600)",
                ));
            }
            (None, None, None) => None,
            (None, _, _) => {
                return Err(self.err(
                    K,
                    "cert_file and key_file are for the agent that hosts the broker (`listen:`); a connecting node needs only ca_file",
                ));
            }
        };
        let addr = e.listen.as_deref().or(e.connect.as_deref()).unwrap_or("");
        let name = match &t.server_name {
            Some(n) => n.clone(),
            None => {
                let host = host_of(addr);
                let unspecified = host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_unspecified());
                if unspecified {
                    return Err(self.err(
                        &format!("{K}.server_name"),
                        "listening on every address: give server_name, a name the broker's certificate carries",
                    ));
                }
                host.to_string()
            }
        };
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_err() {
            return Err(self.err(
                &format!("{K}.server_name"),
                format!("`{name}` is not a host name or IP address"),
            ));
        }
        Ok((server, Some((absolute(ca), name))))
    }
}
