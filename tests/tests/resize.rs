//! Hotplug resize of a running VM, verified from inside the guest (its agent's report), with
//! the guest counting on throughout; resizing a stopped VM changes its next start.

use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;
use tonic::Code;

const MIB: u64 = 1 << 20;

async fn resize(
    c: &mut Client,
    cpus: Option<u32>,
    memory: Option<&str>,
) -> Result<pb::Vm, tonic::Status> {
    c.resize_vm(pb::ResizeVmRequest {
        name: "elastic".into(),
        cpus,
        memory: memory.map(String::from),
    })
    .await
    .map(|r| r.into_inner())
}

/// (QEMU vCPUs, QEMU MiB, guest vCPUs, guest MiB)
type Sizes = (u32, u64, u32, u64);

fn sizes(vm: &pb::Vm) -> Sizes {
    let s = vm.status.as_ref().unwrap();
    (
        s.cpus,
        s.memory_bytes / MIB,
        s.guest_cpus,
        s.guest_memory_bytes / MIB,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cpus_and_memory_grow_and_shrink_while_running() {
    let agent = Agent::start("node-resize").await;
    let mut c = agent.client().await;
    let mut spec = agent.guest_spec("elastic");
    spec.cpus = 1;
    spec.max_cpus = 3;
    spec.memory = "512Mi".into();
    spec.max_memory = "1Gi".into();
    let vm = create(&mut c, spec, true).await;
    wait_vm(
        &mut c,
        "elastic",
        Duration::from_secs(60),
        "guest agent",
        |s| s.guest_cpus == 1,
    )
    .await;
    let counter = current_counter(&vm, Duration::from_secs(60)).await;

    // (cpus, memory) asked → (QEMU cpus, QEMU MiB, guest cpus, guest MiB) seen
    let steps: [(Option<u32>, Option<&str>, Sizes); 4] = [
        (Some(3), None, (3, 512, 3, 512)),
        (Some(2), None, (2, 512, 2, 512)),
        (None, Some("1Gi"), (2, 1024, 2, 1024)),
        (None, Some("768Mi"), (2, 768, 2, 768)),
    ];
    for (cpus, memory, expected) in steps {
        let t = Instant::now();
        let vm = resize(&mut c, cpus, memory)
            .await
            .unwrap_or_else(|e| panic!("{cpus:?} {memory:?}: {e}"));
        println!(
            "resize cpus={cpus:?} memory={memory:?}: {:?}, guest sees {:?}",
            t.elapsed(),
            sizes(&vm)
        );
        assert_eq!(sizes(&vm), expected);
        assert_eq!(phase(&vm), pb::VmPhase::Running);
    }
    // Growing to 3 again needs a third vCPU start in this process: KVM does it; under TCG QEMU
    // would abort (it never reuses a vCPU's translation context), so the agent refuses.
    let accel = vm.status.as_ref().unwrap().accelerator.clone();
    match (accel.as_str(), resize(&mut c, Some(3), None).await) {
        ("tcg", Err(e)) => assert!(e.message().contains("under TCG"), "{}", e.message()),
        ("kvm", Ok(vm)) => {
            assert_eq!(sizes(&vm).0, 3);
            resize(&mut c, Some(2), None).await.unwrap();
        }
        (a, r) => panic!("{a}: unexpected {r:?}"),
    }
    let now = get(&mut c, "elastic").await;
    assert_eq!((phase(&now), sizes(&now).0), (pb::VmPhase::Running, 2));

    // The guest never stopped: same boot, counter moved on.
    wait_counter_above(&vm, counter, Duration::from_secs(60)).await;
    assert_eq!(count_markers(&serial(&vm), READY_MARKER), 1);

    // Bad input: refused before anything is touched.
    for (cpus, memory, code, needle) in [
        (Some(4), None, Code::InvalidArgument, "maxCpus"),
        (
            Some(0),
            None,
            Code::InvalidArgument,
            "cpus: must be at least 1",
        ),
        (None, Some("2Gi"), Code::InvalidArgument, "maxMemory"),
        (None, Some("lots"), Code::InvalidArgument, "memory"),
        (
            None,
            Some("256Mi"),
            Code::Aborted,
            "cannot go below the 512Mi",
        ),
        (None, None, Code::InvalidArgument, "give at least one"),
    ] {
        let e = resize(&mut c, cpus, memory).await.unwrap_err();
        assert_eq!(e.code(), code, "{cpus:?} {memory:?}: {}", e.message());
        assert!(
            e.message().contains(needle),
            "{cpus:?} {memory:?}: {}",
            e.message()
        );
    }
    let e = c
        .resize_vm(pb::ResizeVmRequest {
            name: "ghost".into(),
            cpus: Some(2),
            memory: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let now = get(&mut c, "elastic").await;
    assert_eq!(
        sizes(&now),
        (2, 768, 2, 768),
        "unchanged by refused requests"
    );

    // The size persists across a stop and start: the VM now boots with it.
    stop(&mut c, "elastic", true).await;
    let stopped = resize(&mut c, Some(3), None).await.unwrap();
    assert_eq!(
        stopped.spec.as_ref().unwrap().cpus,
        3,
        "a stopped VM's spec changes"
    );
    let started = c
        .start_vm(pb::StartVmRequest {
            name: "elastic".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            started.status.as_ref().unwrap().cpus,
            started.status.as_ref().unwrap().memory_bytes / MIB
        ),
        (3, 768)
    );
    let seen = wait_vm(
        &mut c,
        "elastic",
        Duration::from_secs(60),
        "guest sees its size",
        |s| s.guest_cpus == 3,
    )
    .await;
    assert_eq!(sizes(&seen), (3, 768, 3, 768));
}

/// For guests without a virtio-mem driver: pc-dimm memory grows and shrinks by whole DIMMs,
/// the guest onlines and releases them, and a live migration recreates them on the target,
/// where they can be unplugged again.
#[tokio::test(flavor = "multi_thread")]
async fn dimm_memory_grows_shrinks_and_moves() {
    let src = Agent::start("dimm-a").await;
    let dst = Agent::peer_of(&src, "dimm-b", &[]).await;
    let (mut a, mut b) = (src.client().await, dst.client().await);
    let mut spec = src.guest_spec("elastic");
    spec.memory = "512Mi".into();
    spec.max_memory = "1Gi".into();
    spec.memory_hotplug = pb::MemoryHotplug::Dimm as i32;
    let vm = create(&mut a, spec, true).await;
    let pid = vm.status.as_ref().unwrap().pid;
    let argv = String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .unwrap()
        .replace('\0', " ");
    assert!(argv.contains("slots=4,maxmem=1024M"), "{argv}");
    assert!(!argv.contains("virtio-mem"), "{argv}");
    wait_vm(
        &mut a,
        "elastic",
        Duration::from_secs(60),
        "guest agent",
        |s| s.guest_memory_bytes > 0,
    )
    .await;
    let counter = current_counter(&vm, Duration::from_secs(60)).await;

    for (memory, guest_mib) in [("1Gi", 1024), ("768Mi", 768)] {
        let t = Instant::now();
        let vm = resize(&mut a, None, Some(memory))
            .await
            .unwrap_or_else(|e| panic!("{memory}: {e}"));
        println!(
            "dimm resize to {memory}: {:?}, {:?}",
            t.elapsed(),
            sizes(&vm)
        );
        assert_eq!(sizes(&vm), (1, guest_mib, 1, guest_mib));
    }
    let e = resize(&mut a, None, Some("700Mi")).await.unwrap_err();
    assert!(
        e.message().contains("whole DIMMs of 128Mi"),
        "{}",
        e.message()
    );
    assert_eq!(sizes(&get(&mut a, "elastic").await), (1, 768, 1, 768));

    let t = Instant::now();
    let progress = migrate(&mut a, "elastic", &dst.address, Default::default())
        .await
        .unwrap();
    assert_plausible_migration(progress.last().unwrap(), 768 * MIB, t.elapsed());
    let moved = wait_vm(
        &mut b,
        "elastic",
        Duration::from_secs(60),
        "guest agent",
        |s| s.guest_memory_bytes > 0,
    )
    .await;
    assert_eq!(sizes(&moved), (1, 768, 1, 768));
    // The DIMMs plugged on the source exist on the target under the same ids.
    for (memory, guest_mib) in [("512Mi", 512), ("1Gi", 1024)] {
        let vm = resize(&mut b, None, Some(memory))
            .await
            .unwrap_or_else(|e| panic!("on the target, {memory}: {e}"));
        assert_eq!(sizes(&vm), (1, guest_mib, 1, guest_mib));
    }
    wait_counter_above(&moved, counter + 2, Duration::from_secs(60)).await;
    // The target's console has the counter, but no boot.
    assert_eq!(count_markers(&serial(&moved), READY_MARKER), 0, "no reboot");
}
