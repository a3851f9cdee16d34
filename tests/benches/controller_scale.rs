//! Controller scale benchmark: 1,000 VirtualMachines across 100 simulated agents
//! (`hypersdk-agent --simulate`), from submission to all Running, through the real controllers
//! over the in-process API. Prints the total and p50/p95 per VM (submission to Running).
//! Target: all Running within 10 s.
//!
//! Run with `scripts/bench.sh controller_scale`. `BENCH_N` sets the VM count (default 1000);
//! `BENCH_AGENTS` the agent count (default 100).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hypersdk_controller::context::{Context, Settings};
use hypersdk_controller::crd::VirtualMachine;
use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::nodes::{AgentInfo, Agents};
use hypersdk_controller::standalone::FakeApi;
use hypersdk_proto::endpoint::Address;
use hypersdk_tests::{bench_rounds, bin, wait_until};
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};

struct Sims {
    _dir: tempfile::TempDir,
    children: Vec<Child>,
    agents: Vec<AgentInfo>,
}

impl Drop for Sims {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_sims(n: usize) -> Sims {
    let dir = tempfile::Builder::new()
        .prefix("hs-sim-")
        .tempdir_in("/tmp")
        .unwrap();
    let mut children = Vec::new();
    let mut agents = Vec::new();
    for i in 0..n {
        let node = format!("sim-{i:03}");
        let sock = dir.path().join(format!("{node}.sock"));
        let child = Command::new(bin("hypersdk-agent"))
            .args([
                "--simulate",
                "--node-name",
                &node,
                "--simulate-cpus",
                "64",
                "--simulate-memory",
                "256Gi",
            ])
            .args(["--simulate-boot-ms", "50"])
            .arg("--data-dir")
            .arg(dir.path().join(&node))
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .env("HYPERSDK_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        children.push(child);
        agents.push(AgentInfo {
            node,
            address: Address::Unix(sock),
            labels: Default::default(),
            carbon_intensity: None,
            unschedulable: false,
        });
    }
    for a in &agents {
        let Address::Unix(sock) = &a.address else {
            unreachable!()
        };
        wait_until(Duration::from_secs(60), "simulated agent socket", || {
            std::os::unix::net::UnixStream::connect(sock).is_ok()
        });
    }
    Sims {
        _dir: dir,
        children,
        agents,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let vms = bench_rounds(1000);
    let agent_count: usize = std::env::var("BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let sims = start_sims(agent_count);
    let client = FakeApi::new().client("default");
    let agents = Arc::new(Agents::default());
    agents.sync(sims.agents.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while agents.all().iter().any(|a| a.client().is_none()) {
        assert!(Instant::now() < deadline, "agents did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ctx = Arc::new(Context::new(client.clone(), agents, Settings::default()));
    let controllers = tokio::spawn(hypersdk_controller::controllers::run(
        ctx,
        std::future::pending(),
    ));
    let api: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");

    // Record when each VM is first seen Running.
    let running = Arc::new(std::sync::Mutex::new(HashMap::<String, Instant>::new()));
    let seen = running.clone();
    tokio::spawn(
        watcher(api.clone(), watcher::Config::default())
            .applied_objects()
            .for_each(move |vm| {
                if let Ok(vm) = vm
                    && vm.status.as_ref().and_then(|s| s.phase) == Some(VmPhase::Running)
                {
                    seen.lock()
                        .unwrap()
                        .entry(vm.metadata.name.clone().unwrap())
                        .or_insert_with(Instant::now);
                }
                async {}
            }),
    );

    let start = Instant::now();
    let mut submitted = HashMap::new();
    for i in 0..vms {
        let name = format!("vm-{i:04}");
        let vm: VirtualMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "hypersdk.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"cpus": 2, "memory": "2Gi", "running": true, "boot": {"kernel": "/images/vmlinuz"}}
        }))
        .unwrap();
        submitted.insert(name, Instant::now());
        api.create(&PostParams::default(), &vm).await.unwrap();
    }
    let submit_time = start.elapsed();
    let limit = Duration::from_secs(120);
    while running.lock().unwrap().len() < vms {
        assert!(
            start.elapsed() < limit,
            "only {} of {vms} Running after {limit:?}",
            running.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = start.elapsed();
    let done = running.lock().unwrap();
    let mut per_vm: Vec<Duration> = submitted
        .iter()
        .map(|(n, t)| done[n].duration_since(*t))
        .collect();
    per_vm.sort();
    println!(
        "controller scale: {vms} VMs on {agent_count} simulated agents: all Running in {:.2} s (submitted in {:.2} s); per VM p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms (target: all within 10 s)",
        total.as_secs_f64(),
        submit_time.as_secs_f64(),
        percentile(&per_vm, 0.50).as_secs_f64() * 1000.0,
        percentile(&per_vm, 0.95).as_secs_f64() * 1000.0,
        per_vm.last().unwrap().as_secs_f64() * 1000.0,
    );
    controllers.abort();
}
