//! The leading controller's side: watches the CSRs for [`SIGNER`], approves and signs those of
//! agent pods for their own node, and denies the others with the reason.

use std::time::Duration;

use futures::TryStreamExt;
use hypersdk_tls::issue::{Pem, Validity};
use hypersdk_tls::request::sign_request;
use hypersdk_tls::role::Role;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tracing::{info, warn};

use super::{Refusal, SIGNER, agent_sans, decided, issued, requesting_node};

#[derive(Debug, thiserror::Error)]
enum SignError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("signing: {0}")]
    Sign(#[from] hypersdk_tls::request::RequestError),
}

pub struct Signer {
    pub client: kube::Client,
    pub ca: Pem,
    /// `system:serviceaccount:NAMESPACE:NAME` of the agent pods.
    pub agent_user: String,
    pub days: u32,
}

impl Signer {
    /// Signs agent CSRs as they come, until the process ends.
    pub async fn run(self) {
        let api = Api::<CertificateSigningRequest>::all(self.client.clone());
        let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER}"));
        let (api, this) = (&api, &self);
        loop {
            let stream = watcher(api.clone(), config.clone())
                .default_backoff()
                .applied_objects();
            let result = stream
                .try_for_each(|csr| async move {
                    this.handle(api, csr).await;
                    Ok(())
                })
                .await;
            if let Err(e) = result {
                warn!(error = %e, "watching CertificateSigningRequests");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn handle(&self, api: &Api<CertificateSigningRequest>, csr: CertificateSigningRequest) {
        if issued(&csr) || matches!(decided(&csr), Some("Denied" | "Failed")) {
            return;
        }
        let name = csr.name_any();
        match self.sign(api, &csr).await {
            Ok(node) => info!(csr = name, node, "signed an agent certificate"),
            Err(SignError::Refused(why)) => {
                warn!(csr = name, reason = %why, "denied an agent certificate");
                if let Err(e) = self.decide(api, &name, "Denied", &why.to_string()).await {
                    warn!(csr = name, error = %e, "denying");
                }
            }
            Err(e) => warn!(csr = name, error = %e, "signing an agent certificate"),
        }
    }

    async fn sign(
        &self,
        api: &Api<CertificateSigningRequest>,
        csr: &CertificateSigningRequest,
    ) -> Result<String, SignError> {
        let name = csr.name_any();
        let node_name = requesting_node(csr, &self.agent_user)?;
        let node = Api::<Node>::all(self.client.clone())
            .get(&node_name)
            .await?;
        let sans = agent_sans(&node)?;
        if decided(csr).is_none() {
            let why = format!("an agent pod on node {node_name}");
            self.decide(api, &name, "Approved", &why).await?;
        }
        let request = String::from_utf8_lossy(&csr.spec.request.0);
        let role = Role::Agent(node_name.clone());
        let cert = sign_request(
            &self.ca,
            &request,
            &role,
            &sans,
            Validity::days_from_now(self.days),
        )?;
        // The chain: the agent's certificate, then the CA it is to trust.
        let chain = format!("{cert}{}", self.ca.cert);
        let patch = json!({"status": {"certificate": ByteString(chain.into_bytes())}});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(node_name)
    }

    async fn decide(
        &self,
        api: &Api<CertificateSigningRequest>,
        name: &str,
        decision: &str,
        message: &str,
    ) -> Result<(), kube::Error> {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let patch = json!({"status": {"conditions": [{
            "type": decision,
            "status": "True",
            "reason": format!("HyperSDK{decision}"),
            "message": message,
            "lastUpdateTime": now,
        }]}});
        api.patch_approval(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }
}
