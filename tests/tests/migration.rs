//! Live migration between two real agents on this machine (loopback, shared image directory),
//! each with its own data dir and node name, moving the real test guest.

use std::time::{Duration, Instant};

use hypersdk_agent::qemu::process;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::Address;
use hypersdk_tests::*;

const MIB: u64 = 1 << 20;

fn sizes(vm: &pb::Vm) -> (u32, u64, u32) {
    let s = vm.status.as_ref().unwrap();
    (s.cpus, s.memory_bytes / MIB, s.guest_cpus)
}

fn report(what: &str, progress: &[pb::MigrationProgress]) {
    let p = progress.last().unwrap();
    println!(
        "{what}: {:?} in {} ms, downtime {} ms (QEMU {} ms), {} MiB sent, {} passes, {} updates",
        p.phase(),
        p.elapsed_ms,
        p.downtime_ms,
        p.qemu_downtime_ms,
        p.transferred_bytes / MIB,
        p.iterations,
        progress.len()
    );
}

/// How long a migration of the test guest may take, from the call to the guest running on
/// the target (bounds the wait only).
const MOVE: Duration = Duration::from_secs(180);

/// Watches `name` arrive on the target agent behind `client`: the main-thread priority of its
/// QEMU while it loads the state (None if never seen loading), and its pid once it runs.
async fn watch_arrival(client: &mut Client, name: &str) -> (Option<i32>, u32) {
    let mut loading = None;
    let pid = eventually(MOVE, &format!("{name} running on the target"), async || {
        let vm = client.get_vm(pb::GetVmRequest { name: name.into() }).await;
        let vm = vm.map_err(|e| e.to_string())?.into_inner();
        match (phase(&vm), vm.status.as_ref().unwrap().pid) {
            (pb::VmPhase::Running, pid) => Ok(pid),
            (pb::VmPhase::Incoming, pid) if pid > 0 => {
                loading = loading.or(process::priority(pid).ok());
                Err(format!("loading at {loading:?}"))
            }
            (other, _) => Err(format!("{other:?}")),
        }
    })
    .await;
    (loading, pid)
}

/// Whether this process, and so the agent it starts, may raise a priority (CAP_SYS_NICE).
fn may_raise_priority() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    caps & (1 << CAP_SYS_NICE) != 0
}

/// A running guest moves with its memory, disk, vCPUs and hot-plugged memory; the guest never
/// reboots and keeps counting; afterwards only the target has it.
#[tokio::test(flavor = "multi_thread")]
async fn idle_and_busy_guests_move_without_a_reboot() {
    let src = Agent::start("mig-a").await;
    let dst = Agent::peer_of(&src, "mig-b", &[]).await;
    let mut a = src.client().await;
    let mut b = dst.client().await;

    let mut idle = src.guest_spec("idle");
    idle.max_memory = "512Mi".into();
    let mut busy = src.guest_spec("busy");
    busy.boot.as_mut().unwrap().cmdline += " hypersdk.dirty_mib=64";
    create(&mut a, idle, true).await;
    create(&mut a, busy, true).await;
    for name in ["idle", "busy"] {
        wait_vm(&mut a, name, Duration::from_secs(90), "guest agent", |s| {
            s.agent_connected
        })
        .await;
    }
    // The idle guest is resized first: the target must recreate the plugged vCPU and memory.
    resize_to(&mut a, "idle", 2, "384Mi").await;

    for name in ["idle", "busy"] {
        let before = get(&mut a, name).await;
        let memory = before.status.as_ref().unwrap().memory_bytes;
        let counter = current_counter(&before, Duration::from_secs(60)).await;
        let t = Instant::now();
        // The idle guest moves by the gRPC call, the busy one by hyperctl (its JSON figures).
        let figures = if name == "idle" {
            let mut arriving = dst.client().await;
            let (progress, (loading, pid)) = tokio::join!(
                migrate(&mut a, name, &dst.address, Default::default()),
                watch_arrival(&mut arriving, name)
            );
            let progress = progress.unwrap();
            report(name, &progress);
            // The receiving QEMU loads at a raised priority where the agent may raise one
            // (as root), else at the agent's own, and says why; it runs the guest at the
            // agent's own priority.
            if may_raise_priority() {
                assert_eq!(loading, Some(process::LOADING_NICE));
            } else {
                assert_eq!(loading, Some(process::own_priority()));
                let log = dst.agent_log();
                assert!(log.contains("runs at normal priority"), "{log}");
            }
            assert!(
                process::thread_priorities(pid)
                    .unwrap()
                    .iter()
                    .all(|n| *n == process::own_priority()),
                "{:?}",
                process::thread_priorities(pid)
            );
            assert!(
                progress
                    .iter()
                    .any(|p| p.phase() == pb::MigrationPhase::Active),
                "progress was streamed"
            );
            progress.last().unwrap().clone()
        } else {
            hyperctl_migrate(&src, name, &dst)
        };
        println!("{name}: migrated in {:?}: {figures:?}", t.elapsed());
        assert_plausible_migration(&figures, memory, t.elapsed());
        assert_eq!(figures.source_node, "mig-a");
        assert_eq!(figures.target_node, "mig-b");

        // Only the target has it now, running, with the same guest.
        assert!(
            list(&mut a)
                .await
                .iter()
                .all(|v| v.spec.as_ref().unwrap().name != name)
        );
        assert_eq!(
            a.get_vm(pb::GetVmRequest { name: name.into() })
                .await
                .unwrap_err()
                .code(),
            tonic::Code::NotFound
        );
        assert!(qemu_pids_under(&src.data_dir().join("vms").join(name)).is_empty());
        let moved = get(&mut b, name).await;
        assert_eq!(phase(&moved), pb::VmPhase::Running);
        assert_eq!(moved.status.as_ref().unwrap().node_name, "mig-b");
        wait_counter_above(&moved, counter, Duration::from_secs(60)).await;
        let log = serial(&moved);
        assert_eq!(
            count_markers(&log, READY_MARKER),
            0,
            "the guest rebooted:\n{log}"
        );
        let counters = all_counters(&log);
        assert!(
            counters[0] >= counter,
            "counter went back: {counter} then {counters:?}"
        );
        assert!(
            counters.windows(2).all(|w| w[1] == w[0] + 1),
            "{counters:?}"
        );
    }

    // The plugged vCPU and memory came along, the guest still sees them, and the vCPU can be
    // unplugged on the target (it kept its device id).
    let idle = wait_vm(&mut b, "idle", Duration::from_secs(60), "guest view", |s| {
        s.guest_cpus == 2
    })
    .await;
    assert_eq!(sizes(&idle), (2, 384, 2));
    resize_to(&mut b, "idle", 1, "384Mi").await;

    // A migration that cannot finish in time (a busy guest over a 2 MiB/s cap, 6 s timeout): the
    // agent lifts the cap and throttles the guest, and it completes (back to the source) before
    // the cancel at twice the timeout, with room to spare on a loaded machine.
    let memory = get(&mut b, "busy").await.status.unwrap().memory_bytes;
    let t = Instant::now();
    let progress = migrate(
        &mut b,
        "busy",
        &src.address,
        pb::MigrationOptions {
            bandwidth_bytes_per_second: Some(2 * MIB),
            completion_timeout_seconds: Some(6),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    report("busy, capped, 6 s timeout", &progress);
    assert!(
        progress
            .iter()
            .any(|p| p.phase() == pb::MigrationPhase::Throttling),
        "no escalation seen"
    );
    assert_plausible_migration(progress.last().unwrap(), memory, t.elapsed());
    assert!(progress.last().unwrap().elapsed_ms >= 6000);

    // Disk writes went on across both moves: after a reboot, the guest reads back a counter at
    // least as high as any it printed before.
    let back = get(&mut a, "busy").await;
    let seen = current_counter(&back, Duration::from_secs(60)).await;
    let from = serial(&back).len();
    let restarted = a
        .restart_vm(pb::RestartVmRequest {
            name: "busy".into(),
            timeout_seconds: 30,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    wait_boots(&restarted, 1, Duration::from_secs(60)).await;
    let disk = disk_counter_at_boot(&restarted, from, Duration::from_secs(60)).await;
    assert!(
        disk >= seen,
        "disk counter {disk} < {seen} printed on the target"
    );
}

/// Migrates by `hyperctl vm migrate --wait -o json`; returns the figures it printed.
fn hyperctl_migrate(src: &Agent, name: &str, dst: &Agent) -> pb::MigrationProgress {
    let out = std::process::Command::new(bin("hyperctl"))
        .env("HYPERSDK_AGENT", src.address.to_string())
        .args(["vm", "migrate", name, "--to", &dst.address.to_string()])
        .args([
            "--max-downtime",
            "50ms",
            "--multifd",
            "4",
            "--wait",
            "-o",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let number = |field: &str| {
        figures[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} in {figures}"))
    };
    let text = |field: &str| figures[field].as_str().unwrap_or_default().to_string();
    let phase = pb::MigrationPhase::from_str_name(&format!(
        "MIGRATION_PHASE_{}",
        text("phase").to_uppercase()
    ))
    .unwrap_or_else(|| panic!("phase in {figures}"));
    pb::MigrationProgress {
        vm: text("vm"),
        phase: phase as i32,
        message: text("message"),
        source_node: text("sourceNode"),
        target_node: text("targetNode"),
        transferred_bytes: number("transferredBytes"),
        total_bytes: number("totalBytes"),
        elapsed_ms: number("totalTimeMs"),
        downtime_ms: number("downtimeMs") as u32,
        qemu_downtime_ms: number("qemuDowntimeMs") as u32,
        ..Default::default()
    }
}

async fn resize_to(c: &mut Client, name: &str, cpus: u32, memory: &str) {
    c.resize_vm(pb::ResizeVmRequest {
        name: name.into(),
        cpus: Some(cpus),
        memory: Some(memory.into()),
    })
    .await
    .unwrap_or_else(|e| panic!("resize {name}: {e}"));
}

/// A slow migration (bandwidth capped) that the test interrupts while memory is being copied.
async fn start_slow(c: &mut Client, target: &Address) -> tonic::Streaming<pb::MigrationProgress> {
    let mut stream = c
        .migrate_vm(pb::MigrateVmRequest {
            name: "stay".into(),
            target: target.to_string(),
            options: Some(pb::MigrationOptions {
                bandwidth_bytes_per_second: Some(4 * MIB),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(p) = stream.message().await.unwrap() {
        if p.phase() == pb::MigrationPhase::Active && p.transferred_bytes > 0 {
            return stream;
        }
        assert!(!migration_is_final(&p), "ended early: {p:?}");
    }
    panic!("stream ended before the copy began");
}

fn migration_is_final(p: &pb::MigrationProgress) -> bool {
    matches!(
        p.phase(),
        pb::MigrationPhase::Completed | pb::MigrationPhase::Failed | pb::MigrationPhase::Cancelled
    )
}

async fn rest(mut stream: tonic::Streaming<pb::MigrationProgress>) -> Vec<pb::MigrationProgress> {
    let mut all = Vec::new();
    while let Some(p) = stream.message().await.unwrap() {
        all.push(p);
    }
    all
}

/// The VM is still here, Running, and its guest keeps counting.
async fn still_running_here(c: &mut Client, pid: u32) {
    let vm = wait_vm(c, "stay", Duration::from_secs(60), "Running", |s| {
        s.phase == pb::VmPhase::Running as i32
    })
    .await;
    assert_eq!(
        vm.status.as_ref().unwrap().pid,
        pid,
        "the source QEMU was replaced"
    );
    wait_counting(&vm, Duration::from_secs(60)).await;
}

/// Nothing of the VM is left on the target.
async fn nothing_on(target: &Agent) {
    let mut c = target.client().await;
    eventually(Duration::from_secs(60), "target cleaned up", async || {
        qemu_pids_under(target.dir.path()).is_empty()
    })
    .await;
    assert!(list(&mut c).await.is_empty(), "{:?}", list(&mut c).await);
}

/// Migrating "stay" to `target` fails up front with a message holding every needle.
async fn refused_by(a: &mut Client, target: &Agent, needles: &[&str]) {
    let p = migrate(a, "stay", &target.address, Default::default())
        .await
        .unwrap();
    let (ended, why) = final_phase(&p);
    assert_eq!(ended, pb::MigrationPhase::Failed);
    assert!(needles.iter().all(|n| why.contains(n)), "{why}");
    nothing_on(target).await;
}

/// Every way a migration can fail leaves the VM running at the source, says why, and leaves
/// nothing behind on the target.
#[tokio::test(flavor = "multi_thread")]
async fn failed_migrations_leave_the_vm_running() {
    let src = Agent::start("fail-src").await;
    let mut a = src.client().await;
    let mut spec = src.guest_spec("stay");
    spec.boot.as_mut().unwrap().cmdline += " hypersdk.dirty_mib=32";
    create(&mut a, spec, true).await;
    let vm = wait_vm(
        &mut a,
        "stay",
        Duration::from_secs(90),
        "guest agent",
        |s| s.agent_connected,
    )
    .await;
    let pid = vm.status.as_ref().unwrap().pid;

    // Unreachable target.
    let nowhere: Address = "http://127.0.0.1:9".parse().unwrap();
    let p = migrate(&mut a, "stay", &nowhere, Default::default())
        .await
        .unwrap();
    let (ended, why) = final_phase(&p);
    assert_eq!(ended, pb::MigrationPhase::Failed);
    assert!(why.contains("cannot reach target agent"), "{why}");
    still_running_here(&mut a, pid).await;

    // A target that cannot see the disks, and one with too little memory: refused up front.
    let blind = Agent::start("fail-blind").await;
    refused_by(
        &mut a,
        &blind,
        &["target agent refused", "outside the allowed directories"],
    )
    .await;
    drop(blind);
    let small = Agent::peer_of(&src, "fail-small", &["--allocatable-memory", "128Mi"]).await;
    refused_by(&mut a, &small, &["spec.memory", "does not fit"]).await;
    drop(small);
    still_running_here(&mut a, pid).await;

    let mut dst = Agent::peer_of(&src, "fail-dst", &[]).await;

    // Cancelled on request; other requests are refused while it runs.
    let stream = start_slow(&mut a, &dst.address).await;
    let busy = a
        .resize_vm(pb::ResizeVmRequest {
            name: "stay".into(),
            cpus: Some(2),
            memory: None,
        })
        .await
        .unwrap_err();
    assert!(busy.message().contains("Migrating"), "{busy}");
    let stop = a
        .stop_vm(pb::StopVmRequest {
            name: "stay".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stop.code(), tonic::Code::FailedPrecondition);
    assert_eq!(phase(&get(&mut a, "stay").await), pb::VmPhase::Migrating);
    a.cancel_migration(pb::CancelMigrationRequest {
        name: "stay".into(),
    })
    .await
    .unwrap();
    let p = rest(stream).await;
    assert_eq!(final_phase(&p).0, pb::MigrationPhase::Cancelled, "{p:?}");
    still_running_here(&mut a, pid).await;
    nothing_on(&dst).await;

    // The target's QEMU dies mid-copy.
    let stream = start_slow(&mut a, &dst.address).await;
    let victims = qemu_pids_under(dst.dir.path());
    assert_eq!(victims.len(), 1, "{victims:?}");
    for pid in victims {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    let p = rest(stream).await;
    let (ended, why) = final_phase(&p);
    assert_eq!(ended, pb::MigrationPhase::Failed, "{p:?}");
    println!("target QEMU killed: {why}");
    still_running_here(&mut a, pid).await;
    nothing_on(&dst).await;

    // The target agent dies mid-copy; when it comes back it removes the half-arrived VM.
    let stream = start_slow(&mut a, &dst.address).await;
    dst.kill_agent(nix::sys::signal::Signal::SIGKILL);
    let t = Instant::now();
    let p = rest(stream).await;
    let (ended, why) = final_phase(&p);
    assert_eq!(ended, pb::MigrationPhase::Failed, "{p:?}");
    assert!(why.contains("target agent"), "{why}");
    println!("target agent killed: noticed in {:?}: {why}", t.elapsed());
    still_running_here(&mut a, pid).await;
    dst.respawn().await;
    nothing_on(&dst).await;

    // After all that, a migration still works.
    let memory = get(&mut a, "stay").await.status.unwrap().memory_bytes;
    let t = Instant::now();
    let p = migrate(&mut a, "stay", &dst.address, Default::default())
        .await
        .unwrap();
    report("after failures", &p);
    assert_plausible_migration(p.last().unwrap(), memory, t.elapsed());
    let mut b = dst.client().await;
    assert_eq!(phase(&get(&mut b, "stay").await), pb::VmPhase::Running);
}
