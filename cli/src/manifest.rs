//! VirtualMachine manifests (`hypersdk.io/v1alpha1`) read by `hyperctl vm create -f`.
//!
//! The agent runs what a manifest pins down (size, boot files, disk paths). Fields the cluster
//! controller resolves (templates, storage classes, cloud-init) are accepted and left to it; a
//! manifest that relies on them alone gets the agent's error naming the missing field.

use std::collections::BTreeMap;

use hypersdk_proto::agent::v1 as pb;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not YAML for a VirtualMachine: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
    #[error("{field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// `spec.highAvailability.restartPolicy`, as the seeds spell it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    #[default]
    Never,
}

impl RestartPolicy {
    pub fn to_proto(self) -> pb::RestartPolicy {
        match self {
            RestartPolicy::Always => pb::RestartPolicy::Always,
            RestartPolicy::OnFailure => pb::RestartPolicy::OnFailure,
            RestartPolicy::Never => pb::RestartPolicy::Never,
        }
    }
}

/// `spec.memoryHotplug`, as in the VirtualMachine CRD.
#[derive(Debug, Clone, Copy, Default, Deserialize, clap::ValueEnum)]
pub enum MemoryHotplug {
    #[default]
    Auto,
    VirtioMem,
    Dimm,
}

impl MemoryHotplug {
    pub fn to_proto(self) -> pb::MemoryHotplug {
        match self {
            MemoryHotplug::Auto => pb::MemoryHotplug::Auto,
            MemoryHotplug::VirtioMem => pb::MemoryHotplug::VirtioMem,
            MemoryHotplug::Dimm => pb::MemoryHotplug::Dimm,
        }
    }
}

/// `spec.firmware`, as in the VirtualMachine CRD.
#[derive(Debug, Clone, Copy, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

impl Firmware {
    pub fn to_proto(self) -> pb::Firmware {
        match self {
            Firmware::Bios => pb::Firmware::Bios,
            Firmware::Uefi => pb::Firmware::Uefi,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HighAvailability {
    #[serde(default)]
    restart_policy: RestartPolicy,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    high_availability: HighAvailability,
    cpus: Option<u32>,
    memory: Option<String>,
    #[serde(default)]
    max_cpus: u32,
    #[serde(default)]
    max_memory: String,
    #[serde(default)]
    memory_hotplug: MemoryHotplug,
    #[serde(default)]
    running: bool,
    #[serde(default)]
    boot: Boot,
    #[serde(default)]
    firmware: Firmware,
    #[serde(default)]
    disks: Vec<Disk>,
    #[serde(default)]
    networks: Vec<Network>,
}

#[derive(Debug, Default, Deserialize)]
struct Boot {
    #[serde(default)]
    kernel: String,
    #[serde(default)]
    initrd: String,
    #[serde(default)]
    cmdline: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Disk {
    name: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    format: String,
    #[serde(default)]
    read_only: bool,
}

#[derive(Debug, Deserialize)]
struct Network {
    name: String,
}

/// The agent spec of a manifest, and whether it asks to be running.
pub fn parse(yaml: &str) -> Result<(pb::VmSpec, bool), ManifestError> {
    let m: Manifest = serde_yaml_ng::from_str(yaml)?;
    let field = |field, message: String| ManifestError::Field { field, message };
    if m.api_version != "hypersdk.io/v1alpha1" {
        return Err(field(
            "apiVersion",
            format!("{:?}: expected hypersdk.io/v1alpha1", m.api_version),
        ));
    }
    if m.kind != "VirtualMachine" {
        return Err(field(
            "kind",
            format!("{:?}: expected VirtualMachine", m.kind),
        ));
    }
    let cpus = m
        .spec
        .cpus
        .ok_or_else(|| field("spec.cpus", "is required".into()))?;
    let memory = m
        .spec
        .memory
        .ok_or_else(|| field("spec.memory", "is required".into()))?;
    let mut disks = Vec::new();
    for d in m.spec.disks {
        let format = match d.format.as_str() {
            "" => pb::DiskFormat::Unspecified,
            "qcow2" => pb::DiskFormat::Qcow2,
            "raw" => pb::DiskFormat::Raw,
            other => {
                return Err(field(
                    "spec.disks[].format",
                    format!("{other:?}: expected qcow2 or raw"),
                ));
            }
        };
        disks.push(pb::Disk {
            name: d.name,
            path: d.path,
            format: format as i32,
            read_only: d.read_only,
            ..Default::default()
        });
    }
    let spec = pb::VmSpec {
        name: m.metadata.name,
        cpus,
        max_cpus: m.spec.max_cpus,
        memory,
        max_memory: m.spec.max_memory,
        boot: Some(pb::Boot {
            kernel: m.spec.boot.kernel,
            initrd: m.spec.boot.initrd,
            cmdline: m.spec.boot.cmdline,
        }),
        disks,
        networks: m
            .spec
            .networks
            .into_iter()
            .map(|n| pb::Network {
                name: n.name,
                backend: Some(pb::network::Backend::User(pb::UserNetwork {})),
            })
            .collect(),
        labels: m.metadata.labels.into_iter().collect(),
        restart_policy: m.spec.high_availability.restart_policy.to_proto() as i32,
        cloud_init: None,
        memory_hotplug: m.spec.memory_hotplug.to_proto() as i32,
        // Only the controller moves VMs between nodes, and fences them for it.
        high_availability: false,
        firmware: m.spec.firmware.to_proto() as i32,
    };
    Ok((spec, m.spec.running))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_manifest_with_controller_fields() {
        let yaml = r#"
apiVersion: hypersdk.io/v1alpha1
kind: VirtualMachine
metadata:
  name: my-vm
  namespace: default
spec:
  cpus: 2
  memory: "1Gi"
  maxCpus: 4
  running: true
  boot:
    kernel: /images/vmlinuz
    cmdline: console=ttyS0
  image:
    templateRef:
      name: ubuntu-22-04
  disks:
    - name: root
      path: /images/disk.qcow2
  networks:
    - name: default
      type: pod-network
  carbonAware:
    enabled: true
  highAvailability:
    enabled: true
    restartPolicy: Always
    evictionStrategy: LiveMigrate
"#;
        let (spec, running) = parse(yaml).unwrap();
        assert!(running);
        assert_eq!(
            (spec.name.as_str(), spec.cpus, spec.max_cpus),
            ("my-vm", 2, 4)
        );
        assert_eq!(spec.boot.unwrap().kernel, "/images/vmlinuz");
        assert_eq!(spec.disks[0].path, "/images/disk.qcow2");
        assert_eq!(spec.networks[0].name, "default");
        assert_eq!(spec.restart_policy, pb::RestartPolicy::Always as i32);
    }

    #[test]
    fn names_what_is_missing_or_wrong() {
        let base = "apiVersion: hypersdk.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: a}\n";
        let err = parse(&format!("{base}spec: {{memory: 1Gi}}")).unwrap_err();
        assert_eq!(err.to_string(), "spec.cpus: is required");
        let err = parse(&format!("{base}spec: {{cpus: 1}}")).unwrap_err();
        assert_eq!(err.to_string(), "spec.memory: is required");
        let err = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {}").unwrap_err();
        assert!(err.to_string().starts_with("apiVersion"));
        assert!(matches!(parse("{{{"), Err(ManifestError::Yaml(_))));
    }
}
