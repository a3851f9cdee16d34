//! `VMTemplate`: a reusable image plus default VM settings that VirtualMachines refer to.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::vm::{Boot, CloudInit, Disk, Firmware, Network};
use super::{Condition, QUANTITY_PATTERN};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hypersdk.io",
    version = "v1alpha1",
    kind = "VMTemplate",
    namespaced,
    status = "VMTemplateStatus",
    shortname = "vmtpl",
    printcolumn = r#"{"name": "Display Name", "type": "string", "jsonPath": ".spec.displayName"}"#,
    printcolumn = r#"{"name": "Version", "type": "string", "jsonPath": ".spec.version"}"#,
    printcolumn = r#"{"name": "Usage", "type": "integer", "jsonPath": ".status.usageCount"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VMTemplateSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_info: Option<OsInfo>,
    /// Settings a VM gets when it does not set them itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_spec: Option<DefaultSpec>,
    pub image: TemplateImage,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OsInfo {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distro: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// VirtualMachine spec fields a template may preset.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefaultSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(QUANTITY_PATTERN))]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(QUANTITY_PATTERN))]
    pub max_memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    /// The firmware the template's image boots with (`bios` or `uefi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub networks: Vec<Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateImage {
    /// The root disk image: an http:// or https:// URL, or a path on the nodes (inside the
    /// agents' image directories). Each node fetches it once into its image cache; every VM
    /// gets a writable overlay on it.
    #[schemars(length(min = 1, max = 4096))]
    pub source: String,
    /// "sha256:<hex>" or "sha512:<hex>" of the image file, verified as it is fetched; required
    /// for URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$"))]
    pub checksum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ImageFormat>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMTemplateStatus {
    /// VirtualMachines that refer to this template.
    #[serde(default)]
    pub usage_count: u32,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
