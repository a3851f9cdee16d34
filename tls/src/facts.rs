//! What a certificate says: its role and when it expires (x509-parser).

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::role::{Role, RoleError, SCHEME};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The role of its `hypersdk://` URI name, or why it has none.
    pub role: Result<Role, RoleError>,
    pub not_after: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
#[error("not a readable X.509 certificate: {0}")]
pub struct Unreadable(String);

impl CertFacts {
    pub fn read(der: &[u8]) -> Result<CertFacts, Unreadable> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| Unreadable(e.to_string()))?;
        let names = cert
            .subject_alternative_name()
            .map_err(|e| Unreadable(e.to_string()))?;
        let uris = names.iter().flat_map(|ext| &ext.value.general_names);
        let role = uris
            .filter_map(|n| match n {
                GeneralName::URI(u) if u.starts_with(SCHEME) => Some(Role::from_uri(u)),
                _ => None,
            })
            .next()
            .unwrap_or(Err(RoleError::Missing));
        Ok(CertFacts {
            role,
            not_after: cert.validity().not_after.to_datetime(),
        })
    }

    /// Whole days from now until it expires (negative once expired).
    pub fn days_left(&self) -> i64 {
        (self.not_after - OffsetDateTime::now_utc()).whole_days()
    }
}
