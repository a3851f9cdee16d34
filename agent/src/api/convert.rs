//! The gRPC `VmSpec` and the agent's [`VmSpec`]: a request is checked field by field on the way
//! in (every error names its field), and the spec goes out as the API shows it.

use std::path::Path;

use hypersdk_proto::agent::v1 as pb;

use crate::cloudinit::CloudInit;
use crate::image::{ImageRef, Source, parse_image};
use crate::quantity::format_bytes;
use crate::spec::{
    Boot, Disk, DiskFormat, FieldError, Firmware, MAX_VCPUS, Made, MemoryHotplug, Network,
    NetworkBackend, RestartPolicy, VmSpec, check_cmdline, check_name, check_path_shape,
    check_unique, parse_memory,
};

impl TryFrom<pb::VmSpec> for VmSpec {
    type Error = FieldError;

    fn try_from(s: pb::VmSpec) -> Result<Self, FieldError> {
        check_name("spec.name", &s.name)?;
        let (cpus, max_cpus) = cpus(&s)?;
        let (memory, max_memory) = memory(&s)?;
        let boot = boot(s.boot.unwrap_or_default())?;
        let disks = disks(s.disks)?;
        if boot.is_none() && disks.is_empty() {
            return Err(FieldError::new(
                "spec.disks",
                "nothing to boot: no spec.boot.kernel, and no disk for the firmware to boot",
            ));
        }
        let networks = networks(s.networks)?;
        check_labels(&s.labels)?;
        let cloud_init = s
            .cloud_init
            .map(|c| {
                CloudInit::new(
                    c.user_data,
                    c.network_data,
                    &c.instance_id,
                    &c.hostname,
                    &s.name,
                )
            })
            .transpose()?;
        Ok(VmSpec {
            cloud_init,
            restart_policy: restart_policy(s.restart_policy)?,
            memory_hotplug: memory_hotplug(s.memory_hotplug)?,
            high_availability: s.high_availability,
            firmware: firmware(s.firmware)?,
            name: s.name,
            cpus,
            max_cpus,
            memory,
            max_memory,
            boot,
            disks,
            networks,
            labels: s.labels.into_iter().collect(),
        })
    }
}

/// vCPUs and maxCpus (which defaults to the vCPUs).
fn cpus(s: &pb::VmSpec) -> Result<(u32, u32), FieldError> {
    if s.cpus == 0 {
        return Err(FieldError::new("spec.cpus", "must be at least 1"));
    }
    let max_cpus = if s.max_cpus == 0 { s.cpus } else { s.max_cpus };
    if max_cpus > MAX_VCPUS {
        return Err(FieldError::new(
            "spec.maxCpus",
            format!("{max_cpus} is above the limit of {MAX_VCPUS}"),
        ));
    }
    if s.cpus > max_cpus {
        return Err(FieldError::new(
            "spec.cpus",
            format!("{} is more than maxCpus ({max_cpus})", s.cpus),
        ));
    }
    Ok((s.cpus, max_cpus))
}

/// Memory and maxMemory (which defaults to the memory), in bytes.
fn memory(s: &pb::VmSpec) -> Result<(u64, u64), FieldError> {
    if s.memory.is_empty() {
        return Err(FieldError::new("spec.memory", "is required (e.g. 512Mi)"));
    }
    let memory = parse_memory("spec.memory", &s.memory)?;
    let max_memory = if s.max_memory.is_empty() {
        memory
    } else {
        parse_memory("spec.maxMemory", &s.max_memory)?
    };
    if (max_memory - memory.min(max_memory)) % crate::hotplug::VMEM_BLOCK != 0 {
        return Err(FieldError::new(
            "spec.maxMemory",
            "must exceed memory by a multiple of 2Mi (the hotplug block size)",
        ));
    }
    if memory > max_memory {
        return Err(FieldError::new(
            "spec.memory",
            format!("{} is more than maxMemory ({})", s.memory, s.max_memory),
        ));
    }
    Ok((memory, max_memory))
}

/// Direct kernel boot, or `None` (all empty) for firmware boot.
fn boot(boot: pb::Boot) -> Result<Option<Boot>, FieldError> {
    if boot.kernel.is_empty() {
        if boot.initrd.is_empty() && boot.cmdline.is_empty() {
            return Ok(None);
        }
        return Err(FieldError::new(
            "spec.boot.kernel",
            "is required when initrd or cmdline is set (leave all three empty to boot the first disk through the firmware)",
        ));
    }
    let kernel = check_path_shape("spec.boot.kernel", &boot.kernel)?;
    let initrd = match boot.initrd.as_str() {
        "" => None,
        p => Some(check_path_shape("spec.boot.initrd", p)?),
    };
    check_cmdline(&boot.cmdline)?;
    Ok(Some(Boot {
        kernel,
        initrd,
        cmdline: boot.cmdline,
    }))
}

fn firmware(firmware: i32) -> Result<Firmware, FieldError> {
    match pb::Firmware::try_from(firmware) {
        Ok(pb::Firmware::Unspecified | pb::Firmware::Bios) => Ok(Firmware::Bios),
        Ok(pb::Firmware::Uefi) => Ok(Firmware::Uefi),
        Err(_) => Err(FieldError::new(
            "spec.firmware",
            format!("unknown firmware {firmware} (BIOS or UEFI)"),
        )),
    }
}

fn disks(disks: Vec<pb::Disk>) -> Result<Vec<Disk>, FieldError> {
    let disks = disks
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            check_name(&format!("spec.disks[{i}].name"), &d.name)?;
            let made = made(i, &d)?;
            let path = match d.path.as_str() {
                "" if made.is_some() => Default::default(),
                p => check_path_shape(&format!("spec.disks[{i}].path"), p)?,
            };
            Ok(Disk {
                path,
                format: disk_format(i, d.format)?,
                name: d.name,
                read_only: d.read_only,
                made,
                boot_order: d.boot_order,
            })
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    check_unique("disks", disks.iter().map(|d| &d.name))?;
    Ok(disks)
}

/// What the agent makes the disk from, if it makes it: an image and/or a size.
fn made(i: usize, d: &pb::Disk) -> Result<Option<Made>, FieldError> {
    let image = d
        .image
        .as_ref()
        .map(|img| {
            parse_image(
                &format!("spec.disks[{i}].image"),
                &img.source,
                &img.checksum,
            )
        })
        .transpose()?;
    let size = match d.size.as_str() {
        "" => None,
        q => Some(disk_size(&format!("spec.disks[{i}].size"), q)?),
    };
    if image.is_none() && size.is_none() {
        return Ok(None);
    }
    Ok(Some(Made { image, size }))
}

/// A disk's virtual size: a positive quantity in whole 512-byte sectors.
fn disk_size(field: &str, q: &str) -> Result<u64, FieldError> {
    let bytes =
        crate::quantity::parse_bytes(q).map_err(|e| FieldError::new(field, e.to_string()))?;
    if bytes == 0 || !bytes.is_multiple_of(512) {
        return Err(FieldError::new(
            field,
            format!("{q:?} must be a positive whole number of 512-byte sectors (e.g. 10Gi)"),
        ));
    }
    Ok(bytes)
}

fn disk_format(i: usize, format: i32) -> Result<Option<DiskFormat>, FieldError> {
    match pb::DiskFormat::try_from(format) {
        Ok(pb::DiskFormat::Unspecified) => Ok(None),
        Ok(pb::DiskFormat::Qcow2) => Ok(Some(DiskFormat::Qcow2)),
        Ok(pb::DiskFormat::Raw) => Ok(Some(DiskFormat::Raw)),
        Err(_) => Err(FieldError::new(
            format!("spec.disks[{i}].format"),
            format!("unknown format {format}"),
        )),
    }
}

fn networks(networks: Vec<pb::Network>) -> Result<Vec<Network>, FieldError> {
    let networks = networks
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            check_name(&format!("spec.networks[{i}].name"), &n.name)?;
            let backend = match n.backend {
                Some(pb::network::Backend::User(_)) | None => NetworkBackend::User,
                Some(pb::network::Backend::Bridge(_)) => NetworkBackend::Bridge,
            };
            Ok(Network {
                name: n.name,
                backend,
            })
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    check_unique("networks", networks.iter().map(|n| &n.name))?;
    Ok(networks)
}

fn check_labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), FieldError> {
    for (k, v) in labels {
        if k.is_empty()
            || k.len() > 63
            || v.len() > 253
            || k.chars().chain(v.chars()).any(char::is_control)
        {
            return Err(FieldError::new(
                format!("spec.labels[{k:?}]"),
                "keys must be 1-63 and values at most 253 printable characters",
            ));
        }
    }
    Ok(())
}

fn restart_policy(policy: i32) -> Result<RestartPolicy, FieldError> {
    match pb::RestartPolicy::try_from(policy) {
        Ok(pb::RestartPolicy::Always) => Ok(RestartPolicy::Always),
        Ok(pb::RestartPolicy::OnFailure) => Ok(RestartPolicy::OnFailure),
        Ok(pb::RestartPolicy::Never | pb::RestartPolicy::Unspecified) => Ok(RestartPolicy::Never),
        Err(_) => Err(FieldError::new(
            "spec.restartPolicy",
            format!("unknown policy {policy}"),
        )),
    }
}

fn memory_hotplug(mode: i32) -> Result<MemoryHotplug, FieldError> {
    match pb::MemoryHotplug::try_from(mode) {
        Ok(pb::MemoryHotplug::Auto) => Ok(MemoryHotplug::Auto),
        Ok(pb::MemoryHotplug::VirtioMem) => Ok(MemoryHotplug::VirtioMem),
        Ok(pb::MemoryHotplug::Dimm) => Ok(MemoryHotplug::Dimm),
        Err(_) => Err(FieldError::new(
            "spec.memoryHotplug",
            format!("unknown value {mode}"),
        )),
    }
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl From<&VmSpec> for pb::VmSpec {
    fn from(s: &VmSpec) -> Self {
        pb::VmSpec {
            name: s.name.clone(),
            cpus: s.cpus,
            max_cpus: s.max_cpus,
            memory: format_bytes(s.memory),
            max_memory: format_bytes(s.max_memory),
            boot: s.boot.as_ref().map(|b| pb::Boot {
                kernel: path_string(&b.kernel),
                initrd: b.initrd.as_deref().map(path_string).unwrap_or_default(),
                cmdline: b.cmdline.clone(),
            }),
            disks: s.disks.iter().map(disk).collect(),
            networks: s
                .networks
                .iter()
                .map(|n| pb::Network {
                    name: n.name.clone(),
                    backend: Some(match n.backend {
                        NetworkBackend::User => pb::network::Backend::User(pb::UserNetwork {}),
                        NetworkBackend::Bridge => {
                            pb::network::Backend::Bridge(pb::BridgeNetwork {})
                        }
                    }),
                })
                .collect(),
            labels: s.labels.clone().into_iter().collect(),
            restart_policy: match s.restart_policy {
                RestartPolicy::Always => pb::RestartPolicy::Always,
                RestartPolicy::OnFailure => pb::RestartPolicy::OnFailure,
                RestartPolicy::Never => pb::RestartPolicy::Never,
            } as i32,
            memory_hotplug: match s.memory_hotplug {
                MemoryHotplug::Auto => pb::MemoryHotplug::Auto,
                MemoryHotplug::VirtioMem => pb::MemoryHotplug::VirtioMem,
                MemoryHotplug::Dimm => pb::MemoryHotplug::Dimm,
            } as i32,
            high_availability: s.high_availability,
            cloud_init: s.cloud_init.as_ref().map(|c| pb::CloudInit {
                user_data: c.user_data.clone(),
                network_data: c.network_data.clone().unwrap_or_default(),
                instance_id: c.instance_id.clone(),
                hostname: c.hostname.clone(),
            }),
            firmware: match s.firmware {
                Firmware::Bios => pb::Firmware::Bios,
                Firmware::Uefi => pb::Firmware::Uefi,
            } as i32,
        }
    }
}

fn disk(d: &Disk) -> pb::Disk {
    pb::Disk {
        name: d.name.clone(),
        path: path_string(&d.path),
        format: match d.format {
            None => pb::DiskFormat::Unspecified,
            Some(DiskFormat::Qcow2) => pb::DiskFormat::Qcow2,
            Some(DiskFormat::Raw) => pb::DiskFormat::Raw,
        } as i32,
        read_only: d.read_only,
        image: d.made.as_ref().and_then(|m| m.image.as_ref()).map(image),
        size: d
            .made
            .as_ref()
            .and_then(|m| m.size)
            .map(format_bytes)
            .unwrap_or_default(),
        boot_order: d.boot_order,
    }
}

fn image(i: &ImageRef) -> pb::DiskImage {
    pb::DiskImage {
        source: match &i.source {
            Source::Url(u) => u.clone(),
            Source::Path(p) => path_string(p),
        },
        checksum: i
            .checksum
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default(),
    }
}
