//! The `hypersdk.io/v1alpha1` API: custom resource types (the source of truth for the CRDs in
//! `deploy/crds/`), shared field types and the Kubernetes `Condition` helpers.

pub mod backup;
pub mod operation;
pub mod reason;
pub mod snapshot;
pub mod template;
pub mod vm;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use backup::{
    BackupJob, BackupJobSpec, BackupJobStatus, BackupSchedule, BackupScheduleSpec,
    BackupScheduleStatus, RestoreJob, RestoreJobSpec, RestoreJobStatus,
};
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
pub use operation::{VMOperation, VMOperationSpec, VMOperationStatus};
pub use reason::Reason;
pub use snapshot::{VMSnapshot, VMSnapshotSpec, VMSnapshotStatus};
pub use template::{VMTemplate, VMTemplateSpec, VMTemplateStatus};
pub use vm::{VirtualMachine, VirtualMachineSpec, VirtualMachineStatus};

pub const GROUP: &str = "hypersdk.io";
pub const VERSION: &str = "v1alpha1";

/// A Kubernetes quantity as the seeds write sizes ("8Gi", "512Mi", "50G"). The scheduler parses
/// it again (see [`hypersdk_proto::quantity`]); the pattern lets the API server refuse "8XB" up front.
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";
/// A DNS-1123 label: what the agent accepts as a VM, disk or network name.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// Every CRD this controller serves, in a stable order (as written to `deploy/crds/`).
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        VirtualMachine::crd(),
        VMOperation::crd(),
        VMSnapshot::crd(),
        VMTemplate::crd(),
        BackupJob::crd(),
        BackupSchedule::crd(),
        RestoreJob::crd(),
    ]
}

/// The CRD files for `deploy/crds/`: (file name, YAML), generated from the types above.
pub fn render() -> Vec<(String, String)> {
    all()
        .into_iter()
        .map(|crd| {
            let file = format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural);
            let yaml = serde_yaml_ng::to_string(&crd).expect("CRDs serialise");
            (file, format!("# Generated from controller/src/crd by `hypersdk-controller crds`; do not edit.\n{yaml}"))
        })
        .collect()
}

/// A reference to another object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectReference {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Condition statuses as the Kubernetes API spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// Sets condition `type_` in `conditions`, keeping `lastTransitionTime` when the status is
/// unchanged (that time means "since when", not "last written"). Returns true when anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: Reason,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) -> bool {
    let message = message.into();
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status.as_str()
                || c.reason != reason
                || c.message != message
                || c.observed_generation != observed_generation;
            if c.status != status.as_str() {
                c.last_transition_time = now;
            }
            c.status = status.as_str().into();
            c.reason = reason.as_str().into();
            c.message = message;
            c.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.into(),
                status: status.as_str().into(),
                reason: reason.as_str().into(),
                message,
                observed_generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// The condition of `type_`, if set.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_kept_while_status_unchanged() {
        let mut cs = Vec::new();
        assert!(set_condition(
            &mut cs,
            "Ready",
            Status::False,
            Reason::Creating,
            "m",
            None
        ));
        let first = cs[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(set_condition(
            &mut cs,
            "Ready",
            Status::False,
            Reason::Failed,
            "m2",
            None
        ));
        assert_eq!(cs[0].last_transition_time, first);
        assert!(!set_condition(
            &mut cs,
            "Ready",
            Status::False,
            Reason::Failed,
            "m2",
            None
        ));
        assert!(set_condition(
            &mut cs,
            "Ready",
            Status::True,
            Reason::Succeeded,
            "",
            None
        ));
        assert_ne!(cs[0].last_transition_time, first);
        assert_eq!(condition(&cs, "Ready").unwrap().reason, Reason::Succeeded);
        assert_eq!(cs.len(), 1);
    }
}
