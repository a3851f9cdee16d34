//! Resizing a running VM: vCPUs by `device_add`/`device_del` on QEMU's hotpluggable CPU slots,
//! memory by the virtio-mem device's `requested-size` or by pc-dimm devices (for guests without
//! a virtio-mem driver). Planning is pure; [`set_cpus`] and [`set_memory`] talk QMP.

use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use qapi::qmp;
use qapi::qmp::HotpluggableCPU;

use crate::qemu::qmp::QmpError;
use crate::quantity::format_bytes;

mod apply;
pub use apply::{memory, plug_dimm, request_virtio_mem, set_cpus, set_memory};

/// The virtio-mem device (and, with `-mem`, its memory backend) of VMs with maxMemory > memory.
pub const VMEM_ID: &str = "vmem0";
/// virtio-mem's block size on x86: requested sizes are multiples of it.
pub const VMEM_BLOCK: u64 = 2 << 20;
/// Linux's memory block size on x86-64: DIMMs are made of whole blocks, or the guest could not
/// use all of them.
pub const DIMM_BLOCK: u64 = 128 << 20;
/// At most this many DIMM slots; QEMU reserves 1 GiB of guest address space per slot.
const MAX_DIMMS: u64 = 32;
/// How long the guest may take to release a vCPU or memory before we report it refused.
const GUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A size the running VM cannot take, found before QEMU is touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("only {free} vCPU slots are free")]
    NoFreeSlots { free: usize },
    #[error("cannot go below the {boot} vCPUs the VM was started with")]
    BelowBootCpus { boot: usize },
    #[error(
        "under TCG this QEMU process can start only {left} more vCPU(s): QEMU does not reuse \
         the translation context of an unplugged vCPU; stop and start the VM to reset"
    )]
    TcgCpuStarts { left: u32 },
    #[error(
        "cannot go below the {} the VM was started with (stop it to shrink further)",
        format_bytes(*base)
    )]
    BelowBootMemory { base: u64 },
    #[error("exceeds maxMemory by {}", format_bytes(*over))]
    AboveMaxMemory { over: u64 },
    #[error("must change in steps of {}", format_bytes(VMEM_BLOCK))]
    NotVirtioMemBlocks,
    #[error(
        "with pc-dimm hotplug memory changes by whole DIMMs of {}: {} is not reachable",
        format_bytes(*dimm),
        format_bytes(*want)
    )]
    NotWholeDimms { dimm: u64, want: u64 },
    #[error("the VM has no hotplug memory (its maxMemory equals memory)")]
    NoHotplugMemory,
}

/// Why a running VM did not reach the size asked for.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("QEMU runs {running} vCPUs after {GUEST_TIMEOUT:?}, {want} were asked")]
    CpuCount { running: u32, want: u32 },
    #[error("the guest did not release {id} within {GUEST_TIMEOUT:?}")]
    CpuNotReleased { id: String },
    #[error(
        "the guest did not release {id} within {GUEST_TIMEOUT:?} (its memory may be in use); \
         it stays plugged"
    )]
    DimmNotReleased { id: String },
    #[error(
        "the guest has {} of hotplug memory after {GUEST_TIMEOUT:?}, {} was asked",
        format_bytes(*plugged),
        format_bytes(*want)
    )]
    VirtioMemShort { plugged: u64, want: u64 },
}

#[derive(Debug, Clone)]
pub enum CpuChange {
    Add(qmp::device_add),
    Remove { id: String },
}

/// (socket, core, thread) of a slot of `query-hotpluggable-cpus`.
pub fn position(slot: &HotpluggableCPU) -> (i64, i64, i64) {
    let p = &slot.props;
    (
        p.socket_id.unwrap_or(0),
        p.core_id.unwrap_or(0),
        p.thread_id.unwrap_or(0),
    )
}

/// `device_add` for a vCPU in a free slot: the slot's properties; its id names the slot.
pub fn add_args(slot: &HotpluggableCPU) -> qmp::device_add {
    let (socket, core, thread) = position(slot);
    let props = serde_json::to_value(&slot.props).ok();
    qmp::device_add {
        driver: slot.type_.clone(),
        id: Some(format!("vcpu-s{socket}c{core}t{thread}")),
        bus: None,
        arguments: props
            .and_then(|p| p.as_object().cloned())
            .unwrap_or_default(),
    }
}

/// The steps from the slots' current state to `want` vCPUs. Only vCPUs added by hotplug
/// (under /machine/peripheral) can be removed; the ones the VM booted with stay.
pub fn plan_cpus(slots: &[HotpluggableCPU], want: u32) -> Result<Vec<CpuChange>, PlanError> {
    let plugged = slots.iter().filter(|s| s.qom_path.is_some()).count() as u32;
    if want >= plugged {
        let mut free: Vec<_> = slots.iter().filter(|s| s.qom_path.is_none()).collect();
        free.sort_by_key(|s| position(s));
        if free.len() < (want - plugged) as usize {
            return Err(PlanError::NoFreeSlots { free: free.len() });
        }
        return Ok(free[..(want - plugged) as usize]
            .iter()
            .map(|s| CpuChange::Add(add_args(s)))
            .collect());
    }
    let mut removable: Vec<_> = slots
        .iter()
        .filter_map(|s| {
            let id = s
                .qom_path
                .as_deref()?
                .strip_prefix("/machine/peripheral/")?;
            Some((position(s), id))
        })
        .collect();
    removable.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    let remove = (plugged - want) as usize;
    if removable.len() < remove {
        return Err(PlanError::BelowBootCpus {
            boot: plugged as usize - removable.len(),
        });
    }
    Ok(removable[..remove]
        .iter()
        .map(|(_, id)| CpuChange::Remove { id: id.to_string() })
        .collect())
}

/// Refuses `adds` vCPU starts where the process can do fewer (see [`set_cpus`]).
pub fn check_adds(adds: usize, adds_left: Option<u32>) -> Result<(), PlanError> {
    match adds_left {
        Some(left) if adds > left as usize => Err(PlanError::TcgCpuStarts { left }),
        _ => Ok(()),
    }
}

/// virtio-mem `requested-size` for `want` bytes in all, given boot memory and the device's region.
pub fn virtio_mem_size(base: u64, region: u64, want: u64) -> Result<u64, PlanError> {
    check_floor(base, want)?;
    let size = want - base;
    if size > region {
        return Err(PlanError::AboveMaxMemory {
            over: size - region,
        });
    }
    if !size.is_multiple_of(VMEM_BLOCK) {
        return Err(PlanError::NotVirtioMemBlocks);
    }
    Ok(size)
}

/// The size of each DIMM for a hotplug range: one memory block, doubled until at most
/// [`MAX_DIMMS`] of them span the range. The last DIMM takes what is left.
pub fn dimm_size(range: u64) -> u64 {
    let mut size = DIMM_BLOCK;
    while range.div_ceil(size) > MAX_DIMMS {
        size *= 2;
    }
    size
}

/// DIMM slots on the command line for a hotplug range.
pub fn dimm_slots(range: u64) -> u64 {
    range.div_ceil(dimm_size(range))
}

#[derive(Debug, Clone, PartialEq)]
pub enum DimmChange {
    Add(pb::Dimm),
    Remove(u32),
}

/// The DIMMs to plug or unplug to go from `plugged` to `want` bytes in all. DIMMs are added in
/// slot order and removed newest first, so the sizes reachable are boot memory plus whole DIMMs.
pub fn plan_dimms(
    base: u64,
    range: u64,
    plugged: &[pb::Dimm],
    want: u64,
) -> Result<Vec<DimmChange>, PlanError> {
    check_floor(base, want)?;
    if want > base + range {
        return Err(PlanError::AboveMaxMemory {
            over: want - base - range,
        });
    }
    let size = dimm_size(range);
    let mut total = base + plugged.iter().map(|d| d.size_bytes).sum::<u64>();
    let mut plan = Vec::new();
    if want >= total {
        for slot in 0..dimm_slots(range) as u32 {
            if total >= want {
                break;
            }
            if plugged.iter().all(|d| d.slot != slot) {
                let size_bytes = size.min(range - u64::from(slot) * size);
                total += size_bytes;
                plan.push(DimmChange::Add(pb::Dimm { slot, size_bytes }));
            }
        }
    } else {
        let mut newest: Vec<_> = plugged.iter().collect();
        newest.sort_by_key(|d| std::cmp::Reverse(d.slot));
        for d in newest {
            if total <= want {
                break;
            }
            total -= d.size_bytes;
            plan.push(DimmChange::Remove(d.slot));
        }
    }
    if total != want {
        return Err(PlanError::NotWholeDimms { dimm: size, want });
    }
    Ok(plan)
}

fn check_floor(base: u64, want: u64) -> Result<(), PlanError> {
    if want < base {
        return Err(PlanError::BelowBootMemory { base });
    }
    Ok(())
}

/// The memory of a running QEMU, from `query-memory-size-summary` and `query-memory-devices`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Memory {
    /// Boot memory.
    pub base: u64,
    /// The virtio-mem device's region, requested size and plugged size.
    pub vmem_region: u64,
    pub vmem_requested: u64,
    pub vmem_plugged: u64,
    /// Our DIMMs ("dimm<slot>").
    pub dimms: Vec<pb::Dimm>,
}

pub fn parse_memory(summary: &qmp::MemoryInfo, devices: &[qmp::MemoryDeviceInfo]) -> Memory {
    let mut m = Memory {
        base: summary.base_memory,
        ..Memory::default()
    };
    for d in devices {
        match d {
            qmp::MemoryDeviceInfo::virtio_mem(v) if v.data.id.as_deref() == Some(VMEM_ID) => {
                m.vmem_region = v.data.max_size;
                m.vmem_requested = v.data.requested_size;
                m.vmem_plugged = v.data.size;
            }
            qmp::MemoryDeviceInfo::dimm(d) => {
                let slot = d.data.id.as_deref().and_then(|id| id.strip_prefix("dimm"));
                if let Some(slot) = slot.and_then(|n| n.parse().ok()) {
                    m.dimms.push(pb::Dimm {
                        slot,
                        size_bytes: u64::try_from(d.data.size).unwrap_or(0),
                    });
                }
            }
            _ => {}
        }
    }
    m.dimms.sort_by_key(|d| d.slot);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// As QEMU 10 answers for `-smp 1,maxcpus=3` with one vCPU hot-added.
    fn slots() -> Vec<HotpluggableCPU> {
        serde_json::from_value(json!([
            {"props": {"core-id": 2, "thread-id": 0, "node-id": 0, "socket-id": 0}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
            {"props": {"core-id": 1, "thread-id": 0, "node-id": 0, "socket-id": 0}, "vcpus-count": 1,
             "qom-path": "/machine/peripheral/vcpu-s0c1t0", "type": "max-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0}, "vcpus-count": 1,
             "qom-path": "/machine/unattached/device[0]", "type": "max-x86_64-cpu"}
        ]))
        .unwrap()
    }

    #[test]
    fn adds_into_free_slots_in_order() {
        let plan = plan_cpus(&slots(), 3).unwrap();
        let [CpuChange::Add(args)] = &plan[..] else {
            panic!("{plan:?}")
        };
        assert_eq!(
            serde_json::to_value(args).unwrap(),
            json!({"driver": "max-x86_64-cpu", "id": "vcpu-s0c2t0", "socket-id": 0, "core-id": 2, "thread-id": 0, "node-id": 0})
        );
        assert!(plan_cpus(&slots(), 2).unwrap().is_empty());
        assert_eq!(
            plan_cpus(&slots(), 4).unwrap_err(),
            PlanError::NoFreeSlots { free: 1 }
        );
    }

    #[test]
    fn removes_only_hotplugged_vcpus() {
        let plan = plan_cpus(&slots(), 1).unwrap();
        assert!(
            matches!(&plan[..], [CpuChange::Remove { id }] if id == "vcpu-s0c1t0"),
            "{plan:?}"
        );
        let e = plan_cpus(&slots(), 0).unwrap_err();
        assert_eq!(e, PlanError::BelowBootCpus { boot: 1 });
        assert!(e.to_string().contains("cannot go below the 1 vCPUs"), "{e}");
    }

    #[test]
    fn tcg_limits_vcpu_starts_per_process() {
        assert!(check_adds(1, None).is_ok());
        assert!(check_adds(1, Some(1)).is_ok());
        let e = check_adds(1, Some(0)).unwrap_err();
        assert_eq!(e, PlanError::TcgCpuStarts { left: 0 });
        assert!(e.to_string().contains("under TCG"), "{e}");
        assert!(check_adds(0, Some(0)).is_ok(), "removing is free");
    }

    #[test]
    fn virtio_mem_sizes() {
        let mib = 1 << 20;
        assert_eq!(
            virtio_mem_size(512 * mib, 512 * mib, 1024 * mib),
            Ok(512 * mib)
        );
        assert_eq!(
            virtio_mem_size(512 * mib, 512 * mib, 768 * mib),
            Ok(256 * mib)
        );
        assert_eq!(virtio_mem_size(512 * mib, 512 * mib, 512 * mib), Ok(0));
        assert_eq!(
            virtio_mem_size(512 * mib, 512 * mib, 256 * mib),
            Err(PlanError::BelowBootMemory { base: 512 * mib })
        );
        assert_eq!(
            virtio_mem_size(512 * mib, 512 * mib, 2048 * mib),
            Err(PlanError::AboveMaxMemory { over: 1024 * mib })
        );
        let e = virtio_mem_size(512 * mib, 512 * mib, 513 * mib).unwrap_err();
        assert_eq!(e, PlanError::NotVirtioMemBlocks);
        assert_eq!(e.to_string(), "must change in steps of 2Mi");
    }

    fn dimm(slot: u32, mib: u64) -> pb::Dimm {
        pb::Dimm {
            slot,
            size_bytes: mib << 20,
        }
    }

    #[test]
    fn dimm_sizes_keep_slots_few() {
        let mib = 1 << 20;
        assert_eq!(
            (dimm_size(512 * mib), dimm_slots(512 * mib)),
            (128 * mib, 4)
        );
        assert_eq!((dimm_size(4 << 30), dimm_slots(4 << 30)), (128 * mib, 32));
        assert_eq!((dimm_size(5 << 30), dimm_slots(5 << 30)), (256 * mib, 20));
        // 384 MiB in 256 MiB DIMMs would be rare (ranges above 4 GiB), but the last one is smaller.
        assert_eq!(dimm_slots((4 << 30) + 384 * mib), 18);
    }

    #[test]
    fn dimms_plug_in_order_and_unplug_newest_first() {
        let mib = 1 << 20;
        let (base, range) = (512 * mib, 512 * mib);
        let grow = plan_dimms(base, range, &[], 1024 * mib).unwrap();
        assert_eq!(
            grow,
            (0..4)
                .map(|s| DimmChange::Add(dimm(s, 128)))
                .collect::<Vec<_>>()
        );
        let all: Vec<_> = (0..4).map(|s| dimm(s, 128)).collect();
        assert_eq!(
            plan_dimms(base, range, &all, 768 * mib).unwrap(),
            [DimmChange::Remove(3), DimmChange::Remove(2)]
        );
        // A gap left by an earlier unplug is filled first.
        let gap = [dimm(0, 128), dimm(2, 128)];
        assert_eq!(
            plan_dimms(base, range, &gap, 896 * mib).unwrap(),
            [DimmChange::Add(dimm(1, 128))]
        );
        assert_eq!(plan_dimms(base, range, &gap, 768 * mib).unwrap(), []);
        for (want, needle) in [
            (700, "whole DIMMs of 128Mi"),
            (1100, "exceeds maxMemory"),
            (256, "cannot go below the 512Mi"),
        ] {
            let e = plan_dimms(base, range, &all, want * mib).unwrap_err();
            assert!(e.to_string().contains(needle), "{want}: {e}");
        }
        assert_eq!(
            plan_dimms(base, range, &all, 700 * mib),
            Err(PlanError::NotWholeDimms {
                dimm: 128 * mib,
                want: 700 * mib
            })
        );
    }

    #[test]
    fn reads_virtio_mem_and_dimms() {
        let summary = serde_json::from_value(
            json!({"base-memory": 536870912u64, "plugged-memory": 268435456u64}),
        )
        .unwrap();
        let reported = |id: &str, slot, size: u64| {
            json!({"type": "dimm", "data": {"id": id, "slot": slot, "size": size, "addr": 0,
                   "memdev": "/objects/x", "node": 0, "hotplugged": true, "hotpluggable": true}})
        };
        let devices: Vec<qmp::MemoryDeviceInfo> = serde_json::from_value(json!([
            reported("dimm1", 0, 134217728),
            reported("dimm0", 1, 134217728),
            reported("other", 2, 1),
            {"type": "virtio-mem", "data": {"id": "vmem0", "max-size": 1073741824u64,
             "requested-size": 4194304u64, "size": 2097152u64, "block-size": 2097152u64,
             "memaddr": 4294967296u64, "memdev": "/objects/vmem0-mem", "node": 0}}
        ]))
        .unwrap();
        let m = parse_memory(&summary, &devices);
        assert_eq!(m.base, 512 << 20);
        assert_eq!(m.dimms, [dimm(0, 128), dimm(1, 128)]);
        assert_eq!(
            (m.vmem_region, m.vmem_requested, m.vmem_plugged),
            (1 << 30, 4 << 20, 2 << 20)
        );
    }
}
