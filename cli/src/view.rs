//! What hyperctl prints: stable, machine-readable views of the agent's messages.
//!
//! JSON/YAML field names are camelCase like Kubernetes objects and only ever gain fields.

use hypersdk_proto::agent::v1 as pb;
use serde::Serialize;

use crate::migrate::MigrationView;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmView {
    pub name: String,
    pub spec: SpecView,
    pub status: StatusView,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecView {
    pub cpus: u32,
    pub max_cpus: u32,
    pub memory: String,
    pub max_memory: String,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub disks: Vec<DiskView>,
    pub networks: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskView {
    pub name: String,
    pub path: String,
    pub format: String,
    pub read_only: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub phase: String,
    pub message: String,
    pub node: String,
    pub pid: u32,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub agent_connected: bool,
    /// What the guest reports through its agent (0 while none answers).
    pub guest_cpus: u32,
    pub guest_memory_bytes: u64,
    pub restart_count: u32,
    pub qemu_status: String,
    pub accelerator: String,
    pub started_at_ms: i64,
    pub serial_log: String,
    pub data_dir: String,
    pub revision: u64,
    pub startup: StartupView,
    /// The migration under way, or the last one that ended on this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationView>,
    /// The guest's network interfaces, as its guest agent reports them.
    pub interfaces: Vec<InterfaceView>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceView {
    /// The spec's network whose NIC it is ("" for the guest's own).
    pub network: String,
    pub name: String,
    pub mac: String,
    pub ip_addresses: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StartupView {
    pub qmp_ready_ms: u32,
    pub running_ms: u32,
    pub agent_connected_ms: u32,
}

/// "Running" for VM_PHASE_RUNNING.
pub fn phase_name(phase: i32) -> String {
    match pb::VmPhase::try_from(phase) {
        Ok(pb::VmPhase::Unspecified) | Err(_) => "Unknown".into(),
        Ok(p) => {
            let s = p
                .as_str_name()
                .trim_start_matches("VM_PHASE_")
                .to_lowercase();
            let mut c = s.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        }
    }
}

fn format_name(format: i32) -> String {
    match pb::DiskFormat::try_from(format) {
        Ok(pb::DiskFormat::Qcow2) => "qcow2",
        Ok(pb::DiskFormat::Raw) => "raw",
        _ => "auto",
    }
    .into()
}

impl From<&pb::Vm> for VmView {
    fn from(vm: &pb::Vm) -> Self {
        let spec = vm.spec.clone().unwrap_or_default();
        let st = vm.status.clone().unwrap_or_default();
        let boot = spec.boot.unwrap_or_default();
        let startup = st.startup.unwrap_or_default();
        VmView {
            name: spec.name,
            spec: SpecView {
                cpus: spec.cpus,
                max_cpus: spec.max_cpus,
                memory: spec.memory,
                max_memory: spec.max_memory,
                kernel: boot.kernel,
                initrd: boot.initrd,
                cmdline: boot.cmdline,
                disks: spec
                    .disks
                    .into_iter()
                    .map(|d| DiskView {
                        name: d.name,
                        path: d.path,
                        format: format_name(d.format),
                        read_only: d.read_only,
                    })
                    .collect(),
                networks: spec.networks.into_iter().map(|n| n.name).collect(),
            },
            status: StatusView {
                phase: phase_name(st.phase),
                message: st.message,
                node: st.node_name,
                pid: st.pid,
                cpus: st.cpus,
                memory_bytes: st.memory_bytes,
                agent_connected: st.agent_connected,
                guest_cpus: st.guest_cpus,
                guest_memory_bytes: st.guest_memory_bytes,
                restart_count: st.restart_count,
                qemu_status: st.qemu_status,
                interfaces: st
                    .interfaces
                    .into_iter()
                    .map(|i| InterfaceView {
                        network: i.network,
                        name: i.interface_name,
                        mac: i.mac,
                        ip_addresses: i.ip_addresses,
                    })
                    .collect(),
                accelerator: st.accelerator,
                started_at_ms: st.started_at_ms,
                serial_log: st.serial_log,
                data_dir: st.data_dir,
                revision: st.revision,
                startup: StartupView {
                    qmp_ready_ms: startup.qmp_ready_ms,
                    running_ms: startup.running_ms,
                    agent_connected_ms: startup.agent_connected_ms,
                },
                migration: st.migration.as_ref().map(MigrationView::from),
            },
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub node_name: String,
    pub hostname: String,
    pub agent_version: String,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub qemu_version: String,
    pub accelerator: String,
    pub accelerator_reason: String,
    pub allocated_cpus: u32,
    pub allocated_memory_bytes: u64,
    pub vm_count: u32,
    pub cgroups: String,
    pub tls_not_after: String,
    pub tls_days_left: i64,
    pub kvm: KvmView,
    /// The controller's lease on the node (fencing of highly available VMs).
    pub lease: LeaseView,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseView {
    pub remaining_ms: u64,
    pub fenced: bool,
}

impl LeaseView {
    pub fn describe(&self) -> String {
        match (self.fenced, self.remaining_ms) {
            (true, _) => "ran out: highly available VMs are stopped and kept stopped".into(),
            (false, 0) => "none (no controller renews one)".into(),
            (false, ms) => format!("{:.1}s left", ms as f64 / 1000.0),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KvmView {
    pub present: bool,
    pub usable: bool,
    pub modules: Vec<String>,
    pub api_version: i32,
    pub max_vcpus: u32,
    pub recommended_vcpus: u32,
    pub extensions: std::collections::BTreeMap<String, bool>,
}

impl From<pb::Node> for NodeView {
    fn from(n: pb::Node) -> Self {
        let k = n.kvm.unwrap_or_default();
        let lease = n.lease.unwrap_or_default();
        NodeView {
            node_name: n.node_name,
            hostname: n.hostname,
            agent_version: n.agent_version,
            cpus: n.cpus,
            memory_total_bytes: n.memory_total_bytes,
            memory_available_bytes: n.memory_available_bytes,
            qemu_version: n.qemu_version,
            accelerator: n.accelerator,
            accelerator_reason: n.accelerator_reason,
            allocated_cpus: n.allocated_cpus,
            allocated_memory_bytes: n.allocated_memory_bytes,
            vm_count: n.vm_count,
            cgroups: n.cgroups,
            tls_not_after: n.tls_not_after,
            tls_days_left: n.tls_days_left,
            kvm: KvmView {
                present: k.present,
                usable: k.usable,
                modules: k.modules,
                api_version: k.api_version,
                max_vcpus: k.max_vcpus,
                recommended_vcpus: k.recommended_vcpus,
                extensions: k.extensions.into_iter().collect(),
            },
            lease: LeaseView {
                remaining_ms: lease.remaining_ms,
                fenced: lease.fenced,
            },
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    #[serde(rename = "type")]
    pub kind: String,
    pub reason: String,
    pub message: String,
    pub vm: VmView,
}

impl From<&pb::VmEvent> for EventView {
    fn from(e: &pb::VmEvent) -> Self {
        let kind = pb::EventType::try_from(e.r#type)
            .map(|t| {
                t.as_str_name()
                    .trim_start_matches("EVENT_TYPE_")
                    .to_string()
            })
            .unwrap_or_else(|_| "UNKNOWN".into());
        EventView {
            kind,
            reason: e.reason.clone(),
            message: e.message.clone(),
            vm: VmView::from(&e.vm.clone().unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_read_like_kubernetes() {
        assert_eq!(phase_name(pb::VmPhase::Running as i32), "Running");
        assert_eq!(phase_name(pb::VmPhase::Stopped as i32), "Stopped");
        assert_eq!(phase_name(99), "Unknown");
    }
}
