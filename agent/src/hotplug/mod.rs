//! Resizing a running VM: vCPUs by `device_add`/`device_del` on QEMU's hotpluggable CPU slots,
//! memory by the virtio-mem device's `requested-size` or by pc-dimm devices (for guests without
//! a virtio-mem driver). Planning is pure; [`set_cpus`] and [`set_memory`] talk QMP.

use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use serde_json::{Map, Value, json};

use crate::qemu::qmp::Qmp;
use crate::quantity::format_bytes;
use crate::spec::MemoryHotplug;

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

/// One entry of `query-hotpluggable-cpus`.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSlot {
    pub driver: String,
    pub props: Map<String, Value>,
    /// Set when a vCPU occupies the slot.
    pub qom_path: Option<String>,
}

pub fn parse_slots(reply: &Value) -> Vec<CpuSlot> {
    reply
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| CpuSlot {
            driver: s["type"].as_str().unwrap_or_default().to_string(),
            props: s["props"].as_object().cloned().unwrap_or_default(),
            qom_path: s["qom-path"].as_str().map(String::from),
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub enum CpuChange {
    Add { args: Value },
    Remove { id: String },
}

fn prop(slot: &CpuSlot, key: &str) -> i64 {
    slot.props.get(key).and_then(Value::as_i64).unwrap_or(0)
}

/// (socket, core, thread) of a slot.
pub fn position(slot: &CpuSlot) -> (i64, i64, i64) {
    (
        prop(slot, "socket-id"),
        prop(slot, "core-id"),
        prop(slot, "thread-id"),
    )
}

/// `device_add` arguments for a vCPU in a free slot; its id names the slot.
pub fn add_args(slot: &CpuSlot) -> Value {
    let (socket, core, thread) = position(slot);
    let mut args = slot.props.clone();
    args.insert("driver".into(), json!(slot.driver));
    args.insert(
        "id".into(),
        json!(format!("vcpu-s{socket}c{core}t{thread}")),
    );
    Value::Object(args)
}

/// The steps from the slots' current state to `want` vCPUs. Only vCPUs added by hotplug
/// (under /machine/peripheral) can be removed; the ones the VM booted with stay.
pub fn plan_cpus(slots: &[CpuSlot], want: u32) -> Result<Vec<CpuChange>, String> {
    let plugged = slots.iter().filter(|s| s.qom_path.is_some()).count() as u32;
    if want >= plugged {
        let mut free: Vec<_> = slots.iter().filter(|s| s.qom_path.is_none()).collect();
        free.sort_by_key(|s| position(s));
        if free.len() < (want - plugged) as usize {
            return Err(format!("only {} vCPU slots are free", free.len()));
        }
        return Ok(free[..(want - plugged) as usize]
            .iter()
            .map(|s| CpuChange::Add { args: add_args(s) })
            .collect());
    }
    let mut removable: Vec<_> = slots
        .iter()
        .filter(|s| {
            s.qom_path
                .as_deref()
                .is_some_and(|p| p.starts_with("/machine/peripheral/"))
        })
        .collect();
    removable.sort_by_key(|s| std::cmp::Reverse(position(s)));
    let remove = (plugged - want) as usize;
    if removable.len() < remove {
        return Err(format!(
            "cannot go below the {} vCPUs the VM was started with",
            plugged as usize - removable.len()
        ));
    }
    Ok(removable[..remove]
        .iter()
        .map(|s| CpuChange::Remove {
            id: s
                .qom_path
                .as_deref()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string(),
        })
        .collect())
}

/// Refuses a plan that would start more vCPUs than the process can (see [`set_cpus`]).
pub fn check_adds(plan: &[CpuChange], adds_left: Option<u32>) -> Result<(), String> {
    let adds = plan
        .iter()
        .filter(|c| matches!(c, CpuChange::Add { .. }))
        .count() as u32;
    match adds_left {
        Some(left) if adds > left => Err(format!(
            "under TCG this QEMU process can start only {left} more vCPU(s): QEMU does not reuse \
             the translation context of an unplugged vCPU; stop and start the VM to reset"
        )),
        _ => Ok(()),
    }
}

/// virtio-mem `requested-size` for `want` bytes in all, given boot memory and the device's region.
pub fn virtio_mem_size(base: u64, region: u64, want: u64) -> Result<u64, String> {
    check_floor(base, want)?;
    let size = want - base;
    if size > region {
        return Err(format!(
            "exceeds maxMemory by {}",
            format_bytes(size - region)
        ));
    }
    if !size.is_multiple_of(VMEM_BLOCK) {
        return Err(format!(
            "must change in steps of {}",
            format_bytes(VMEM_BLOCK)
        ));
    }
    Ok(size)
}

/// Sets the vCPU count of a running VM. A vCPU removal waits for the guest to release it.
///
/// `adds_left` is the number of vCPUs this QEMU process can still start, where that is limited:
/// under TCG, QEMU gives every vCPU thread it ever starts a translation context of its own and
/// never reuses one after an unplug; past `maxCpus` starts it aborts. `None`: no limit (KVM).
pub async fn set_cpus(qmp: &Qmp, want: u32, adds_left: &mut Option<u32>) -> Result<(), String> {
    let slots = qmp
        .execute_value("query-hotpluggable-cpus", json!({}))
        .await
        .map_err(|e| e.to_string())?;
    let plan = plan_cpus(&parse_slots(&slots), want)?;
    check_adds(&plan, *adds_left)?;
    for change in plan {
        match change {
            CpuChange::Add { args } => {
                qmp.execute_value("device_add", args)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Some(left) = adds_left {
                    *left -= 1;
                }
            }
            CpuChange::Remove { id } => remove_cpu(qmp, &id).await?,
        }
    }
    // The vCPU threads come and go a moment after the slots change.
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        let running = qmp
            .execute_value("query-cpus-fast", json!({}))
            .await
            .map_err(|e| e.to_string())?;
        let n = running.as_array().map_or(0, Vec::len) as u32;
        if n == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "QEMU runs {n} vCPUs after {GUEST_TIMEOUT:?}, {want} were asked"
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `device_del`, then wait until the slot is free: the guest must agree to the unplug. (QEMU
/// signals a vCPU's removal only by DEVICE_DELETED for its lapic child, so the slot list is
/// the reliable witness.)
async fn remove_cpu(qmp: &Qmp, id: &str) -> Result<(), String> {
    qmp.execute_value("device_del", json!({ "id": id }))
        .await
        .map_err(|e| e.to_string())?;
    let path = format!("/machine/peripheral/{id}");
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        let slots = qmp
            .execute_value("query-hotpluggable-cpus", json!({}))
            .await
            .map_err(|e| e.to_string())?;
        if !parse_slots(&slots)
            .iter()
            .any(|s| s.qom_path.as_deref() == Some(path.as_str()))
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the guest did not release {id} within {GUEST_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
) -> Result<Vec<DimmChange>, String> {
    check_floor(base, want)?;
    if want > base + range {
        return Err(format!(
            "exceeds maxMemory by {}",
            format_bytes(want - base - range)
        ));
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
        return Err(format!(
            "with pc-dimm hotplug memory changes by whole DIMMs of {}: {} is not reachable",
            format_bytes(size),
            format_bytes(want)
        ));
    }
    Ok(plan)
}

fn check_floor(base: u64, want: u64) -> Result<(), String> {
    if want < base {
        return Err(format!(
            "cannot go below the {} the VM was started with (stop it to shrink further)",
            format_bytes(base)
        ));
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

pub fn parse_memory(summary: &Value, devices: &Value) -> Memory {
    let mut m = Memory {
        base: summary["base-memory"].as_u64().unwrap_or(0),
        ..Memory::default()
    };
    for d in devices.as_array().into_iter().flatten() {
        let data = &d["data"];
        let id = data["id"].as_str().unwrap_or_default();
        let size = data["size"].as_u64().unwrap_or(0);
        match d["type"].as_str() {
            Some("virtio-mem") if id == VMEM_ID => {
                m.vmem_region = data["max-size"].as_u64().unwrap_or(0);
                m.vmem_requested = data["requested-size"].as_u64().unwrap_or(0);
                m.vmem_plugged = size;
            }
            Some("dimm") => {
                if let Some(slot) = id.strip_prefix("dimm").and_then(|n| n.parse().ok()) {
                    m.dimms.push(pb::Dimm {
                        slot,
                        size_bytes: size,
                    });
                }
            }
            _ => {}
        }
    }
    m.dimms.sort_by_key(|d| d.slot);
    m
}

pub async fn memory(qmp: &Qmp) -> Result<Memory, String> {
    let summary = qmp
        .execute_value("query-memory-size-summary", json!({}))
        .await
        .map_err(|e| e.to_string())?;
    let devices = qmp
        .execute_value("query-memory-devices", json!({}))
        .await
        .map_err(|e| e.to_string())?;
    Ok(parse_memory(&summary, &devices))
}

/// Sets the memory of a running VM to `want` bytes and waits until the guest has taken or
/// released it.
pub async fn set_memory(
    qmp: &Qmp,
    mode: MemoryHotplug,
    max_memory: u64,
    want: u64,
) -> Result<(), String> {
    let now = memory(qmp).await?;
    let range = max_memory.saturating_sub(now.base);
    if range == 0 && want != now.base {
        return Err("the VM has no hotplug memory (its maxMemory equals memory)".into());
    }
    if mode != MemoryHotplug::Dimm {
        return set_virtio_mem(qmp, &now, want).await;
    }
    for change in plan_dimms(now.base, range, &now.dimms, want)? {
        match change {
            DimmChange::Add(d) => plug_dimm(qmp, &d).await?,
            DimmChange::Remove(slot) => unplug_dimm(qmp, slot).await?,
        }
    }
    Ok(())
}

/// `object-add` the DIMM's RAM and `device_add` it; the guest onlines it by itself.
pub async fn plug_dimm(qmp: &Qmp, d: &pb::Dimm) -> Result<(), String> {
    let id = format!("dimm{}", d.slot);
    let backend = format!("{id}-mem");
    qmp.execute_value(
        "object-add",
        json!({"qom-type": "memory-backend-ram", "id": backend, "size": d.size_bytes}),
    )
    .await
    .map_err(|e| e.to_string())?;
    let added = qmp
        .execute_value(
            "device_add",
            json!({"driver": "pc-dimm", "id": id, "memdev": backend}),
        )
        .await;
    if let Err(e) = added {
        let _ = qmp
            .execute_value("object-del", json!({"id": backend}))
            .await;
        return Err(e.to_string());
    }
    Ok(())
}

/// `device_del`, wait until the guest has offlined and ejected the DIMM, then free its RAM.
async fn unplug_dimm(qmp: &Qmp, slot: u32) -> Result<(), String> {
    let id = format!("dimm{slot}");
    qmp.execute_value("device_del", json!({ "id": id }))
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    while memory(qmp).await?.dimms.iter().any(|d| d.slot == slot) {
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the guest did not release {id} within {GUEST_TIMEOUT:?} (its memory may be \
                 in use); it stays plugged"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    qmp.execute_value("object-del", json!({"id": format!("{id}-mem")}))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn set_virtio_mem(qmp: &Qmp, now: &Memory, want: u64) -> Result<(), String> {
    let size = virtio_mem_size(now.base, now.vmem_region, want)?;
    let path = format!("/machine/peripheral/{VMEM_ID}");
    qmp.execute_value(
        "qom-set",
        json!({"path": path, "property": "requested-size", "value": size}),
    )
    .await
    .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        let plugged = memory(qmp).await?.vmem_plugged;
        if plugged == size {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the guest has {} of hotplug memory after {GUEST_TIMEOUT:?}, {} was asked",
                format_bytes(plugged),
                format_bytes(size)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As QEMU 10 answers for `-smp 1,maxcpus=3` with one vCPU hot-added.
    fn slots() -> Vec<CpuSlot> {
        parse_slots(&json!([
            {"props": {"core-id": 2, "thread-id": 0, "node-id": 0, "socket-id": 0}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
            {"props": {"core-id": 1, "thread-id": 0, "node-id": 0, "socket-id": 0}, "vcpus-count": 1,
             "qom-path": "/machine/peripheral/vcpu-s0c1t0", "type": "max-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "node-id": 0, "socket-id": 0}, "vcpus-count": 1,
             "qom-path": "/machine/unattached/device[0]", "type": "max-x86_64-cpu"}
        ]))
    }

    #[test]
    fn adds_into_free_slots_in_order() {
        let plan = plan_cpus(&slots(), 3).unwrap();
        assert_eq!(
            plan,
            [CpuChange::Add {
                args: json!({"driver": "max-x86_64-cpu", "id": "vcpu-s0c2t0", "socket-id": 0, "core-id": 2, "thread-id": 0, "node-id": 0})
            }]
        );
        assert_eq!(plan_cpus(&slots(), 2).unwrap(), []);
        assert!(
            plan_cpus(&slots(), 4)
                .unwrap_err()
                .contains("only 1 vCPU slots are free")
        );
    }

    #[test]
    fn removes_only_hotplugged_vcpus() {
        assert_eq!(
            plan_cpus(&slots(), 1).unwrap(),
            [CpuChange::Remove {
                id: "vcpu-s0c1t0".into()
            }]
        );
        let e = plan_cpus(&slots(), 0).unwrap_err();
        assert!(e.contains("cannot go below the 1 vCPUs"), "{e}");
    }

    #[test]
    fn tcg_limits_vcpu_starts_per_process() {
        let plan = plan_cpus(&slots(), 3).unwrap();
        assert!(check_adds(&plan, None).is_ok());
        assert!(check_adds(&plan, Some(1)).is_ok());
        assert!(
            check_adds(&plan, Some(0))
                .unwrap_err()
                .contains("under TCG")
        );
        assert!(
            check_adds(&plan_cpus(&slots(), 1).unwrap(), Some(0)).is_ok(),
            "removing is free"
        );
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
        assert!(
            virtio_mem_size(512 * mib, 512 * mib, 256 * mib)
                .unwrap_err()
                .contains("below")
        );
        assert!(
            virtio_mem_size(512 * mib, 512 * mib, 2048 * mib)
                .unwrap_err()
                .contains("exceeds")
        );
        assert!(
            virtio_mem_size(512 * mib, 512 * mib, 513 * mib)
                .unwrap_err()
                .contains("steps")
        );
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
            assert!(e.contains(needle), "{want}: {e}");
        }
    }

    #[test]
    fn reads_virtio_mem_and_dimms() {
        let m = parse_memory(
            &json!({"base-memory": 536870912u64, "plugged-memory": 268435456u64}),
            &json!([
                {"type": "dimm", "data": {"id": "dimm1", "slot": 0, "size": 134217728u64}},
                {"type": "dimm", "data": {"id": "dimm0", "slot": 1, "size": 134217728u64}},
                {"type": "dimm", "data": {"id": "other", "size": 1}},
                {"type": "virtio-mem", "data": {"id": "vmem0", "max-size": 1073741824u64,
                 "requested-size": 4194304u64, "size": 2097152u64}}
            ]),
        );
        assert_eq!(m.base, 512 << 20);
        assert_eq!(m.dimms, [dimm(0, 128), dimm(1, 128)]);
        assert_eq!(
            (m.vmem_region, m.vmem_requested, m.vmem_plugged),
            (1 << 30, 4 << 20, 2 << 20)
        );
    }
}
