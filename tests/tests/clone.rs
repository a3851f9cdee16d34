//! Cloning a VM on its node: a running source keeps running while its disk is copied at one
//! instant; the clone boots from that copy; a linked clone of a disk with a backing file
//! copies only the top layer; the clone's disks go with it.

use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;
use tonic::Code;

fn clone_req(name: &str, target: &str, linked: bool) -> pb::CloneVmRequest {
    pb::CloneVmRequest {
        name: name.into(),
        target_name: target.into(),
        linked,
        start: true,
        labels: Default::default(),
    }
}

/// The counter the guest's disk held when its clone booted: the first one the clone printed.
fn first_counter(serial: &str) -> u64 {
    all_counters(serial).first().copied().expect("no counter")
}

#[tokio::test(flavor = "multi_thread")]
async fn running_and_layered_vms_clone_at_one_instant() {
    let agent = Agent::start("clone").await;
    let mut c = agent.client().await;
    let src = create(&mut c, agent.small_spec("src"), true).await;
    let pid = src.status.as_ref().unwrap().pid;
    wait_counter_above(&src, 3, Duration::from_secs(60)).await;

    // Full clone of the running VM.
    let before = last_counter(&serial(&src)).unwrap();
    let clone = c
        .clone_vm(clone_req("src", "copy", false))
        .await
        .unwrap()
        .into_inner();
    let after = last_counter(&serial(&src)).unwrap();
    let disk = &clone.spec.as_ref().unwrap().disks[0].path;
    let dir = agent.data_dir().join("images/clones/copy");
    assert!(disk.starts_with(dir.to_str().unwrap()), "{disk}");
    wait_boots(&clone, 1, Duration::from_secs(60)).await;
    wait_counter_above(&clone, 0, Duration::from_secs(30)).await;
    let from_disk = first_counter(&serial(&clone));
    println!(
        "source counted {before}..{after} during the clone; the clone went on from {from_disk}"
    );
    // The disk lags the console by a write at most.
    assert!(
        (before.saturating_sub(2)..=after + 1).contains(&from_disk),
        "clone started from {from_disk}, source was at {before}..{after}"
    );
    let now = get(&mut c, "src").await;
    assert_eq!(now.status.as_ref().unwrap().pid, pid, "the source ran on");
    wait_counter_above(&src, after + 1, Duration::from_secs(60)).await;
    assert_eq!(count_markers(&serial(&src), READY_MARKER), 1);

    // Bad input: nothing is made.
    for (req, code) in [
        (clone_req("src", "copy", false), Code::AlreadyExists),
        (clone_req("src", "../x", false), Code::InvalidArgument),
        (clone_req("src", "src", false), Code::AlreadyExists),
        (clone_req("ghost", "y", false), Code::NotFound),
    ] {
        let e = c.clone_vm(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {}", e.message());
    }
    assert!(!agent.data_dir().join("images/clones/y").exists());

    // A stopped VM on an overlay: its linked clone copies the top layer over the same base.
    let base = std::path::PathBuf::from(&src.spec.as_ref().unwrap().disks[0].path);
    let top = base.with_file_name("layered-top.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .args([&base, &top])
        .status()
        .unwrap();
    assert!(made.success());
    stop(&mut c, "src", false).await;
    let mut spec = agent.small_spec("layered");
    spec.disks[0].path = top.to_string_lossy().into();
    let layered = create(&mut c, spec, true).await;
    wait_counter_above(&layered, 1, Duration::from_secs(60)).await;
    stop(&mut c, "layered", false).await;
    let linked = c
        .clone_vm(clone_req("layered", "linked", true))
        .await
        .unwrap()
        .into_inner();
    let copy = std::path::PathBuf::from(&linked.spec.as_ref().unwrap().disks[0].path);
    assert_eq!(
        hypersdk_agent::host::image::backing_file(&copy),
        Some(base.clone()),
        "the linked clone's disk is a top layer over the same base"
    );
    wait_counter_above(&linked, 0, Duration::from_secs(60)).await;
    let stopped_at = last_counter(&serial(&layered)).unwrap();
    assert!(
        first_counter(&serial(&linked)) >= stopped_at.saturating_sub(1),
        "the clone goes on from the layered VM's disk"
    );

    // The clone's disks go with it.
    c.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "copy".into(),
    })
    .await
    .unwrap();
    assert!(!dir.exists(), "{} removed", dir.display());
}
