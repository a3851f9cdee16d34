//! Reading and writing the PEM files of certificates, keys and the CA.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsFiles;
use crate::facts::{CertFacts, Unreadable};
use crate::issue::Pem;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no certificate in it", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: {source}", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: Unreadable,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: already exists; remove it first to replace it", .0.display())]
    Exists(PathBuf),
    #[error("{}: {source}", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// A certificate chain, the leaf first.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let pem_error = |source| FileError::Pem {
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(FileError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| FileError::Pem {
        path: path.to_path_buf(),
        source,
    })
}

/// The CA file's certificates as trust anchors.
pub fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, FileError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|source| FileError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// What the certificate file of `files` says (role, expiry).
pub fn read_facts(files: &TlsFiles) -> Result<CertFacts, FileError> {
    let certs = read_certs(&files.cert)?;
    CertFacts::read(&certs[0]).map_err(|source| FileError::Certificate {
        path: files.cert.clone(),
        source,
    })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError::Io { path, source }
}

/// Reads `NAME.crt` and `NAME.key` in `dir`.
pub fn read_pem(dir: &Path, name: &str) -> Result<Pem, FileError> {
    let read = |ext: &str| {
        let path = dir.join(format!("{name}.{ext}"));
        std::fs::read_to_string(&path).map_err(io_error(&path))
    };
    Ok(Pem {
        cert: read("crt")?,
        key: read("key")?,
    })
}

/// Writes `NAME.crt` (mode 0644) and `NAME.key` (mode 0600) in `dir`, creating it; an existing
/// key is never overwritten.
pub fn write_pem(dir: &Path, name: &str, pem: &Pem) -> Result<(PathBuf, PathBuf), FileError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    if key.exists() {
        return Err(FileError::Exists(key));
    }
    write_new(&key, &pem.key, 0o600)?;
    write_new(&cert, &pem.cert, 0o644)?;
    Ok((cert, key))
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), FileError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(text.as_bytes()).map_err(io_error(path))
}
