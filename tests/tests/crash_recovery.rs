//! QEMU crashes and damaged state files are expected events: noticed at once, reported with
//! their cause, handled by the VM's restart policy, and never allowed to hurt other VMs.

use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_stream::StreamExt;

fn sigkill(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
}

/// How long a crash may take to be reported at most: bounds the wait only.
const REPORTED: Duration = Duration::from_secs(60);

/// How fast the agent must notice a crash, by its own clock (the status's phase change).
const NOTICED: Duration = Duration::from_secs(1);

/// Kills the VM's QEMU and waits for the agent to report it; returns that event and how long
/// after the kill the agent changed the VM's phase (its own figure, whatever the delivery).
async fn kill_and_wait_report(c: &mut Client, name: &str, pid: u32) -> (Duration, pb::VmEvent) {
    let mut events = c
        .watch_vms(pb::WatchVmsRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    events.next().await.unwrap().unwrap(); // the current state
    let killed_ms = unix_ms();
    sigkill(pid);
    let event = tokio::time::timeout(REPORTED, async {
        loop {
            let ev = events.next().await.unwrap().unwrap();
            if ev.reason == "ProcessExited" {
                return ev;
            }
        }
    })
    .await
    .expect("an exit reported after the kill");
    let changed_ms = event
        .vm
        .as_ref()
        .unwrap()
        .status
        .as_ref()
        .unwrap()
        .phase_changed_at_ms;
    let noticed =
        Duration::from_millis(u64::try_from(changed_ms - killed_ms).unwrap_or_else(|_| {
            panic!("phase changed at {changed_ms}, before the kill at {killed_ms}")
        }));
    (noticed, event)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// How long a VM is watched to see that no restart follows: longer than the back-off a restart
/// would wait at this point (at once, then 1 s, 2 s, 4 s...), with room for a loaded machine.
const NO_RESTART_WINDOW: Duration = Duration::from_secs(10);

/// `name` is down (`phase`, no QEMU) with no restart planned, and stays so for
/// [`NO_RESTART_WINDOW`].
async fn assert_stays_down(c: &mut Client, name: &str, phase: pb::VmPhase) {
    let mut events = c
        .watch_vms(pb::WatchVmsRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    let down = |ev: pb::VmEvent| {
        let s = ev.vm.unwrap().status.unwrap();
        assert!(
            s.phase == phase as i32 && s.pid == 0 && s.next_restart_at_ms == 0,
            "{name} did not stay {phase:?} ({}): {s:?}",
            ev.reason
        );
    };
    // The first event is the current state.
    let watched = tokio::time::timeout(NO_RESTART_WINDOW, async {
        while let Some(ev) = events.next().await {
            down(ev.unwrap());
        }
    })
    .await;
    assert!(watched.is_err(), "the watch of {name} ended");
}

#[tokio::test(flavor = "multi_thread")]
async fn crashed_qemu_is_restarted_under_always() {
    let agent = Agent::start("node-crash-a").await;
    let mut c = agent.client().await;
    let mut spec = agent.small_spec("phoenix");
    spec.restart_policy = pb::RestartPolicy::Always as i32;
    let vm = create(&mut c, spec, true).await;
    wait_boots(&vm, 1, Duration::from_secs(60)).await;
    let pid = vm.status.as_ref().unwrap().pid;

    let (noticed, event) = kill_and_wait_report(&mut c, "phoenix", pid).await;
    println!("crash noticed after {noticed:?}");
    assert!(noticed < NOTICED, "noticed after {noticed:?}");
    let st = event.vm.unwrap().status.unwrap();
    assert_eq!(st.phase, pb::VmPhase::Failed as i32);
    assert!(st.message.contains("killed by signal 9"), "{}", st.message);

    let back = wait_vm(&mut c, "phoenix", REPORTED, "restarted", |s| {
        s.phase == pb::VmPhase::Running as i32 && s.pid != pid && s.pid != 0
    })
    .await;
    assert_eq!(back.status.as_ref().unwrap().restart_count, 1);
    wait_boots(&vm, 2, Duration::from_secs(60)).await;

    // A stop request is a stop, not a crash: no restart follows.
    let stopped = stop(&mut c, "phoenix", true).await;
    assert_eq!(phase(&stopped), pb::VmPhase::Stopped);
    assert_stays_down(&mut c, "phoenix", pb::VmPhase::Stopped).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crashed_qemu_stays_failed_under_never() {
    let agent = Agent::start("node-crash-n").await;
    let mut c = agent.client().await;
    let mut spec = agent.small_spec("mortal");
    spec.restart_policy = pb::RestartPolicy::Never as i32;
    let vm = create(&mut c, spec, true).await;
    let pid = vm.status.as_ref().unwrap().pid;
    let (noticed, _) = kill_and_wait_report(&mut c, "mortal", pid).await;
    assert!(noticed < NOTICED, "noticed after {noticed:?}");
    assert_stays_down(&mut c, "mortal", pb::VmPhase::Failed).await;
    let vm = get(&mut c, "mortal").await;
    let st = vm.status.unwrap();
    assert_eq!(st.phase, pb::VmPhase::Failed as i32);
    assert!(st.message.contains("killed by signal 9"), "{}", st.message);
    assert_eq!((st.pid, st.restart_count, st.next_restart_at_ms), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_state_files_are_reported_and_set_aside() {
    let mut agent = Agent::start("node-torn").await;
    let mut c = agent.client().await;
    let runner = create(&mut c, agent.small_spec("runner"), true).await;
    let runner_pid = runner.status.as_ref().unwrap().pid;
    create(&mut c, agent.small_spec("torn-spec"), false).await;
    create(&mut c, agent.small_spec("fine"), false).await;
    agent.kill_agent(Signal::SIGKILL);

    let vms = agent.data_dir().join("vms");
    std::fs::write(vms.join("torn-spec/spec.json"), b"{\"name\": \"torn-sp").unwrap();
    // The running VM loses its state file: the agent must still find and adopt its QEMU.
    std::fs::write(vms.join("runner/state.json"), b"\0\0\0\0").unwrap();
    agent.respawn().await;
    let mut c = agent.client().await;

    assert_eq!(list(&mut c).await.len(), 3, "no VM lost");
    let torn = get(&mut c, "torn-spec").await;
    assert_eq!(phase(&torn), pb::VmPhase::Failed);
    let msg = &torn.status.as_ref().unwrap().message;
    assert!(
        msg.contains("cannot load") && msg.contains("set aside"),
        "{msg}"
    );
    assert!(
        vms.join("torn-spec/spec.json.corrupt").exists(),
        "the evidence is kept"
    );
    let err = c
        .start_vm(pb::StartVmRequest {
            name: "torn-spec".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let runner = get(&mut c, "runner").await;
    assert_eq!(phase(&runner), pb::VmPhase::Running);
    assert_eq!(
        runner.status.as_ref().unwrap().pid,
        runner_pid,
        "adopted without its state file"
    );
    assert!(vms.join("runner/state.json.corrupt").exists());
    assert!(
        vms.join("runner/state.json").exists(),
        "state written afresh after adoption"
    );
    let fine = get(&mut c, "fine").await;
    assert_eq!(phase(&fine), pb::VmPhase::Pending);

    c.delete_vm(pb::DeleteVmRequest {
        keep_disks: false,
        name: "torn-spec".into(),
    })
    .await
    .unwrap();
    assert!(!vms.join("torn-spec").exists());
    assert_eq!(list(&mut c).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_kernel_panic_is_reported_and_handled_by_policy() {
    let agent = Agent::start("node-panic").await;
    let mut c = agent.client().await;
    let mut spec = agent.small_spec("panicky");
    spec.boot
        .as_mut()
        .unwrap()
        .cmdline
        .push_str(" hypersdk.panic_after=2");
    spec.restart_policy = pb::RestartPolicy::OnFailure as i32;
    let mut events = c
        .watch_vms(pb::WatchVmsRequest {
            name: "panicky".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let vm = create(&mut c, spec, true).await;
    let first_pid = vm.status.as_ref().unwrap().pid;

    // The panic reaches QEMU through pvpanic: reported as such, not as a mere exit.
    let failed = loop {
        let ev = tokio::time::timeout(Duration::from_secs(90), events.next())
            .await
            .expect("the guest panics")
            .unwrap()
            .unwrap();
        if ev.reason == "ProcessExited" {
            break ev.vm.unwrap().status.unwrap();
        }
    };
    assert!(serial(&vm).contains("HYPERSDK-PANIC"));
    assert_eq!(failed.phase, pb::VmPhase::Failed as i32);
    assert!(
        failed.message.contains("the guest kernel panicked"),
        "{}",
        failed.message
    );

    // OnFailure: started again in a new QEMU.
    let again = wait_vm(&mut c, "panicky", REPORTED, "restarted", |s| {
        s.restart_count >= 1 && s.pid != 0 && s.pid != first_pid
    })
    .await;
    println!("restarted: {:?}", again.status.as_ref().unwrap().message);
    // Stopping cancels further restarts.
    let end = stop(&mut c, "panicky", true).await;
    assert_eq!(phase(&end), pb::VmPhase::Stopped);
    assert_stays_down(&mut c, "panicky", pb::VmPhase::Stopped).await;
}
