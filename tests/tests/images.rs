//! Images from a URL with a checksum, the disks the agent makes over them, and the cloud-init
//! volume: fetched once per node into the image cache (shown as phase Importing), a writable
//! qcow2 overlay of the requested size per VM over the untouched cached image, deleted with
//! the VM; bad images and sizes refused with the reason, leaving nothing behind; an import
//! cut short by an agent crash starts again cleanly.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hypersdk_agent::cloudinit::CloudInit;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;
use serde_json::Value;
use sha2::Digest;
use tonic::Code;

const BOOT: Duration = Duration::from_secs(180);
const IMPORT: Duration = Duration::from_secs(60);

fn sha256(bytes: &[u8]) -> String {
    let d = sha2::Sha256::digest(bytes);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The test guest with its root disk made by the agent over `source`, and cloud-init data.
fn image_spec(agent: &Agent, name: &str, source: &str, checksum: &str, size: &str) -> pb::VmSpec {
    let mut spec = agent.small_spec(name);
    spec.disks = vec![pb::Disk {
        name: "root".into(),
        image: Some(pb::DiskImage {
            source: source.into(),
            checksum: checksum.into(),
        }),
        size: size.into(),
        boot_order: 1,
        ..Default::default()
    }];
    spec.cloud_init = Some(pb::CloudInit {
        user_data: format!("#cloud-config\nhostname: {name}\n"),
        ..Default::default()
    });
    spec
}

fn cache_dir(agent: &Agent) -> PathBuf {
    agent.data_dir().join("images/cache")
}

/// The image files in the agent's cache, and the files of unfinished downloads.
fn cache_files(agent: &Agent) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let list = |dir: &Path| -> Vec<PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    };
    let dir = cache_dir(agent);
    (list(&dir), list(&dir.join(".partial")))
}

fn disk_dir(agent: &Agent, vm: &str) -> PathBuf {
    agent.data_dir().join("images/disks").join(vm)
}

/// `qemu-img info` of an image in use (-U: without taking its lock).
fn qemu_img_info(path: &str) -> Value {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The arguments of a running process.
fn cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    raw.split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Every (VM, phase, import percent) the agent reported, gathered in the background.
fn record_events(mut stream: tonic::Streaming<pb::VmEvent>) -> Arc<Mutex<Vec<(String, i32, u32)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        while let Some(Ok(ev)) = stream.next().await {
            let vm = ev.vm.unwrap_or_default();
            let status = vm.status.unwrap_or_default();
            let percent = status.import.map_or(0, |i| i.percent);
            let name = vm.spec.unwrap_or_default().name;
            out.lock().unwrap().push((name, status.phase, percent));
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn a_url_image_is_fetched_once_and_each_vm_runs_on_its_own_overlay() {
    let agent = Agent::start("img-a").await;
    let mut c = agent.client().await;
    // Paced: ten steps of 64 KiB, so that the import is seen under way.
    let server = ImageServer::start(Some(Duration::from_millis(100))).await;
    let image = std::fs::read(&agent.guest.disk).unwrap();
    let checksum = sha256(&image);
    server.put("/guest.qcow2", image.clone());
    let url = server.url("/guest.qcow2");
    let watch = c
        .watch_vms(pb::WatchVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let events = record_events(watch);

    // Two VMs want the image at once.
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let spec_a = image_spec(&agent, "a", &url, &checksum, "256Mi");
    let spec_b = image_spec(&agent, "b", &url, &checksum, "128Mi");
    let (a, b) = tokio::join!(create(&mut c1, spec_a, true), create(&mut c2, spec_b, true));
    for vm in [&a, &b] {
        let name = &vm.spec.as_ref().unwrap().name;
        let vm = wait_vm(&mut c, name, BOOT, "Running", |s| {
            s.phase == pb::VmPhase::Running as i32
        })
        .await;
        // The guest mounted its root disk (the overlay, /dev/vda) and writes to it.
        disk_counter_at_boot(&vm, 0, BOOT).await;
        wait_counter_above(&vm, 2, BOOT).await;
    }
    assert_eq!(server.hits("/guest.qcow2"), 1, "one download for both VMs");
    let seen = events.lock().unwrap().clone();
    for name in ["a", "b"] {
        let importing: Vec<u32> = seen
            .iter()
            .filter(|(n, phase, _)| n == name && *phase == pb::VmPhase::Importing as i32)
            .map(|(_, _, p)| *p)
            .collect();
        assert!(
            importing.iter().any(|p| (1..100).contains(p)),
            "{name} was seen importing part way: {importing:?}"
        );
        assert!(importing.is_sorted(), "{name}: {importing:?}");
    }

    // One verified image in the cache, untouched by the guests that write to their disks.
    let (cached, partial) = cache_files(&agent);
    let hex = checksum.trim_start_matches("sha256:");
    assert_eq!(
        cached,
        [cache_dir(&agent).join(format!("sha256-{hex}.qcow2"))]
    );
    assert!(partial.is_empty(), "{partial:?}");
    assert_eq!(sha256(&std::fs::read(&cached[0]).unwrap()), checksum);
    let a = get(&mut c, "a").await;
    let b = get(&mut c, "b").await;
    for (vm, size) in [(&a, 256u64 << 20), (&b, 128 << 20)] {
        let root = &vm.spec.as_ref().unwrap().disks[0];
        assert!(
            root.path.starts_with(
                disk_dir(&agent, &vm.spec.as_ref().unwrap().name)
                    .to_str()
                    .unwrap()
            )
        );
        let info = qemu_img_info(&root.path);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], size, "{info}");
        assert_eq!(info["backing-filename"], cached[0].to_str().unwrap());
        assert_eq!(info["backing-filename-format"], "qcow2");
    }

    // The cloud-init volume: attached read-only after the root disk, and the bytes the
    // library makes of the VM's cloud-init data (the same on every node, every time).
    let status = a.status.clone().unwrap();
    let argv = cmdline(status.pid);
    let cidata = argv
        .iter()
        .filter_map(|a| serde_json::from_str::<Value>(a).ok())
        .find(|bd| bd["node-name"] == "cidata")
        .expect("a cidata blockdev");
    assert_eq!(cidata["read-only"], true);
    assert_eq!(cidata["file"]["read-only"], true);
    let devices: Vec<_> = argv
        .iter()
        .filter(|a| a.starts_with("virtio-blk-pci"))
        .collect();
    assert_eq!(
        devices,
        [
            "virtio-blk-pci,id=vdisk0,drive=disk0,bootindex=1",
            "virtio-blk-pci,id=vcidata,drive=cidata"
        ]
    );
    let volume = std::fs::read(cidata["file"]["filename"].as_str().unwrap()).unwrap();
    let expected = CloudInit::new(
        "#cloud-config\nhostname: a\n".into(),
        String::new(),
        "",
        "",
        "a",
    )
    .unwrap()
    .volume()
    .unwrap();
    assert!(
        volume == expected,
        "the cidata volume is not the expected bytes"
    );
    let fs = fatfs::FileSystem::new(std::io::Cursor::new(volume), fatfs::FsOptions::new()).unwrap();
    assert_eq!(fs.volume_label().trim_end(), "cidata");
    let mut meta = String::new();
    std::io::Read::read_to_string(
        &mut fs.root_dir().open_file("meta-data").unwrap(),
        &mut meta,
    )
    .unwrap();
    assert_eq!(meta, "instance-id: a\nlocal-hostname: a\n");

    // Deleting a VM deletes its disks, not the image; the other VM runs on.
    c.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "a".into(),
    })
    .await
    .unwrap();
    assert!(!disk_dir(&agent, "a").exists(), "a's disks are gone");
    assert_eq!(sha256(&std::fs::read(&cached[0]).unwrap()), checksum);
    wait_counting(&b, BOOT).await;

    // A snapshot puts a layer over the overlay; deleting it merges the layer back into the
    // overlay (the disk's own file), never into the cached image.
    let b_root = b.spec.as_ref().unwrap().disks[0].path.clone();
    c.create_snapshot(pb::CreateSnapshotRequest {
        name: "b".into(),
        snapshot: "s1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    wait_counting(&b, BOOT).await;
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        name: "b".into(),
        snapshot: "s1".into(),
    })
    .await
    .unwrap();
    wait_counting(&b, BOOT).await;
    assert_eq!(
        qemu_img_info(&b_root)["backing-filename"],
        cached[0].to_str().unwrap()
    );
    assert_eq!(sha256(&std::fs::read(&cached[0]).unwrap()), checksum);

    // A linked clone copies the overlay's top layer, over the same cached image, and boots
    // from the copy; deleting it leaves the image alone.
    let clone = c
        .clone_vm(pb::CloneVmRequest {
            name: "b".into(),
            target_name: "b2".into(),
            linked: true,
            start: true,
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    let copy = &clone.spec.as_ref().unwrap().disks[0];
    assert!(
        copy.image.is_none() && copy.size.is_empty(),
        "the copy is the clone's own file"
    );
    let info = qemu_img_info(&copy.path);
    assert_eq!(info["backing-filename"], cached[0].to_str().unwrap());
    assert_eq!(info["virtual-size"], 128u64 << 20);
    assert!(
        disk_counter_at_boot(&clone, 0, BOOT).await > 0,
        "the clone has b's disk"
    );
    c.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "b2".into(),
    })
    .await
    .unwrap();
    assert!(!Path::new(&copy.path).exists());
    c.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "b".into(),
    })
    .await
    .unwrap();
    assert!(!disk_dir(&agent, "b").exists());
    assert_eq!(cache_files(&agent).0, cached, "the image stays cached");
}

/// Waits until `name` is Failed; returns its message after checking nothing was made for it.
async fn failed(c: &mut Client, agent: &Agent, name: &str) -> String {
    let vm = wait_vm(c, name, IMPORT, "Failed", |s| {
        s.phase == pb::VmPhase::Failed as i32
    })
    .await;
    let status = vm.status.unwrap();
    assert_eq!(status.pid, 0, "{name}: no QEMU");
    assert!(!disk_dir(agent, name).exists(), "{name}: no disk left");
    assert!(
        cache_files(agent).1.is_empty(),
        "{name}: no partial download left"
    );
    status.message
}

/// A CreateVm the agent refuses outright: the field named, no VM made.
async fn refused(c: &mut Client, spec: pb::VmSpec, field: &str) -> String {
    let name = spec.name.clone();
    let e = c
        .create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            start: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().starts_with(field), "{field}: {e}");
    assert!(
        list(c)
            .await
            .iter()
            .all(|v| v.spec.as_ref().unwrap().name != name)
    );
    e.message().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_images_sizes_and_user_data_are_refused_with_the_reason() {
    let agent = Agent::start("img-bad").await;
    let mut c = agent.client().await;
    let server = ImageServer::start(None).await;
    let image = std::fs::read(&agent.guest.disk).unwrap();
    let checksum = sha256(&image);
    server.put("/guest.qcow2", image);
    let page = b"<html><body>Not the image you are looking for</body></html>\n".to_vec();
    let page_sum = sha256(&page);
    server.put("/page.html", page);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    // Wrong checksum: said with both digests; nothing cached.
    let wrong = sha256(b"something else");
    create(
        &mut c,
        image_spec(&agent, "wrong-sum", &server.url("/guest.qcow2"), &wrong, ""),
        true,
    )
    .await;
    let msg = failed(&mut c, &agent, "wrong-sum").await;
    assert!(msg.starts_with("spec.disks[0].image: "), "{msg}");
    assert!(
        msg.contains(&format!("has digest {checksum}, expected {wrong}")),
        "{msg}"
    );
    assert!(cache_files(&agent).0.is_empty(), "nothing cached");

    let unreachable = format!("http://{closed}/guest.qcow2");
    create(
        &mut c,
        image_spec(&agent, "no-server", &unreachable, &checksum, ""),
        true,
    )
    .await;
    let msg = failed(&mut c, &agent, "no-server").await;
    assert!(
        msg.contains(&format!("cannot download {unreachable}")),
        "{msg}"
    );

    create(
        &mut c,
        image_spec(&agent, "missing", &server.url("/gone.qcow2"), &checksum, ""),
        true,
    )
    .await;
    let msg = failed(&mut c, &agent, "missing").await;
    assert!(msg.contains("answered HTTP 404"), "{msg}");

    create(
        &mut c,
        image_spec(
            &agent,
            "not-image",
            &server.url("/page.html"),
            &page_sum,
            "",
        ),
        true,
    )
    .await;
    let msg = failed(&mut c, &agent, "not-image").await;
    assert!(msg.contains("is not a disk image: it is text"), "{msg}");
    assert!(cache_files(&agent).0.is_empty(), "nothing cached");

    // Smaller than the image (64 MiB): no disk; the verified image may stay cached.
    create(
        &mut c,
        image_spec(
            &agent,
            "too-small",
            &server.url("/guest.qcow2"),
            &checksum,
            "16Mi",
        ),
        true,
    )
    .await;
    let msg = failed(&mut c, &agent, "too-small").await;
    assert_eq!(
        msg,
        "spec.disks[0].size: 16Mi is smaller than the image (64Mi): the disk must hold the whole image"
    );

    // Refused before anything is made.
    let mut s = image_spec(&agent, "bad-ud", &server.url("/guest.qcow2"), &checksum, "");
    s.cloud_init.as_mut().unwrap().user_data = "hostname: x\n".into();
    refused(
        &mut c,
        s,
        "spec.cloudInit.userData: must start with a cloud-init header",
    )
    .await;
    let mut s = image_spec(&agent, "big-ud", &server.url("/guest.qcow2"), &checksum, "");
    s.cloud_init.as_mut().unwrap().user_data = format!("#!/bin/sh\n#{}\n", "x".repeat(64 << 10));
    refused(
        &mut c,
        s,
        "spec.cloudInit.userData: is 65548 bytes, the limit is 65536",
    )
    .await;
    let s = image_spec(&agent, "no-sum", &server.url("/guest.qcow2"), "", "");
    refused(&mut c, s, "spec.disks[0].image.checksum: is required").await;
    let s = image_spec(&agent, "outside", "/etc/hostname", "", "");
    refused(
        &mut c,
        s,
        "spec.disks[0].image.source: /etc/hostname is outside",
    )
    .await;
    let mut s = image_spec(&agent, "chosen", &server.url("/guest.qcow2"), &checksum, "");
    s.disks[0].path = agent.guest.disk.to_string_lossy().into();
    refused(&mut c, s, "spec.disks[0].path: must be empty").await;
    let mut s = image_spec(
        &agent,
        "bad-size",
        &server.url("/guest.qcow2"),
        &checksum,
        "",
    );
    s.disks[0].size = "1000".into();
    refused(&mut c, s, "spec.disks[0].size").await;

    // The failed VMs hold nothing and go away on request.
    for name in [
        "wrong-sum",
        "no-server",
        "missing",
        "not-image",
        "too-small",
    ] {
        c.delete_vm(pb::DeleteVmRequest {
            keep_disks: false,
            name: name.into(),
        })
        .await
        .unwrap();
    }
    assert!(list(&mut c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_cut_short_by_an_agent_crash_starts_again_cleanly() {
    let mut agent = Agent::start("img-crash").await;
    let mut c = agent.client().await;
    let server = ImageServer::start(Some(Duration::from_millis(300))).await;
    let image = std::fs::read(&agent.guest.disk).unwrap();
    let checksum = sha256(&image);
    server.put("/guest.qcow2", image);
    let spec = image_spec(&agent, "cut", &server.url("/guest.qcow2"), &checksum, "");
    create(&mut c, spec, true).await;
    wait_vm(&mut c, "cut", IMPORT, "importing part way", |s| {
        s.phase == pb::VmPhase::Importing as i32 && s.import.as_ref().is_some_and(|i| i.percent > 0)
    })
    .await;
    assert_eq!(
        cache_files(&agent).1.len(),
        1,
        "a partial download under way"
    );
    agent.kill_agent(nix::sys::signal::Signal::SIGKILL);
    agent.respawn().await;
    let mut c = agent.client().await;
    // The partial file is gone and never became an image; the VM says what happened.
    assert_eq!(cache_files(&agent), (vec![], vec![]));
    let msg = failed(&mut c, &agent, "cut").await;
    assert!(msg.contains("restarted during the image import"), "{msg}");
    let vm = c
        .start_vm(pb::StartVmRequest { name: "cut".into() })
        .await
        .unwrap()
        .into_inner();
    disk_counter_at_boot(&vm, 0, BOOT).await;
    assert_eq!(
        server.hits("/guest.qcow2"),
        2,
        "downloaded again from the start"
    );
    let (cached, partial) = cache_files(&agent);
    assert_eq!(cached.len(), 1);
    assert!(partial.is_empty());
    assert_eq!(sha256(&std::fs::read(&cached[0]).unwrap()), checksum);
    c.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "cut".into(),
    })
    .await
    .unwrap();
}
