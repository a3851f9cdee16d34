//! VMs outlive their agent: killing or stopping the agent leaves every QEMU running, and the
//! next agent process adopts them unchanged.

use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;
use nix::sys::signal::Signal;

const VMS: [&str; 3] = ["keep-0", "keep-1", "keep-2"];

/// How long a stop request may take to reach the agent's VM (bounds the wait only).
const STOPPING: Duration = Duration::from_secs(30);

async fn pids(c: &mut Client) -> Vec<u32> {
    let mut out = vec![];
    for name in VMS {
        let vm = get(c, name).await;
        assert_eq!(phase(&vm), pb::VmPhase::Running, "{name}: {:?}", vm.status);
        out.push(vm.status.unwrap().pid);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn vms_survive_twenty_agent_restarts() {
    let mut agent = Agent::start("node-r").await;
    let mut c = agent.client().await;
    let mut vms = vec![];
    for name in VMS {
        let spec = agent.small_spec(name);
        let vm = create(&mut c, spec, true).await;
        vms.push(vm);
    }
    for vm in &vms {
        wait_boots(vm, 1, Duration::from_secs(90)).await;
    }
    let before = pids(&mut c).await;
    let mut counters = vec![];
    for vm in &vms {
        counters.push(current_counter(vm, Duration::from_secs(90)).await);
    }

    let started = Instant::now();
    for round in 0..20 {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "restarts too slow (round {round})"
        );
        // Alternate a crash (SIGKILL) and an orderly stop (SIGTERM).
        let signal = if round % 2 == 0 {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        };
        agent.kill_agent(signal);
        for pid in &before {
            assert!(
                pid_alive(*pid),
                "round {round}: QEMU {pid} died with the agent ({signal})"
            );
        }
        agent.respawn().await;
        c = agent.client().await;
        assert_eq!(
            pids(&mut c).await,
            before,
            "round {round}: same QEMU processes adopted"
        );
    }
    println!("20 agent restarts in {:?}", started.elapsed());

    // The guests never noticed: still on their first boot, counting on without a gap.
    for (vm, n) in vms.iter().zip(counters) {
        wait_counter_above(vm, n, Duration::from_secs(30)).await;
        let text = serial(vm);
        assert_eq!(count_markers(&text, READY_MARKER), 1, "no reboot");
        let seen = all_counters(&text);
        assert!(
            seen.windows(2).all(|w| w[1] == w[0] + 1),
            "counter sequence broken: {seen:?}"
        );
    }
    // Adopted VMs are fully managed: the guest agent is seen again, and they stop on request.
    let name = VMS[0];
    wait_vm(
        &mut c,
        name,
        Duration::from_secs(60),
        "guest agent after adoption",
        |s| s.agent_connected,
    )
    .await;
    let stopped = c
        .stop_vm(pb::StopVmRequest {
            name: name.into(),
            timeout_seconds: 30,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(&stopped), pb::VmPhase::Stopped);
    assert!(!pid_alive(before[0]));
    assert!(
        serial(&vms[0]).contains("reboot: Power down"),
        "graceful stop of an adopted VM"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_that_died_while_the_agent_was_down_is_reported() {
    let mut agent = Agent::start("node-r2").await;
    let mut c = agent.client().await;
    let vm = create(&mut c, agent.guest_spec("lost"), true).await;
    let pid = vm.status.unwrap().pid;
    create(&mut c, agent.guest_spec("idle"), false).await;

    agent.kill_agent(Signal::SIGKILL);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    eventually(Duration::from_secs(30), "QEMU gone", async || {
        !pid_alive(pid)
    })
    .await;
    agent.respawn().await;
    let mut c = agent.client().await;

    let lost = get(&mut c, "lost").await;
    assert_eq!(phase(&lost), pb::VmPhase::Failed);
    let msg = &lost.status.as_ref().unwrap().message;
    assert!(msg.contains("ended while the agent was down"), "{msg}");
    let idle = get(&mut c, "idle").await;
    assert_eq!(phase(&idle), pb::VmPhase::Pending, "untouched");
    // And it can be started again.
    let again = c
        .start_vm(pb::StartVmRequest {
            name: "lost".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(&again), pb::VmPhase::Running);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_interrupted_by_an_agent_crash_completes() {
    let mut agent = Agent::start("node-r3").await;
    let mut c = agent.client().await;
    let vm = create(&mut c, agent.small_spec("halting"), true).await;
    wait_vm(
        &mut c,
        "halting",
        Duration::from_secs(60),
        "guest agent",
        |s| s.agent_connected,
    )
    .await;
    let pid = vm.status.as_ref().unwrap().pid;

    // Ask for a graceful stop, and kill the agent before the guest has powered off.
    let mut c2 = agent.client().await;
    let stop = tokio::spawn(async move {
        c2.stop_vm(pb::StopVmRequest {
            name: "halting".into(),
            timeout_seconds: 30,
            force: false,
        })
        .await
    });
    wait_vm(&mut c, "halting", STOPPING, "Stopping", |s| {
        s.phase == pb::VmPhase::Stopping as i32
    })
    .await;
    agent.kill_agent(Signal::SIGKILL);
    assert!(
        stop.await.unwrap().is_err(),
        "the caller sees the agent go away"
    );
    agent.respawn().await;
    let mut c = agent.client().await;

    // Whether QEMU ended before or after the new agent came up, the stop is seen through.
    let done = wait_vm(&mut c, "halting", Duration::from_secs(40), "Stopped", |s| {
        s.phase == pb::VmPhase::Stopped as i32
    })
    .await;
    println!("after restart: {:?}", done.status.as_ref().unwrap().message);
    assert!(!pid_alive(pid));
    assert!(
        serial(&vm).contains("reboot: Power down"),
        "the guest powered off by itself"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_calls_in_flight_finish() {
    let mut agent = Agent::start("node-drain").await;
    let mut c = agent.client().await;
    create(&mut c, agent.small_spec("draining"), true).await;
    wait_vm(
        &mut c,
        "draining",
        Duration::from_secs(60),
        "guest agent",
        |s| s.agent_connected,
    )
    .await;

    // A graceful stop takes as long as the guest needs to power off; SIGTERM arrives meanwhile.
    let mut c2 = agent.client().await;
    let call = tokio::spawn(async move {
        c2.stop_vm(pb::StopVmRequest {
            name: "draining".into(),
            timeout_seconds: 30,
            force: false,
        })
        .await
    });
    wait_vm(&mut c, "draining", STOPPING, "Stopping", |s| {
        s.phase == pb::VmPhase::Stopping as i32
    })
    .await;
    agent.kill_agent(Signal::SIGTERM);
    let reply = call
        .await
        .unwrap()
        .expect("the call in flight is answered, not cut off");
    assert_eq!(phase(&reply.into_inner()), pb::VmPhase::Stopped);
}
