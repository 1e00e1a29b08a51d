//! Connecting to one RabbitMQ URL: plain `amqp://`, or `amqps://` with the
//! configured TLS files. With a `ca_file` the connection trusts that CA
//! alone (a private CA pins the cluster: a certificate some public CA gave
//! for the same name is refused); without one, the system's roots.

use lapin::tcp::{AsyncTcpStream, OwnedIdentity, OwnedTLSConfig, RustlsConnectorConfig};
use lapin::{Connection, ConnectionProperties};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{RabbitTls, RabbitmqConfig};

/// One connection attempt. The error is text, for the caller's summary.
/// The heartbeat of `broker.rabbitmq.heartbeat` replaces any the URL
/// gives: lapin closes a connection that heard nothing for two of them,
/// which is how a hung node (SIGSTOP, a frozen VM) is noticed.
pub(super) async fn connect_url(url: &str, cfg: &RabbitmqConfig) -> Result<Connection, String> {
    let props = ConnectionProperties::default();
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(|e: String| e)?;
    uri.query.heartbeat = Some(heartbeat_secs(cfg));
    let Some(tls) = cfg.tls.as_ref().filter(|_| url.starts_with("amqps://")) else {
        return Connection::connect_uri(uri, props)
            .await
            .map_err(|e| e.to_string());
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| e.to_string())?;
    let identity = identity(tls)?;
    let Some(ca_file) = &tls.ca_file else {
        let config = OwnedTLSConfig {
            identity: identity.map(|(pem, key)| OwnedIdentity::PKCS8 { pem, key }),
            cert_chain: None,
        };
        return Connection::connect_uri_with_config(uri, props, config, runtime)
            .await
            .map_err(|e| e.to_string());
    };
    let pem = read(ca_file)?;
    let roots = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", ca_file.display()))?;
    // Only `roots`: RustlsConnectorConfig::default() adds no system roots.
    let config = RustlsConnectorConfig::default().with_parsable_certificates(roots);
    let connector = match identity {
        Some((pem, key)) => {
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the client certificate is not PEM: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(&key)
                .map_err(|e| format!("the client key is not a PEM private key: {e}"))?;
            config.connector_with_single_cert(chain, key)
        }
        None => config.connector_with_no_client_auth(),
    }
    .map_err(|e| format!("TLS: {e}"))?;
    Connection::connector(
        uri,
        runtime,
        async move |uri, runtime| {
            let host = uri.authority.host.clone();
            let addr = tokio::net::lookup_host((host.as_str(), uri.authority.port))
                .await?
                .next()
                .ok_or_else(|| std::io::Error::other(format!("{host} has no address")))?;
            let plain = AsyncTcpStream::connect(&runtime, addr).await?;
            Ok(plain.into_rustls(&connector, &host).await?)
        },
        props,
    )
    .await
    .map_err(|e| e.to_string())
}

/// The heartbeat in whole seconds, as AMQP negotiates it (the
/// configuration refuses 0 and values beyond a u16).
fn heartbeat_secs(cfg: &RabbitmqConfig) -> u16 {
    cfg.heartbeat.as_secs().clamp(1, u64::from(u16::MAX)) as u16
}

fn read(p: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

/// A client certificate chain and its private key, both PEM.
type Pem = (Vec<u8>, Vec<u8>);

/// The client certificate and its key, when configured; the key is read
/// like every secret: one others may read is refused.
fn identity(tls: &RabbitTls) -> Result<Option<Pem>, String> {
    let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) else {
        return Ok(None);
    };
    let key = crate::secret::read(key).map_err(|e| e.to_string())?;
    Ok(Some((read(cert)?, key.into_bytes())))
}
