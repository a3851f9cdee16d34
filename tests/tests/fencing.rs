//! Fencing, with real agents and real QEMU: the node of a highly available VM is cut off from
//! the controller, either by a link (a relay) in front of its agent or, as a host, by taking its
//! network namespace off the test bridge. The node's agent stops the VM once its lease has run
//! out, and only then does the controller start it on the other node: sampled every 100 ms
//! through the whole episode, there are never two QEMUs for it. A VM without high availability
//! keeps running on the cut-off node. After healing, each VM runs once and the stopped copy is
//! gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hypersdk_controller::context::Settings;
use hypersdk_controller::crd::VirtualMachine;
use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::nodes::spec::agent_name;
use hypersdk_controller::nodes::{AgentInfo, Agents};
use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::controller::*;
use hypersdk_tests::hosts::{Host, Hosts};
use hypersdk_tests::link::Link;
use hypersdk_tests::pki::Pki;
use hypersdk_tests::{
    Agent, current_counter, eventually, qemu_pids_with, wait_boots, wait_counter_above,
};
use hypersdk_tls::role::Role;

/// Short, so that the test is: the agents renew every 1.5 s.
const FENCE_TIMEOUT: Duration = Duration::from_secs(6);

/// Counts the QEMU processes of one VM on every node of the test, every 100 ms (by their VM
/// directories: other tests may run a VM of the same name).
struct Sampler {
    most: Arc<AtomicUsize>,
    samples: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(vm: &str, nodes: &[Agent]) -> Sampler {
        let needles: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}/vms/{vm}/", n.data_dir().display()))
            .collect();
        let most = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s, st) = (most.clone(), samples.clone(), stop.clone());
        let task = tokio::task::spawn_blocking(move || {
            while !st.load(Ordering::Relaxed) {
                let n = needles.iter().map(|d| qemu_pids_with(d).len()).sum();
                m.fetch_max(n, Ordering::Relaxed);
                s.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Sampler {
            most,
            samples,
            stop,
            task,
        }
    }

    /// The most QEMUs seen at once, and how many samples were taken.
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.most.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

async fn running_on(ctl: &Controller, name: &str, pred: impl Fn(&str) -> bool) -> String {
    let vm = wait_for(&ctl.vms(), name, BOOT, "Running", |v| {
        phase(v) == Some(VmPhase::Running)
            && v.status
                .as_ref()
                .unwrap()
                .node_name
                .as_deref()
                .is_some_and(&pred)
    })
    .await;
    vm.status.unwrap().node_name.unwrap()
}

/// What cuts a node off: a relay in front of its agent, or its host's veth.
enum Cut<'a> {
    Link(Link),
    Host(&'a Host),
}

impl Cut<'_> {
    fn cut(&self) {
        match self {
            Cut::Link(l) => l.cut(),
            Cut::Host(h) => h.cut(),
        }
    }

    fn heal(&self) {
        match self {
            Cut::Link(l) => l.heal(),
            Cut::Host(h) => h.heal(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_node_stops_its_ha_vm_before_it_runs_elsewhere() {
    let images = images();
    let nodes = [
        start_node("node-1", images.path(), &[]).await,
        start_node("node-2", images.path(), &[]).await,
    ];
    let links: Vec<Link> = nodes
        .iter()
        .map(|n| Link::new(&n.address, n.dir.path()))
        .collect();
    let infos = nodes
        .iter()
        .zip(&links)
        .map(|(n, l)| AgentInfo {
            address: l.address.clone(),
            ..info(n)
        })
        .collect();
    let cuts: Vec<Cut> = links.into_iter().map(Cut::Link).collect();
    partition(&images, &nodes, infos, &cuts, Agents::new(FENCE_TIMEOUT)).await;
}

/// The same between hosts: agents in network namespaces, reached over mutual TLS on their
/// addresses; the cut takes the host off the bridge, so connections hang rather than close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_host_stops_its_ha_vm_before_it_runs_elsewhere() {
    let hosts = Hosts::new(&["fence-a", "fence-b"]);
    let images = images();
    let pki = Pki::new();
    let (nodes, infos) = start_host_nodes(&hosts, &pki, images.path()).await;
    let cuts: Vec<Cut> = hosts.hosts.iter().map(Cut::Host).collect();
    let ctl_cert = pki.issue("ctl", Role::Controller("ctl".into()));
    let agents = Agents::new(FENCE_TIMEOUT).with_tls(Some(ctl_cert));
    partition(&images, &nodes, infos, &cuts, agents).await;
}

/// The episode: an HA VM and a pinned non-HA VM on one node, which is then cut off and healed.
async fn partition(
    images: &tempfile::TempDir,
    nodes: &[Agent],
    infos: Vec<AgentInfo>,
    cuts: &[Cut<'_>],
    agents: Agents,
) {
    let settings = Settings {
        fence_margin: Duration::from_secs(2),
        ..settings()
    };
    let ctl = Controller::start_with(infos, settings, agents);
    ctl.create_ha_vm(images.path()).await;
    let first = running_on(&ctl, "ha", |_| true).await;
    let cut_off = nodes.iter().position(|n| n.name == first).unwrap();
    let (cut_off, link) = (&nodes[cut_off], &cuts[cut_off]);
    ctl.create::<VirtualMachine>(small_vm("pinned", false, Some(&first)))
        .await
        .unwrap();
    running_on(&ctl, "pinned", |_| true).await;
    let pinned = agent_vm(cut_off, "pinned").await.unwrap();
    wait_boots(&pinned, 1, BOOT).await;
    wait_boots(&agent_vm(cut_off, "ha").await.unwrap(), 1, BOOT).await;

    let sampler = Sampler::start(&agent_name("default", "ha"), nodes);
    link.cut();
    // The cut-off agent, which no longer hears from the controller, stops the VM itself...
    let fenced = eventually(BOOT, "ha fenced on its cut-off node", async || {
        let vm = agent_vm(cut_off, "ha").await.map_err(|e| e.to_string())?;
        let s = vm.status.clone().unwrap();
        match s.phase == pb::VmPhase::Stopped as i32 && s.message.contains("fenced") {
            true => Ok(vm),
            false => Err(format!("{s:?}")),
        }
    })
    .await;
    assert_eq!(fenced.status.unwrap().pid, 0);
    // ... and only then does it run elsewhere, booting there.
    let second = running_on(&ctl, "ha", |n| n != first).await;
    let moved = nodes.iter().find(|n| n.name == second).unwrap();
    wait_boots(&agent_vm(moved, "ha").await.unwrap(), 1, BOOT).await;
    // The VM without high availability kept running on the cut-off node, counting.
    let counted = current_counter(&pinned, BOOT).await;
    wait_counter_above(&pinned, counted, BOOT).await;

    link.heal();
    eventually(BOOT, "the fenced copy removed", async || {
        agent_vm(cut_off, "ha")
            .await
            .is_err_and(|e| e.code() == tonic::Code::NotFound)
    })
    .await;
    let back = wait_for(&ctl.vms(), "pinned", BOOT, "NodeReachable again", |v| {
        cond(v, "NodeReachable").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!(phase(&back), Some(VmPhase::Running));
    let still = agent_vm(cut_off, "pinned").await.unwrap();
    assert_eq!(still.status.unwrap().pid, pinned.status.unwrap().pid);
    assert_eq!(running_on(&ctl, "ha", |n| n == second).await, second);
    let (most, samples) = sampler.finish().await;
    assert!(samples > 50, "{samples} samples");
    assert_eq!(
        most, 1,
        "QEMUs of the VM at once, at most, in {samples} samples"
    );
}
