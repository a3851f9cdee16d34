//! The TLS side of an agent's TCP listener: handshakes with the current certificate (re-read
//! when its files change), and the verdict on the client's certificate for each connection.
//!
//! The handshake takes any client certificate whose key the client holds; the chain is checked
//! right after, and a refused one travels with the connection. The authorization layer then
//! answers each call with UNAUTHENTICATED and the reason, which a TLS alert could not carry.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::facts::CertFacts;
use crate::files::{self, FileError};
use crate::role::Role;
use crate::{ALPN_H2, TlsFiles, provider};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("--tls-ca: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("--tls-cert/--tls-key: {0}")]
    Config(#[from] rustls::Error),
}

/// Who is at the other end of a TLS connection, as far as the cluster CA can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Verified(Role),
    /// Why the client's certificate does not identify it.
    Refused(String),
}

/// The current server configuration and the files' state it was read from.
struct Loaded {
    stamps: Vec<Option<(SystemTime, u64)>>,
    acceptor: TlsAcceptor,
    verifier: Arc<dyn ClientCertVerifier>,
    facts: CertFacts,
}

/// A server's TLS identity, re-read when its files change.
pub struct ServerTls {
    files: TlsFiles,
    loaded: Mutex<Arc<Loaded>>,
}

fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    let stamp = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    [&files.cert, &files.key, &files.ca]
        .into_iter()
        .map(|p| stamp(p))
        .collect()
}

fn load(files: &TlsFiles) -> Result<Loaded, ServerTlsError> {
    let stamps = stamps(files);
    let provider = provider();
    let roots = files::read_roots(&files.ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let facts = files::read_facts(files)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(Deferred(verifier.clone())))
        .with_single_cert(
            files::read_certs(&files.cert)?,
            files::read_key(&files.key)?,
        )?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Loaded {
        stamps,
        acceptor: TlsAcceptor::from(Arc::new(config)),
        verifier,
        facts,
    })
}

impl ServerTls {
    pub fn load(files: TlsFiles) -> Result<Arc<ServerTls>, ServerTlsError> {
        let loaded = Mutex::new(Arc::new(load(&files)?));
        Ok(Arc::new(ServerTls { files, loaded }))
    }

    /// The configuration for a new connection: read again if a file changed since. Files caught
    /// half-written (a key that does not match its certificate) leave the last good one in use.
    fn current(&self) -> Arc<Loaded> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if stamps(&self.files) != loaded.stamps {
            match load(&self.files) {
                Ok(new) => {
                    info!(cert = %self.files.cert.display(), not_after = %new.facts.not_after, "TLS certificate re-read");
                    *loaded = Arc::new(new);
                }
                Err(e) => warn!("TLS files changed but cannot be used (keeping the last): {e}"),
            }
        }
        loaded.clone()
    }

    /// What the server's own certificate says (its expiry for GetNode).
    pub fn facts(&self) -> CertFacts {
        self.current().facts.clone()
    }

    /// Handshakes on every connection `listener` accepts; yields the established ones.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> ReceiverStream<std::io::Result<TlsConn>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                // Stops accepting (and frees the port) once the server is gone.
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = tx.closed() => return,
                };
                let (tcp, remote) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let loaded = self.current();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match handshake(&loaded, tcp, remote).await {
                        Ok(conn) => {
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Err(e) => info!(%remote, "TLS handshake failed: {e}"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

async fn handshake(
    loaded: &Loaded,
    tcp: TcpStream,
    remote: SocketAddr,
) -> std::io::Result<TlsConn> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, loaded.acceptor.accept(tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))??;
    let peer = verify(
        loaded.verifier.as_ref(),
        stream.get_ref().1.peer_certificates(),
    );
    Ok(TlsConn {
        stream,
        info: ConnInfo { remote, peer },
    })
}

/// The verdict on a client's certificate chain (leaf first).
pub fn verify(verifier: &dyn ClientCertVerifier, chain: Option<&[CertificateDer<'_>]>) -> Peer {
    let Some((leaf, intermediates)) = chain.and_then(|c| c.split_first()) else {
        return Peer::Refused(
            "no client certificate; this port requires one from the cluster CA".into(),
        );
    };
    if let Err(e) = verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) {
        let why = match e {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                "not issued by the cluster CA".to_string()
            }
            e => e.to_string(),
        };
        return Peer::Refused(format!("client certificate refused: {why}"));
    }
    match CertFacts::read(leaf).map(|f| f.role) {
        Ok(Ok(role)) => Peer::Verified(role),
        Ok(Err(e)) => Peer::Refused(format!("client certificate has no role: {e}")),
        Err(e) => Peer::Refused(format!("client certificate: {e}")),
    }
}

/// Accepts the certificate during the handshake (after the client proved it holds the key) so
/// that [`verify`] can judge it once the connection can carry a gRPC status.
#[derive(Debug)]
struct Deferred(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for Deferred {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// What the gRPC server learns of a connection (in every request's extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub peer: Peer,
}

/// An established TLS connection with its verdict.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
