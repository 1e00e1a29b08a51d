//! Validation of `broker.rabbitmq`: URLs, identity (`verify_sender`, the
//! login, `password_file`), TLS files, and the dead-letter queue's bound.

use std::time::Duration;

use super::amqp_url::{has_password, is_loopback_host, url_host, url_user, with_password};
use super::raw::RawRabbitmq;
use super::validate::{Validator, absolute};
use super::*;

type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl Validator<'_> {
    pub(super) fn rabbitmq(&self, node: &NodeName, r: RawRabbitmq) -> Result<RabbitmqConfig> {
        const K: &str = "broker.rabbitmq";
        if r.urls.is_empty() {
            return Err(self.err(&format!("{K}.urls"), "list at least one amqp:// URL"));
        }
        let auth_external = match r.auth_mechanism.as_deref() {
            None | Some("plain") => false,
            Some("external") => true,
            Some(_) => {
                return Err(self.err(
                    &format!("{K}.auth_mechanism"),
                    "must be `plain` (user and password) or `external` (the client certificate's CN)",
                ));
            }
        };
        let password = match &r.password_file {
            Some(p) => Some(
                crate::secret::read(&absolute(p))
                    .map_err(|e| self.err(&format!("{K}.password_file"), e.to_string()))?,
            ),
            None => None,
        };
        let insecure = r.insecure.unwrap_or(false);
        let verify_sender = r.verify_sender.unwrap_or(true);
        let mut urls = Vec::with_capacity(r.urls.len());
        for (i, url) in r.urls.iter().enumerate() {
            let key = format!("{K}.urls[{i}]");
            let tls = url.starts_with("amqps://");
            if !(tls || url.starts_with("amqp://")) {
                return Err(self.err(&key, "a URL must start with amqp:// or amqps://"));
            }
            let Some(host) = url_host(url).filter(|h| !h.is_empty()) else {
                return Err(self.err(&key, "the URL names no host"));
            };
            if !tls && !insecure && !is_loopback_host(&host) {
                return Err(self.err(
                    &key,
                    format!(
                        "plain amqp:// to `{host}` would send the password and every file in clear: use amqps:// with `tls:`, or set `insecure: true` on a network you trust"
                    ),
                ));
            }
            if auth_external && !tls {
                return Err(self.err(
                    &key,
                    "auth_mechanism: external logs in with a client certificate: use amqps://",
                ));
            }
            let user = url_user(url);
            // With verify_sender on, peers drop what this node publishes
            // unless its broker user is its node name; say so here rather
            // than have every message dead-lettered. (Explicitly set, the
            // operator chose, e.g. a receiver that only checks others.)
            if verify_sender && r.verify_sender.is_none() && !auth_external {
                if let Some(user) = user.as_deref().filter(|u| *u != node.as_str()) {
                    return Err(self.err(
                        &key,
                        format!(
                            "node `{node}` logs in as `{user}`, but peers accept a message only from the broker user named after its sender (verify_sender, on by default): give each node its own RabbitMQ user (packaging/rabbitmq/local-cluster.sh makes them), or set `verify_sender: false`"
                        ),
                    ));
                }
            }
            if auth_external {
                // The broker's user is the certificate's CN: it must be the
                // node, and the URL carries it so that `user_id` is set.
                if user.as_deref().is_some_and(|u| u != node.as_str()) {
                    return Err(self.err(
                        &key,
                        format!("with auth_mechanism: external the user is the certificate's CN, which must be `{node}`: leave the user out of the URL"),
                    ));
                }
                let mut u = match user {
                    Some(_) => url.clone(),
                    None => url.replacen("://", &format!("://{node}@"), 1),
                };
                if !u.contains("auth_mechanism=") {
                    u.push(if u.contains('?') { '&' } else { '?' });
                    u.push_str("auth_mechanism=external");
                }
                urls.push(u);
                continue;
            }
            match &password {
                Some(_) if has_password(url) => {
                    return Err(self.err(
                        &key,
                        "the URL carries a password and password_file gives another: keep one",
                    ));
                }
                Some(_) if user.is_none() => {
                    return Err(self.err(
                        &key,
                        "password_file needs the user in the URL, e.g. amqps://alpha@host:5671/%2f",
                    ));
                }
                Some(p) => urls.push(with_password(url, p)),
                None => urls.push(url.clone()),
            }
        }
        let tls = match r.tls {
            Some(t) => Some(self.rabbit_tls(t)?),
            None => None,
        };
        if tls.is_some() {
            // TLS settings beside a plain URL would be silently unused.
            if let Some(i) = r.urls.iter().position(|u| u.starts_with("amqp://")) {
                return Err(self.err(
                    &format!("{K}.urls[{i}]"),
                    "`tls:` is given but this URL is plain amqp://: use amqps://",
                ));
            }
        }
        if auth_external && tls.as_ref().is_none_or(|t| t.cert_file.is_none()) {
            return Err(self.err(
                &format!("{K}.auth_mechanism"),
                "external needs a client certificate: give tls.cert_file and tls.key_file",
            ));
        }
        let confirm_timeout = match &r.confirm_timeout {
            Some(t) => self.duration(&format!("{K}.confirm_timeout"), t)?,
            None => Duration::from_secs(30),
        };
        let heartbeat = match &r.heartbeat {
            Some(t) => self.duration(&format!("{K}.heartbeat"), t)?,
            None => DEFAULT_HEARTBEAT,
        };
        if heartbeat.is_zero() || heartbeat.subsec_nanos() != 0 || heartbeat.as_secs() > 600 {
            return Err(self.err(
                &format!("{K}.heartbeat"),
                "must be whole seconds from 1s to 600s (AMQP counts heartbeats in seconds; 0 would turn them off and leave an agent on a hung node for minutes)",
            ));
        }
        let window = match &r.window {
            Some(w) => self.size(&format!("{K}.window"), w)?,
            None => 8 << 20,
        };
        // A receiver acks a chunk only once it is on disk and recorded, so
        // it holds one batch being committed while the next arrives: 16 x
        // 512 KiB left the consumer behind the publisher on the test
        // cluster, 32 kept up.
        let prefetch = r.prefetch.unwrap_or(32);
        if prefetch == 0 {
            return Err(self.err(&format!("{K}.prefetch"), "must be at least 1"));
        }
        let dead_letter_max = match &r.dead_letter_max {
            Some(m) => self.size(&format!("{K}.dead_letter_max"), m)?,
            None => DEFAULT_DEAD_LETTER_MAX,
        };
        if dead_letter_max == 0 {
            return Err(self.err(&format!("{K}.dead_letter_max"), "must be more than 0"));
        }
        Ok(RabbitmqConfig {
            urls,
            confirm_timeout,
            heartbeat,
            prefetch,
            delivery_limit: r.delivery_limit.unwrap_or(20),
            window: window.max(MAX_CHUNK),
            verify_sender,
            max_queue: r
                .max_queue
                .as_deref()
                .map(|m| self.size(&format!("{K}.max_queue"), m))
                .transpose()?,
            tls,
            auth_external,
            dead_letter_max,
        })
    }

    fn rabbit_tls(&self, t: super::raw::RawRabbitTls) -> Result<RabbitTls> {
        const K: &str = "broker.rabbitmq.tls";
        if t.cert_file.is_some() != t.key_file.is_some() {
            return Err(self.err(K, "give cert_file and key_file together (or neither)"));
        }
        let readable = |key: &str, p: &std::path::Path| {
            std::fs::read(p)
                .map(|_| ())
                .map_err(|e| self.err(key, format!("cannot read {}: {e}", p.display())))
        };
        let tls = RabbitTls {
            ca_file: t.ca_file.map(|p| absolute(&p)),
            cert_file: t.cert_file.map(|p| absolute(&p)),
            key_file: t.key_file.map(|p| absolute(&p)),
        };
        if let Some(p) = &tls.ca_file {
            readable(&format!("{K}.ca_file"), p)?;
        }
        if let Some(p) = &tls.cert_file {
            readable(&format!("{K}.cert_file"), p)?;
        }
        if let Some(p) = &tls.key_file {
            // A private key is a secret: refused when others may read it.
            crate::secret::read(p)
                .map_err(|e| self.err(&format!("{K}.key_file"), e.to_string()))?;
        }
        Ok(tls)
    }
}
