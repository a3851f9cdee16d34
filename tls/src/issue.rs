//! Certificates of the cluster CA: the CA itself and role certificates it signs (rcgen).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::role::Role;

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("--san {0:?}: expected an IP address or a DNS name")]
    BadSan(String),
    #[error("--role agent needs at least one --san: the IP or DNS name clients reach the agent at")]
    AgentWithoutSan,
    #[error("--days must be at least 1")]
    NoDays,
    #[error("the CA certificate or key: {0}")]
    BadCa(#[source] rcgen::Error),
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

/// When a certificate is valid: from `not_before` for `days` days.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub days: u32,
}

impl Validity {
    /// From an hour ago (clocks of hosts differ a little) for `days` days.
    pub fn days_from_now(days: u32) -> Validity {
        Validity {
            not_before: OffsetDateTime::now_utc() - Duration::hours(1),
            days,
        }
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), IssueError> {
        if self.days == 0 {
            return Err(IssueError::NoDays);
        }
        params.not_before = self.not_before;
        params.not_after = self.not_before + Duration::days(self.days.into());
        Ok(())
    }
}

/// A new self-signed cluster CA named `name`.
pub fn new_ca(name: &str, validity: Validity) -> Result<Pem, IssueError> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity.apply(&mut params)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The parameters of a certificate for `role`: its role URI and `sans` as subject alternative
/// names; agents (which also serve) may authenticate as server and client, others as client.
pub fn role_params(
    role: &Role,
    sans: &[String],
    validity: Validity,
) -> Result<CertificateParams, IssueError> {
    if matches!(role, Role::Agent(_)) && sans.is_empty() {
        return Err(IssueError::AgentWithoutSan);
    }
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, role.name());
    let uri = role.uri().try_into().map_err(IssueError::Sign)?;
    params.subject_alt_names.push(SanType::URI(uri));
    for san in sans {
        params.subject_alt_names.push(parse_san(san)?);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if matches!(role, Role::Agent(_)) {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        // QEMU (GnuTLS) refuses a server certificate for the migration stream without it.
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    params.use_authority_key_identifier_extension = true;
    validity.apply(&mut params)?;
    Ok(params)
}

fn parse_san(san: &str) -> Result<SanType, IssueError> {
    if let Ok(ip) = san.parse() {
        return Ok(SanType::IpAddress(ip));
    }
    let dns_ok = !san.is_empty()
        && san
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !dns_ok {
        return Err(IssueError::BadSan(san.to_string()));
    }
    let name = san
        .to_string()
        .try_into()
        .map_err(|_| IssueError::BadSan(san.to_string()))?;
    Ok(SanType::DnsName(name))
}

/// A certificate for `role` signed by the CA `ca`, with a new key.
pub fn issue(
    ca: &Pem,
    role: &Role,
    sans: &[String],
    validity: Validity,
) -> Result<Pem, IssueError> {
    let params = role_params(role, sans, validity)?;
    let ca_key = KeyPair::from_pem(&ca.key).map_err(IssueError::BadCa)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(IssueError::BadCa)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::CertFacts;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    fn facts(pem: &str) -> CertFacts {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        CertFacts::read(&der).unwrap()
    }

    #[test]
    fn issued_certificates_carry_role_and_validity() {
        let ca = new_ca("test CA", Validity::days_from_now(10)).unwrap();
        let role = Role::Agent("node-1".into());
        let sans = ["127.0.0.1".to_string(), "node-1.example".to_string()];
        let pem = issue(&ca, &role, &sans, Validity::days_from_now(3)).unwrap();
        let f = facts(&pem.cert);
        assert_eq!(f.role, Ok(role));
        let left = f.not_after - OffsetDateTime::now_utc();
        assert!(
            left > Duration::days(2) && left < Duration::days(3),
            "{left}"
        );
        assert!(pem.key.contains("PRIVATE KEY"));
    }

    #[test]
    fn bad_issue_requests_name_the_flag() {
        let ca = new_ca("test CA", Validity::days_from_now(10)).unwrap();
        let v = Validity::days_from_now(1);
        let agent = Role::Agent("n".into());
        let admin = Role::Admin("a".into());
        assert!(matches!(
            issue(&ca, &agent, &[], v),
            Err(IssueError::AgentWithoutSan)
        ));
        let e = issue(&ca, &admin, &["bad name!".into()], v).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--san \"bad name!\": expected an IP address or a DNS name"
        );
        let zero = Validity { days: 0, ..v };
        assert!(matches!(
            issue(&ca, &admin, &[], zero),
            Err(IssueError::NoDays)
        ));
        let garbage = Pem {
            cert: "x".into(),
            key: "y".into(),
        };
        assert!(matches!(
            issue(&garbage, &admin, &[], v),
            Err(IssueError::BadCa(_))
        ));
    }
}
