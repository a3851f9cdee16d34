//! A cluster CA for tests, and agents that serve mutual TLS on a loopback port.

use std::path::{Path, PathBuf};

use hypersdk_tls::TlsFiles;
use hypersdk_tls::files::write_pem;
use hypersdk_tls::issue::{self, Pem, Validity};
use hypersdk_tls::role::Role;

/// A CA in a temporary directory and the certificates issued from it.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Pem,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("hs-pki-")
            .tempdir_in("/tmp")
            .unwrap();
        let ca = issue::new_ca("test cluster CA", Validity::days_from_now(30)).unwrap();
        write_pem(dir.path(), "ca", &ca).unwrap();
        Pki { dir, ca }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// Files of a new certificate for `role` (valid `validity`), trusting this CA; `name`
    /// distinguishes several certificates of one role.
    pub fn issue_valid(&self, name: &str, role: Role, validity: Validity) -> TlsFiles {
        self.issue_with(name, role, &["127.0.0.1".into()], validity)
    }

    /// For an agent on a host at `ip`: its address as the certificate's name.
    pub fn issue_for_host(&self, name: &str, ip: &str) -> TlsFiles {
        let role = Role::Agent(name.into());
        self.issue_with(name, role, &[ip.into()], Validity::days_from_now(30))
    }

    fn issue_with(&self, name: &str, role: Role, sans: &[String], validity: Validity) -> TlsFiles {
        let pem = issue::issue(&self.ca, &role, sans, validity).unwrap();
        let (cert, key) = write_pem(&self.dir.path().join(name), name, &pem).unwrap();
        TlsFiles {
            cert,
            key,
            ca: self.ca_file(),
        }
    }

    pub fn issue(&self, name: &str, role: Role) -> TlsFiles {
        self.issue_valid(name, role, Validity::days_from_now(30))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// Agent flags: serve mutual TLS on 127.0.0.1:`port` with `files`.
pub fn tls_flags(port: u16, files: &TlsFiles) -> Vec<String> {
    tls_flags_on("127.0.0.1", port, files)
}

/// Agent flags: serve mutual TLS on `ip`:`port` with `files`.
pub fn tls_flags_on(ip: &str, port: u16, files: &TlsFiles) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    vec![
        "--listen".into(),
        format!("https://{ip}:{port}"),
        "--tls-cert".into(),
        path(&files.cert),
        "--tls-key".into(),
        path(&files.key),
        "--tls-ca".into(),
        path(&files.ca),
    ]
}
