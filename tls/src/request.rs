//! Certificates through a signing request: a part makes a key and a CSR carrying only its
//! public key ([`new_request`]); the CA's holder decides the role and names from what it has
//! verified about the requester, not from the request, and signs ([`sign_request`]).

use rcgen::{CertificateParams, CertificateSigningRequestParams, Issuer, KeyPair};

use crate::issue::{IssueError, Pem, Validity, role_params};
use crate::role::Role;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the certificate signing request: {0}")]
    BadRequest(#[source] rcgen::Error),
    #[error(transparent)]
    Issue(#[from] IssueError),
}

/// A new key and a CSR (PEM) for it, with `name` as common name.
pub fn new_request(name: &str) -> Result<Pem, RequestError> {
    let key = KeyPair::generate().map_err(IssueError::Sign)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(IssueError::Sign)?;
    Ok(Pem {
        cert: csr,
        key: key.serialize_pem(),
    })
}

/// A certificate for `role` with `sans`, for the public key of `csr_pem`, signed by `ca`.
/// Whatever else the request asks for is ignored.
pub fn sign_request(
    ca: &Pem,
    csr_pem: &str,
    role: &Role,
    sans: &[String],
    validity: Validity,
) -> Result<String, RequestError> {
    let mut csr =
        CertificateSigningRequestParams::from_pem(csr_pem).map_err(RequestError::BadRequest)?;
    csr.params = role_params(role, sans, validity)?;
    let ca_key = KeyPair::from_pem(&ca.key).map_err(IssueError::BadCa)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key).map_err(IssueError::BadCa)?;
    let cert = csr.signed_by(&issuer).map_err(IssueError::Sign)?;
    Ok(cert.pem())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::CertFacts;
    use crate::issue::new_ca;
    use rcgen::PublicKeyData;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn the_signer_decides_role_and_names() {
        let ca = new_ca("test CA", Validity::days_from_now(10)).unwrap();
        let request = new_request("hypersdk://controller/forged").unwrap();
        assert!(
            request.cert.contains("CERTIFICATE REQUEST"),
            "{}",
            request.cert
        );
        let role = Role::Agent("node-1".into());
        let sans = ["10.0.0.7".to_string(), "node-1".to_string()];
        let cert =
            sign_request(&ca, &request.cert, &role, &sans, Validity::days_from_now(2)).unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(CertFacts::read(&der).unwrap().role, Ok(role.clone()));
        // The certificate is for the requester's key.
        let key = KeyPair::from_pem(&request.key).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            parsed.public_key().raw,
            key.subject_public_key_info().as_slice()
        );

        let e = sign_request(&ca, "garbage", &role, &sans, Validity::days_from_now(1)).unwrap_err();
        assert!(
            e.to_string().starts_with("the certificate signing request"),
            "{e}"
        );
    }
}
