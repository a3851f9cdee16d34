//! Certificates in a cluster, without a person: the controller keeps the cluster CA in a Secret
//! ([`ca`]), issues its own certificate from it, and signs the agents' certificates, which
//! agent pods ask for with a CertificateSigningRequest for the [`SIGNER`] ([`request`], run by
//! the agent pod's init container; [`signer`], run by the leading controller).
//!
//! This file is the pure part: who may have which certificate. A CSR is signed only when the
//! API server authenticated it as the agents' ServiceAccount from a pod bound to a node (the
//! token's node claim, which the API server copies into the CSR's `extra`); the certificate is
//! for that node (role `hypersdk://agent/NODE`) and that node's addresses, whatever the request
//! asked for.

pub mod ca;
pub mod request;
pub mod signer;

use std::collections::BTreeMap;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::Node;

/// The signer name of agent certificates.
pub const SIGNER: &str = "hypersdk.io/agent";
/// Where the API server records the node of the pod whose token made a request.
pub const NODE_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Why a CSR for [`SIGNER`] is not signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("requested by {0:?}, not by the agents' ServiceAccount {1:?}")]
    NotTheAgent(String, String),
    #[error("the requester's token names no node (spec.extra[\"{NODE_EXTRA}\"])")]
    NoNode,
    #[error("node {0} has no address")]
    NoAddress(String),
}

/// The node a CSR is from, when its requester is `agent_user`
/// (`system:serviceaccount:NAMESPACE:NAME`).
pub fn requesting_node(
    csr: &CertificateSigningRequest,
    agent_user: &str,
) -> Result<String, Refusal> {
    let spec = &csr.spec;
    let user = spec.username.clone().unwrap_or_default();
    if user != agent_user {
        return Err(Refusal::NotTheAgent(user, agent_user.to_string()));
    }
    let empty = BTreeMap::new();
    let extra = spec.extra.as_ref().unwrap_or(&empty);
    match extra.get(NODE_EXTRA).map(Vec::as_slice) {
        Some([node]) if !node.is_empty() => Ok(node.clone()),
        _ => Err(Refusal::NoNode),
    }
}

/// The names an agent certificate for `node` carries: the node's addresses (InternalIP and
/// ExternalIP first, then its host name) and its name.
pub fn agent_sans(node: &Node) -> Result<Vec<String>, Refusal> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    let mut sans: Vec<String> = addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .map(|a| a.address.clone())
        .collect();
    if sans.is_empty() {
        return Err(Refusal::NoAddress(name));
    }
    sans.push(name);
    sans.dedup();
    Ok(sans)
}

/// Whether a CSR was already decided (approved or denied) and so needs no approval.
pub fn decided(csr: &CertificateSigningRequest) -> Option<&str> {
    csr.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| {
            c.status == "True" && ["Approved", "Denied", "Failed"].contains(&c.type_.as_str())
        })
        .map(|c| c.type_.as_str())
}

/// Whether a CSR already has its certificate.
pub fn issued(csr: &CertificateSigningRequest) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty())
}

#[cfg(test)]
mod tests;
