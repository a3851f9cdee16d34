//! Standalone mode: no cluster. An in-process Kubernetes API ([`api`]: routes over `path.rs`, the
//! object [`store`], admission by [`schema`]) serves the same reconcilers a cluster would, and a
//! directory of manifests is the desired state ([`sync`]): every pass applies each manifest, deletes
//! objects whose manifest is gone, and writes every object's status to
//! `DIR/status/<kind>-<namespace>-<name>.yaml` (problems with the manifests themselves go to
//! `DIR/status/errors.yaml`).
//!
//! This file holds the pure part: reading manifests and comparing them with objects.

pub mod api;
mod path;
pub mod schema;
pub mod store;
pub mod sync;

use std::collections::BTreeMap;

use kube::api::DynamicObject;
use kube::core::ApiResource;
use serde::Deserialize;
use serde_json::Value;

use crate::crd::{
    BackupJob, BackupSchedule, RestoreJob, VMOperation, VMSnapshot, VMTemplate, VirtualMachine,
};

pub use api::FakeApi;
pub use sync::Standalone;

/// One object a manifest names: kind, namespace, name.
type ObjectKey = (String, String, String);

/// Why a manifest file, or one object in it, was not applied; the text is what `errors.yaml`
/// says about it.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {document}: {source}")]
    Yaml {
        document: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("apiVersion {api_version:?} kind {kind:?} is not served here")]
    NotServed { api_version: String, kind: String },
    #[error("{0}")]
    Object(#[source] serde_json::Error),
    /// Refused by the API: its message names the field, as kubectl would show it.
    #[error("{}", api_message(.0))]
    Api(#[source] kube::Error),
}

/// What the API said about a refused request (its message names the field), else the error.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// The documents of a (multi-document) YAML or JSON manifest file; empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, ManifestError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc).map_err(|source| ManifestError::Yaml {
            document: i + 1,
            source,
        })?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// What a document names: its kind as served, and the object (namespace "default" unless set).
fn identify(doc: &mut Value) -> Result<(ApiResource, ObjectKey), ManifestError> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let ar = resources()
        .into_iter()
        .find(|r| r.kind == kind && r.api_version == api_version)
        .ok_or_else(|| ManifestError::NotServed {
            api_version: api_version.into(),
            kind: kind.clone(),
        })?;
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ns = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    doc["metadata"]["namespace"] = Value::String(ns.clone());
    Ok((ar, (kind, ns, name)))
}

/// A status file: its name and content (the object's identity and status).
fn status_file(ar: &ApiResource, obj: &DynamicObject) -> (String, String) {
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let name = obj.metadata.name.clone().unwrap_or_default();
    let file = format!("{}-{ns}-{name}.yaml", ar.kind.to_lowercase());
    let body = serde_json::json!({
        "apiVersion": ar.api_version, "kind": ar.kind,
        "metadata": {"name": name, "namespace": ns, "generation": obj.metadata.generation},
        "status": obj.data.get("status").cloned().unwrap_or(Value::Null),
    });
    (file, to_yaml(&body))
}

/// The kinds served, as the API names them.
fn resources() -> Vec<ApiResource> {
    vec![
        ApiResource::erase::<VirtualMachine>(&()),
        ApiResource::erase::<VMOperation>(&()),
        ApiResource::erase::<VMSnapshot>(&()),
        ApiResource::erase::<VMTemplate>(&()),
        ApiResource::erase::<BackupJob>(&()),
        ApiResource::erase::<BackupSchedule>(&()),
        ApiResource::erase::<RestoreJob>(&()),
    ]
}

/// Whether the file's content differs from the object (ignoring what the server owns).
fn changed(cur: &DynamicObject, doc: &Value) -> bool {
    let cur_labels = cur.metadata.labels.clone().unwrap_or_default();
    let cur_ann = cur.metadata.annotations.clone().unwrap_or_default();
    let want_labels: BTreeMap<String, String> =
        serde_json::from_value(doc["metadata"]["labels"].clone()).unwrap_or_default();
    let want_ann: BTreeMap<String, String> =
        serde_json::from_value(doc["metadata"]["annotations"].clone()).unwrap_or_default();
    let body_differs = doc
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"))
        .any(|(k, v)| cur.data.get(k) != Some(v));
    body_differs || cur_labels != want_labels || cur_ann != want_ann
}

fn to_yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn splits_multi_document_files() {
        let docs = parse_documents("a: 1\n---\n---\nb: 2\n").unwrap();
        assert_eq!(docs, vec![json!({"a": 1}), json!({"b": 2})]);
        let e = parse_documents("a: 1\n---\nb: [\n").unwrap_err();
        assert!(
            matches!(e, ManifestError::Yaml { document: 2, .. }),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("document 2: "), "{e}");
    }
}
