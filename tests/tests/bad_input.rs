//! Bad requests get a clear error naming the field, and change nothing: a running VM keeps
//! running, no VM or directory appears.

use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_and_change_nothing() {
    let agent = Agent::start("node-bad").await;
    let mut c = agent.client().await;
    let good = create(&mut c, agent.guest_spec("good"), true).await;
    let pid = good.status.as_ref().unwrap().pid;
    wait_boots(&good, 1, Duration::from_secs(60)).await;
    let before = VmState::from(&get(&mut c, "good").await);

    let base = agent.guest_spec("bad");
    let with = |f: &dyn Fn(&mut pb::VmSpec)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    let outside = std::env::temp_dir().join(format!("hs-outside-{}.img", std::process::id()));
    std::fs::write(&outside, b"not for guests").unwrap();
    let images = agent.dir.path().join("images");
    let cases: Vec<(&str, pb::VmSpec, Code, &str)> = vec![
        (
            "duplicate name",
            with(&|s| s.name = "good".into()),
            Code::AlreadyExists,
            "\"good\" already exists",
        ),
        (
            "invalid name",
            with(&|s| s.name = "Bad_Name".into()),
            Code::InvalidArgument,
            "spec.name",
        ),
        (
            "name too long",
            with(&|s| s.name = "a".repeat(64)),
            Code::InvalidArgument,
            "spec.name",
        ),
        (
            "0 cpus",
            with(&|s| s.cpus = 0),
            Code::InvalidArgument,
            "spec.cpus",
        ),
        (
            "cpus > maxCpus",
            with(&|s| s.cpus = 3),
            Code::InvalidArgument,
            "spec.cpus",
        ),
        (
            "memory not a quantity",
            with(&|s| s.memory = "8XB".into()),
            Code::InvalidArgument,
            "spec.memory",
        ),
        (
            "memory above max",
            with(&|s| s.memory = "1Gi".into()),
            Code::InvalidArgument,
            "spec.memory",
        ),
        (
            "kernel outside allowed dirs",
            with(&|s| s.boot.as_mut().unwrap().kernel = "/etc/shadow".into()),
            Code::InvalidArgument,
            "spec.boot.kernel",
        ),
        (
            "initrd outside allowed dirs",
            with(&|s| s.boot.as_mut().unwrap().initrd = outside.to_string_lossy().into()),
            Code::InvalidArgument,
            "spec.boot.initrd",
        ),
        (
            "disk path with ..",
            with(&|s| s.disks[0].path = format!("{}/../../../etc/passwd", images.display())),
            Code::InvalidArgument,
            "spec.disks[0].path",
        ),
        (
            "comma in kernel path",
            with(&|s| {
                s.boot.as_mut().unwrap().kernel = format!("{}/vmlinuz,if=none", images.display())
            }),
            Code::InvalidArgument,
            "spec.boot.kernel",
        ),
        (
            "= in disk path",
            with(&|s| s.disks[0].path = format!("{}/x=y.qcow2", images.display())),
            Code::InvalidArgument,
            "spec.disks[0].path",
        ),
        (
            "comma in disk path",
            with(&|s| {
                s.disks[0].path = format!("{}/d.qcow2,file.filename=/etc/shadow", images.display())
            }),
            Code::InvalidArgument,
            "spec.disks[0].path",
        ),
        (
            "control character in cmdline",
            with(&|s| s.boot.as_mut().unwrap().cmdline = "quiet\n-device x".into()),
            Code::InvalidArgument,
            "spec.boot.cmdline",
        ),
        (
            "missing disk file",
            with(&|s| s.disks[0].path = format!("{}/missing.qcow2", images.display())),
            Code::InvalidArgument,
            "spec.disks[0].path",
        ),
        (
            "bad disk name",
            with(&|s| s.disks[0].name = "Root Disk".into()),
            Code::InvalidArgument,
            "spec.disks[0].name",
        ),
    ];
    for (what, spec, code, needle) in cases {
        let err = c
            .create_vm(pb::CreateVmRequest {
                spec: Some(spec),
                start: true,
            })
            .await
            .expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{what}: {:?} should name {needle:?}",
            err.message()
        );
    }
    let err = c
        .create_vm(pb::CreateVmRequest {
            spec: None,
            start: false,
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("spec"), "{}", err.message());

    // Unknown VMs, and names that are not names, for every per-VM call.
    for name in ["nope", "../etc"] {
        let code = if name == "nope" {
            Code::NotFound
        } else {
            Code::InvalidArgument
        };
        let n = || name.to_string();
        let errs = [
            c.get_vm(pb::GetVmRequest { name: n() }).await.unwrap_err(),
            c.start_vm(pb::StartVmRequest { name: n() })
                .await
                .unwrap_err(),
            c.stop_vm(pb::StopVmRequest {
                name: n(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            c.restart_vm(pb::RestartVmRequest {
                name: n(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            c.pause_vm(pb::PauseVmRequest { name: n() })
                .await
                .unwrap_err(),
            c.resume_vm(pb::ResumeVmRequest { name: n() })
                .await
                .unwrap_err(),
            c.delete_vm(pb::DeleteVmRequest {
                keep_disks: false,
                name: n(),
            })
            .await
            .unwrap_err(),
        ];
        for e in errs {
            assert_eq!(e.code(), code, "{name}: {}", e.message());
        }
    }

    // Wrong state: a clear refusal, not an attempt.
    let err = c
        .start_vm(pb::StartVmRequest {
            name: "good".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("cannot start a VM that is Running"),
        "{}",
        err.message()
    );
    let err = c
        .resume_vm(pb::ResumeVmRequest {
            name: "good".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Nothing changed: one VM, the same, still the same QEMU, still counting.
    let vms = list(&mut c).await;
    assert_eq!(vms.len(), 1);
    let now = get(&mut c, "good").await;
    assert_eq!(phase(&now), pb::VmPhase::Running);
    assert_eq!(now.status.as_ref().unwrap().pid, pid);
    assert_eq!(
        VmState::from(&now),
        before,
        "a refused request changed the VM"
    );
    assert!(pid_alive(pid));
    let dirs: Vec<_> = std::fs::read_dir(agent.data_dir().join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(dirs, vec![std::ffi::OsString::from("good")]);
    wait_counting(&now, Duration::from_secs(60)).await;
    let _ = std::fs::remove_file(outside);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_image_may_not_smuggle_in_a_host_file() {
    let agent = Agent::start("node-img").await;
    let mut c = agent.client().await;
    let images = agent.dir.path().join("images");
    // A qcow2 overlay whose backing file is a host file outside the allowed directories.
    let evil = images.join("evil.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/passwd",
        ])
        .arg(&evil)
        .arg("1M")
        .status()
        .unwrap();
    assert!(status.success());
    let mut spec = agent.guest_spec("smuggler");
    spec.disks[0].path = evil.to_string_lossy().into();
    let err = c
        .create_vm(pb::CreateVmRequest {
            spec: Some(spec.clone()),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("spec.disks[0].path") && err.message().contains("backing file"),
        "{}",
        err.message()
    );

    // A raw file declared as qcow2 is refused rather than misread.
    let raw = images.join("plain.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    spec.disks[0].path = raw.to_string_lossy().into();
    spec.disks[0].format = pb::DiskFormat::Qcow2 as i32;
    let err = c
        .create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            start: false,
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("declared qcow2"),
        "{}",
        err.message()
    );
    assert!(list(&mut c).await.is_empty());
}

/// A create racing the delete of the same name: whatever wins, the registry tells the truth
/// (a VM that was created is found afterwards; a deleted one is gone).
#[tokio::test(flavor = "multi_thread")]
async fn create_racing_delete_of_the_same_name_keeps_the_registry_true() {
    let agent = Agent::start("node-race").await;
    let mut c = agent.client().await;
    create(&mut c, agent.small_spec("twin"), false).await;
    for round in 0..200 {
        let (mut d, mut k) = (c.clone(), c.clone());
        let delete = tokio::spawn(async move {
            d.delete_vm(pb::DeleteVmRequest {
                keep_disks: false,
                name: "twin".into(),
            })
            .await
        });
        let spec = agent.small_spec("twin");
        let created = tokio::spawn(async move {
            k.create_vm(pb::CreateVmRequest {
                spec: Some(spec),
                start: false,
            })
            .await
        });
        let (deleted, created) = (delete.await.unwrap(), created.await.unwrap());
        let listed = list(&mut c).await.len();
        // Either the create came too early (AlreadyExists) and the delete removed the VM,
        // or it came after and the new VM must be there.
        match (&deleted, &created) {
            (_, Ok(_)) => assert_eq!(listed, 1, "round {round}: the created VM vanished"),
            (Ok(_), Err(e)) if e.code() == tonic::Code::AlreadyExists => {
                assert_eq!(listed, 0, "round {round}");
                create(&mut c, agent.small_spec("twin"), false).await;
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
}
