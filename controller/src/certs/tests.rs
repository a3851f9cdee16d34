use super::*;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

const AGENT: &str = "system:serviceaccount:hypersdk-system:hypersdk-agent";

fn csr(user: &str, node: Option<&str>) -> CertificateSigningRequest {
    CertificateSigningRequest {
        spec: CertificateSigningRequestSpec {
            signer_name: SIGNER.into(),
            username: Some(user.into()),
            extra: node.map(|n| BTreeMap::from([(NODE_EXTRA.to_string(), vec![n.to_string()])])),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn only_the_agents_account_from_a_node_is_signed() {
    assert_eq!(
        requesting_node(&csr(AGENT, Some("node-1")), AGENT),
        Ok("node-1".into())
    );
    assert_eq!(
        requesting_node(
            &csr("system:serviceaccount:default:x", Some("node-1")),
            AGENT
        ),
        Err(Refusal::NotTheAgent(
            "system:serviceaccount:default:x".into(),
            AGENT.into()
        ))
    );
    let e = requesting_node(&csr(AGENT, None), AGENT).unwrap_err();
    assert_eq!(e, Refusal::NoNode);
    assert!(e.to_string().contains(NODE_EXTRA), "{e}");
}

#[test]
fn agent_certificates_name_the_nodes_addresses() {
    let address = |t: &str, a: &str| NodeAddress {
        type_: t.into(),
        address: a.into(),
    };
    let mut node = Node::default();
    node.metadata.name = Some("node-1".into());
    assert_eq!(agent_sans(&node), Err(Refusal::NoAddress("node-1".into())));
    node.status = Some(NodeStatus {
        addresses: Some(vec![
            address("InternalIP", "10.0.0.7"),
            address("Hostname", "node-1"),
        ]),
        ..Default::default()
    });
    assert_eq!(agent_sans(&node).unwrap(), vec!["10.0.0.7", "node-1"]);
}

#[test]
fn decided_and_issued_csrs_are_recognised() {
    let mut c = csr(AGENT, Some("n"));
    assert_eq!(decided(&c), None);
    assert!(!issued(&c));
    c.status = Some(CertificateSigningRequestStatus {
        conditions: Some(vec![CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            ..Default::default()
        }]),
        certificate: Some(k8s_openapi::ByteString(b"PEM".to_vec())),
    });
    assert_eq!(decided(&c), Some("Approved"));
    assert!(issued(&c));
}
