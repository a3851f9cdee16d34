//! `VMOperation`: a one-shot action on a VirtualMachine (start, stop, migrate, ...).

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, DNS_LABEL_PATTERN, LocalObjectReference, QUANTITY_PATTERN};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hypersdk.io",
    version = "v1alpha1",
    kind = "VMOperation",
    namespaced,
    status = "VMOperationStatus",
    shortname = "vmop",
    printcolumn = r#"{"name": "VM", "type": "string", "jsonPath": ".spec.vmRef.name"}"#,
    printcolumn = r#"{"name": "Operation", "type": "string", "jsonPath": ".spec.operation"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("self == oldSelf").message("an operation's spec is immutable; create a new VMOperation"),
    validation = Rule::new("self.operation != 'clone' || has(self.cloneSpec)")
        .message("operation clone needs cloneSpec").field_path(".cloneSpec"),
    validation = Rule::new("self.operation != 'resize' || (has(self.resizeSpec) && (has(self.resizeSpec.cpus) || has(self.resizeSpec.memory)))")
        .message("operation resize needs resizeSpec.cpus or resizeSpec.memory").field_path(".resizeSpec"),
    validation = Rule::new("self.operation != 'restore' || has(self.restoreSpec)")
        .message("operation restore needs restoreSpec").field_path(".restoreSpec")
)]
#[serde(rename_all = "camelCase")]
pub struct VMOperationSpec {
    pub vm_ref: LocalObjectReference,
    pub operation: OperationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_spec: Option<CloneSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate_spec: Option<MigrateSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize_spec: Option<ResizeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_spec: Option<SnapshotSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_spec: Option<RestoreSpec>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationKind {
    Start,
    Stop,
    Restart,
    Pause,
    Resume,
    Clone,
    Migrate,
    Resize,
    Snapshot,
    Restore,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Start => "start",
            OperationKind::Stop => "stop",
            OperationKind::Restart => "restart",
            OperationKind::Pause => "pause",
            OperationKind::Resume => "resume",
            OperationKind::Clone => "clone",
            OperationKind::Migrate => "migrate",
            OperationKind::Resize => "resize",
            OperationKind::Snapshot => "snapshot",
            OperationKind::Restore => "restore",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloneSpec {
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub target_name: String,
    #[serde(default)]
    pub linked_clone: bool,
    #[serde(default)]
    pub start_after_clone: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrateSpec {
    /// Destination node; empty lets the scheduler choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub target_node: Option<String>,
    #[serde(default = "yes")]
    pub live: bool,
    /// Bandwidth cap such as "100Mbps" or "1Gbps".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(\.[0-9]+)?[kKMG]?(bps|Bps)$"))]
    pub bandwidth: Option<String>,
    #[serde(default)]
    pub auto_converge: bool,
    /// Longest pause allowed at switch-over, such as "50ms" or "1s".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9]+(ms|s)$"))]
    pub max_downtime: Option<String>,
}

fn yes() -> bool {
    true
}

/// No `migrateSpec`: live, to a node the scheduler chooses, with the agent's defaults.
impl Default for MigrateSpec {
    fn default() -> Self {
        MigrateSpec {
            target_node: None,
            live: true,
            bandwidth: None,
            auto_converge: false,
            max_downtime: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResizeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(QUANTITY_PATTERN))]
    pub memory: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// Name of the VMSnapshot to create; defaults to the operation's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub snapshot_name: Option<String>,
    #[serde(default)]
    pub include_memory: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub snapshot_name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMOperationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<OperationPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum OperationPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl OperationPhase {
    /// Finished operations are never acted on again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OperationPhase::Succeeded | OperationPhase::Failed | OperationPhase::Cancelled
        )
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    #[schemars(range(max = 100))]
    pub percent: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
}
