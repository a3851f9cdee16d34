//! A VM's whole life through the agent's gRPC API, on real QEMU with the test guest.

use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;

const BOOT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn create_pause_resume_stop_start_restart_delete() {
    let agent = Agent::start("node-a").await;
    let mut c = agent.client().await;

    // create → Running, guest up, guest agent answering
    let vm = create(&mut c, agent.guest_spec("life"), true).await;
    assert_eq!(phase(&vm), pb::VmPhase::Running, "{:?}", vm.status);
    let st = vm.status.clone().unwrap();
    let first_pid = st.pid;
    assert!(pid_alive(first_pid));
    assert_eq!(st.cpus, 1, "QEMU reports the vCPUs it runs");
    assert_eq!(st.memory_bytes, 256 << 20);
    wait_boots(&vm, 1, BOOT).await;
    let vm = wait_vm(&mut c, "life", BOOT, "guest agent", |s| s.agent_connected).await;
    println!("startup timings: {:?}", vm.status.as_ref().unwrap().startup);

    // pause: the guest's counter stops
    current_counter(&vm, BOOT).await;
    let paused = c
        .pause_vm(pb::PauseVmRequest {
            name: "life".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(&paused), pb::VmPhase::Paused);
    assert_eq!(paused.status.as_ref().unwrap().qemu_status, "paused");
    let at_pause = serial(&vm).len();
    let before = last_counter(&serial(&vm)).expect("counted before the pause");
    assert_holds_still(&vm).await;

    // resume: it counts again
    let resumed = c
        .resume_vm(pb::ResumeVmRequest {
            name: "life".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(&resumed), pb::VmPhase::Running);
    wait_counter_above(&vm, before, BOOT).await;
    let counted = all_counters(&serial(&vm)[at_pause..]);
    assert_eq!(
        counted.first(),
        Some(&(before + 1)),
        "the guest goes on from where it was paused: {before}, then {counted:?}"
    );

    // graceful stop: the guest powers itself off (ACPI), QEMU exits, nothing is killed
    let stopped = stop(&mut c, "life", false).await;
    assert_eq!(
        phase(&stopped),
        pb::VmPhase::Stopped,
        "{:?}",
        stopped.status
    );
    assert_eq!(stopped.status.as_ref().unwrap().message, "stopped");
    assert!(
        serial(&vm).contains("reboot: Power down"),
        "the guest powered off by itself"
    );
    assert!(!pid_alive(first_pid), "QEMU process gone");

    // start again: a new QEMU, a second boot
    let started = c
        .start_vm(pb::StartVmRequest {
            name: "life".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(&started), pb::VmPhase::Running);
    let second_pid = started.status.as_ref().unwrap().pid;
    assert_ne!(second_pid, first_pid);
    wait_boots(&vm, 2, BOOT).await;
    wait_vm(&mut c, "life", BOOT, "guest agent after start", |s| {
        s.agent_connected
    })
    .await;

    // restart: stop + start, a third boot in a new process
    let restarted = c
        .restart_vm(pb::RestartVmRequest {
            name: "life".into(),
            timeout_seconds: 30,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(&restarted), pb::VmPhase::Running);
    let third_pid = restarted.status.as_ref().unwrap().pid;
    assert!(third_pid != second_pid && !pid_alive(second_pid));
    wait_boots(&vm, 3, BOOT).await;

    // delete: process gone, directory gone, name unknown
    let dir = std::path::PathBuf::from(&vm.status.as_ref().unwrap().data_dir);
    assert!(dir.is_dir());
    c.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "life".into(),
    })
    .await
    .unwrap();
    assert!(!pid_alive(third_pid), "QEMU process gone after delete");
    assert!(!dir.exists(), "data dir removed");
    let err = c
        .get_vm(pb::GetVmRequest {
            name: "life".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(list(&mut c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_stop_and_unexpected_exit() {
    let agent = Agent::start("node-b").await;
    let mut c = agent.client().await;
    let vm = create(&mut c, agent.guest_spec("crashy"), true).await;
    let pid = vm.status.as_ref().unwrap().pid;

    // QEMU killed behind the agent's back: noticed, reported as Failed with the cause
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failed = wait_vm(&mut c, "crashy", BOOT, "Failed", |s| {
        s.phase == pb::VmPhase::Failed as i32
    })
    .await;
    let msg = &failed.status.as_ref().unwrap().message;
    assert!(msg.contains("signal 9"), "{msg}");
    assert_eq!(failed.status.as_ref().unwrap().pid, 0);

    // a failed VM can be started again; a forced stop ends it at once, before the guest
    // could have powered off by itself
    c.start_vm(pb::StartVmRequest {
        name: "crashy".into(),
    })
    .await
    .unwrap();
    let t = std::time::Instant::now();
    let stopped = stop(&mut c, "crashy", true).await;
    assert_eq!(phase(&stopped), pb::VmPhase::Stopped);
    assert!(
        !serial(&vm).contains("reboot: Power down"),
        "the guest was not asked to power off"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "forced stop took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_existing_vms_then_changes() {
    use tokio_stream::StreamExt;
    let agent = Agent::start("node-w").await;
    let mut c = agent.client().await;
    create(&mut c, agent.guest_spec("before"), false).await;
    let mut stream = c
        .watch_vms(pb::WatchVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.r#type, pb::EventType::Added as i32);
    assert_eq!(first.vm.unwrap().spec.unwrap().name, "before");

    let mut c2 = agent.client().await;
    c2.start_vm(pb::StartVmRequest {
        name: "before".into(),
    })
    .await
    .unwrap();
    let mut phases = vec![];
    while !phases.contains(&pb::VmPhase::Running) {
        let ev = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        phases.push(pb::VmPhase::try_from(ev.vm.unwrap().status.unwrap().phase).unwrap());
    }
    assert!(phases.contains(&pb::VmPhase::Starting), "{phases:?}");
    c2.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "before".into(),
    })
    .await
    .unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if ev.r#type == pb::EventType::Deleted as i32 {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_right_after_start_is_still_graceful() {
    let agent = Agent::start("node-early").await;
    let mut c = agent.client().await;
    let vm = create(&mut c, agent.small_spec("early"), true).await;
    // The guest has not booted yet: its ACPI button driver is not listening. The agent keeps
    // pressing the button until the guest answers, within the timeout.
    let stopped = c
        .stop_vm(pb::StopVmRequest {
            name: "early".into(),
            timeout_seconds: 60,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(&stopped), pb::VmPhase::Stopped);
    assert_eq!(stopped.status.as_ref().unwrap().message, "stopped");
    assert!(
        serial(&vm).contains("reboot: Power down"),
        "the guest powered off by itself"
    );
}
