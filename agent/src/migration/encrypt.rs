//! QEMU's migration stream over mutual TLS: both QEMUs get a `tls-creds-x509` object made from
//! the agent's own certificate, key and the cluster CA (`--tls-*`), the target verifies the
//! source's certificate (verify-peer) and the source checks the target's against the host it
//! connects to (tls-hostname). The credentials are made afresh for every migration, so a
//! rotated certificate is used by the next one.

use std::path::{Path, PathBuf};

use hypersdk_tls::TlsFiles;
use qapi::qmp;

use crate::qemu::qmp::{Qmp, QmpError};

/// The id of the credentials object in both QEMUs.
pub const CREDS_ID: &str = "migration-tls";

/// Which end of the stream a QEMU is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The target listens: a TLS server.
    Target,
    /// The source connects: a TLS client.
    Source,
}

#[derive(Debug, thiserror::Error)]
pub enum EncryptError {
    #[error("linking {} for QEMU's migration credentials: {source}", path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU refused the migration credentials: {0}")]
    Qmp(#[from] QmpError),
}

/// The files QEMU reads from the credentials directory, by the names it expects, and the
/// agent's file each one is.
pub fn creds_files(files: &TlsFiles, end: End) -> [(&'static str, &Path); 3] {
    let (cert, key) = match end {
        End::Target => ("server-cert.pem", "server-key.pem"),
        End::Source => ("client-cert.pem", "client-key.pem"),
    };
    [
        ("ca-cert.pem", files.ca.as_path()),
        (cert, files.cert.as_path()),
        (key, files.key.as_path()),
    ]
}

/// `object-add` of the credentials read from `dir`; both ends verify the other.
pub fn creds(dir: &Path, end: End) -> qmp::object_add {
    let endpoint = match end {
        End::Target => qmp::QCryptoTLSCredsEndpoint::server,
        End::Source => qmp::QCryptoTLSCredsEndpoint::client,
    };
    let base = qmp::TlsCredsProperties {
        dir: Some(dir.to_string_lossy().into_owned()),
        endpoint: Some(endpoint),
        priority: None,
        verify_peer: Some(true),
    };
    qmp::object_add(qmp::ObjectOptions::tls_creds_x509 {
        id: CREDS_ID.into(),
        tls_creds_x509: base.into(),
    })
}

/// `migrate-set-parameters` that puts the stream over the credentials; `hostname` (source only)
/// is the name the target's certificate must carry.
pub fn parameters(hostname: Option<&str>) -> qmp::migrate_set_parameters {
    qmp::migrate_set_parameters(qmp::MigrateSetParameters {
        tls_creds: Some(qmp::StrOrNull::s(CREDS_ID.into())),
        tls_hostname: hostname.map(|h| qmp::StrOrNull::s(h.into())),
        ..Default::default()
    })
}

/// The host of a `tcp:HOST:PORT` migration URI, without IPv6 brackets.
pub fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("tcp:")?;
    let (host, _port) = rest.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

/// Gives `qmp`'s QEMU the credentials (linked into `dir`) and turns TLS on for its next
/// migration.
pub async fn enable(
    qmp: &Qmp,
    files: &TlsFiles,
    dir: &Path,
    end: End,
    hostname: Option<&str>,
) -> Result<(), EncryptError> {
    link_files(files, dir, end)?;
    // A QEMU keeps the object of an earlier (failed) migration: replace it.
    let _ = qmp
        .execute(qmp::object_del {
            id: CREDS_ID.into(),
        })
        .await;
    qmp.execute(creds(dir, end)).await?;
    qmp.execute(parameters(hostname)).await?;
    Ok(())
}

fn link_files(files: &TlsFiles, dir: &Path, end: End) -> Result<(), EncryptError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EncryptError::Files { path, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    for (name, file) in creds_files(files, end) {
        let link = dir.join(name);
        let target = std::fs::canonicalize(file).map_err(err(file))?;
        match std::fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(&link)(e)),
            _ => {}
        }
        std::os::unix::fs::symlink(&target, &link).map_err(err(&link))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> TlsFiles {
        TlsFiles {
            cert: "/etc/hs/node.crt".into(),
            key: "/etc/hs/node.key".into(),
            ca: "/etc/hs/ca.crt".into(),
        }
    }

    #[test]
    fn each_end_gets_the_names_qemu_reads() {
        let f = files();
        let target: Vec<_> = creds_files(&f, End::Target).map(|(n, _)| n).into();
        assert_eq!(target, ["ca-cert.pem", "server-cert.pem", "server-key.pem"]);
        let source = creds_files(&f, End::Source);
        assert_eq!(
            source[1],
            ("client-cert.pem", Path::new("/etc/hs/node.crt"))
        );
        assert_eq!(source[2], ("client-key.pem", Path::new("/etc/hs/node.key")));
    }

    #[test]
    fn credentials_verify_the_peer_and_the_source_checks_the_host() {
        let add = serde_json::to_value(creds(Path::new("/d"), End::Target)).unwrap();
        assert_eq!(
            add,
            serde_json::json!({"qom-type": "tls-creds-x509", "id": CREDS_ID, "dir": "/d",
                               "endpoint": "server", "verify-peer": true})
        );
        let p = serde_json::to_value(parameters(Some("10.0.0.7"))).unwrap();
        assert_eq!(p["tls-creds"], CREDS_ID);
        assert_eq!(p["tls-hostname"], "10.0.0.7");
        let p = serde_json::to_value(parameters(None)).unwrap();
        assert!(p.get("tls-hostname").is_none());
    }

    #[test]
    fn uri_hosts() {
        assert_eq!(uri_host("tcp:10.0.0.7:49152"), Some("10.0.0.7"));
        assert_eq!(uri_host("tcp:[fd00::7]:49152"), Some("fd00::7"));
        assert_eq!(uri_host("unix:/x"), None);
    }
}
