//! What mutual TLS costs, in the same run: a 1 GiB, 1 vCPU test guest migrated back and forth
//! between two plain agents (loopback, plaintext stream) and between two https agents (the
//! stream over QEMU's TLS, multifd included), idle and rewriting 256 MiB; and a GetVm round trip
//! over plain loopback gRPC against one over mutual TLS. Prints medians and TLS / plain ratios.
//!
//! Both pairs run `--migration-copy live`, so that under TCG they migrate live as on KVM. Run
//! with `scripts/bench.sh migration_tls` (release build). `BENCH_N` sets N (default 3).

use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::{self, Address};
use hypersdk_tests::pki::{Pki, tls_flags};
use hypersdk_tests::*;
use hypersdk_tls::role::Role;

const DIRTY_MIB: u32 = 256;
const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// Between resuming a guest and migrating it: the dirtier is back at full rate.
const SETTLE: Duration = Duration::from_secs(2);
const ROUND_TRIPS: usize = 300;

/// A pair of agents and an admin client of each.
struct Pair {
    label: &'static str,
    agents: [Agent; 2],
    clients: [Client; 2],
}

impl Pair {
    async fn plain(flags: &[&str]) -> Pair {
        let a = Agent::start_with("bench-plain-a", flags).await;
        let b = Agent::peer_of(&a, "bench-plain-b", flags).await;
        let clients = [a.client().await, b.client().await];
        Pair {
            label: "plain",
            agents: [a, b],
            clients,
        }
    }

    async fn tls(pki: &Pki, flags: &[&str]) -> Pair {
        let admin = pki.issue("bench-admin", Role::Admin("bench-admin".into()));
        let ports = [free_port(), free_port()];
        let names = ["bench-tls-a", "bench-tls-b"];
        let args = |i: usize| {
            let files = pki.issue(names[i], Role::Agent(names[i].into()));
            let mut v: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            v.extend(tls_flags(ports[i], &files));
            v
        };
        let (a0, a1) = (args(0), args(1));
        let a =
            Agent::start_with(names[0], &a0.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let b = Agent::peer_of(
            &a,
            names[1],
            &a1.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        let mut clients = vec![];
        for port in ports {
            let addr = Address::Tls(format!("127.0.0.1:{port}"));
            clients.push(endpoint::connect(&addr, Some(&admin)).await.unwrap());
        }
        let mut agents = [a, b];
        for (agent, port) in agents.iter_mut().zip(ports) {
            agent.address = Address::Tls(format!("127.0.0.1:{port}"));
        }
        Pair {
            label: "TLS",
            agents,
            clients: clients.try_into().unwrap(),
        }
    }
}

/// One completed migration: total and guest pause, ms.
struct Sample {
    total: f64,
    downtime: f64,
    encrypted: bool,
}

/// The guest at 1 GiB, 1 vCPU, rewriting `dirty_mib` MiB (0: idle).
fn guest(agent: &Agent, name: &str, dirty_mib: u32) -> pb::VmSpec {
    let mut s = agent.guest_spec(name);
    (s.cpus, s.memory, s.max_memory) = (1, "1Gi".into(), "1Gi".into());
    if dirty_mib > 0 {
        s.boot.as_mut().unwrap().cmdline += &format!(" hypersdk.dirty_mib={dirty_mib}");
    }
    s
}

/// Migrates `name` from node `at` to the other one; panics when it does not complete.
async fn migrate_once(pair: &mut Pair, name: &str, at: usize) -> Sample {
    let to = pair.agents[1 - at].address.clone();
    let c = &mut pair.clients[at];
    c.resume_vm(pb::ResumeVmRequest { name: name.into() })
        .await
        .unwrap();
    tokio::time::sleep(SETTLE).await;
    let progress = migrate(c, name, &to, Default::default()).await.unwrap();
    let p = progress.last().unwrap();
    assert_eq!(p.phase(), pb::MigrationPhase::Completed, "{}", p.message);
    let c = &mut pair.clients[1 - at];
    c.pause_vm(pb::PauseVmRequest { name: name.into() })
        .await
        .unwrap();
    Sample {
        total: p.elapsed_ms as f64,
        downtime: p.downtime_ms as f64,
        encrypted: p.encrypted,
    }
}

/// N round trips of each pair's guest, alternating pairs so drift hits both alike.
async fn case(pairs: &mut [Pair; 2], dirty_mib: u32, n: usize) -> [Vec<Sample>; 2] {
    let name = format!("mig-{dirty_mib}");
    for pair in pairs.iter_mut() {
        let spec = guest(&pair.agents[0], &name, dirty_mib);
        create(&mut pair.clients[0], spec, true).await;
        wait_vm(
            &mut pair.clients[0],
            &name,
            BOOT_LIMIT,
            "guest agent",
            |s| s.agent_connected,
        )
        .await;
        let req = pb::PauseVmRequest { name: name.clone() };
        pair.clients[0].pause_vm(req).await.unwrap();
    }
    let mut samples: [Vec<Sample>; 2] = Default::default();
    for round in 0..2 * n {
        for k in 0..2 {
            let i = (round + k) % 2;
            let s = migrate_once(&mut pairs[i], &name, round % 2).await;
            println!(
                "  {} round {}: total {:.0} ms, downtime {:.0} ms, encrypted {}",
                pairs[i].label,
                round + 1,
                s.total,
                s.downtime,
                s.encrypted
            );
            samples[i].push(s);
        }
    }
    for pair in pairs.iter_mut() {
        // After an even number of moves the guest is back on the first node.
        stop(&mut pair.clients[0], &name, true).await;
        let req = pb::DeleteVmRequest {
            name: name.clone(),
            keep_disks: false,
        };
        pair.clients[0].delete_vm(req).await.unwrap();
    }
    samples
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(title: &str, samples: &[Vec<Sample>; 2]) {
    let m = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
    let (total, down) = (
        (m(0, |s| s.total), m(1, |s| s.total)),
        (m(0, |s| s.downtime), m(1, |s| s.downtime)),
    );
    println!(
        "{title}: total plain {:.0} ms, TLS {:.0} ms, ratio {:.2}; downtime plain {:.0} ms, TLS {:.0} ms, ratio {:.2}",
        total.0,
        total.1,
        total.1 / total.0,
        down.0,
        down.1,
        down.1 / down.0
    );
}

/// p50 of `ROUND_TRIPS` GetVm calls, in microseconds.
async fn round_trip(c: &mut Client, name: &str) -> f64 {
    let mut v = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let t0 = Instant::now();
        let _ = c.get_vm(pb::GetVmRequest { name: name.into() }).await;
        v.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    median(v)
}

#[tokio::main]
async fn main() {
    let n = bench_rounds(3);
    let flags = [BENCH_FLAGS, &["--migration-copy", "live"]].concat();
    let pki = Pki::new();
    let mut pairs = [Pair::plain(&flags).await, Pair::tls(&pki, &flags).await];
    let (_, node) = agent_accel(&mut pairs[0].clients[0]).await;
    println!(
        "TLS benchmark: N={n} round trips per case, accelerator {}, 1 GiB guest, 1 vCPU, loopback",
        node.accelerator
    );
    let idle = case(&mut pairs, 0, n).await;
    let busy = case(&mut pairs, DIRTY_MIB, n).await;
    let mut rtt = vec![];
    for pair in pairs.iter_mut() {
        rtt.push(round_trip(&mut pair.clients[0], "absent").await);
    }
    println!(
        "\nmedians over {} migrations each; ratios are TLS / plain",
        2 * n
    );
    report("idle guest", &idle);
    report(&format!("guest rewriting {DIRTY_MIB} MiB"), &busy);
    println!(
        "GetVm round trip p50 over {ROUND_TRIPS}: plain {:.0} us, TLS {:.0} us, ratio {:.2}",
        rtt[0],
        rtt[1],
        rtt[1] / rtt[0]
    );
}
