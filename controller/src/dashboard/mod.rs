//! The web dashboard, served by the controller beside `/metrics`: embedded assets ([`assets`]),
//! the live state fed by the controller's watches ([`watch`]), and actions that create the
//! VMOperation or VMSnapshot a user would write by hand ([`create`]); routes and access checks in
//! [`serve`].
//!
//! This file holds the pure part: who may do what, the state document the page renders, and the
//! object an action creates.

pub mod assets;
pub mod create;
pub mod serve;
pub mod watch;

use std::sync::Arc;

use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::crd::{VMOperation, VMSnapshot, VMTemplate, VirtualMachine};
use crate::scheduling::NodeInfo;

/// Who may use the dashboard's API (`/api/...`); the assets themselves hold no data.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The bearer token requests must carry; without one, only a loopback listener serves.
    pub token: Option<String>,
    /// The listener is not on a loopback address.
    pub exposed: bool,
    /// Actions (creating objects) are allowed; the dashboard is read-only otherwise.
    pub actions: bool,
}

/// Why a request was refused; the text is the response body.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the dashboard listens on a non-loopback address without a token: start the controller with --dashboard-token-file"
    )]
    NoTokenConfigured,
    #[error("missing or wrong bearer token (Authorization: Bearer <token>)")]
    BadToken,
    #[error(
        "the dashboard is read-only: start the controller with --dashboard-actions to allow actions"
    )]
    ReadOnly,
}

impl Access {
    /// Checks a request's `Authorization` header; `write` for requests that create objects.
    pub fn check(&self, authorization: Option<&str>, write: bool) -> Result<(), Refusal> {
        match (&self.token, self.exposed) {
            (None, true) => return Err(Refusal::NoTokenConfigured),
            (Some(token), _) => {
                let given = authorization
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .unwrap_or_default();
                if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
                    return Err(Refusal::BadToken);
                }
            }
            (None, false) => {}
        }
        if write && !self.actions {
            return Err(Refusal::ReadOnly);
        }
        Ok(())
    }
}

/// What the agent of a VM's node reports beyond the VM's status: what the guest has now and the
/// migration under way.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Live {
    pub guest_cpus: u32,
    pub guest_memory_bytes: u64,
    pub agent_connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    pub phase: String,
    pub target_node: String,
    pub transferred_bytes: u64,
    pub total_bytes: u64,
    pub percent: u32,
}

impl Migration {
    pub fn new(phase: String, target_node: String, transferred: u64, remaining: u64) -> Self {
        let total = transferred + remaining;
        let percent = transferred
            .saturating_mul(100)
            .checked_div(total)
            .unwrap_or(0) as u32;
        Migration {
            phase,
            target_node,
            transferred_bytes: transferred,
            total_bytes: total,
            percent,
        }
    }
}

/// Everything the page shows, as the controller's watches and agents see it now.
pub struct Inputs {
    pub vms: Vec<(Arc<VirtualMachine>, Option<Live>)>,
    pub operations: Vec<Arc<VMOperation>>,
    pub snapshots: Vec<Arc<VMSnapshot>>,
    pub templates: Vec<Arc<VMTemplate>>,
    pub events: Vec<Arc<Event>>,
    pub nodes: Vec<NodeInfo>,
    pub actions: bool,
}

/// How many recent events the page gets.
pub const RECENT_EVENTS: usize = 50;

/// The state document: objects as the API holds them (sorted by namespace and name, managed
/// fields left out), each VM with its agent's live figures, the nodes' capacity, allocation and
/// carbon intensity, and the latest events first.
pub fn state(mut inputs: Inputs) -> Value {
    inputs.vms.sort_by_key(|(vm, _)| sort_key(vm.as_ref()));
    let vms: Vec<Value> = inputs
        .vms
        .iter()
        .map(|(vm, live)| {
            let mut v = object(vm.as_ref());
            v["live"] = serde_json::to_value(live).unwrap_or(Value::Null);
            v
        })
        .collect();
    inputs
        .events
        .sort_by_key(|e| std::cmp::Reverse(event_time(e)));
    let events: Vec<Value> = inputs
        .events
        .iter()
        .take(RECENT_EVENTS)
        .map(|e| {
            let regarding = e.regarding.as_ref();
            json!({
                "time": event_time(e),
                "type": e.type_,
                "reason": e.reason,
                "note": e.note,
                "kind": regarding.and_then(|r| r.kind.clone()),
                "name": regarding.and_then(|r| r.name.clone()),
            })
        })
        .collect();
    let nodes: Vec<Value> = inputs
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name, "reachable": n.reachable, "kvm": n.kvm,
                "cpus": n.cpus, "memoryBytes": n.memory_bytes,
                "allocatedCpus": n.allocated_cpus, "allocatedMemoryBytes": n.allocated_memory_bytes,
                "carbonIntensity": n.carbon_intensity,
            })
        })
        .collect();
    json!({
        "vms": vms,
        "operations": sorted(&inputs.operations),
        "snapshots": sorted(&inputs.snapshots),
        "templates": sorted(&inputs.templates),
        "events": events,
        "nodes": nodes,
        "access": {"actions": inputs.actions},
    })
}

fn sort_key<K: ResourceExt>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

fn sorted<K: ResourceExt + Serialize>(objects: &[Arc<K>]) -> Vec<Value> {
    let mut objects: Vec<&Arc<K>> = objects.iter().collect();
    objects.sort_by_key(|o| sort_key(o.as_ref()));
    objects.iter().map(|o| object(o.as_ref())).collect()
}

/// An object as JSON without its managed fields (noise to the page).
fn object<K: Serialize>(o: &K) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    v
}

/// When an event last happened, as RFC 3339 text (sorts in time order).
fn event_time(e: &Event) -> String {
    e.series
        .as_ref()
        .map(|s| s.last_observed_time.0.to_string())
        .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
        .or_else(|| {
            e.deprecated_last_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
        })
        .or_else(|| {
            e.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
        })
        .unwrap_or_default()
}

/// An action of the page: the object to create, as a user would write it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Action {
    /// A VMOperation on a VM.
    #[serde(rename = "VMOperation", rename_all = "camelCase")]
    Operation {
        #[serde(default = "default_namespace")]
        namespace: String,
        vm: String,
        operation: String,
        /// For `migrate`: the node to move to (else the scheduler chooses).
        #[serde(default)]
        target_node: Option<String>,
    },
    /// A VMSnapshot of a VM.
    #[serde(rename = "VMSnapshot", rename_all = "camelCase")]
    Snapshot {
        #[serde(default = "default_namespace")]
        namespace: String,
        vm: String,
        #[serde(default)]
        include_memory: bool,
        #[serde(default)]
        description: Option<String>,
    },
}

fn default_namespace() -> String {
    "default".into()
}

/// An action the page may not take as sent; names the field.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum ActionError {
    #[error("{field}: {value:?} is not a valid name (lowercase letters, digits and '-')")]
    Name { field: &'static str, value: String },
    #[error("operation: {0:?} is not one of {OPERATIONS:?}")]
    Operation(String),
}

/// The operations the page offers; clone, resize and restore need forms it does not have yet.
pub const OPERATIONS: [&str; 6] = ["start", "stop", "restart", "pause", "resume", "migrate"];

impl Action {
    pub fn namespace(&self) -> &str {
        match self {
            Action::Operation { namespace, .. } | Action::Snapshot { namespace, .. } => namespace,
        }
    }

    pub fn vm(&self) -> &str {
        match self {
            Action::Operation { vm, .. } | Action::Snapshot { vm, .. } => vm,
        }
    }

    /// The object to create, named `<vm>-<what>-<suffix>` (`suffix` keeps names unique).
    pub fn object(&self, suffix: &str) -> Result<Value, ActionError> {
        match self {
            Action::Operation {
                namespace,
                vm,
                operation,
                target_node,
            } => {
                check_names(namespace, vm)?;
                if !OPERATIONS.contains(&operation.as_str()) {
                    return Err(ActionError::Operation(operation.clone()));
                }
                let mut spec = json!({"vmRef": {"name": vm}, "operation": operation});
                if operation == "migrate" {
                    let node = target_node.as_deref().filter(|n| !n.is_empty());
                    if let Some(n) = node {
                        name("targetNode", n)?;
                    }
                    spec["migrateSpec"] = json!({"targetNode": node, "live": true});
                }
                Ok(json!({
                    "apiVersion": "hypersdk.io/v1alpha1", "kind": "VMOperation",
                    "metadata": {"name": format!("{vm}-{operation}-{suffix}"), "namespace": namespace},
                    "spec": spec,
                }))
            }
            Action::Snapshot {
                namespace,
                vm,
                include_memory,
                description,
            } => {
                check_names(namespace, vm)?;
                Ok(json!({
                    "apiVersion": "hypersdk.io/v1alpha1", "kind": "VMSnapshot",
                    "metadata": {"name": format!("{vm}-snapshot-{suffix}"), "namespace": namespace},
                    "spec": {"vmRef": {"name": vm}, "includeMemory": include_memory,
                             "description": description},
                }))
            }
        }
    }
}

fn check_names(namespace: &str, vm: &str) -> Result<(), ActionError> {
    name("namespace", namespace)?;
    name("vm", vm)
}

/// A DNS label, short enough to take a suffix.
fn name(field: &'static str, value: &str) -> Result<(), ActionError> {
    let ok = !value.is_empty()
        && value.len() <= 40
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ActionError::Name {
            field,
            value: value.into(),
        })
    }
}

#[cfg(test)]
mod tests;
