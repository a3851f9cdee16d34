//! The VM specification as the agent keeps it, and the checks of its values (a gRPC request is
//! turned into one field by field in [`crate::api::convert`]).
//!
//! Everything here is pure: checks on the request's own values. Checks that need the file system
//! (paths inside allowed directories, disk headers) live in [`crate::host::paths`] and [`crate::host::image`].

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::cloudinit::CloudInit;
pub use crate::firmware::Firmware;
pub use crate::image::ImageRef;
use crate::quantity::{format_bytes, parse_bytes};

pub mod argv;
pub mod resolve;

/// Highest vCPU count accepted in a spec (QEMU's q35 limit without an IOMMU).
pub const MAX_VCPUS: u32 = 255;
/// Smallest memory a VM may have.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest memory a VM may have (QEMU's x86 limit is far above any host's RAM; this keeps
/// every sum of sizes far from overflowing).
pub const MAX_MEMORY: u64 = 16 << 40;
/// Linux's x86 COMMAND_LINE_SIZE.
pub const MAX_CMDLINE: usize = 2048;

/// A request field that failed validation, named as the request names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSpec {
    pub name: String,
    pub cpus: u32,
    pub max_cpus: u32,
    pub memory: u64,
    pub max_memory: u64,
    /// Direct kernel boot; `None`: the firmware boots the first disk.
    #[serde(default)]
    pub boot: Option<Boot>,
    #[serde(default)]
    pub firmware: Firmware,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub networks: Vec<Network>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// `Auto` only between the request and [`MemoryHotplug::resolve`]; specs saved before this
    /// field existed ran virtio-mem.
    #[serde(default)]
    pub memory_hotplug: MemoryHotplug,
    /// Fenced when the controller's lease runs out (see `crate::fence`).
    #[serde(default)]
    pub high_availability: bool,
    /// The NoCloud volume the agent writes for the guest's cloud-init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryHotplug {
    Auto,
    #[default]
    VirtioMem,
    Dimm,
}

impl MemoryHotplug {
    /// The device this node's QEMU will use: `Auto` becomes virtio-mem where QEMU has it, else
    /// pc-dimm. pc-dimm needs the hotplug range (maxMemory - memory) in whole 128 MiB blocks.
    pub fn resolve(
        self,
        memory: u64,
        max_memory: u64,
        has_virtio_mem: bool,
    ) -> Result<MemoryHotplug, FieldError> {
        let chosen = match self {
            MemoryHotplug::Auto if has_virtio_mem => MemoryHotplug::VirtioMem,
            MemoryHotplug::Auto => MemoryHotplug::Dimm,
            MemoryHotplug::VirtioMem if !has_virtio_mem => {
                return Err(FieldError::new(
                    "spec.memoryHotplug",
                    "this node's QEMU has no virtio-mem-pci device (use DIMM or AUTO)",
                ));
            }
            other => other,
        };
        if chosen == MemoryHotplug::Dimm {
            check_dimm_range("spec.maxMemory", memory, max_memory)?;
        }
        Ok(chosen)
    }
}

/// pc-dimm memory comes in Linux memory blocks: the hotplug range must be made of them.
pub fn check_dimm_range(field: &str, memory: u64, max_memory: u64) -> Result<(), FieldError> {
    let block = crate::hotplug::DIMM_BLOCK;
    if !(max_memory - memory.min(max_memory)).is_multiple_of(block) {
        return Err(FieldError::new(
            field,
            format!(
                "with pc-dimm hotplug, maxMemory must exceed memory by a multiple of {}",
                format_bytes(block)
            ),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    #[default]
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Boot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Disk {
    pub name: String,
    pub path: PathBuf,
    /// `None` until the image header has been read (see [`crate::host::image`]).
    pub format: Option<DiskFormat>,
    #[serde(default)]
    pub read_only: bool,
    /// A disk the agent makes (and deletes with the VM); None for a file given by path. Its
    /// `path` is empty until the VM is registered, and the file exists once the VM started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made: Option<Made>,
    /// Boot priority, 1 first; 0: not in the boot order.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub boot_order: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What the agent makes a disk from: an overlay on an image, or a blank disk of `size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Made {
    pub image: Option<ImageRef>,
    /// Virtual size in bytes; with an image, None means the image's own.
    pub size: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    pub name: String,
    pub backend: NetworkBackend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkBackend {
    /// QEMU's user-mode networking (SLIRP): NAT inside QEMU, no node setup.
    User,
    /// A tap on the node's bridge (see `crate::network`).
    Bridge,
}

/// Checks a DNS-1123 label: what Kubernetes accepts as a name, and safe in paths and argv.
pub fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !name.starts_with('-') && !name.ends_with('-');
    if name.is_empty() {
        Err(FieldError::new(field, "must not be empty"))
    } else if name.len() > 63 {
        Err(FieldError::new(field, "must be at most 63 characters"))
    } else if !ok_chars || !ok_ends {
        Err(FieldError::new(
            field,
            format!(
                "{name:?} is not a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
            ),
        ))
    } else {
        Ok(())
    }
}

/// Checks the shape of a host path before it is resolved: absolute, no `..`, and none of the
/// characters QEMU's option syntax gives a meaning to.
pub fn check_path_shape(field: &str, path: &str) -> Result<PathBuf, FieldError> {
    if path.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if let Some(c) = path
        .chars()
        .find(|c| matches!(c, ',' | '=') || c.is_control())
    {
        return Err(FieldError::new(
            field,
            format!("{path:?} contains {c:?}, which is not allowed in paths"),
        ));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(FieldError::new(
            field,
            format!("{path:?} must be an absolute path"),
        ));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(FieldError::new(
            field,
            format!("{path:?} must not contain '..'"),
        ));
    }
    Ok(p.to_path_buf())
}

/// The kernel command line goes to QEMU's `-append`, which takes its value whole (no option
/// parsing), so `=` and `,` are fine there; control characters and overlong lines are not.
pub(crate) fn check_cmdline(cmdline: &str) -> Result<(), FieldError> {
    const FIELD: &str = "spec.boot.cmdline";
    if cmdline.len() > MAX_CMDLINE {
        return Err(FieldError::new(
            FIELD,
            format!("is {} bytes, the limit is {MAX_CMDLINE}", cmdline.len()),
        ));
    }
    if let Some(c) = cmdline.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(FieldError::new(
            FIELD,
            format!("contains {c:?}; only printable ASCII is allowed"),
        ));
    }
    Ok(())
}

/// Parses a memory quantity that must be a whole number of MiB and at least [`MIN_MEMORY`].
pub fn parse_memory(field: &str, value: &str) -> Result<u64, FieldError> {
    let bytes = parse_bytes(value).map_err(|e| FieldError::new(field, e.to_string()))?;
    if bytes % (1 << 20) != 0 {
        return Err(FieldError::new(
            field,
            format!("{value:?} must be a whole number of MiB"),
        ));
    }
    if bytes > MAX_MEMORY {
        return Err(FieldError::new(
            field,
            format!(
                "{value:?} is above the maximum of {}",
                format_bytes(MAX_MEMORY)
            ),
        ));
    }
    if bytes < MIN_MEMORY {
        return Err(FieldError::new(
            field,
            format!(
                "{value:?} is below the minimum of {}",
                format_bytes(MIN_MEMORY)
            ),
        ));
    }
    Ok(bytes)
}

pub(crate) fn check_unique<'a>(
    what: &str,
    names: impl Iterator<Item = &'a String>,
) -> Result<(), FieldError> {
    let mut seen = std::collections::BTreeSet::new();
    for (i, n) in names.enumerate() {
        if !seen.insert(n) {
            return Err(FieldError::new(
                format!("spec.{what}[{i}].name"),
                format!("{n:?} is used twice"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hypersdk_proto::agent::v1 as pb;

    /// The smallest valid spec, for other modules' unit tests.
    pub fn minimal(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            cpus: 1,
            max_cpus: 1,
            memory: 64 << 20,
            max_memory: 64 << 20,
            boot: Some(Boot {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
            }),
            firmware: Firmware::Bios,
            disks: vec![],
            networks: vec![],
            labels: Default::default(),
            restart_policy: Default::default(),
            memory_hotplug: Default::default(),
            high_availability: false,
            cloud_init: None,
        }
    }

    pub fn valid() -> pb::VmSpec {
        pb::VmSpec {
            name: "vm-1".into(),
            cpus: 1,
            max_cpus: 4,
            memory: "512Mi".into(),
            max_memory: "2Gi".into(),
            boot: Some(pb::Boot {
                kernel: "/images/vmlinuz".into(),
                initrd: "/images/initrd.img".into(),
                cmdline: "console=ttyS0 quiet".into(),
            }),
            disks: vec![pb::Disk {
                name: "root".into(),
                path: "/images/disk.qcow2".into(),
                ..Default::default()
            }],
            networks: vec![pb::Network {
                name: "default".into(),
                backend: Some(pb::network::Backend::User(pb::UserNetwork {})),
            }],
            labels: Default::default(),
            restart_policy: pb::RestartPolicy::Always as i32,
            memory_hotplug: pb::MemoryHotplug::Auto as i32,
            high_availability: true,
            cloud_init: None,
            firmware: pb::Firmware::Unspecified as i32,
        }
    }

    fn field_of(mutate: impl FnOnce(&mut pb::VmSpec)) -> String {
        let mut s = valid();
        mutate(&mut s);
        VmSpec::try_from(s).expect_err("should be rejected").field
    }

    #[test]
    fn accepts_a_valid_spec_and_round_trips() {
        let spec = VmSpec::try_from(valid()).unwrap();
        assert_eq!(spec.memory, 512 << 20);
        assert_eq!(spec.max_memory, 2 << 30);
        assert_eq!(spec.max_cpus, 4);
        let again = VmSpec::try_from(pb::VmSpec::from(&spec)).unwrap();
        assert_eq!(spec, again);
    }

    #[test]
    fn memory_hotplug_resolves_to_what_qemu_has() {
        use MemoryHotplug::*;
        let (mib, gib) = (1 << 20, 1 << 30);
        assert_eq!(Auto.resolve(512 * mib, gib, true), Ok(VirtioMem));
        assert_eq!(Auto.resolve(512 * mib, gib, false), Ok(Dimm));
        assert_eq!(Dimm.resolve(512 * mib, gib, true), Ok(Dimm));
        assert_eq!(
            VirtioMem.resolve(512 * mib, gib, false).unwrap_err().field,
            "spec.memoryHotplug"
        );
        let e = Dimm.resolve(512 * mib, 514 * mib, true).unwrap_err();
        assert_eq!(e.field, "spec.maxMemory");
        assert!(e.message.contains("multiple of 128Mi"), "{e}");
        assert_eq!(Auto.resolve(512 * mib, 512 * mib, false), Ok(Dimm));
    }

    #[test]
    fn defaults_max_to_the_current_size() {
        let mut s = valid();
        s.max_cpus = 0;
        s.max_memory = String::new();
        let spec = VmSpec::try_from(s).unwrap();
        assert_eq!((spec.max_cpus, spec.max_memory), (1, 512 << 20));
    }

    #[test]
    fn names_the_field_that_is_wrong() {
        assert_eq!(field_of(|s| s.name = "My_VM".into()), "spec.name");
        assert_eq!(field_of(|s| s.name = "-a".into()), "spec.name");
        assert_eq!(field_of(|s| s.name = "a".repeat(64)), "spec.name");
        assert_eq!(field_of(|s| s.name = String::new()), "spec.name");
        assert_eq!(field_of(|s| s.cpus = 0), "spec.cpus");
        assert_eq!(field_of(|s| s.cpus = 5), "spec.cpus");
        assert_eq!(field_of(|s| s.max_cpus = 1000), "spec.maxCpus");
        assert_eq!(field_of(|s| s.memory = "8XB".into()), "spec.memory");
        assert_eq!(field_of(|s| s.memory = "".into()), "spec.memory");
        assert_eq!(field_of(|s| s.memory = "1000000".into()), "spec.memory");
        assert_eq!(field_of(|s| s.memory = "4Gi".into()), "spec.memory");
        assert_eq!(field_of(|s| s.memory = "1Mi".into()), "spec.memory");
        assert_eq!(field_of(|s| s.max_memory = "16Ei".into()), "spec.maxMemory");
        assert_eq!(field_of(|s| s.max_memory = "lots".into()), "spec.maxMemory");
        assert_eq!(
            field_of(|s| s.boot.as_mut().unwrap().kernel = "vmlinuz".into()),
            "spec.boot.kernel"
        );
        assert_eq!(
            field_of(|s| s.boot.as_mut().unwrap().kernel = "/images/../etc/shadow".into()),
            "spec.boot.kernel"
        );
        assert_eq!(
            field_of(|s| s.boot.as_mut().unwrap().kernel = "/images/a,b".into()),
            "spec.boot.kernel"
        );
        assert_eq!(
            field_of(|s| s.boot.as_mut().unwrap().kernel = String::new()),
            "spec.boot.kernel"
        );
        assert_eq!(field_of(|s| s.firmware = 7), "spec.firmware");
        assert_eq!(
            field_of(|s| {
                s.boot = None;
                s.disks.clear();
            }),
            "spec.disks"
        );
        assert_eq!(
            field_of(|s| s.boot.as_mut().unwrap().initrd = "/i/x=y".into()),
            "spec.boot.initrd"
        );
        assert_eq!(
            field_of(|s| s.boot.as_mut().unwrap().cmdline = "a\nb".into()),
            "spec.boot.cmdline"
        );
        assert_eq!(
            field_of(|s| s.disks[0].path = "/images/../../etc/passwd".into()),
            "spec.disks[0].path"
        );
        assert_eq!(
            field_of(|s| s.disks[0].path = "/images/d,file=x".into()),
            "spec.disks[0].path"
        );
        assert_eq!(
            field_of(|s| s.disks[0].name = "Root".into()),
            "spec.disks[0].name"
        );
        assert_eq!(field_of(|s| s.disks[0].format = 7), "spec.disks[0].format");
        assert_eq!(field_of(|s| s.restart_policy = 9), "spec.restartPolicy");
        assert_eq!(field_of(|s| s.memory_hotplug = 9), "spec.memoryHotplug");
        assert_eq!(
            field_of(|s| s.disks.push(s.disks[0].clone())),
            "spec.disks[1].name"
        );
    }

    #[test]
    fn without_a_kernel_the_firmware_boots_the_disk() {
        let mut s = valid();
        s.boot = None;
        s.firmware = pb::Firmware::Uefi as i32;
        let spec = VmSpec::try_from(s.clone()).unwrap();
        assert_eq!((spec.boot.as_ref(), spec.firmware), (None, Firmware::Uefi));
        assert_eq!(VmSpec::try_from(pb::VmSpec::from(&spec)).unwrap(), spec);
        s.boot = Some(pb::Boot::default());
        s.firmware = pb::Firmware::Unspecified as i32;
        let spec = VmSpec::try_from(s).unwrap();
        assert_eq!((spec.boot, spec.firmware), (None, Firmware::Bios));
    }

    #[test]
    fn specs_saved_before_firmware_boot_still_load() {
        let saved = r#"{"name":"a","cpus":1,"maxCpus":1,"memory":67108864,"maxMemory":67108864,
            "boot":{"kernel":"/k","initrd":null,"cmdline":""}}"#;
        let spec: VmSpec = serde_json::from_str(saved).unwrap();
        assert_eq!(spec.boot.unwrap().kernel, Path::new("/k"));
        assert_eq!(spec.firmware, Firmware::Bios);
    }

    #[test]
    fn kernel_cmdline_may_hold_equals_and_commas() {
        let mut s = valid();
        s.boot.as_mut().unwrap().cmdline = "console=ttyS0,115200 root=/dev/vda".into();
        assert!(VmSpec::try_from(s).is_ok());
    }
}
