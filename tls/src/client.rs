//! The TLS side of a client's connection to an agent. The files are read for every new
//! connection, so a rotated certificate is used from the next connection on.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::files::{self, FileError};
use crate::{ALPN_H2, TlsFiles, provider};

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("--tls-cert/--tls-key: {0}")]
    Config(#[from] rustls::Error),
}

/// A client configuration from the files as they are now: trusts the cluster CA, presents the
/// certificate.
pub fn config(files: &TlsFiles) -> Result<Arc<ClientConfig>, ClientTlsError> {
    let roots = files::read_roots(&files.ca)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            files::read_certs(&files.cert)?,
            files::read_key(&files.key)?,
        )?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Opens a TLS connection to `hostport`, whose certificate must name `host` (IP or DNS).
pub async fn connect(
    config: Arc<ClientConfig>,
    hostport: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    let (host, _) = hostport
        .rsplit_once(':')
        .ok_or_else(|| invalid(format!("{hostport:?}: expected host:port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name =
        ServerName::try_from(host.to_string()).map_err(|e| invalid(format!("{host:?}: {e}")))?;
    let tcp = TcpStream::connect(hostport).await?;
    tcp.set_nodelay(true)?;
    TlsConnector::from(config).connect(name, tcp).await
}
