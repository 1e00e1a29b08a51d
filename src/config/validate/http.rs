//! The checks of `http:`: an address to listen on, the token's file, and
//! TLS beyond loopback (a history of file names is company data, and the
//! token travels in every request).

use std::path::Path;

use super::super::raw::RawHttp;
use super::{Result, Validator, absolute};
use crate::config::HttpConfig;

impl Validator<'_> {
    pub(super) fn http(&self, raw: RawHttp, state_dir: &Path) -> Result<HttpConfig> {
        let Ok(listen) = raw.listen.parse::<std::net::SocketAddr>() else {
            return Err(self.err(
                "http.listen",
                format!("`{}` is not an address such as 127.0.0.1:9810", raw.listen),
            ));
        };
        let loopback = listen.ip().is_loopback();
        if !loopback && raw.tls.is_none() {
            return Err(self.err(
                "http.listen",
                "beyond loopback the console's token and history would travel in plain text; listen on 127.0.0.1 or add `tls:` with cert_file and key_file",
            ));
        }
        let metrics_open = raw.metrics_open.unwrap_or(false);
        if metrics_open && !loopback {
            return Err(self.err(
                "http.metrics_open",
                "`/metrics` may be open only on loopback; remove metrics_open and give Prometheus the token (bearer_token_file), or listen on 127.0.0.1",
            ));
        }
        Ok(HttpConfig {
            listen,
            token_file: raw
                .token_file
                .as_deref()
                .map_or_else(|| state_dir.join("http.token"), absolute),
            metrics_open,
            tls: raw
                .tls
                .map(|t| (absolute(&t.cert_file), absolute(&t.key_file))),
        })
    }
}
