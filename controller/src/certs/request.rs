//! The agent pod's side (`hypersdk-controller agent-certificate`, its init container): a key
//! and a CSR for [`SIGNER`], then, once the controller has signed it, the certificate, the key
//! and the cluster CA written for the agent, and the CSR deleted.

use std::path::Path;
use std::time::{Duration, Instant};

use hypersdk_tls::files::{FileError, write_pem};
use hypersdk_tls::issue::Pem;
use hypersdk_tls::request::{RequestError, new_request};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use tracing::info;

use super::{SIGNER, decided, issued};

#[derive(Debug, thiserror::Error)]
pub enum AgentCertError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("CertificateSigningRequest {name}: {source}")]
    Api {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "CertificateSigningRequest {name} was {decision}: {message} (see the controller's log)"
    )]
    Refused {
        name: String,
        decision: String,
        message: String,
    },
    #[error(
        "CertificateSigningRequest {0} was not signed within {1:?}: is the HyperSDK controller running?"
    )]
    Timeout(String, Duration),
    #[error("the signed certificate of CertificateSigningRequest {0} holds no CA certificate")]
    NoCa(String),
    #[error("--out: {0}")]
    Files(#[from] FileError),
    #[error("--out {0}: {1}")]
    Write(String, #[source] std::io::Error),
}

/// Asks for the certificate of the agent of this pod's node, as `name` (unique to the pod),
/// and writes tls.crt, tls.key and ca.crt in `out`.
pub async fn obtain(
    client: kube::Client,
    name: &str,
    out: &Path,
    timeout: Duration,
) -> Result<(), AgentCertError> {
    let api = Api::<CertificateSigningRequest>::all(client);
    let api_error = |source| AgentCertError::Api {
        name: name.into(),
        source,
    };
    let request = new_request(name)?;
    // A restarted init container of the same pod asks afresh.
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(api_error(e)),
    }
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            signer_name: SIGNER.into(),
            request: ByteString(request.cert.clone().into_bytes()),
            usages: Some(
                ["digital signature", "client auth", "server auth"]
                    .map(String::from)
                    .to_vec(),
            ),
            ..Default::default()
        },
        status: None,
    };
    api.create(&PostParams::default(), &csr)
        .await
        .map_err(api_error)?;
    info!(
        csr = name,
        signer = SIGNER,
        "asked for the agent's certificate"
    );
    let started = Instant::now();
    let chain = loop {
        let csr = api.get(name).await.map_err(api_error)?;
        if issued(&csr) {
            let cert = csr.status.and_then(|s| s.certificate).unwrap_or_default();
            break String::from_utf8_lossy(&cert.0).into_owned();
        }
        if let Some(decision @ ("Denied" | "Failed")) = decided(&csr).map(str::to_string).as_deref()
        {
            let message = csr
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == decision)
                .and_then(|c| c.message)
                .unwrap_or_default();
            return Err(AgentCertError::Refused {
                name: name.into(),
                decision: decision.to_lowercase(),
                message,
            });
        }
        if started.elapsed() > timeout {
            return Err(AgentCertError::Timeout(name.into(), timeout));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (leaf, ca) = split_chain(&chain).ok_or_else(|| AgentCertError::NoCa(name.into()))?;
    let _ = std::fs::remove_file(out.join("tls.key"));
    write_pem(
        out,
        "tls",
        &Pem {
            cert: leaf,
            key: request.key,
        },
    )?;
    let ca_path = out.join("ca.crt");
    std::fs::write(&ca_path, ca)
        .map_err(|e| AgentCertError::Write(ca_path.display().to_string(), e))?;
    api.delete(name, &DeleteParams::default())
        .await
        .map_err(api_error)?;
    info!(csr = name, out = %out.display(), "wrote the agent's certificate");
    Ok(())
}

/// The first certificate of a PEM chain, and the rest (the CA).
pub fn split_chain(chain: &str) -> Option<(String, String)> {
    const END: &str = "-----END CERTIFICATE-----";
    let cut = chain.find(END)? + END.len();
    let (leaf, rest) = chain.split_at(cut);
    let rest = rest.trim_start();
    (!rest.is_empty()).then(|| (format!("{leaf}\n"), rest.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_splits_into_leaf_and_ca() {
        let leaf = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----";
        let ca = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----\n";
        let (l, c) = split_chain(&format!("{leaf}\n{ca}")).unwrap();
        assert_eq!(l, format!("{leaf}\n"));
        assert_eq!(c, ca);
        assert_eq!(split_chain(leaf), None);
        assert_eq!(split_chain("nothing"), None);
    }
}
