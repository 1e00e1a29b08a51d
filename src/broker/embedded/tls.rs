//! TLS for the embedded broker (rustls through tokio-rustls, the same rustls
//! and crypto provider lapin uses). The broker serves every connection as a
//! TLS server session when given a certificate and key; a client trusts
//! only the private CA of its `ca_file`. The frames inside are unchanged:
//! the hello's small frame limit, the timeouts and the credentials all
//! apply inside the TLS session.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, rustls};

/// A connection's byte stream: plain TCP or a TLS session over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Stream = Box<dyn Io>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read the certificate file {0}: {1}; give a PEM file (tests/certs.sh makes one)"
    )]
    Cert(PathBuf, String),
    #[error(
        "the certificate file {0} holds no PEM certificate; give the broker's certificate (and its chain)"
    )]
    NoCert(PathBuf),
    #[error("cannot use the key file {0}: {1}")]
    Key(PathBuf, String),
    #[error(
        "the key {key} does not fit the certificate {cert}: {reason}; give the key the certificate was made for"
    )]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error(
        "`{0}` is not a host name or IP address the broker's certificate could name; set tls.server_name"
    )]
    ServerName(String),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert(path.to_path_buf(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(path.to_path_buf()));
    }
    Ok(certs)
}

/// The broker's side: its certificate chain and its private key, which must
/// be private to its owner (read like any secret, `secret::read`).
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    let chain = certs(cert_file)?;
    let pem = crate::secret::read(key_file)
        .map_err(|e| TlsError::Key(key_file.to_path_buf(), e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        TlsError::Key(
            key_file.to_path_buf(),
            format!("{e}; give a PEM private key"),
        )
    })?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Mismatch {
            cert: cert_file.to_path_buf(),
            key: key_file.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A client's side: trusts only the CAs in `ca_file`, and expects the
/// broker's certificate to name `server_name`.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    name: ServerName<'static>,
    ca_file: PathBuf,
}

impl Client {
    pub fn new(ca_file: &Path, server_name: &str) -> Result<Client, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(ca_file)? {
            roots
                .add(c)
                .map_err(|e| TlsError::Cert(ca_file.to_path_buf(), e.to_string()))?;
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
        Ok(Client {
            connector: TlsConnector::from(Arc::new(config)),
            name,
            ca_file: ca_file.to_path_buf(),
        })
    }

    /// The TLS session over `tcp`, or a sentence saying what to check.
    pub async fn connect(&self, tcp: TcpStream) -> Result<Stream, String> {
        match self.connector.connect(self.name.clone(), tcp).await {
            Ok(s) => Ok(Box::new(s)),
            Err(e) => Err(format!(
                "TLS handshake failed: {e}; check that the broker's certificate is signed by ca_file {} and names {:?} (tls.server_name), and that the broker runs with TLS",
                self.ca_file.display(),
                self.name.to_str()
            )),
        }
    }
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}
