//! Start-up benchmark: the test guest started N times through the agent and N times by raw QEMU
//! with the same command line, alternating, in the same run. Prints medians and their ratio,
//! and the agent's and QEMU's memory use.
//!
//! Run with `scripts/bench.sh startup` (release build). `BENCH_N` sets N (default 7).

use std::path::Path;
use std::time::{Duration, Instant};

use hypersdk_agent::firmware::Loader;
use hypersdk_agent::host::accel::Accel;
use hypersdk_agent::qemu::qmp::Qmp;
use hypersdk_agent::spec::VmSpec;
use hypersdk_agent::spec::argv::{self, VmFiles};
use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;

#[derive(Default)]
struct Sample {
    qmp_ready: Duration,
    running: Duration,
    guest_ready: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn wait_marker(serial: &Path, t0: Instant) -> Duration {
    loop {
        if std::fs::read(serial).is_ok_and(|b| String::from_utf8_lossy(&b).contains(READY_MARKER)) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "guest never became ready"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Raw QEMU: exec, poll for the QMP socket, negotiate, query-status, serial marker.
async fn raw_run(spec: &VmSpec, dir: &Path, accel: Accel) -> Sample {
    std::fs::create_dir_all(dir).unwrap();
    let files = VmFiles::in_dir(dir);
    let args = argv::build(spec, &files, accel, &Loader::SeaBios);
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args(&args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let qmp = loop {
        if files.qmp_socket.exists()
            && let Ok(q) = Qmp::connect(&files.qmp_socket).await
        {
            break q;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let qmp_ready = t0.elapsed();
    while !qmp
        .execute(qapi::qmp::query_status {})
        .await
        .unwrap()
        .running
    {}
    let running = t0.elapsed();
    let guest_ready = wait_marker(&files.serial_log, t0).await;
    let _ = qmp.execute(qapi::qmp::quit {}).await;
    let _ = child.wait().await;
    std::fs::remove_dir_all(dir).unwrap();
    Sample {
        qmp_ready,
        running,
        guest_ready,
    }
}

/// Through the agent: StartVm sent → QMP ready (agent's timing) → Running reply → serial marker.
async fn agent_run(c: &mut Client, name: &str) -> Sample {
    let t0 = Instant::now();
    let sent_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let vm = c
        .start_vm(pb::StartVmRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    let running = t0.elapsed();
    let st = vm.status.clone().unwrap();
    assert_eq!(st.phase, pb::VmPhase::Running as i32);
    let launch_offset = Duration::from_millis((st.started_at_ms - sent_ms).max(0) as u64);
    let qmp_ready = launch_offset + Duration::from_millis(st.startup.unwrap().qmp_ready_ms as u64);
    // The serial log is appended across runs: wait for this boot's marker.
    let serial = Path::new(&st.serial_log).to_path_buf();
    let before = count_markers(
        &String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()),
        READY_MARKER,
    );
    let guest_ready = loop {
        let text =
            String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
        if count_markers(&text, READY_MARKER) > before {
            break t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    c.stop_vm(pb::StopVmRequest {
        name: name.into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    Sample {
        qmp_ready,
        running,
        guest_ready,
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let n = bench_rounds(7);
    let agent = Agent::for_bench("bench").await;
    let mut c = agent.client().await;
    let (accel, node) = agent_accel(&mut c).await;
    println!(
        "startup benchmark: N={n}, accelerator {} ({})",
        node.accelerator, node.accelerator_reason
    );

    let spec_pb = agent.guest_spec("bench-vm");
    create(&mut c, spec_pb.clone(), false).await;
    // Raw QEMU gets the very argv the agent builds, for a VM in a directory of its own.
    let mut raw_spec = VmSpec::try_from(spec_pb).unwrap();
    raw_spec.disks[0].format = Some(hypersdk_agent::spec::DiskFormat::Qcow2);
    let raw_dir = agent.dir.path().join("raw");

    let (mut raw, mut ours) = (vec![], vec![]);
    for i in 0..n {
        // Alternate which goes first, so drift on a shared machine hits both alike.
        if i % 2 == 0 {
            raw.push(raw_run(&raw_spec, &raw_dir, accel).await);
            ours.push(agent_run(&mut c, "bench-vm").await);
        } else {
            ours.push(agent_run(&mut c, "bench-vm").await);
            raw.push(raw_run(&raw_spec, &raw_dir, accel).await);
        }
    }
    println!(
        "\n{:<22} {:>10} {:>10} {:>10} {:>8}",
        "median (ms)", "raw QEMU", "agent", "diff", "ratio"
    );
    type Pick = fn(&Sample) -> Duration;
    let metrics: [(&str, Pick); 3] = [
        ("exec → QMP ready", |s| s.qmp_ready),
        ("exec → Running", |s| s.running),
        ("exec → guest ready", |s| s.guest_ready),
    ];
    for (label, pick) in metrics {
        let r = median(raw.iter().map(pick).collect());
        let a = median(ours.iter().map(pick).collect());
        println!(
            "{label:<22} {:>10.1} {:>10.1} {:>+10.1} {:>8.3}",
            ms(r),
            ms(a),
            ms(a) - ms(r),
            ms(a) / ms(r)
        );
    }

    // Memory: the agent with 0 and 10 idle VMs, and one QEMU's footprint beyond guest RAM.
    c.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "bench-vm".into(),
    })
    .await
    .unwrap();
    let agent_pid = agent.pid();
    let rss0 = rss_kib(agent_pid);
    let mut pids = vec![];
    for i in 0..10 {
        let spec = agent.small_spec(&format!("idle-{i}"));
        let vm = create(&mut c, spec, true).await;
        pids.push(vm.status.unwrap().pid);
    }
    for i in 0..10 {
        wait_vm(
            &mut c,
            &format!("idle-{i}"),
            Duration::from_secs(300),
            "guest agent",
            |s| s.agent_connected,
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss10 = rss_kib(agent_pid);
    let qemu_rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let qemu_med = {
        let mut v = qemu_rss.clone();
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "\nagent RSS: {:.1} MiB with 0 VMs, {:.1} MiB with 10 idle VMs (+{:.2} MiB per VM)",
        rss0 as f64 / 1024.0,
        rss10 as f64 / 1024.0,
        (rss10 as f64 - rss0 as f64) / 1024.0 / 10.0
    );
    println!(
        "QEMU RSS per idle VM (median of 10): {:.1} MiB; minus its 128 MiB guest RAM: {:+.1} MiB",
        qemu_med as f64 / 1024.0,
        qemu_med as f64 / 1024.0 - 128.0
    );
}
