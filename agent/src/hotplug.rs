//! Resizing a running VM: vCPUs by `device_add`/`device_del` on QEMU's hotpluggable CPU slots,
//! memory by the virtio-mem device's `requested-size`. Planning is pure; [`apply`] talks QMP.

use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::qmp::Qmp;
use crate::quantity::format_bytes;

/// The virtio-mem device (and, with `-mem`, its memory backend) of VMs with maxMemory > memory.
pub const VMEM_ID: &str = "vmem0";
/// virtio-mem's block size on x86: requested sizes are multiples of it.
pub const VMEM_BLOCK: u64 = 2 << 20;
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
    if want < base {
        return Err(format!(
            "cannot go below the {} the VM was started with (stop it to shrink further)",
            format_bytes(base)
        ));
    }
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

/// Memory facts of a running VM: (boot memory, virtio-mem region, virtio-mem plugged).
pub async fn memory(qmp: &Qmp) -> Result<(u64, u64, u64), String> {
    let summary = qmp
        .execute_value("query-memory-size-summary", json!({}))
        .await
        .map_err(|e| e.to_string())?;
    let devices = qmp
        .execute_value("query-memory-devices", json!({}))
        .await
        .map_err(|e| e.to_string())?;
    let vmem = devices
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["type"] == "virtio-mem" && d["data"]["id"] == VMEM_ID);
    let get = |v: Option<&Value>, k: &str| v.and_then(|v| v["data"][k].as_u64()).unwrap_or(0);
    Ok((
        summary["base-memory"].as_u64().unwrap_or(0),
        get(vmem, "max-size"),
        get(vmem, "size"),
    ))
}

/// Sets the memory of a running VM to `want` bytes and waits until the guest has it.
pub async fn set_memory(qmp: &Qmp, want: u64) -> Result<(), String> {
    let (base, region, _) = memory(qmp).await?;
    if region == 0 && want != base {
        return Err("the VM has no hotplug memory (its maxMemory equals memory)".into());
    }
    let size = virtio_mem_size(base, region, want)?;
    let path = format!("/machine/peripheral/{VMEM_ID}");
    qmp.execute_value(
        "qom-set",
        json!({"path": path, "property": "requested-size", "value": size}),
    )
    .await
    .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        let (_, _, plugged) = memory(qmp).await?;
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
}
