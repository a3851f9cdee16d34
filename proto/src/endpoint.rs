//! Agent addresses, as users write them (`unix:///run/hypersdk/agent.sock`, `http://127.0.0.1:7443`),
//! and connecting a client to one.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::agent::v1::agent_service_client::AgentServiceClient;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    /// `host:port`, plain HTTP/2.
    Tcp(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("{0:?}: expected unix:///absolute/path or http://host:port")]
    Malformed(String),
    #[error("{0:?}: TLS (https://) is not supported yet; use unix:// or http:// on loopback")]
    TlsUnsupported(String),
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
        if s.starts_with("https://") {
            return Err(AddressError::TlsUnsupported(s.to_string()));
        }
        let hostport = s
            .strip_prefix("http://")
            .ok_or_else(bad)?
            .trim_end_matches('/');
        let (host, port) = hostport.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() || hostport.contains('/') {
            return Err(bad());
        }
        Ok(Address::Tcp(hostport.to_string()))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
            Address::Tcp(hp) => write!(f, "http://{hp}"),
        }
    }
}

/// Connects an agent client.
pub async fn connect(
    addr: &Address,
) -> Result<AgentServiceClient<Channel>, tonic::transport::Error> {
    // VM lists with many specs can exceed tonic's 4 MiB default.
    Ok(AgentServiceClient::new(channel(addr).await?).max_decoding_message_size(64 << 20))
}

/// Opens a channel to any service the agent serves (health, reflection, the agent API).
/// Unix sockets need a custom connector; the URI is then only a placeholder.
pub async fn channel(addr: &Address) -> Result<Channel, tonic::transport::Error> {
    Ok(match addr {
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
        assert!(matches!(
            "https://h:1".parse::<Address>(),
            Err(AddressError::TlsUnsupported(_))
        ));
        for bad in [
            "unix://rel.sock",
            "unix://",
            "127.0.0.1:80",
            "http://h",
            "http://h:x",
            "http://h:1/p",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
        assert_eq!(Address::Unix("/a".into()).to_string(), "unix:///a");
    }
}
