//! The machine layout both QEMUs of a migration must share: the vCPUs and memory devices
//! plugged since boot, read at the source and replayed at the target (pure).

use crate::migration::IncomingError;
use hypersdk_proto::agent::v1 as pb;
use qapi::qmp;
use qapi::qmp::HotpluggableCPU;

use crate::hotplug::{Memory, dimm_slots, position};
use crate::spec::{FieldError, MemoryHotplug, VmSpec};

/// The layout of a running QEMU: boot vCPUs, hot-added vCPU slots, boot memory, the virtio-mem
/// size and the DIMMs, from `query-hotpluggable-cpus` and [`crate::hotplug::memory`].
pub fn layout(slots: &[HotpluggableCPU], memory: &Memory) -> pb::MachineLayout {
    let hot = |s: &HotpluggableCPU| {
        s.qom_path
            .as_deref()
            .is_some_and(|p| p.starts_with("/machine/peripheral/"))
    };
    let plugged: Vec<_> = slots.iter().filter(|s| s.qom_path.is_some()).collect();
    pb::MachineLayout {
        boot_cpus: plugged.iter().filter(|s| !hot(s)).count() as u32,
        boot_memory_bytes: memory.base,
        hotplugged_cpus: plugged
            .iter()
            .filter(|s| hot(s))
            .map(|s| {
                let (socket, core, thread) = position(s);
                pb::CpuSlot {
                    socket: socket as u32,
                    core: core as u32,
                    thread: thread as u32,
                }
            })
            .collect(),
        virtio_mem_requested_bytes: memory.vmem_requested,
        dimms: memory.dimms.clone(),
    }
}

/// Guest memory in all for a layout (boot, virtio-mem and DIMMs), `None` on overflow.
pub fn layout_memory(l: &pb::MachineLayout) -> Option<u64> {
    l.dimms
        .iter()
        .try_fold(l.boot_memory_bytes, |sum, d| sum.checked_add(d.size_bytes))?
        .checked_add(l.virtio_mem_requested_bytes)
}

/// Checks a layout received from a source agent (or read from a snapshot) against the spec it
/// comes with.
pub fn check_layout(l: &pb::MachineLayout, spec: &VmSpec) -> Result<(), FieldError> {
    let bad = |m: String| Err(FieldError::new("layout", m));
    let cpus = l.boot_cpus as usize + l.hotplugged_cpus.len();
    if l.boot_cpus == 0 || cpus > spec.max_cpus as usize {
        return bad(format!("{cpus} vCPUs do not fit maxCpus {}", spec.max_cpus));
    }
    if l.boot_memory_bytes == 0 || layout_memory(l).is_none_or(|m| m > spec.max_memory) {
        return bad("boot memory plus hotplug memory does not fit maxMemory".into());
    }
    let dimm = spec.memory_hotplug == MemoryHotplug::Dimm;
    if dimm && l.virtio_mem_requested_bytes > 0 || !dimm && !l.dimms.is_empty() {
        return bad(format!(
            "its hotplug memory does not match the spec's {:?}",
            spec.memory_hotplug
        ));
    }
    let slots = dimm_slots(spec.max_memory - l.boot_memory_bytes);
    let mut seen = std::collections::BTreeSet::new();
    for d in &l.dimms {
        if u64::from(d.slot) >= slots || !seen.insert(d.slot) || d.size_bytes == 0 {
            return bad(format!("DIMM slot {} is invalid or repeated", d.slot));
        }
        if !d.size_bytes.is_multiple_of(crate::hotplug::DIMM_BLOCK) {
            return bad(format!(
                "DIMM {} is not made of whole memory blocks",
                d.slot
            ));
        }
    }
    Ok(())
}

/// The `device_add` recreating `want` on a target QEMU's free slot.
pub fn cpu_to_add(
    slots: &[HotpluggableCPU],
    want: &pb::CpuSlot,
) -> Result<qmp::device_add, IncomingError> {
    let wanted = (want.socket.into(), want.core.into(), want.thread.into());
    let slot = slots
        .iter()
        .find(|s| s.qom_path.is_none() && position(s) == wanted)
        .ok_or(IncomingError::NoFreeSlot {
            socket: want.socket,
            core: want.core,
            thread: want.thread,
        })?;
    Ok(crate::hotplug::add_args(slot))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::tests::sent;
    use serde_json::json;

    fn slots() -> Vec<HotpluggableCPU> {
        let slot = |core, qom_path: Option<&str>| {
            json!({"type": "max-x86_64-cpu", "vcpus-count": 1, "qom-path": qom_path,
                   "props": {"socket-id": 0, "core-id": core, "thread-id": 0}})
        };
        serde_json::from_value(json!([
            slot(2, None),
            slot(1, Some("/machine/peripheral/vcpu-s0c1t0")),
            slot(0, Some("/machine/unattached/device[0]")),
        ]))
        .unwrap()
    }

    #[test]
    fn layout_names_boot_and_hot_added_vcpus() {
        let memory = Memory {
            base: 512 << 20,
            vmem_requested: 64 << 20,
            ..Memory::default()
        };
        let l = layout(&slots(), &memory);
        assert_eq!(l.boot_cpus, 1);
        assert_eq!(l.boot_memory_bytes, 512 << 20);
        assert_eq!(
            l.hotplugged_cpus,
            vec![pb::CpuSlot {
                socket: 0,
                core: 1,
                thread: 0
            }]
        );
        let spec = |max_cpus, max_memory, memory_hotplug| VmSpec {
            max_cpus,
            max_memory,
            memory_hotplug,
            ..crate::spec::tests::minimal("vm")
        };
        let vmem = MemoryHotplug::VirtioMem;
        check_layout(&l, &spec(3, 1 << 30, vmem)).unwrap();
        assert!(check_layout(&l, &spec(1, 1 << 30, vmem)).is_err());
        assert!(check_layout(&l, &spec(3, 512 << 20, vmem)).is_err());
        let mut zero = l.clone();
        zero.boot_cpus = 0;
        assert!(check_layout(&zero, &spec(3, 1 << 30, vmem)).is_err());
        let e = check_layout(&l, &spec(3, 1 << 30, MemoryHotplug::Dimm)).unwrap_err();
        assert!(e.message.contains("does not match"), "{e}");

        let dimm = |slot, size_bytes| pb::Dimm { slot, size_bytes };
        let mut dimms = l.clone();
        dimms.virtio_mem_requested_bytes = 0;
        dimms.dimms = vec![dimm(0, 128 << 20), dimm(1, 128 << 20)];
        let with_dimms = spec(3, 1 << 30, MemoryHotplug::Dimm);
        check_layout(&dimms, &with_dimms).unwrap();
        assert_eq!(layout_memory(&dimms), Some(768 << 20));
        for bad in [
            vec![dimm(0, 128 << 20), dimm(0, 128 << 20)],
            vec![dimm(4, 128 << 20)],
            vec![dimm(0, 1 << 20)],
            vec![dimm(0, u64::MAX), dimm(1, u64::MAX)],
        ] {
            dimms.dimms = bad;
            assert!(check_layout(&dimms, &with_dimms).is_err(), "{dimms:?}");
        }
    }

    #[test]
    fn hot_added_vcpus_are_recreated_in_the_same_slot() {
        let args = cpu_to_add(
            &slots(),
            &pb::CpuSlot {
                socket: 0,
                core: 2,
                thread: 0,
            },
        )
        .unwrap();
        assert_eq!(args.id.as_deref(), Some("vcpu-s0c2t0"));
        assert_eq!(sent(&args)["core-id"], 2);
        // Occupied or absent slots are refused.
        for (socket, core) in [(0, 1), (3, 0)] {
            let want = pb::CpuSlot {
                socket,
                core,
                thread: 0,
            };
            let e = cpu_to_add(&slots(), &want).unwrap_err();
            assert!(
                matches!(e, IncomingError::NoFreeSlot { socket: s, core: c, thread: 0 } if (s, c) == (socket, core)),
                "{e}"
            );
        }
    }
}
