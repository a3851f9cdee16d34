//! Mutual TLS between HyperSDK's parts: one cluster CA, certificates that carry a role
//! ([`role`]), servers that re-read their files when they change ([`server`]), clients that read
//! them for every new connection ([`client`]), and the agent's authorization by role
//! ([`authorize`]).

pub mod authorize;
pub mod client;
pub mod facts;
pub mod files;
pub mod issue;
pub mod request;
pub mod role;
pub mod server;

pub use rustls;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The flags every part takes: its certificate and key, and the cluster CA it trusts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// This part's certificate (PEM), issued by the cluster CA.
    #[arg(long, global = true, env = "HYPERSDK_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, env = "HYPERSDK_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA certificate (PEM): peers must present certificates it issued.
    #[arg(long, global = true, env = "HYPERSDK_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, when TLS is configured.
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }
}

/// Where a part's TLS identity and trust live; read again whenever they are needed anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// ring, explicitly: other crates in a binary may enable a second rustls provider.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// gRPC runs over HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";
