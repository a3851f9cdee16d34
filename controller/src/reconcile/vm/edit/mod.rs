//! Edits of a VM's spec while its node has it: `cpus` and `memory` within what the running VM
//! can reach (its maxCpus / maxMemory) are applied live with ResizeVm; every other change, and a
//! size beyond those maxima, waits for the next start from Stopped (the VM is then made again on
//! its node with the new spec, its disks kept) and is reported meanwhile by the RestartRequired
//! condition naming the fields. Pure: what to do, from the desired and the current agent spec.

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::quantity::parse_bytes;

pub mod apply;

/// What identifies a disk for an edit: name, read-only, image, size, given path.
type DiskKey = (String, bool, Option<String>, Option<u64>, String);

/// What an edit asks of the node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Edit {
    /// A new vCPU count the running VM can take live.
    pub cpus: Option<u32>,
    /// A new memory size the running VM can take live.
    pub memory: Option<String>,
    /// Fields whose change needs a new QEMU, as named in the VirtualMachine.
    pub restart: Vec<&'static str>,
}

impl Edit {
    pub fn live(&self) -> bool {
        self.cpus.is_some() || self.memory.is_some()
    }
}

fn bytes(q: &str) -> Option<u64> {
    (!q.is_empty()).then(|| parse_bytes(q).ok()).flatten()
}

/// The firmware a spec boots with (unspecified is SeaBIOS).
fn firmware(s: &pb::VmSpec) -> pb::Firmware {
    match s.firmware() {
        pb::Firmware::Unspecified => pb::Firmware::Bios,
        f => f,
    }
}

/// What identifies a disk across the controller's spec and the agent's: the path of the disks
/// the agent makes is its own choice, so only given paths count.
fn disk_key(d: &pb::Disk) -> DiskKey {
    let made = d.image.is_some() || !d.size.is_empty();
    let path = if made { String::new() } else { d.path.clone() };
    (
        d.name.clone(),
        d.read_only,
        d.image.as_ref().map(|i| i.source.clone()),
        bytes(&d.size),
        path,
    )
}

fn disks(s: &pb::VmSpec) -> Vec<DiskKey> {
    let mut v: Vec<_> = s.disks.iter().map(disk_key).collect();
    v.sort();
    v
}

fn networks(s: &pb::VmSpec) -> Vec<(String, String)> {
    let mut v: Vec<_> = s
        .networks
        .iter()
        .map(|n| (n.name.clone(), format!("{:?}", n.backend)))
        .collect();
    v.sort();
    v
}

fn cloud_init(s: &pb::VmSpec) -> Option<(&str, &str)> {
    s.cloud_init
        .as_ref()
        .map(|c| (c.user_data.as_str(), c.network_data.as_str()))
}

/// What changes from `current` (the agent's spec, cpus and memory as they are now) to
/// `desired` (built from the VirtualMachine and its template).
pub fn plan(desired: &pb::VmSpec, current: &pb::VmSpec) -> Edit {
    let mut edit = Edit::default();
    let max_cpus = if current.max_cpus == 0 {
        current.cpus
    } else {
        current.max_cpus
    };
    if desired.max_cpus != 0 && desired.max_cpus != max_cpus {
        edit.restart.push("spec.maxCpus");
    }
    if desired.cpus != current.cpus {
        match desired.cpus <= max_cpus {
            true => edit.cpus = Some(desired.cpus),
            false => edit.restart.push("spec.cpus"),
        }
    }
    let memory = bytes(&current.memory);
    let max_memory = bytes(&current.max_memory).or(memory);
    if let Some(want) = bytes(&desired.max_memory)
        && Some(want) != max_memory
    {
        edit.restart.push("spec.maxMemory");
    }
    if let Some(want) = bytes(&desired.memory)
        && Some(want) != memory
    {
        match max_memory.is_some_and(|m| want <= m) {
            true => edit.memory = Some(desired.memory.clone()),
            false => edit.restart.push("spec.memory"),
        }
    }
    let changed = [
        ("spec.boot", desired.boot != current.boot),
        ("spec.firmware", firmware(desired) != firmware(current)),
        ("spec.disks", disks(desired) != disks(current)),
        ("spec.networks", networks(desired) != networks(current)),
        ("spec.cloudInit", cloud_init(desired) != cloud_init(current)),
    ];
    edit.restart
        .extend(changed.into_iter().filter(|(_, c)| *c).map(|(f, _)| f));
    edit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cpus: u32, max_cpus: u32, memory: &str, max_memory: &str) -> pb::VmSpec {
        pb::VmSpec {
            name: "default-web-1".into(),
            cpus,
            max_cpus,
            memory: memory.into(),
            max_memory: max_memory.into(),
            disks: vec![pb::Disk {
                name: "root".into(),
                image: Some(pb::DiskImage {
                    source: "/images/disk.qcow2".into(),
                    checksum: String::new(),
                }),
                size: "10Gi".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// The agent's view: its own path for the disk it made, sizes in its own spelling.
    fn on_agent(mut s: pb::VmSpec) -> pb::VmSpec {
        s.disks[0].path = "/var/lib/hypersdk/images/disks/default-web-1/root.qcow2".into();
        s.disks[0].size = "10737418240".into();
        s.firmware = pb::Firmware::Bios as i32;
        s
    }

    #[test]
    fn the_same_spec_asks_for_nothing() {
        let s = spec(2, 4, "1Gi", "2Gi");
        assert_eq!(plan(&s, &on_agent(s.clone())), Edit::default());
    }

    #[test]
    fn cpus_and_memory_within_the_maxima_are_live() {
        let current = on_agent(spec(2, 4, "1Gi", "2Gi"));
        let edit = plan(&spec(4, 4, "2048Mi", "2Gi"), &current);
        assert_eq!(edit.cpus, Some(4));
        assert_eq!(edit.memory.as_deref(), Some("2048Mi"));
        assert!(edit.restart.is_empty(), "{edit:?}");
        assert!(edit.live());
    }

    #[test]
    fn beyond_the_maxima_and_other_fields_wait_for_a_restart() {
        let current = on_agent(spec(2, 0, "1Gi", ""));
        let mut want = spec(3, 0, "4Gi", "");
        want.disks.push(pb::Disk {
            name: "data".into(),
            size: "5Gi".into(),
            ..Default::default()
        });
        want.firmware = pb::Firmware::Uefi as i32;
        let edit = plan(&want, &current);
        assert!(!edit.live());
        assert_eq!(
            edit.restart,
            ["spec.cpus", "spec.memory", "spec.firmware", "spec.disks"]
        );
        let mut raised = spec(2, 8, "1Gi", "8Gi");
        raised.boot = Some(pb::Boot {
            kernel: "/k".into(),
            ..Default::default()
        });
        let edit = plan(&raised, &current);
        assert_eq!(
            edit.restart,
            ["spec.maxCpus", "spec.maxMemory", "spec.boot"]
        );
    }
}
