//! From a VirtualMachine (and its template) to the agent's `VmSpec`. Pure: every problem is a
//! [`SpecError`] naming the field, which the reconciler turns into a condition.

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::quantity::{self, QuantityError};

use std::collections::HashMap;

use crate::crd::operation::MigrateSpec;
use crate::crd::template::{DefaultSpec, VMTemplateSpec};
use crate::crd::vm::{Disk, Firmware, MemoryHotplug, Network, RestartPolicy, VirtualMachineSpec};

/// Labels that tie an agent VM back to its VirtualMachine.
pub const NAMESPACE_LABEL: &str = "hypersdk.io/namespace";
pub const NAME_LABEL: &str = "hypersdk.io/name";

/// A field the agent spec cannot be built from: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {source}")]
    Quantity {
        field: &'static str,
        #[source]
        source: QuantityError,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

impl SpecError {
    /// The field at fault, as the API names it.
    pub fn field(&self) -> &'static str {
        match self {
            SpecError::Quantity { field, .. } | SpecError::Invalid { field, .. } => field,
        }
    }
}

fn err(field: &'static str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        message: message.into(),
    }
}

/// The agent's VM name for `namespace/name`: readable, a DNS-1123 label, and distinct for distinct
/// objects (a hash of the full identity is appended, so "a-b/c" and "a/b-c" never collide).
pub fn agent_name(namespace: &str, name: &str) -> String {
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let hash = format!("{namespace}/{name}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    let mut base = format!("{namespace}-{name}");
    base.truncate(54);
    format!("{}-{:08x}", base.trim_end_matches('-'), hash as u32)
}

/// What the agent is asked to run, plus disks the agent cannot provide (named for DiskReady).
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub spec: pb::VmSpec,
    pub unprovisioned_disks: Vec<String>,
}

/// The VirtualMachine an agent spec is built for.
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Its `metadata.uid`: cloud-init's instance-id.
    pub uid: &'a str,
}

/// Builds the agent spec; `template` is the resolved `spec.image.templateRef`, if any.
pub fn build(
    id: Identity<'_>,
    vm: &VirtualMachineSpec,
    template: Option<&VMTemplateSpec>,
) -> Result<Built, SpecError> {
    let Identity {
        namespace,
        name,
        uid,
    } = id;
    let defaults = template
        .and_then(|t| t.default_spec.clone())
        .unwrap_or_default();
    let max_memory = max_memory(vm, &defaults)?;
    let max_cpus = vm
        .max_cpus
        .or(defaults.max_cpus)
        .filter(|m| *m >= vm.cpus)
        .unwrap_or(0);
    let boot = vm.boot.clone().or(defaults.boot.clone());
    let spec_disks = if vm.disks.is_empty() {
        &defaults.disks
    } else {
        &vm.disks
    };
    let (disks, unprovisioned_disks) = disks(spec_disks, template)?;
    if boot.is_none() && disks.is_empty() {
        return Err(err(
            "spec.boot.kernel",
            "nothing to boot: set spec.boot.kernel, or use a template whose image the firmware boots",
        ));
    }
    let nets = if vm.networks.is_empty() {
        &defaults.networks
    } else {
        &vm.networks
    };
    Ok(Built {
        spec: pb::VmSpec {
            name: agent_name(namespace, name),
            cpus: vm.cpus,
            max_cpus,
            memory: vm.memory.clone(),
            max_memory: max_memory.unwrap_or_default(),
            boot: boot.map(|boot| pb::Boot {
                kernel: boot.kernel,
                initrd: boot.initrd.unwrap_or_default(),
                cmdline: boot.cmdline.unwrap_or_default(),
            }),
            firmware: firmware(vm.firmware.or(defaults.firmware)) as i32,
            disks,
            networks: nets.iter().map(network).collect(),
            labels: identity_labels(namespace, name),
            restart_policy: restart_policy(vm) as i32,
            memory_hotplug: memory_hotplug(vm) as i32,
            high_availability: vm.high_availability.as_ref().is_some_and(|h| h.enabled),
            cloud_init: vm
                .cloud_init
                .as_ref()
                .or(defaults.cloud_init.as_ref())
                .map(|c| pb::CloudInit {
                    user_data: c.user_data.clone().unwrap_or_default(),
                    network_data: c.network_data.clone().unwrap_or_default(),
                    instance_id: uid.to_string(),
                    hostname: name.to_string(),
                }),
        },
        unprovisioned_disks,
    })
}

/// The labels that tie an agent VM to `namespace/name`.
pub fn identity_labels(namespace: &str, name: &str) -> HashMap<String, String> {
    [
        (NAMESPACE_LABEL.to_string(), namespace.to_string()),
        (NAME_LABEL.to_string(), name.to_string()),
    ]
    .into()
}

/// `spec.maxMemory` (or the template's), when it is at least `spec.memory`; both whole MiB.
fn max_memory(
    vm: &VirtualMachineSpec,
    defaults: &DefaultSpec,
) -> Result<Option<String>, SpecError> {
    let memory_bytes = parse_mib("spec.memory", &vm.memory)?;
    let max_memory = vm
        .max_memory
        .clone()
        .or(defaults.max_memory.clone())
        .filter(|m| quantity::parse_bytes(m).is_ok_and(|b| b >= memory_bytes));
    if let Some(m) = &max_memory {
        parse_mib("spec.maxMemory", m)?;
    }
    Ok(max_memory)
}

/// The agent's disks: the root disk over the template's image (the agent makes it, of the root
/// entry's size), then every disk with a path, and a blank disk for every other one with a
/// size; disks with none of these are returned by name, as not provisioned.
fn disks(
    spec_disks: &[Disk],
    template: Option<&VMTemplateSpec>,
) -> Result<(Vec<pb::Disk>, Vec<String>), SpecError> {
    let root = spec_disks.iter().find(|d| d.path.is_none());
    let root_name = root.map_or("root".to_string(), |d| d.name.clone());
    // A disk given by path under the root's name (a restored VM's) is the root: the template
    // still gives boot and defaults, not the disk.
    let root_given = spec_disks
        .iter()
        .any(|d| d.name == root_name && d.path.is_some());
    let mut disks: Vec<pb::Disk> = template
        .filter(|_| !root_given)
        .map(|t| root_disk(t, &root_name, root))
        .transpose()?
        .into_iter()
        .collect();
    let mut unprovisioned = Vec::new();
    for d in spec_disks {
        let disk = pb::Disk {
            name: d.name.clone(),
            read_only: d.read_only,
            boot_order: d.boot_order.unwrap_or(0),
            ..Default::default()
        };
        match (&d.path, &d.size) {
            _ if template.is_some() && d.name == root_name && !root_given => {}
            (Some(path), _) => disks.push(pb::Disk {
                path: path.clone(),
                ..disk
            }),
            (None, Some(size)) => disks.push(pb::Disk {
                size: size.clone(),
                ..disk
            }),
            (None, None) => unprovisioned.push(d.name.clone()),
        }
    }
    Ok((disks, unprovisioned))
}

/// The root disk `name` the agent makes over the template's image, sized by `entry`.
fn root_disk(t: &VMTemplateSpec, name: &str, entry: Option<&Disk>) -> Result<pb::Disk, SpecError> {
    let source = t
        .image
        .source
        .strip_prefix("file://")
        .unwrap_or(&t.image.source);
    let url = source.starts_with("http://") || source.starts_with("https://");
    if !url && !source.starts_with('/') {
        return Err(err(
            "image.source",
            format!("{source:?} must be an http(s) URL or an absolute path on the nodes"),
        ));
    }
    if url && t.image.checksum.is_none() {
        return Err(err(
            "image.checksum",
            "is required for an http(s) image (sha256:<hex> or sha512:<hex>)",
        ));
    }
    Ok(pb::Disk {
        name: name.into(),
        image: Some(pb::DiskImage {
            source: source.into(),
            checksum: t.image.checksum.clone().unwrap_or_default(),
        }),
        size: entry.and_then(|d| d.size.clone()).unwrap_or_default(),
        boot_order: entry.and_then(|d| d.boot_order).unwrap_or(1),
        ..Default::default()
    })
}

/// `pod-network` is the node network (a bridge NIC); [`on_node`] turns it into QEMU user
/// networking on a node that has none.
fn network(n: &Network) -> pb::Network {
    use crate::crd::vm::NetworkType;
    pb::Network {
        name: n.name.clone(),
        backend: Some(match n.type_ {
            NetworkType::PodNetwork => pb::network::Backend::Bridge(pb::BridgeNetwork {}),
            NetworkType::User => pb::network::Backend::User(pb::UserNetwork {}),
        }),
    }
}

/// The spec as a node runs it: on a node without a node network (its agent has no --bridge),
/// `pod-network` NICs are QEMU user networking, and NetworkReady says so.
pub fn on_node(mut spec: pb::VmSpec, node: Option<&pb::Node>) -> pb::VmSpec {
    if node.and_then(|n| n.network.as_ref()).is_none() {
        for n in &mut spec.networks {
            if matches!(n.backend, Some(pb::network::Backend::Bridge(_))) {
                n.backend = Some(pb::network::Backend::User(pb::UserNetwork {}));
            }
        }
    }
    spec
}

fn restart_policy(vm: &VirtualMachineSpec) -> pb::RestartPolicy {
    match vm.high_availability.as_ref().map(|h| h.restart_policy) {
        Some(RestartPolicy::Always) => pb::RestartPolicy::Always,
        Some(RestartPolicy::Never) => pb::RestartPolicy::Never,
        Some(RestartPolicy::OnFailure) | None => pb::RestartPolicy::OnFailure,
    }
}

fn firmware(firmware: Option<Firmware>) -> pb::Firmware {
    match firmware.unwrap_or_default() {
        Firmware::Bios => pb::Firmware::Bios,
        Firmware::Uefi => pb::Firmware::Uefi,
    }
}

fn memory_hotplug(vm: &VirtualMachineSpec) -> pb::MemoryHotplug {
    match vm.memory_hotplug.unwrap_or_default() {
        MemoryHotplug::Auto => pb::MemoryHotplug::Auto,
        MemoryHotplug::VirtioMem => pb::MemoryHotplug::VirtioMem,
        MemoryHotplug::Dimm => pb::MemoryHotplug::Dimm,
    }
}

/// A quantity that must be a positive whole number of MiB, in bytes.
fn parse_mib(field: &'static str, value: &str) -> Result<u64, SpecError> {
    let bytes =
        quantity::parse_bytes(value).map_err(|source| SpecError::Quantity { field, source })?;
    whole_mib(field, bytes)?;
    Ok(bytes)
}

fn whole_mib(field: &'static str, bytes: u64) -> Result<(), SpecError> {
    if bytes == 0 || !bytes.is_multiple_of(1 << 20) {
        return Err(err(
            field,
            "must be a positive whole number of MiB (e.g. 512Mi, 8Gi)",
        ));
    }
    Ok(())
}

/// A VMOperation's `migrateSpec` as the agent's migration options: a bandwidth such as
/// "100Mbps" (bits) or "50MBps" (bytes, decimal prefixes) and a downtime such as "50ms" or "1s".
/// Whatever is unset keeps the agent's defaults.
pub fn migration_options(m: &MigrateSpec) -> Result<pb::MigrationOptions, SpecError> {
    let bandwidth = m
        .bandwidth
        .as_deref()
        .map(|b| {
            parse_bandwidth(b).ok_or_else(|| {
                err(
                    "migrateSpec.bandwidth",
                    format!("{b:?} is not a rate such as 100Mbps or 1Gbps"),
                )
            })
        })
        .transpose()?;
    let downtime = m
        .max_downtime
        .as_deref()
        .map(|d| {
            let ms = match d.strip_suffix("ms") {
                Some(ms) => ms.parse::<u32>().ok(),
                None => d
                    .strip_suffix('s')
                    .and_then(|s| s.parse::<u32>().ok())
                    .and_then(|s| s.checked_mul(1000)),
            };
            ms.filter(|ms| *ms > 0).ok_or_else(|| {
                err(
                    "migrateSpec.maxDowntime",
                    format!("{d:?} is not a positive duration such as 50ms or 1s"),
                )
            })
        })
        .transpose()?;
    Ok(pb::MigrationOptions {
        bandwidth_bytes_per_second: bandwidth,
        max_downtime_ms: downtime,
        auto_converge: m.auto_converge.then_some(true),
        ..Default::default()
    })
}

/// "100Mbps" → 12.5e6 bytes/s; "50MBps" → 50e6 bytes/s. `None` for anything else or zero.
fn parse_bandwidth(s: &str) -> Option<u64> {
    let (number, bits) = match (s.strip_suffix("bps"), s.strip_suffix("Bps")) {
        (Some(n), _) => (n, true),
        (_, Some(n)) => (n, false),
        _ => return None,
    };
    let (number, scale) = match number.char_indices().last() {
        Some((i, 'k' | 'K')) => (&number[..i], 1e3),
        Some((i, 'M')) => (&number[..i], 1e6),
        Some((i, 'G')) => (&number[..i], 1e9),
        _ => (number, 1.0),
    };
    let value = number.parse::<f64>().ok()? * scale / if bits { 8.0 } else { 1.0 };
    (value.is_finite() && value >= 1.0 && value < u64::MAX as f64).then_some(value as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<'a>(namespace: &'a str, name: &'a str) -> Identity<'a> {
        Identity {
            namespace,
            name,
            uid: "uid-1",
        }
    }

    fn vm(yaml: &str) -> VirtualMachineSpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn template() -> VMTemplateSpec {
        serde_yaml_ng::from_str(
            "image: {source: /images/disk.qcow2, format: qcow2}\ndefaultSpec: {boot: {kernel: /images/vmlinuz, cmdline: console=ttyS0}}",
        )
        .unwrap()
    }

    #[test]
    fn seed_vm_gets_template_root_disk_and_identity_labels() {
        let spec = vm(
            "cpus: 4\nmemory: 8Gi\nrunning: true\ndisks: [{name: root, size: 50Gi}, {name: data, size: 1Gi}]\nnetworks: [{name: default, type: pod-network}]",
        );
        let b = build(id("default", "my-vm"), &spec, Some(&template())).unwrap();
        assert_eq!(b.spec.disks.len(), 2);
        let root = &b.spec.disks[0];
        assert_eq!((root.name.as_str(), root.read_only), ("root", false));
        assert_eq!((root.path.as_str(), root.size.as_str()), ("", "50Gi"));
        assert_eq!(root.image.as_ref().unwrap().source, "/images/disk.qcow2");
        assert_eq!(root.boot_order, 1);
        let data = &b.spec.disks[1];
        assert_eq!((data.name.as_str(), data.size.as_str()), ("data", "1Gi"));
        assert!(data.image.is_none() && data.path.is_empty());
        assert!(b.unprovisioned_disks.is_empty());
        assert_eq!(b.spec.boot.unwrap().kernel, "/images/vmlinuz");
        assert_eq!(b.spec.labels[NAME_LABEL], "my-vm");
        assert_eq!(b.spec.networks.len(), 1);
        assert_eq!(b.spec.restart_policy, pb::RestartPolicy::OnFailure as i32);
    }

    #[test]
    fn cloud_init_gets_the_vms_uid_and_name() {
        let spec = vm(
            "cpus: 1\nmemory: 1Gi\ncloudInit: {userData: \"#cloud-config\\n\", networkData: \"version: 2\"}\ndisks: [{name: scratch}]",
        );
        let mut t = template();
        t.image.source = "https://images.example/debian.qcow2".into();
        t.image.checksum = Some(format!("sha256:{}", "ab".repeat(32)));
        let b = build(id("default", "web"), &spec, Some(&t)).unwrap();
        let ci = b.spec.cloud_init.unwrap();
        assert_eq!(
            (ci.instance_id.as_str(), ci.hostname.as_str()),
            ("uid-1", "web")
        );
        assert_eq!(
            (ci.user_data.as_str(), ci.network_data.as_str()),
            ("#cloud-config\n", "version: 2")
        );
        let image = b.spec.disks[0].image.clone().unwrap();
        assert_eq!(image.checksum, format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(
            b.spec.disks[0].name, "scratch",
            "the first disk without a path is the root"
        );
        t.image.checksum = None;
        let e = build(id("default", "web"), &spec, Some(&t)).unwrap_err();
        assert_eq!(e.field(), "image.checksum");
    }

    #[test]
    fn errors_name_the_field() {
        let e = build(id("d", "v"), &vm("cpus: 1\nmemory: 1Gi"), None).unwrap_err();
        assert_eq!(e.field(), "spec.boot.kernel");
        let e = build(
            id("d", "v"),
            &vm("cpus: 1\nmemory: 1000k\nboot: {kernel: /k}"),
            None,
        )
        .unwrap_err();
        assert_eq!(e.field(), "spec.memory");
        let e = build(
            id("d", "v"),
            &vm("cpus: 1\nmemory: 8XB\nboot: {kernel: /k}"),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                SpecError::Quantity {
                    field: "spec.memory",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(std::error::Error::source(&e).is_some(), "keeps its source");
        let mut t = template();
        t.image.source = "disk.qcow2".into();
        assert_eq!(
            build(id("d", "v"), &vm("cpus: 1\nmemory: 1Gi"), Some(&t))
                .unwrap_err()
                .field(),
            "image.source"
        );
    }

    #[test]
    fn without_a_kernel_the_template_image_boots_through_the_firmware() {
        let t: VMTemplateSpec = serde_yaml_ng::from_str(
            "image: {source: /images/debian.qcow2}\ndefaultSpec: {firmware: uefi}",
        )
        .unwrap();
        let b = build(id("d", "v"), &vm("cpus: 1\nmemory: 1Gi"), Some(&t)).unwrap();
        assert_eq!(b.spec.boot, None);
        assert_eq!(b.spec.firmware, pb::Firmware::Uefi as i32);
        let image = b.spec.disks[0].image.as_ref().unwrap();
        assert_eq!(image.source, "/images/debian.qcow2");
        let own = build(
            id("d", "v"),
            &vm("cpus: 1\nmemory: 1Gi\nfirmware: bios"),
            Some(&t),
        )
        .unwrap();
        assert_eq!(
            own.spec.firmware,
            pb::Firmware::Bios as i32,
            "the VM's own wins"
        );
        let e =
            serde_yaml_ng::from_str::<VirtualMachineSpec>("cpus: 1\nmemory: 1Gi\nfirmware: efi")
                .unwrap_err();
        assert!(
            e.to_string().contains("firmware") && e.to_string().contains("uefi"),
            "{e}"
        );
    }

    #[test]
    fn agent_names_are_labels_and_distinct() {
        let a = agent_name("a-b", "c");
        let b = agent_name("a", "b-c");
        assert_ne!(a, b);
        let long = agent_name(&"n".repeat(63), &"v".repeat(63));
        assert!(long.len() <= 63, "{long}");
        assert!(
            long.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }

    #[test]
    fn migrate_spec_becomes_agent_options() {
        let spec = |bandwidth: &str, downtime: &str| MigrateSpec {
            target_node: None,
            live: true,
            bandwidth: Some(bandwidth.into()),
            auto_converge: true,
            max_downtime: Some(downtime.into()),
        };
        let o = migration_options(&spec("100Mbps", "50ms")).unwrap();
        assert_eq!(o.bandwidth_bytes_per_second, Some(12_500_000));
        assert_eq!((o.max_downtime_ms, o.auto_converge), (Some(50), Some(true)));
        let o = migration_options(&spec("1.5GBps", "2s")).unwrap();
        assert_eq!(
            (o.bandwidth_bytes_per_second, o.max_downtime_ms),
            (Some(1_500_000_000), Some(2000))
        );
        assert_eq!(
            migration_options(&spec("0Mbps", "1s")).unwrap_err().field(),
            "migrateSpec.bandwidth"
        );
        assert_eq!(
            migration_options(&spec("1Gbps", "0ms"))
                .unwrap_err()
                .field(),
            "migrateSpec.maxDowntime"
        );
        let unset = MigrateSpec {
            bandwidth: None,
            max_downtime: None,
            auto_converge: false,
            ..spec("1Gbps", "1s")
        };
        assert_eq!(migration_options(&unset).unwrap(), Default::default());
    }
}
