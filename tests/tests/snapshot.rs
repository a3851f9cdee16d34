//! Snapshots on real QEMU with the test guest: memory and disks come back to the snapshot's
//! instant, a snapshot restores more than once, and failures leave the VM as it was.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;

const BOOT: Duration = Duration::from_secs(60);

/// How long a memory save may take to create its file (bounds the wait only).
const SAVE_BEGINS: Duration = Duration::from_secs(30);

async fn snapshot(
    c: &mut Client,
    vm: &str,
    snap: &str,
    memory: bool,
    quiesce: bool,
) -> Result<pb::Snapshot, tonic::Status> {
    c.create_snapshot(pb::CreateSnapshotRequest {
        name: vm.into(),
        snapshot: snap.into(),
        memory,
        quiesce,
        description: String::new(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn restore(
    c: &mut Client,
    vm: &str,
    snap: &str,
) -> Result<pb::RestoreSnapshotResponse, tonic::Status> {
    c.restore_snapshot(pb::RestoreSnapshotRequest {
        name: vm.into(),
        snapshot: snap.into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn snapshot_names(c: &mut Client, vm: &str) -> Vec<String> {
    c.list_snapshots(pb::ListSnapshotsRequest { name: vm.into() })
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .into_iter()
        .map(|s| s.name)
        .collect()
}

/// A running test guest whose counter has passed `n`.
async fn running_guest(agent: &Agent, c: &mut Client, name: &str, n: u64) -> pb::Vm {
    let vm = create(c, agent.guest_spec(name), true).await;
    wait_boots(&vm, 1, BOOT).await;
    wait_counter_above(&vm, n, BOOT).await;
    wait_vm(c, name, BOOT, "guest agent", |s| s.agent_connected).await
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_snapshot_restores_memory_and_disk_twice() {
    let agent = Agent::start("snap-a").await;
    let mut c = agent.client().await;
    let vm = running_guest(&agent, &mut c, "mem", 3).await;
    let pid = vm.status.as_ref().unwrap().pid;

    let before = last_counter(&serial(&vm)).unwrap();
    let snap = snapshot(&mut c, "mem", "s1", true, false).await.unwrap();
    let after = last_counter(&serial(&vm)).unwrap();
    println!(
        "snapshot at counter {before}..{after}: pause {} ms, took {} ms, {} bytes, {}",
        snap.pause_ms, snap.duration_ms, snap.size_bytes, snap.memory_format
    );
    assert!(snap.memory && snap.memory_bytes == 256 << 20, "{snap:?}");
    // The pause is part of the call; the memory file holds at least the guest's kernel and
    // root file system, and at most its memory (zero pages are holes).
    assert!(
        0 < snap.pause_ms && snap.pause_ms <= snap.duration_ms,
        "{snap:?}"
    );
    assert!(
        (16 << 20..=snap.memory_bytes + (1 << 20)).contains(&snap.size_bytes),
        "{snap:?}"
    );
    assert_eq!(
        get(&mut c, "mem").await.status.unwrap().pid,
        pid,
        "same QEMU"
    );
    // The guest runs on after the snapshot, and well past it.
    wait_counter_above(&vm, after + 6, Duration::from_secs(60)).await;
    assert_eq!(snapshot_names(&mut c, "mem").await, ["s1"]);

    // Restore a running VM, then a stopped one: each time the guest carries on from the
    // snapshot's counter without booting, and its disk holds the snapshot's counter.
    for round in 0..2 {
        if round == 1 {
            stop(&mut c, "mem", true).await;
        }
        let from = serial(&vm).len();
        let r = restore(&mut c, "mem", "s1").await.unwrap();
        let restored = serial(&vm).len();
        let vm_now = r.vm.unwrap();
        println!(
            "restore #{round}: {} ms (memory load {} ms)",
            r.restore_ms, r.load_ms
        );
        assert_eq!(phase(&vm_now), pb::VmPhase::Running);
        assert!(
            0 < r.load_ms && r.load_ms <= r.restore_ms,
            "loading took {} ms of the restore's {} ms",
            r.load_ms,
            r.restore_ms
        );
        // The guest goes on from the snapshot's counter, without booting.
        let first = resumed_counter(&vm, from, restored, BOOT).await;
        assert!(
            (before..=after + 2).contains(&first),
            "restore #{round}: the guest resumed at {first}, the snapshot was taken at {before}..{after}"
        );
        // Boot once from the restored disk: the counter it finds there is the snapshot's
        // (give or take the seconds the guest ran after the restore), not the later one. The
        // guest powers off, so that no write of the counter is cut in half.
        stop(&mut c, "mem", false).await;
        let booted = serial(&vm).len();
        c.start_vm(pb::StartVmRequest { name: "mem".into() })
            .await
            .unwrap();
        let on_disk = disk_counter_at_boot(&vm, booted, BOOT).await;
        assert!(
            (before.saturating_sub(1)..=after + 4).contains(&on_disk),
            "restore #{round}: the disk said {on_disk}, the snapshot was at {before}..{after}"
        );
    }

    // The snapshot is deleted; the last one gone, the VM's disk is its own file again.
    let freed = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            name: "mem".into(),
            snapshot: "s1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .freed_bytes;
    assert!(freed >= snap.size_bytes, "{freed} freed of {snap:?}");
    assert!(snapshot_names(&mut c, "mem").await.is_empty());
    let data = PathBuf::from(&vm.status.as_ref().unwrap().data_dir);
    assert_eq!(
        std::fs::read_dir(data.join("layers")).unwrap().count(),
        0,
        "no layer left once the last snapshot is gone"
    );
    // And the VM, now on its own disk file again, takes the next snapshot as before.
    snapshot(&mut c, "mem", "s2", true, false).await.unwrap();
    assert_eq!(snapshot_names(&mut c, "mem").await, ["s2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_snapshot_quiesced_brings_the_disk_back() {
    let agent = Agent::start("snap-b").await;
    let mut c = agent.client().await;
    let vm = running_guest(&agent, &mut c, "disk", 3).await;

    let before = last_counter(&serial(&vm)).unwrap();
    let snap = snapshot(&mut c, "disk", "d1", false, true).await.unwrap();
    let after = last_counter(&serial(&vm)).unwrap();
    assert!(!snap.memory && snap.quiesced, "{snap:?}");
    assert_eq!(snap.pause_ms, 0, "a disk snapshot does not pause the guest");
    wait_counter_above(&vm, after + 6, Duration::from_secs(60)).await;

    // Restoring disks only restarts a running guest on the snapshot's disks.
    let from = serial(&vm).len();
    let r = restore(&mut c, "disk", "d1").await.unwrap();
    assert_eq!(phase(&r.vm.unwrap()), pb::VmPhase::Running);
    let on_disk = disk_counter_at_boot(&vm, from, BOOT).await;
    assert!(
        (before.saturating_sub(1)..=after + 1).contains(&on_disk),
        "the disk said {on_disk}, the snapshot was at {before}..{after}"
    );
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("hs-tmpfs-")
            .tempdir_in("/tmp")
            .unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs as a full snapshot target, which needs root"
        );
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_failures_leave_the_vm_as_it_was() {
    let full = Tmpfs::mount("8m");
    let dir = full.path().to_str().unwrap().to_string();
    let agent = Agent::start_with("snap-c", &["--snapshot-dir", &dir]).await;
    let mut c = agent.client().await;
    let vm = running_guest(&agent, &mut c, "fail", 2).await;
    let pid = vm.status.as_ref().unwrap().pid;
    let still_running = |c: &mut Client| {
        let mut c = c.clone();
        let vm = vm.clone();
        async move {
            let now = get(&mut c, "fail").await;
            assert_eq!(phase(&now), pb::VmPhase::Running, "{:?}", now.status);
            assert_eq!(now.status.unwrap().pid, pid, "the same QEMU");
            let n = last_counter(&serial(&vm)).unwrap();
            wait_counter_above(&vm, n, Duration::from_secs(60)).await;
        }
    };

    // A name with path characters.
    for bad in ["../x", "a/b", "x,y"] {
        let e = snapshot(&mut c, "fail", bad, true, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e:?}");
        assert!(e.message().starts_with("snapshot:"), "{e:?}");
    }

    // No space left for the memory state.
    let e = snapshot(&mut c, "fail", "full", true, false)
        .await
        .unwrap_err();
    println!("on a full disk: {e:?}");
    assert!(e.message().contains("No space left"), "{e:?}");
    assert!(snapshot_names(&mut c, "fail").await.is_empty());
    assert_eq!(
        std::fs::read_dir(full.path().join("fail")).unwrap().count(),
        0,
        "nothing half-written is left"
    );
    still_running(&mut c).await;
    drop(agent);
    drop(full);

    // A damaged snapshot is refused before the VM is touched.
    let agent = Agent::start("snap-d").await;
    let mut c = agent.client().await;
    let vm = running_guest(&agent, &mut c, "fail", 2).await;
    let pid = vm.status.as_ref().unwrap().pid;
    snapshot(&mut c, "fail", "good", true, false).await.unwrap();
    // The digest is recorded in the background, after the save returned.
    eventually(Duration::from_secs(60), "a digest recorded", async || {
        c.list_snapshots(pb::ListSnapshotsRequest {
            name: "fail".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .iter()
        .any(|s| !s.memory_digest.is_empty())
    })
    .await;
    let memory = agent.data_dir().join("snapshots/fail/good/memory.bin");
    let len = std::fs::metadata(&memory).unwrap().len();
    let original = std::fs::read(&memory).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"\x5a", len / 2).unwrap();
    let e = restore(&mut c, "fail", "good").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("does not match its digest"), "{e:?}");
    f.set_len(len / 3).unwrap();
    let e = restore(&mut c, "fail", "good").await.unwrap_err();
    assert!(e.message().contains("truncated"), "{e:?}");
    let now = get(&mut c, "fail").await;
    assert_eq!(phase(&now), pb::VmPhase::Running);
    assert_eq!(now.status.unwrap().pid, pid, "the same QEMU runs on");
    let n = last_counter(&serial(&vm)).unwrap();
    wait_counter_above(&vm, n, Duration::from_secs(60)).await;
    // Mended, it restores.
    std::fs::write(&memory, &original).unwrap();
    restore(&mut c, "fail", "good").await.unwrap();
    let e = restore(&mut c, "fail", "nope").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // QEMU killed while it writes the state: an error, and no snapshot.
    let pid = get(&mut c, "fail").await.status.unwrap().pid;
    let mut c2 = c.clone();
    let save = tokio::spawn(async move { snapshot(&mut c2, "fail", "cut", true, false).await });
    let partial = agent.data_dir().join("snapshots/fail/cut/memory.bin");
    eventually(SAVE_BEGINS, "the save to begin", async || partial.exists()).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let e = save.await.unwrap().unwrap_err();
    println!("QEMU killed during the save: {e:?}");
    assert_eq!(snapshot_names(&mut c, "fail").await, ["good"]);
    assert!(!partial.exists(), "the partial state file is removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_during_a_snapshot_leaves_the_vm_running() {
    let mut agent = Agent::start("snap-e").await;
    let mut c = agent.client().await;
    let vm = running_guest(&agent, &mut c, "cut", 2).await;
    let pid = vm.status.as_ref().unwrap().pid;
    let mut c2 = c.clone();
    let save = tokio::spawn(async move { snapshot(&mut c2, "cut", "half", true, false).await });
    let partial = agent.data_dir().join("snapshots/cut/half/memory.bin");
    eventually(SAVE_BEGINS, "the save to begin", async || partial.exists()).await;
    agent.kill_agent(nix::sys::signal::Signal::SIGKILL);
    assert!(
        save.await.unwrap().is_err(),
        "the call ended with the agent"
    );
    agent.respawn().await;
    let mut c = agent.client().await;
    let now = wait_vm(&mut c, "cut", BOOT, "running again", |s| {
        s.phase == pb::VmPhase::Running as i32
    })
    .await;
    assert_eq!(
        now.status.as_ref().unwrap().pid,
        pid,
        "the same QEMU, adopted"
    );
    println!(
        "after the restart: {}",
        now.status.as_ref().unwrap().message
    );
    let n = last_counter(&serial(&vm)).unwrap();
    wait_counter_above(&vm, n, Duration::from_secs(60)).await;
    assert!(snapshot_names(&mut c, "cut").await.is_empty());
    assert!(!partial.exists(), "the unfinished snapshot is removed");
    // The QEMU is fit for the next snapshot.
    snapshot(&mut c, "cut", "whole", true, false).await.unwrap();
}
