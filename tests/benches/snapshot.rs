//! Memory snapshot benchmark: save and restore of the same 1 GiB, 1 vCPU test guest with 512 MiB
//! of memory written (the guest's dirtier keeps 512 MiB rewritten), N times each, in the same
//! run:
//! - by raw QEMU: the agent's argv, the save settings the agent picks for this QEMU (mapped-ram
//!   and multifd when it has them, no bandwidth cap), `stop` + `migrate file:` + `cont`, and a
//!   restore into a new process started with `-S -incoming defer`;
//! - by the agent: CreateSnapshot with memory, RestoreSnapshot.
//!
//! Prints medians of time, guest pause, file size, data written and throughput, the ratios, and
//! a plain sequential write of the same amount to the same disk (the physical floor).
//!
//! Run with `scripts/bench.sh snapshot` (release build). `BENCH_N` sets N (default 3).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hypersdk_agent::host::accel::Accel;
use hypersdk_agent::host::paths::PathPolicy;
use hypersdk_agent::snapshot::SaveMode;
use hypersdk_agent::spec::VmSpec;
use hypersdk_agent::spec::resolve::resolve_spec;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;
use serde_json::json;

const MIB: f64 = (1 << 20) as f64;
const DIRTY_MIB: u32 = 512;
const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// After the dirtier has written its 512 MiB once.
const SETTLE: Duration = Duration::from_secs(5);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes a file really takes (memory files are sparse).
fn data_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

async fn wait_dirtier(serial_log: &Path) {
    let marker = format!("HYPERSDK-DIRTY-MIB {DIRTY_MIB}");
    let deadline = Instant::now() + BOOT_LIMIT;
    while !std::fs::read_to_string(serial_log)
        .unwrap_or_default()
        .contains(&marker)
    {
        assert!(Instant::now() < deadline, "{marker} never came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The guest under raw QEMU.
struct Raw {
    spec: VmSpec,
    dir: std::path::PathBuf,
    accel: Accel,
    qemu: RawQemu,
    mode: SaveMode,
}

impl Raw {
    async fn configure(&self) {
        let q = &self.qemu.qmp;
        q.execute_value("migrate-set-capabilities", self.mode.capabilities(true))
            .await
            .unwrap();
        q.execute_value("migrate-set-parameters", self.mode.parameters())
            .await
            .unwrap();
    }

    /// stop, migrate to the file, cont: returns the pause (= the whole save).
    async fn save(&self, file: &Path) -> Duration {
        let t0 = Instant::now();
        self.qemu.qmp.execute(qapi::qmp::stop {}).await.unwrap();
        self.configure().await;
        let uri = format!("file:{}", file.display());
        self.qemu
            .qmp
            .execute_value("migrate", json!({ "uri": uri }))
            .await
            .unwrap();
        self.qemu.wait_migration().await;
        self.qemu.qmp.execute(qapi::qmp::cont {}).await.unwrap();
        t0.elapsed()
    }

    /// Ends the running QEMU, loads the file into a new one and runs it.
    async fn restore(&mut self, file: &Path) -> Duration {
        let t0 = Instant::now();
        let _ = self.qemu.child.kill().await;
        self.qemu = RawQemu::spawn(
            &self.spec,
            &self.dir,
            self.accel,
            &["-S", "-incoming", "defer"],
        )
        .await;
        self.configure().await;
        let uri = format!("file:{}", file.display());
        self.qemu
            .qmp
            .execute_value("migrate-incoming", json!({ "uri": uri }))
            .await
            .unwrap();
        self.qemu.wait_migration().await;
        self.qemu.qmp.execute(qapi::qmp::cont {}).await.unwrap();
        t0.elapsed()
    }
}

/// Writes `bytes` of non-zero data sequentially to a new file in `dir`: what the disk can take.
fn sequential_write(dir: &Path, bytes: u64) -> Duration {
    let path = dir.join("sequential.bin");
    let chunk = vec![0x5au8; 4 << 20];
    let t0 = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    drop(f);
    let took = t0.elapsed();
    std::fs::remove_file(&path).unwrap();
    took
}

#[derive(Default)]
struct Samples {
    save: Vec<f64>,
    pause: Vec<f64>,
    file: Vec<f64>,
    data: Vec<f64>,
    restore: Vec<f64>,
}

impl Samples {
    fn print(&self, label: &str) {
        let (save, data) = (median(self.save.clone()), median(self.data.clone()));
        println!(
            "{label:<8} save {save:>7.0} ms  pause {:>7.0} ms  file {:>6.0} MiB  data {:>6.0} MiB  {:>6.0} MiB/s  restore {:>7.0} ms",
            median(self.pause.clone()),
            median(self.file.clone()) / MIB,
            data / MIB,
            data / MIB / (save / 1000.0),
            median(self.restore.clone()),
        );
    }
}

#[tokio::main]
async fn main() {
    let n = bench_rounds(3);
    let agent = Agent::for_bench("bench-snap").await;
    let mut c = agent.client().await;
    let (accel, node) = agent_accel(&mut c).await;
    println!(
        "snapshot benchmark: 1 GiB guest, {DIRTY_MIB} MiB written, {n} rounds, accelerator {}, {}",
        node.accelerator, node.qemu_version
    );

    let mut spec = agent.guest_spec("snap");
    spec.memory = "1Gi".into();
    spec.max_memory = "1Gi".into();
    spec.boot.as_mut().unwrap().cmdline += &format!(" hypersdk.dirty_mib={DIRTY_MIB}");
    let vm = create(&mut c, spec.clone(), true).await;
    let serial_log = vm.status.as_ref().unwrap().serial_log.clone();

    let raw_dir = agent.dir.path().join("raw");
    let mut raw_spec = agent.guest_spec("raw-snap");
    raw_spec.memory = spec.memory.clone();
    raw_spec.max_memory = spec.max_memory.clone();
    raw_spec.boot = spec.boot.clone();
    let policy = PathPolicy::new([agent.dir.path().join("images")]).unwrap();
    let raw_spec = resolve_spec(&VmSpec::try_from(raw_spec).unwrap(), &policy).unwrap();
    let qemu = RawQemu::spawn(&raw_spec, &raw_dir, accel, &[]).await;
    let caps: Vec<String> = qemu
        .qmp
        .execute_value("query-migrate-capabilities", json!({}))
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["capability"].as_str().map(String::from))
        .collect();
    let mut raw = Raw {
        spec: raw_spec,
        dir: raw_dir.clone(),
        accel,
        qemu,
        mode: SaveMode::for_capabilities(&caps),
    };
    println!("save mode: {:?}", raw.mode);
    wait_dirtier(Path::new(&serial_log)).await;
    wait_dirtier(&raw_dir.join("serial.log")).await;
    tokio::time::sleep(SETTLE).await;

    let (mut r, mut a) = (Samples::default(), Samples::default());
    for round in 0..n {
        let file = raw_dir.join(format!("memory-{round}.bin"));
        let took = raw.save(&file).await.as_secs_f64() * 1000.0;
        r.save.push(took);
        r.pause.push(took);
        r.file.push(std::fs::metadata(&file).unwrap().len() as f64);
        r.data.push(data_bytes(&file) as f64);
        r.restore
            .push(raw.restore(&file).await.as_secs_f64() * 1000.0);
        std::fs::remove_file(&file).unwrap();

        let snap = format!("s{round}");
        let t0 = Instant::now();
        let s = c
            .create_snapshot(pb::CreateSnapshotRequest {
                name: "snap".into(),
                snapshot: snap.clone(),
                memory: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        a.save.push(t0.elapsed().as_secs_f64() * 1000.0);
        a.pause.push(s.pause_ms as f64);
        let memory = agent
            .data_dir()
            .join(format!("snapshots/snap/{snap}/memory.bin"));
        a.file
            .push(std::fs::metadata(&memory).unwrap().len() as f64);
        a.data.push(data_bytes(&memory) as f64);
        let t0 = Instant::now();
        c.restore_snapshot(pb::RestoreSnapshotRequest {
            name: "snap".into(),
            snapshot: snap.clone(),
        })
        .await
        .unwrap();
        a.restore.push(t0.elapsed().as_secs_f64() * 1000.0);
        c.delete_snapshot(pb::DeleteSnapshotRequest {
            name: "snap".into(),
            snapshot: snap,
        })
        .await
        .unwrap();
        println!(
            "round {round}: raw save {:.0} ms restore {:.0} ms | agent save {:.0} ms (pause {} ms) restore {:.0} ms",
            r.save[round], r.restore[round], a.save[round], s.pause_ms, a.restore[round]
        );
    }

    println!();
    r.print("raw");
    a.print("agent");
    let ratio = |x: &[f64], y: &[f64]| median(x.to_vec()) / median(y.to_vec());
    println!(
        "ratio agent/raw: save {:.2}  pause {:.2}  restore {:.2}   (targets <= 1.2)",
        ratio(&a.save, &r.save),
        ratio(&a.pause, &r.pause),
        ratio(&a.restore, &r.restore)
    );
    let bytes = median(a.data.clone()) as u64;
    let seq = sequential_write(&agent.data_dir(), bytes).as_secs_f64() * 1000.0;
    println!(
        "sequential write of {:.0} MiB to the same disk: {seq:.0} ms ({:.0} MiB/s); agent save / sequential write: {:.2}",
        bytes as f64 / MIB,
        bytes as f64 / MIB / (seq / 1000.0),
        median(a.save.clone()) / seq
    );
    let _ = raw.qemu.child.kill().await;
}
