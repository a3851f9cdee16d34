//! `VirtualMachine`: a VM the controller places on a node and keeps in the state `spec.running` asks.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Condition, DNS_LABEL_PATTERN, LocalObjectReference, QUANTITY_PATTERN};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hypersdk.io",
    version = "v1alpha1",
    kind = "VirtualMachine",
    namespaced,
    status = "VirtualMachineStatus",
    shortname = "vm",
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Node", "type": "string", "jsonPath": ".status.nodeName"}"#,
    printcolumn = r#"{"name": "CPUs", "type": "integer", "jsonPath": ".status.cpus"}"#,
    printcolumn = r#"{"name": "Memory", "type": "string", "jsonPath": ".status.memory"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new("!has(self.maxCpus) || self.maxCpus >= self.cpus")
        .message("maxCpus must be at least cpus").field_path(".maxCpus"),
    validation = Rule::new("!has(self.maxMemory) || quantity(self.maxMemory).compareTo(quantity(self.memory)) >= 0")
        .message("maxMemory must be at least memory").field_path(".maxMemory"),
    validation = Rule::new("has(self.image) || has(self.boot)")
        .message("a VM needs image.templateRef or boot.kernel to boot from")
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineSpec {
    /// vCPUs at start.
    #[schemars(range(min = 1, max = 1024))]
    pub cpus: u32,
    /// Memory at start, a quantity such as "8Gi".
    #[schemars(pattern(QUANTITY_PATTERN))]
    pub memory: String,
    /// Whether the VM should run (true) or be stopped (false).
    #[serde(default)]
    pub running: bool,
    /// Hotplug ceiling for vCPUs; defaults to `cpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_cpus: Option<u32>,
    /// Hotplug ceiling for memory; defaults to `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(QUANTITY_PATTERN))]
    pub max_memory: Option<String>,
    /// How memory is added up to `maxMemory`: `VirtioMem` (2 MiB steps, needs the guest's
    /// virtio-mem driver), `Dimm` (ACPI pc-dimm, steps of whole DIMMs of at least 128 MiB) or
    /// `Auto` (virtio-mem where the node's QEMU has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_hotplug: Option<MemoryHotplug>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<VmImage>,
    /// Kernel boot; overrides the template's. Without one, the firmware boots the first disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    /// `bios` (SeaBIOS, the default) or `uefi` (OVMF, with the VM's own NVRAM); overrides the
    /// template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub disks: Vec<Disk>,
    #[serde(default)]
    #[schemars(length(max = 8))]
    pub networks: Vec<Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carbon_aware: Option<CarbonAware>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_availability: Option<HighAvailability>,
    /// Only nodes whose labels include all of these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmImage {
    /// The VMTemplate (same namespace) whose image and defaults the VM boots from.
    pub template_ref: LocalObjectReference,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Boot {
    /// Kernel path on the node (inside the agent's image directories).
    #[schemars(length(min = 1, max = 4096))]
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub initrd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub cmdline: Option<String>,
}

/// The firmware a VM boots with.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// Virtual size. The root disk (over the template's image) must be at least the image's
    /// size; any other disk without a path is made blank, of this size, by the node agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(QUANTITY_PATTERN))]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub boot_order: Option<u32>,
    /// An existing image file on the node (inside the agent's image directories).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    #[schemars(pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    #[serde(rename = "type", default)]
    pub type_: NetworkType,
}

/// How a NIC reaches the outside: `pod-network` is the node network (a tap on the node's
/// bridge, DHCP and NAT from the agent; QEMU user networking on a node without one), `user`
/// is QEMU's user-mode NAT.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkType {
    #[default]
    PodNetwork,
    User,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloudInit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub user_data: Option<String>,
    /// cloud-init network configuration (YAML), given to the guest as `network-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub network_data: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CarbonAware {
    #[serde(default)]
    pub enabled: bool,
    /// Highest grid carbon intensity (gCO2eq/kWh) of a node the VM may be placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_intensity: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HighAvailability {
    /// When its node goes away, the VM is placed on another node.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub eviction_strategy: EvictionStrategy,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum MemoryHotplug {
    #[default]
    Auto,
    VirtioMem,
    Dimm,
}

/// What the agent does when the VM's QEMU ends without being asked to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RestartPolicy {
    Always,
    #[default]
    OnFailure,
    Never,
}

/// How a VM leaves a node that is drained.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum EvictionStrategy {
    LiveMigrate,
    #[default]
    Restart,
    None,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmPhase>,
    /// The node the VM is placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// What the guest has now, as reported by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The guest's network interfaces, as its guest agent reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
}

/// A network interface of the guest (KubeVirt's shape).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// The spec's network whose NIC this is; absent for the guest's own interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The guest's name for it, e.g. eth0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The first IPv4 address (without its prefix length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// Every address, without prefix lengths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VmPhase {
    Pending,
    Scheduling,
    /// The node fetches the VM's image (the message says how far).
    Importing,
    Creating,
    Running,
    Stopped,
    Paused,
    Migrating,
    Failed,
}

impl VmPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            VmPhase::Pending => "Pending",
            VmPhase::Scheduling => "Scheduling",
            VmPhase::Importing => "Importing",
            VmPhase::Creating => "Creating",
            VmPhase::Running => "Running",
            VmPhase::Stopped => "Stopped",
            VmPhase::Paused => "Paused",
            VmPhase::Migrating => "Migrating",
            VmPhase::Failed => "Failed",
        }
    }
}
