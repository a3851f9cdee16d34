//! Resizing a running VM over QMP, by the plans of [`crate::hotplug`]: vCPUs added and removed,
//! DIMMs plugged and unplugged, the virtio-mem device's size requested; each waits for the
//! guest where QEMU reports its part.

use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use qapi::qmp;
use serde_json::json;

use super::{
    CpuChange, DimmChange, GUEST_TIMEOUT, HotplugError, Memory, PlanError, VMEM_ID, check_adds,
    parse_memory, plan_cpus, plan_dimms, virtio_mem_size,
};
use crate::qemu::qmp::{Qmp, QmpError};
use crate::spec::MemoryHotplug;

/// Sets the vCPU count of a running VM. A vCPU removal waits for the guest to release it.
///
/// `adds_left` is the number of vCPUs this QEMU process can still start, where that is limited:
/// under TCG, QEMU gives every vCPU thread it ever starts a translation context of its own and
/// never reuses one after an unplug; past `maxCpus` starts it aborts. `None`: no limit (KVM).
pub async fn set_cpus(
    qmp: &Qmp,
    want: u32,
    adds_left: &mut Option<u32>,
) -> Result<(), HotplugError> {
    let slots = qmp.execute(qmp::query_hotpluggable_cpus {}).await?;
    let plan = plan_cpus(&slots, want)?;
    let adds = plan
        .iter()
        .filter(|c| matches!(c, CpuChange::Add(_)))
        .count();
    check_adds(adds, *adds_left)?;
    for change in plan {
        match change {
            CpuChange::Add(args) => {
                qmp.execute(args).await?;
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
        let running = qmp.execute(qmp::query_cpus_fast {}).await?.len() as u32;
        if running == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(HotplugError::CpuCount { running, want });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `device_del`, then wait until the slot is free: the guest must agree to the unplug. (QEMU
/// signals a vCPU's removal only by DEVICE_DELETED for its lapic child, so the slot list is
/// the reliable witness.)
async fn remove_cpu(qmp: &Qmp, id: &str) -> Result<(), HotplugError> {
    qmp.execute(qmp::device_del { id: id.into() }).await?;
    let path = format!("/machine/peripheral/{id}");
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        let slots = qmp.execute(qmp::query_hotpluggable_cpus {}).await?;
        if !slots
            .iter()
            .any(|s| s.qom_path.as_deref() == Some(path.as_str()))
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(HotplugError::CpuNotReleased { id: id.into() });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn memory(qmp: &Qmp) -> Result<Memory, QmpError> {
    let summary = qmp.execute(qmp::query_memory_size_summary {}).await?;
    let devices = qmp.execute(qmp::query_memory_devices {}).await?;
    Ok(parse_memory(&summary, &devices))
}

/// Sets the memory of a running VM to `want` bytes and waits until the guest has taken or
/// released it.
pub async fn set_memory(
    qmp: &Qmp,
    mode: MemoryHotplug,
    max_memory: u64,
    want: u64,
) -> Result<(), HotplugError> {
    let now = memory(qmp).await?;
    let range = max_memory.saturating_sub(now.base);
    if range == 0 && want != now.base {
        return Err(PlanError::NoHotplugMemory.into());
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
pub async fn plug_dimm(qmp: &Qmp, d: &pb::Dimm) -> Result<(), QmpError> {
    let id = format!("dimm{}", d.slot);
    let backend = format!("{id}-mem");
    let ram = json!({"qom-type": "memory-backend-ram", "id": backend, "size": d.size_bytes});
    qmp.execute_json::<qmp::object_add>(ram).await?;
    let dimm = json!({"driver": "pc-dimm", "id": id, "memdev": backend});
    if let Err(e) = qmp.execute_json::<qmp::device_add>(dimm).await {
        let _ = qmp.execute(qmp::object_del { id: backend }).await;
        return Err(e);
    }
    Ok(())
}

/// `device_del`, wait until the guest has offlined and ejected the DIMM, then free its RAM.
async fn unplug_dimm(qmp: &Qmp, slot: u32) -> Result<(), HotplugError> {
    let id = format!("dimm{slot}");
    qmp.execute(qmp::device_del { id: id.clone() }).await?;
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    while memory(qmp).await?.dimms.iter().any(|d| d.slot == slot) {
        if tokio::time::Instant::now() > deadline {
            return Err(HotplugError::DimmNotReleased { id });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    qmp.execute(qmp::object_del {
        id: format!("{id}-mem"),
    })
    .await?;
    Ok(())
}

/// Sets the virtio-mem device's `requested-size`; the guest plugs or unplugs blocks to match.
pub async fn request_virtio_mem(qmp: &Qmp, size: u64) -> Result<(), QmpError> {
    let set = qmp::qom_set {
        path: format!("/machine/peripheral/{VMEM_ID}"),
        property: "requested-size".into(),
        value: size.into(),
    };
    qmp.execute(set).await?;
    Ok(())
}

async fn set_virtio_mem(qmp: &Qmp, now: &Memory, want: u64) -> Result<(), HotplugError> {
    let size = virtio_mem_size(now.base, now.vmem_region, want)?;
    request_virtio_mem(qmp, size).await?;
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        let plugged = memory(qmp).await?.vmem_plugged;
        if plugged == size {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(HotplugError::VirtioMemShort {
                plugged,
                want: size,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
