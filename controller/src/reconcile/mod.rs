//! One reconciler per kind, each idempotent: it reads the object and the agents, does what is
//! missing, and writes status only when it changed. What one waits for (another object, a node)
//! it registers in [`crate::waiting`] before it reads it, so that the change wakes it; a periodic
//! look is only a safety net. Failures go back to the controller, which retries with back-off.
//!
//! This file holds what they share: status writes that clear what is unset, ownerReferences.

pub mod backup;
pub mod clone;
pub mod evict;
pub mod migrate;
pub mod network;
pub mod operation;
pub mod snapshot;
pub mod template;
pub mod vm;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

/// The field manager our writes are recorded under.
pub const MANAGER: &str = "hypersdk-controller";

/// Writes `status` through the status subresource when it differs from `old`. Fields that are
/// now unset are sent as null, so a merge patch clears them (e.g. `nodeName` on rescheduling).
pub async fn write_status<K, S>(api: &Api<K>, name: &str, old: Option<&S>, status: &S) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if old == Some(status) {
        return Ok(());
    }
    let mut value = serde_json::to_value(status).map_err(Error::Encode)?;
    if let (Some(obj), Some(old)) = (value.as_object_mut(), old.map(serde_json::to_value)) {
        for key in old
            .ok()
            .and_then(|o| o.as_object().cloned())
            .unwrap_or_default()
            .keys()
        {
            obj.entry(key.clone()).or_insert(Value::Null);
        }
    }
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER),
        &Patch::Merge(serde_json::json!({ "status": value })),
    )
    .await?;
    Ok(())
}

/// Namespace of a namespaced object (always set on objects the API returns).
pub fn namespace<K: Resource>(obj: &K) -> Result<String> {
    obj.meta()
        .namespace
        .clone()
        .ok_or_else(|| Error::NoNamespace(obj.meta().name.clone().unwrap_or_default()))
}

/// Adds `owner` to `obj`'s ownerReferences unless it is there: a plain reference (not a
/// controller), so that the owner's watchers see `obj` change and the garbage collector deletes
/// `obj` once all its owners are gone. The patch applies only to the references it read.
pub async fn own<K>(api: &Api<K>, obj: &K, owner: Option<OwnerReference>) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let Some(owner) = owner else {
        return Ok(());
    };
    let refs = obj.owner_references();
    if refs.iter().any(|r| r.uid == owner.uid) {
        return Ok(());
    }
    let patch = if refs.is_empty() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/ownerReferences", "value": null},
            {"op": "add", "path": "/metadata/ownerReferences", "value": [owner]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/ownerReferences", "value": refs},
            {"op": "add", "path": "/metadata/ownerReferences/-", "value": owner},
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(Error::Encode)?;
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Json::<()>(patch),
    )
    .await?;
    Ok(())
}
