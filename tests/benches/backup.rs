//! Backup benchmark, against a real S3-compatible server (versitygw on loopback), in one run:
//! - a full backup (BackupVm) of a 1 GiB qcow2 disk holding 512 MiB of incompressible data,
//!   of a stopped VM (read through qemu-nbd);
//! - `qemu-img convert` of the same disk to a local qcow2 file (the local copy floor);
//! - a PUT of that file to the same server as one object (the upload floor; the same S3
//!   client library as the agent's, `object_store`);
//! - an incremental backup after 10 MiB were rewritten (time, chunks read, bytes uploaded);
//! - a restore of the full backup (RestoreBackup) into new disk files.
//!
//! Prints MiB/s of each (data MiB over wall time) and the ratios to qemu-img and to the PUT.
//! Run with `scripts/bench.sh backup` (release build). `BENCH_N` sets rounds (default 1).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use futures::StreamExt;
use hypersdk_agent::backup::store::Repo;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::s3::S3Server;
use hypersdk_tests::*;

const MIB: f64 = (1 << 20) as f64;
const DATA_MIB: usize = 512;
const BUCKET: &str = "bench";

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 1 GiB qcow2 disk whose first 512 MiB are pseudo-random (neither compressible nor
/// deduplicable), the rest unallocated.
fn make_disk(path: &Path) {
    let raw = path.with_extension("raw");
    let mut data = vec![0u8; DATA_MIB << 20];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&raw, &data).unwrap();
    run(Command::new("truncate").args(["-s", "1G"]).arg(&raw));
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(path));
    std::fs::remove_file(raw).unwrap();
}

async fn backup(c: &mut Client, s3: &S3Server, id: &str) -> (f64, pb::BackupProgress) {
    let started = Instant::now();
    let mut stream = c
        .backup_vm(pb::BackupVmRequest {
            name: "bench".into(),
            destination: Some(s3.location(BUCKET, "r")),
            backup_id: id.into(),
            compress: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(p) = stream.next().await {
        last = Some(p.unwrap());
    }
    let p = last.unwrap();
    assert!(p.done, "{p:?}");
    (started.elapsed().as_secs_f64(), p)
}

#[tokio::main]
async fn main() {
    let rounds = bench_rounds(1);
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let agent = Agent::for_bench("bench-backup").await;
    let mut c = agent.client().await;
    let disk = agent.dir.path().join("images/bench.qcow2");
    make_disk(&disk);
    let mut spec = agent.small_spec("bench");
    spec.disks[0].path = disk.to_string_lossy().into();
    create(&mut c, spec, false).await;
    let data = DATA_MIB as f64;

    for round in 0..rounds {
        // Each round starts from an empty repository (so the first backup is a full one).
        let _ = std::fs::remove_dir_all(s3.bucket_dir(BUCKET));
        s3.create_bucket(BUCKET);

        let (full_s, full) = backup(&mut c, &s3, &format!("full{round}")).await;

        let copy = agent.dir.path().join("copy.qcow2");
        let started = Instant::now();
        run(Command::new("qemu-img")
            .args(["convert", "-q", "-U", "-O", "qcow2"])
            .arg(&disk)
            .arg(&copy));
        let convert_s = started.elapsed().as_secs_f64();

        // The same file as one object, through the same S3 client library the agent uses.
        let bytes = std::fs::read(&copy).unwrap();
        let repo = Repo::open(&s3.location(BUCKET, ""), "").unwrap();
        let started = Instant::now();
        repo.put("copy.qcow2", bytes).await.unwrap();
        let put_s = started.elapsed().as_secs_f64();
        std::fs::remove_file(&copy).unwrap();

        // 10 MiB rewritten at the start of the data, then an incremental backup.
        run(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 64M 10M"])
            .arg(&disk));
        let (inc_s, inc) = backup(&mut c, &s3, &format!("inc{round}")).await;

        let started = Instant::now();
        let r = c
            .restore_backup(pb::RestoreBackupRequest {
                source: Some(s3.location(BUCKET, "")),
                manifest_key: full.manifest_key.clone(),
                encryption_key: vec![],
                name: format!("restored{round}"),
            })
            .await
            .unwrap()
            .into_inner();
        let restore_s = started.elapsed().as_secs_f64();
        for d in &r.disks {
            std::fs::remove_file(&d.path).unwrap();
        }

        println!("round {round}: disk 1 GiB, {DATA_MIB} MiB of data");
        println!(
            "  full backup      {full_s:7.2} s  {:7.1} MiB/s  ({} chunks read, {} stored, {:.0} MiB uploaded)",
            data / full_s,
            full.chunks_read,
            full.chunks_new,
            full.bytes_uploaded as f64 / MIB
        );
        println!(
            "  qemu-img convert {convert_s:7.2} s  {:7.1} MiB/s",
            data / convert_s
        );
        println!(
            "  PUT of that file {put_s:7.2} s  {:7.1} MiB/s",
            data / put_s
        );
        println!(
            "  incremental      {inc_s:7.2} s  ({} chunks read, {} stored, {:.1} MiB uploaded, incremental {})",
            inc.chunks_read,
            inc.chunks_new,
            inc.bytes_uploaded as f64 / MIB,
            inc.incremental
        );
        println!(
            "  restore          {restore_s:7.2} s  {:7.1} MiB/s",
            data / restore_s
        );
        println!(
            "  ratio backup/qemu-img convert time {:.2}, backup/PUT time {:.2}",
            full_s / convert_s,
            full_s / put_s
        );
    }
}
