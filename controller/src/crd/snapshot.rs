//! `VMSnapshot`: a point-in-time copy of a VirtualMachine's disks (and memory, with `includeMemory`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, LocalObjectReference};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hypersdk.io",
    version = "v1alpha1",
    kind = "VMSnapshot",
    namespaced,
    status = "VMSnapshotStatus",
    shortname = "vmsnap",
    printcolumn = r#"{"name": "VM", "type": "string", "jsonPath": ".spec.vmRef.name"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Memory", "type": "boolean", "jsonPath": ".spec.includeMemory"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VMSnapshotSpec {
    pub vm_ref: LocalObjectReference,
    #[serde(default)]
    pub include_memory: bool,
    /// Freeze guest filesystems (through the guest agent) while the disks are copied.
    #[serde(default)]
    pub quiesce: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 36500))]
    pub keep_days: Option<u32>,
    #[serde(default)]
    pub auto_delete: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMSnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SnapshotPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SnapshotPhase {
    Pending,
    Creating,
    Ready,
    Failed,
    Expired,
}
