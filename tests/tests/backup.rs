//! Backups to a real S3-compatible server (versitygw, started by each test on loopback) from
//! real QEMU with the test guest: a running guest backed up without stopping, an incremental
//! second backup that reads and uploads only changed chunks, restores that boot with the data,
//! S3 failing mid-backup, encryption keys, corrupted chunks, and retention.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::s3::S3Server;
use hypersdk_tests::*;

const BOOT: Duration = Duration::from_secs(90);
const BUCKET: &str = "backups";

fn request(s3: &S3Server, vm: &str, prefix: &str) -> pb::BackupVmRequest {
    pb::BackupVmRequest {
        name: vm.into(),
        destination: Some(s3.location(BUCKET, prefix)),
        compress: true,
        quiesce: true,
        ..Default::default()
    }
}

/// Runs a backup to its end; returns every progress message (the last has `done`).
async fn backup(
    c: &mut Client,
    req: pb::BackupVmRequest,
) -> Result<Vec<pb::BackupProgress>, tonic::Status> {
    let mut stream = c.backup_vm(req).await?.into_inner();
    let mut seen = Vec::new();
    while let Some(p) = stream.next().await {
        seen.push(p?);
    }
    match seen.last() {
        Some(p) if p.done => Ok(seen),
        _ => Err(tonic::Status::unknown(format!(
            "the stream ended without a result: {seen:?}"
        ))),
    }
}

async fn restore(
    c: &mut Client,
    s3: &S3Server,
    manifest_key: &str,
    name: &str,
    key: &[u8],
) -> Result<pb::RestoreBackupResponse, tonic::Status> {
    c.restore_backup(pb::RestoreBackupRequest {
        source: Some(s3.location(BUCKET, "")),
        manifest_key: manifest_key.into(),
        encryption_key: key.to_vec(),
        name: name.into(),
    })
    .await
    .map(|r| r.into_inner())
}

fn chunk_objects(s3: &S3Server, prefix: &str) -> usize {
    s3.objects(BUCKET, &format!("{prefix}/chunks")).len()
}

fn manifests(s3: &S3Server, prefix: &str, vm: &str) -> Vec<PathBuf> {
    s3.objects(BUCKET, &format!("{prefix}/backups/{vm}"))
}

/// `qemu-img compare`: whether two images hold the same guest-visible bytes.
fn same_content(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    println!(
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    out.status.success()
}

/// A spec of the test guest booting from `disk`.
fn spec_on(agent: &Agent, name: &str, disk: &str) -> pb::VmSpec {
    let mut spec = agent.small_spec(name);
    spec.disks[0].path = disk.into();
    spec
}

#[tokio::test(flavor = "multi_thread")]
async fn running_vm_backs_up_incrementally_and_restores_into_a_new_vm() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let agent = Agent::start("backup-a").await;
    let mut c = agent.client().await;
    let vm = create(&mut c, agent.small_spec("src"), true).await;
    wait_boots(&vm, 1, BOOT).await;
    wait_counter_above(&vm, 3, BOOT).await;
    let vm = wait_vm(&mut c, "src", BOOT, "guest agent", |s| s.agent_connected).await;
    let pid = vm.status.as_ref().unwrap().pid;

    // Full backup of the running guest, its filesystems frozen at the instant.
    let before = last_counter(&serial(&vm)).unwrap();
    let mut req = request(&s3, "src", "daily");
    req.backup_id = "first".into();
    let first = backup(&mut c, req).await.unwrap();
    let done1 = first.last().unwrap().clone();
    let after1 = last_counter(&serial(&vm)).unwrap();
    println!("backup 1 (counter {before}..{after1}): {done1:?}");
    assert!(
        !done1.incremental && done1.full_reason.contains("no earlier backup"),
        "{done1:?}"
    );
    assert!(done1.quiesced, "the guest agent was connected: {done1:?}");
    assert_eq!(done1.chunks_total, 16, "a 64 MiB disk in 4 MiB chunks");
    assert_eq!(done1.chunks_read, 16);
    assert!(done1.chunks_new >= 1, "{done1:?}");
    assert!(
        done1.bytes_uploaded < done1.bytes_read,
        "compressed: {done1:?}"
    );
    assert_eq!(
        done1.location,
        format!("s3://{BUCKET}/daily/backups/src/first.json")
    );
    assert_eq!(chunk_objects(&s3, "daily"), done1.chunks_new as usize);
    assert!(first.len() >= 2, "progress before the result: {first:?}");

    // The guest writes its counter to disk every second; the second backup reads only the
    // chunks its bitmap marks and stores only those that changed.
    wait_counter_above(&vm, after1 + 3, BOOT).await;
    let objects_before = chunk_objects(&s3, "daily");
    let mut req = request(&s3, "src", "daily");
    req.backup_id = "second".into();
    let second = backup(&mut c, req).await.unwrap();
    let done2 = second.last().unwrap().clone();
    println!("backup 2: {done2:?}");
    assert!(done2.incremental, "{done2:?}");
    assert!(done2.chunks_read >= 1 && done2.chunks_read < 8, "{done2:?}");
    assert!(
        done2.chunks_new >= 1 && done2.chunks_new <= done2.chunks_read,
        "{done2:?}"
    );
    assert_eq!(
        chunk_objects(&s3, "daily") - objects_before,
        done2.chunks_new as usize,
        "new objects in the bucket"
    );

    // The guest never stopped: same QEMU, and it counts on.
    let now = get(&mut c, "src").await;
    assert_eq!(phase(&now), pb::VmPhase::Running);
    assert_eq!(now.status.as_ref().unwrap().pid, pid);
    let last = last_counter(&serial(&vm)).unwrap();
    wait_counter_above(&vm, last + 2, Duration::from_secs(30)).await;

    // The first backup into a new VM: it boots, and its disk holds the counter the guest had
    // written by then (at least the one it booted with, at most the one it had reached).
    let r = restore(&mut c, &s3, "daily/backups/src/first.json", "copy", &[])
        .await
        .unwrap();
    assert_eq!(r.vm, "src");
    assert_eq!(r.disks.len(), 1);
    let booted_with = disk_counter_at_boot(&vm, 0, BOOT).await;
    let copy = create(&mut c, spec_on(&agent, "copy", &r.disks[0].path), true).await;
    let restored = disk_counter_at_boot(&copy, 0, BOOT).await;
    println!(
        "restored disk counter {restored} (source booted with {booted_with}, at {after1} after backup 1)"
    );
    assert!((booted_with..=after1).contains(&restored), "{restored}");
    wait_counter_above(&copy, restored + 1, BOOT).await;

    // A stopped VM is read directly, incrementally too; its restore is the disk, byte for byte.
    stop(&mut c, "src", false).await;
    let mut req = request(&s3, "src", "daily");
    req.backup_id = "stopped".into();
    let done3 = backup(&mut c, req).await.unwrap().pop().unwrap();
    println!("backup 3 (stopped): {done3:?}");
    assert!(done3.incremental, "{done3:?}");
    let r = restore(&mut c, &s3, &done3.manifest_key, "copy2", &[])
        .await
        .unwrap();
    let source_disk = agent.dir.path().join("images/src.qcow2");
    assert!(same_content(Path::new(&r.disks[0].path), &source_disk));

    let v = c
        .verify_backup(pb::VerifyBackupRequest {
            source: Some(s3.location(BUCKET, "")),
            manifest_key: done3.manifest_key.clone(),
            encryption_key: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.bad_chunks.is_empty() && v.chunks >= 1, "{v:?}");
}

/// A disk of `mib` MiB of random data (chunks that neither compress nor deduplicate).
fn random_disk(dir: &Path, name: &str, mib: usize) -> PathBuf {
    let path = dir.join(format!("{name}.raw"));
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ mib as u64;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    std::fs::write(&path, data).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_down_mid_backup_fails_the_backup_and_the_vm_runs_on() {
    let mut s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let agent = Agent::start("backup-b").await;
    let mut c = agent.client().await;
    let mut spec = agent.small_spec("busy");
    let data = random_disk(&agent.dir.path().join("images"), "busy-data", 96);
    spec.disks.push(pb::Disk {
        name: "data".into(),
        path: data.to_string_lossy().into(),
        ..Default::default()
    });
    let vm = create(&mut c, spec, true).await;
    wait_boots(&vm, 1, BOOT).await;
    wait_counter_above(&vm, 2, BOOT).await;
    let pid = get(&mut c, "busy").await.status.unwrap().pid;

    let mut stream = c
        .backup_vm(request(&s3, "busy", "p"))
        .await
        .unwrap()
        .into_inner();
    let mut killed = false;
    let mut outcome = None;
    while let Some(p) = stream.next().await {
        match p {
            Ok(p) if !killed && p.chunks_new >= 1 => {
                println!("killing the S3 server at {p:?}");
                s3.kill();
                killed = true;
            }
            Ok(p) => assert!(!p.done, "the backup completed with S3 down: {p:?}"),
            Err(e) => {
                outcome = Some(e);
                break;
            }
        }
    }
    assert!(killed, "the backup never stored a chunk");
    let e = outcome.expect("an error once S3 went down");
    println!("backup failed: {e}");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert!(e.message().contains("object storage"), "{e}");

    // The VM was not touched and counts on; with S3 back, nothing partial is listed and a new
    // backup succeeds.
    let now = get(&mut c, "busy").await;
    assert_eq!(
        (phase(&now), now.status.unwrap().pid),
        (pb::VmPhase::Running, pid)
    );
    let last = last_counter(&serial(&vm)).unwrap();
    wait_counter_above(&vm, last + 2, Duration::from_secs(30)).await;
    s3.restart();
    assert!(manifests(&s3, "p", "busy").is_empty());
    let done = backup(&mut c, request(&s3, "busy", "p"))
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(manifests(&s3, "p", "busy").len(), 1, "{done:?}");
    assert!(done.chunks_total == 16 + 24, "{done:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_backups_need_their_key_and_corruption_is_found() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let agent = Agent::start("backup-c").await;
    let mut c = agent.client().await;
    create(&mut c, agent.small_spec("sealed"), false).await;
    let key = [7u8; 32];
    let mut req = request(&s3, "sealed", "enc");
    req.encryption_key = key.to_vec();
    let done = backup(&mut c, req).await.unwrap().pop().unwrap();
    assert!(done.chunks_new >= 1, "{done:?}");

    // Wrong key, no key: refused before any disk is written, saying why.
    let e = restore(&mut c, &s3, &done.manifest_key, "wrong", &[8u8; 32])
        .await
        .unwrap_err();
    println!("wrong key: {e}");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("not the one it was made with"), "{e}");
    let e = restore(&mut c, &s3, &done.manifest_key, "nokey", &[])
        .await
        .unwrap_err();
    assert!(
        e.message().contains("encrypted and no key was given"),
        "{e}"
    );
    assert!(
        !agent
            .data_dir()
            .join("images/restored/wrong-root.qcow2")
            .exists()
    );
    // The chunks say nothing readable: the disk's README is not in any object.
    for o in s3.objects(BUCKET, "enc/chunks") {
        let blob = std::fs::read(&o).unwrap();
        assert!(
            !blob.windows(9).any(|w| w == b"HyperSDK "),
            "{}",
            o.display()
        );
    }

    let r = restore(&mut c, &s3, &done.manifest_key, "right", &key)
        .await
        .unwrap();
    assert!(same_content(
        Path::new(&r.disks[0].path),
        &agent.dir.path().join("images/sealed.qcow2")
    ));

    // A flipped byte in a stored chunk: verify names it and a restore refuses the backup.
    let victim = s3.objects(BUCKET, "enc/chunks").remove(0);
    let mut blob = std::fs::read(&victim).unwrap();
    let at = blob.len() / 2;
    blob[at] ^= 0x40;
    std::fs::write(&victim, blob).unwrap();
    let v = c
        .verify_backup(pb::VerifyBackupRequest {
            source: Some(s3.location(BUCKET, "")),
            manifest_key: done.manifest_key.clone(),
            encryption_key: key.to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    println!("verify: {v:?}");
    let id = victim.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(v.bad_chunks.len(), 1, "{v:?}");
    assert!(
        v.bad_chunks[0].starts_with(&id) && v.bad_chunks[0].contains("altered"),
        "{v:?}"
    );
    // hyperctl says the same and exits 1.
    let key_file = agent.dir.path().join("backup.key");
    std::fs::write(&key_file, key).unwrap();
    let out = Command::new(bin("hyperctl"))
        .env("HYPERSDK_AGENT", agent.address.to_string())
        .env("AWS_ACCESS_KEY_ID", hypersdk_tests::s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", hypersdk_tests::s3::SECRET_KEY)
        .args([
            "backup",
            "verify",
            &done.manifest_key,
            "--bucket",
            BUCKET,
            "--endpoint",
        ])
        .arg(s3.endpoint())
        .arg("--key-file")
        .arg(&key_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("hyperctl backup verify: {stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&format!("bad: {id}")), "{stdout}");
    let e = restore(&mut c, &s3, &done.manifest_key, "again", &key)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DataLoss, "{e}");
    assert!(
        !agent
            .data_dir()
            .join("images/restored/again-root.qcow2")
            .exists()
    );

    // Wrong credentials are the server's refusal, said as such.
    let mut req = request(&s3, "sealed", "enc");
    req.destination.as_mut().unwrap().secret_access_key = "not-the-secret".into();
    let e = backup(&mut c, req).await.unwrap_err();
    println!("wrong credentials: {e}");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("object storage"), "{e}");
}

/// Writes `pattern` over the first MiB of the disk at chunk `chunk` with qemu-io (a stopped
/// VM's disk; the write goes through QEMU's qcow2 driver, so the persistent bitmaps see it).
fn write_chunk(disk: &Path, chunk: u64, pattern: u8) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -P {pattern} {} 1M", chunk * (4 << 20)))
        .arg(disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_the_newest_and_collects_unreferenced_chunks_but_not_during_a_backup() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let agent = Agent::start("backup-d").await;
    let mut c = agent.client().await;
    create(&mut c, agent.small_spec("kept"), false).await;
    let disk = agent.dir.path().join("images/kept.qcow2");
    let keep_last = |n| pb::BackupRetention {
        keep_last: n,
        ..Default::default()
    };
    let mut ids = Vec::new();
    for round in 0..3u64 {
        // Each round changes chunk 10 (its old content is garbage once its backup is pruned).
        write_chunk(&disk, 10, 0x10 + round as u8);
        let mut req = request(&s3, "kept", "r");
        req.backup_id = format!("b{round}");
        req.retention = Some(keep_last(2));
        let done = backup(&mut c, req).await.unwrap().pop().unwrap();
        println!("round {round}: {done:?}");
        if round > 0 {
            assert!(done.incremental && done.chunks_read == 1, "{done:?}");
            assert_eq!(done.chunks_new, 1, "{done:?}");
        }
        if round == 2 {
            assert_eq!((done.pruned, done.chunks_deleted), (1, 1), "{done:?}");
        }
        ids.push(done.manifest_key);
    }
    // A backup in progress (its lock) keeps every chunk: retention still removes manifests,
    // garbage collection deletes nothing until it is over.
    let lock = s3.bucket_dir(BUCKET).join("r/locks/other-backup");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    std::fs::write(&lock, b"{}").unwrap();
    let before = chunk_objects(&s3, "r");
    write_chunk(&disk, 10, 0x13);
    let mut req = request(&s3, "kept", "r");
    req.backup_id = "b3".into();
    req.retention = Some(keep_last(2));
    let done = backup(&mut c, req).await.unwrap().pop().unwrap();
    println!("with a backup in progress: {done:?}");
    assert_eq!((done.pruned, done.chunks_deleted), (1, 0), "{done:?}");
    assert_eq!(chunk_objects(&s3, "r"), before + 1);
    ids.push(done.manifest_key);
    std::fs::remove_file(&lock).unwrap();
    write_chunk(&disk, 10, 0x14);
    let mut req = request(&s3, "kept", "r");
    req.backup_id = "b4".into();
    req.retention = Some(keep_last(2));
    let done = backup(&mut c, req).await.unwrap().pop().unwrap();
    assert_eq!((done.pruned, done.chunks_deleted), (1, 2), "{done:?}");
    ids.push(done.manifest_key);

    let names: Vec<String> = manifests(&s3, "r", "kept")
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["b3.json", "b4.json"]);
    // Every kept backup is whole.
    for key in &ids[3..] {
        let v = c
            .verify_backup(pb::VerifyBackupRequest {
                source: Some(s3.location(BUCKET, "")),
                manifest_key: key.clone(),
                encryption_key: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.bad_chunks.is_empty(), "{v:?}");
    }
}
