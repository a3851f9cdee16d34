//! Soak: several clients issue random lifecycle calls at once. Afterwards the agent's report
//! must match reality: the QEMU processes that exist, their run state, and the directories.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;
use tonic::Code;

const NAMES: [&str; 4] = ["soak-0", "soak-1", "soak-2", "soak-3"];
const CLIENTS: usize = 3;
const OPS_PER_CLIENT: usize = 60;

/// xorshift64*: enough randomness for picking calls, reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545F4914F6CDD1D) >> 33) as usize % n
    }
}

/// The calls a client picks from, by name.
const CALLS: [&str; 7] = [
    "create", "start", "stop", "pause", "resume", "restart", "delete",
];

/// One random call; returns its index in [`CALLS`] and how it went.
async fn random_call(
    c: &mut Client,
    agent: &Agent,
    rng: &mut Rng,
) -> (usize, Result<(), tonic::Status>) {
    let name = NAMES[rng.next(NAMES.len())].to_string();
    let call = [0, 0, 1, 2, 3, 4, 5, 6][rng.next(8)];
    let result = match call {
        0 => c
            .create_vm(pb::CreateVmRequest {
                spec: Some(agent.small_spec(&name)),
                start: rng.next(2) == 0,
            })
            .await
            .map(drop),
        1 => c.start_vm(pb::StartVmRequest { name }).await.map(drop),
        2 => c
            .stop_vm(pb::StopVmRequest {
                name,
                timeout_seconds: 10,
                force: rng.next(2) == 0,
            })
            .await
            .map(drop),
        3 => c.pause_vm(pb::PauseVmRequest { name }).await.map(drop),
        4 => c.resume_vm(pb::ResumeVmRequest { name }).await.map(drop),
        5 => c
            .restart_vm(pb::RestartVmRequest {
                name,
                timeout_seconds: 10,
                force: true,
            })
            .await
            .map(drop),
        _ => c
            .delete_vm(pb::DeleteVmRequest {
                keep_disks: false,
                name,
            })
            .await
            .map(drop),
    };
    (call, result)
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_random_calls_leave_a_true_report() {
    let agent = std::sync::Arc::new(Agent::start("node-soak").await);
    let seed = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("soak seed {seed} (SOAK_SEED={seed} repeats this run)");
    let started = Instant::now();
    let mut tasks = vec![];
    for i in 0..CLIENTS {
        let agent = agent.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = agent.client().await;
            let mut rng = Rng(seed.wrapping_add((i as u64).wrapping_mul(0x9E3779B97F4A7C15)) | 1);
            let mut done = [0; CALLS.len()];
            for _ in 0..OPS_PER_CLIENT {
                if started.elapsed() > Duration::from_secs(150) {
                    break;
                }
                match random_call(&mut c, &agent, &mut rng).await {
                    (call, Ok(())) => done[call] += 1,
                    // Refusals for the wrong state or a missing/existing name are expected.
                    (_, Err(s))
                        if matches!(
                            s.code(),
                            Code::FailedPrecondition | Code::NotFound | Code::AlreadyExists
                        ) => {}
                    (_, Err(s)) => panic!("unexpected error: {s:?}"),
                }
            }
            done
        }));
    }
    let mut succeeded = [0; CALLS.len()];
    for t in tasks {
        for (total, done) in succeeded.iter_mut().zip(t.await.unwrap()) {
            *total += done;
        }
    }
    let tally: Vec<_> = CALLS.iter().zip(succeeded).collect();
    println!(
        "calls that succeeded: {tally:?}, in {:?}",
        started.elapsed()
    );
    // The run did something: VMs were made and removed, and their run state changed.
    let [create, start, stop, pause, resume, restart, delete] = succeeded;
    assert!(create > 0 && delete > 0, "{tally:?}");
    assert!(start + stop + pause + resume + restart > 0, "{tally:?}");

    let mut c = agent.client().await;
    // Let transitional phases settle.
    let vms = eventually(
        Duration::from_secs(180),
        "no VM Starting or Stopping",
        async || {
            let vms = list(&mut c).await;
            let busy: Vec<_> = vms
                .iter()
                .filter(|vm| matches!(phase(vm), pb::VmPhase::Starting | pb::VmPhase::Stopping))
                .map(|vm| vm.spec.as_ref().unwrap().name.clone())
                .collect();
            if busy.is_empty() {
                Ok(vms)
            } else {
                Err(format!("{busy:?}"))
            }
        },
    )
    .await;

    // Processes: exactly those of VMs that are Running or Paused, with the pids reported.
    let reported: BTreeSet<u32> = vms
        .iter()
        .filter(|vm| matches!(phase(vm), pb::VmPhase::Running | pb::VmPhase::Paused))
        .map(|vm| vm.status.as_ref().unwrap().pid)
        .collect();
    for vm in &vms {
        if !matches!(phase(vm), pb::VmPhase::Running | pb::VmPhase::Paused) {
            assert_eq!(vm.status.as_ref().unwrap().pid, 0, "{:?}", vm.status);
        }
    }
    assert_eq!(
        qemu_pids_under(agent.dir.path()),
        reported,
        "no orphaned or missing QEMU"
    );

    // Directories: exactly the listed VMs.
    let dirs: BTreeSet<String> = std::fs::read_dir(agent.data_dir().join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let names: BTreeSet<String> = vms
        .iter()
        .map(|vm| vm.spec.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(dirs, names, "no orphaned data dir");

    // Run state: a Running guest counts, a Paused one does not.
    for vm in &vms {
        match phase(vm) {
            pb::VmPhase::Running => wait_counting(vm, Duration::from_secs(180)).await,
            pb::VmPhase::Paused => assert_holds_still(vm).await,
            _ => {}
        }
    }
}
