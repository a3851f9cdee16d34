//! Resize benchmark: time from asking for a new size to the guest reporting it (through its
//! guest agent), for vCPUs and memory (virtio-mem and pc-dimm), through the agent and by raw QMP on a raw QEMU with the
//! same command line, in the same run. Prints medians and ratios.
//!
//! Run with `scripts/bench.sh resize`. `BENCH_N` sets the rounds (default 5).

use std::path::Path;
use std::time::{Duration, Instant};

use hypersdk_agent::firmware::Loader;
use hypersdk_agent::host::accel::Accel;
use hypersdk_agent::hotplug;
use hypersdk_agent::qemu::qga::Qga;
use hypersdk_agent::qemu::qmp::Qmp;
use hypersdk_agent::spec::argv::{self, VmFiles};
use hypersdk_agent::spec::{DiskFormat, MemoryHotplug, VmSpec};
use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;

const MIB: u64 = 1 << 20;

/// A raw QEMU and direct QMP and guest-agent connections to it.
struct Raw {
    child: tokio::process::Child,
    qmp: Qmp,
    qga: Qga,
}

impl Raw {
    async fn start(spec: &VmSpec, dir: &Path, accel: Accel) -> Raw {
        std::fs::create_dir_all(dir).unwrap();
        let files = VmFiles::in_dir(dir);
        let child = tokio::process::Command::new("qemu-system-x86_64")
            .args(argv::build(spec, &files, accel, &Loader::SeaBios))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let qmp = loop {
            if let Ok(q) = Qmp::connect(&files.qmp_socket).await {
                break q;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let mut qga = Qga::connect(&files.qga_socket).await.unwrap();
        while qga.sync(Duration::from_millis(300)).await.is_err() {}
        Raw { child, qmp, qga }
    }

    /// Polls the guest agent until the guest has `cpus` online vCPUs and `memory` MiB in blocks.
    async fn until_guest_has(&mut self, cpus: u32, memory: u64) {
        loop {
            let v = self
                .qga
                .execute(qapi::qga::guest_get_vcpus {}, Duration::from_secs(2))
                .await
                .unwrap();
            let b = self
                .qga
                .execute(
                    qapi::qga::guest_get_memory_blocks {},
                    Duration::from_secs(2),
                )
                .await
                .unwrap();
            let online_cpus = v.iter().filter(|c| c.online).count() as u32;
            let online_mib = b.iter().filter(|b| b.online).count() as u64 * 128;
            if online_cpus == cpus && online_mib == memory {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let n = bench_rounds(5);
    let agent = Agent::for_bench("bench-resize").await;
    let mut c = agent.client().await;
    let (accel, node) = agent_accel(&mut c).await;
    println!("resize benchmark: N={n}, accelerator {}", node.accelerator);

    // Two VMs on each side: virtio-mem memory (with the vCPU steps), and pc-dimm memory.
    let modes = [
        ("flex", MemoryHotplug::VirtioMem),
        ("flex-dimm", MemoryHotplug::Dimm),
    ];
    let mut raws = vec![];
    for (name, mode) in modes {
        let sized = |name: &str| {
            let mut spec = agent.guest_spec(name);
            // Under TCG a QEMU process can start only maxCpus vCPUs in its life: one per round,
            // plus one.
            spec.max_cpus = n as u32 + 1;
            spec.memory = "512Mi".into();
            spec.max_memory = "1Gi".into();
            spec
        };
        let mut spec = sized(name);
        let mut raw_spec = VmSpec::try_from(sized(&format!("{name}-raw"))).unwrap();
        raw_spec.memory_hotplug = mode;
        raw_spec.disks[0].format = Some(DiskFormat::Qcow2);
        spec.memory_hotplug = pb::VmSpec::from(&raw_spec).memory_hotplug;
        create(&mut c, spec, true).await;
        wait_vm(&mut c, name, Duration::from_secs(120), "guest view", |s| {
            s.guest_cpus == 1
        })
        .await;
        let mut raw = Raw::start(&raw_spec, &agent.dir.path().join(&raw_spec.name), accel).await;
        raw.until_guest_has(1, 512).await;
        raws.push(raw);
    }

    // (label, VM, cpus, memory MiB) in order; each round goes up and back down.
    let steps: [(&str, usize, u32, u64); 6] = [
        ("vCPU 1 → 2", 0, 2, 512),
        ("vCPU 2 → 1", 0, 1, 512),
        ("virtio-mem 512Mi → 1Gi", 0, 1, 1024),
        ("virtio-mem 1Gi → 512Mi", 0, 1, 512),
        ("pc-dimm 512Mi → 1Gi", 1, 1, 1024),
        ("pc-dimm 1Gi → 512Mi", 1, 1, 512),
    ];
    let mut ours = vec![vec![]; steps.len()];
    let mut theirs = vec![vec![]; steps.len()];
    for _ in 0..n {
        for (i, &(_, vm, cpus, mib)) in steps.iter().enumerate() {
            let t = Instant::now();
            let req = pb::ResizeVmRequest {
                name: modes[vm].0.into(),
                cpus: Some(cpus),
                memory: Some(format!("{mib}Mi")),
            };
            c.resize_vm(req).await.unwrap();
            ours[i].push(t.elapsed());

            let raw = &mut raws[vm];
            let t = Instant::now();
            hotplug::set_cpus(&raw.qmp, cpus, &mut None).await.unwrap();
            hotplug::set_memory(&raw.qmp, modes[vm].1, 1024 * MIB, mib * MIB)
                .await
                .unwrap();
            raw.until_guest_has(cpus, mib).await;
            theirs[i].push(t.elapsed());
        }
    }
    println!(
        "\n{:<24} {:>12} {:>12} {:>8}",
        "median (ms)", "raw QMP", "agent", "ratio"
    );
    for (i, (label, ..)) in steps.iter().enumerate() {
        let (r, a) = (median(theirs[i].clone()), median(ours[i].clone()));
        println!("{label:<24} {r:>12.1} {a:>12.1} {:>8.2}", a / r);
    }
    for mut raw in raws {
        let _ = raw.qmp.execute(qapi::qmp::quit {}).await;
        let _ = raw.child.wait().await;
    }
}
