//! Agent addresses, as users write them (`unix:///run/hypersdk/agent.sock`, `http://127.0.0.1:7443`,
//! `https://10.0.0.5:7443`), and connecting a client to one.

use std::path::PathBuf;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use hypersdk_tls::TlsFiles;
use hypersdk_tls::client::{self, ClientTlsError};
use hypersdk_tls::rustls::ClientConfig;
use tonic::transport::{Channel, Endpoint};

use crate::agent::v1::agent_service_client::AgentServiceClient;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    /// `host:port`, plain HTTP/2 (loopback only).
    Tcp(String),
    /// `host:port`, HTTP/2 over mutual TLS.
    Tls(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("{0:?}: expected unix:///absolute/path, http://host:port or https://host:port")]
    Malformed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    #[error("TLS files: {0}")]
    Tls(#[from] ClientTlsError),
    #[error("{0}: https:// needs --tls-cert, --tls-key and --tls-ca")]
    NoTlsFiles(Address),
}

impl std::str::FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        let bad = || AddressError::Malformed(s.to_string());
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(bad());
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let (hostport, kind): (_, fn(String) -> Address) = match s.strip_prefix("https://") {
            Some(rest) => (rest, Address::Tls),
            None => (s.strip_prefix("http://").ok_or_else(bad)?, Address::Tcp),
        };
        let hostport = hostport.trim_end_matches('/');
        let (host, port) = hostport.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() || hostport.contains('/') {
            return Err(bad());
        }
        Ok(kind(hostport.to_string()))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
            Address::Tcp(hp) => write!(f, "http://{hp}"),
            Address::Tls(hp) => write!(f, "https://{hp}"),
        }
    }
}

/// Connects an agent client; `tls` (read now) for `https://` addresses.
pub async fn connect(
    addr: &Address,
    tls: Option<&TlsFiles>,
) -> Result<AgentServiceClient<Channel>, ConnectError> {
    // VM lists with many specs can exceed tonic's 4 MiB default.
    Ok(AgentServiceClient::new(channel(addr, tls).await?).max_decoding_message_size(64 << 20))
}

/// Opens a channel to any service the agent serves (health, reflection, the agent API).
/// Unix sockets and TLS need a custom connector; the URI is then only a placeholder.
pub async fn channel(addr: &Address, tls: Option<&TlsFiles>) -> Result<Channel, ConnectError> {
    Ok(match addr {
        Address::Tls(hp) => {
            let files = tls.ok_or_else(|| ConnectError::NoTlsFiles(addr.clone()))?;
            tls_channel(client::config(files)?, hp).await?
        }
        Address::Tcp(hp) => {
            Endpoint::from_shared(format!("http://{hp}"))?
                .connect()
                .await?
        }
        Address::Unix(path) => {
            let path = path.clone();
            Endpoint::from_static("http://agent.local")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await?
        }
    })
}

/// A channel over TLS to `hostport` with a client configuration of the caller's.
pub async fn tls_channel(
    config: Arc<ClientConfig>,
    hostport: &str,
) -> Result<Channel, tonic::transport::Error> {
    let hp = hostport.to_string();
    Endpoint::from_shared(format!("http://{hp}"))?
        .connect_with_connector(tower::service_fn(move |_| {
            let (config, hp) = (config.clone(), hp.clone());
            async move {
                let stream = client::connect(config, &hp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "unix:///run/a.sock".parse(),
            Ok(Address::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "http://127.0.0.1:7443".parse(),
            Ok(Address::Tcp("127.0.0.1:7443".into()))
        );
        assert_eq!(
            "http://[::1]:7443/".parse(),
            Ok(Address::Tcp("[::1]:7443".into()))
        );
        assert_eq!(
            "https://node-1.example:7443".parse(),
            Ok(Address::Tls("node-1.example:7443".into()))
        );
        assert_eq!(Address::Tls("h:1".into()).to_string(), "https://h:1");
        for bad in [
            "unix://rel.sock",
            "unix://",
            "127.0.0.1:80",
            "http://h",
            "http://h:x",
            "http://h:1/p",
            "https://h",
            "ftp://h:1",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
        assert_eq!(Address::Unix("/a".into()).to_string(), "unix:///a");
    }
}
