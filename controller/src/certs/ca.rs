//! The cluster CA, kept in a Secret of the controller's namespace: made by the first controller
//! that starts (replicas racing to create it all end up with the one that won), owned by the
//! controller's Deployment so that uninstalling removes it. The controller's own certificate
//! is issued from it at every start.

use std::collections::BTreeMap;
use std::path::Path;

use hypersdk_tls::TlsFiles;
use hypersdk_tls::files::{FileError, write_pem};
use hypersdk_tls::issue::{IssueError, Pem, Validity, issue, new_ca};
use hypersdk_tls::role::Role;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use kube::{Resource, ResourceExt};
use tracing::info;

const CERT_KEY: &str = "ca.crt";
const KEY_KEY: &str = "ca.key";
/// Days the cluster CA is valid.
const CA_DAYS: u32 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("--cluster-ca {secret}: {source}")]
    Api {
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error("--owner-deployment {name}: {source}")]
    Owner {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("--cluster-ca {0}: the Secret has no {1}")]
    Incomplete(String, &'static str),
    #[error("the cluster CA: {0}")]
    Issue(#[from] IssueError),
    #[error("writing the controller's certificate: {0}")]
    Files(#[from] FileError),
    #[error("writing {0}: {1}")]
    Write(String, #[source] std::io::Error),
}

/// An owner reference to the Deployment `name`, for what the controller creates.
pub async fn owner(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<OwnerReference, CaError> {
    let deployment = Api::<Deployment>::namespaced(client, namespace)
        .get(name)
        .await
        .map_err(|source| CaError::Owner {
            name: name.into(),
            source,
        })?;
    Ok(OwnerReference {
        api_version: Deployment::api_version(&()).into(),
        kind: Deployment::kind(&()).into(),
        name: deployment.name_any(),
        uid: deployment.uid().unwrap_or_default(),
        ..Default::default()
    })
}

/// The CA in Secret `name`, made now if there is none.
pub async fn ensure(
    client: kube::Client,
    namespace: &str,
    name: &str,
    owner: Option<OwnerReference>,
) -> Result<Pem, CaError> {
    let api = Api::<Secret>::namespaced(client, namespace);
    let api_error = |source| CaError::Api {
        secret: name.into(),
        source,
    };
    if let Some(secret) = api.get_opt(name).await.map_err(api_error)? {
        return read(name, &secret);
    }
    let pem = new_ca("HyperSDK cluster CA", Validity::days_from_now(CA_DAYS))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                CERT_KEY.to_string(),
                ByteString(pem.cert.clone().into_bytes()),
            ),
            (
                KEY_KEY.to_string(),
                ByteString(pem.key.clone().into_bytes()),
            ),
        ])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = name, "made the cluster CA");
            Ok(pem)
        }
        // Another replica made it first: use theirs.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let secret = api.get(name).await.map_err(api_error)?;
            read(name, &secret)
        }
        Err(e) => Err(api_error(e)),
    }
}

fn read(name: &str, secret: &Secret) -> Result<Pem, CaError> {
    let field = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .ok_or_else(|| CaError::Incomplete(name.into(), key))
    };
    Ok(Pem {
        cert: field(CERT_KEY)?,
        key: field(KEY_KEY)?,
    })
}

/// Issues this controller's certificate (role controller/`name`) into `dir` as tls.crt, tls.key
/// and ca.crt, replacing what was there.
pub fn write_own(dir: &Path, ca: &Pem, name: &str, days: u32) -> Result<TlsFiles, CaError> {
    let role = Role::Controller(name.into());
    let pem = issue(ca, &role, &[], Validity::days_from_now(days))?;
    let files = TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: dir.join("ca.crt"),
    };
    let _ = std::fs::remove_file(&files.key);
    write_pem(dir, "tls", &pem)?;
    std::fs::write(&files.ca, &ca.cert)
        .map_err(|e| CaError::Write(files.ca.display().to_string(), e))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypersdk_tls::files::read_facts;

    #[test]
    fn the_controller_certificate_carries_its_role() {
        let ca = new_ca("test", Validity::days_from_now(5)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..2 {
            // A restart writes over the files of the last start.
            let files = write_own(dir.path(), &ca, "hypersdk-controller-abc", 3).unwrap();
            let facts = read_facts(&files).unwrap();
            assert_eq!(
                facts.role,
                Ok(Role::Controller("hypersdk-controller-abc".into()))
            );
            assert_eq!(std::fs::read_to_string(&files.ca).unwrap(), ca.cert);
        }
    }

    #[test]
    fn an_incomplete_secret_names_the_missing_key() {
        let secret = Secret {
            data: Some(BTreeMap::from([(
                CERT_KEY.to_string(),
                ByteString(b"x".to_vec()),
            )])),
            ..Default::default()
        };
        let e = read("hypersdk-ca", &secret).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cluster-ca hypersdk-ca: the Secret has no ca.key"
        );
    }
}
