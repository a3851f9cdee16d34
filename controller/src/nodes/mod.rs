//! The nodes: their agents, what each last reported, and how the controller finds and reaches
//! them.
//!
//! This file is the registry ([`Agents`], [`Agent`]): node facts and a live copy of each agent's
//! VMs, and [`Signal`]s for the reconcilers to look again. [`connect`] keeps each agent
//! connected (gRPC), [`discover`] finds agents (flags, or the agent pods of a cluster), and
//! [`spec`] turns a VirtualMachine into what its agent runs (pure).

pub mod connect;
pub mod discover;
pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_client::AgentServiceClient;
use hypersdk_proto::endpoint::Address;
use hypersdk_tls::TlsFiles;
use tokio::sync::broadcast;
use tonic::transport::Channel;
use tracing::{Instrument, info_span};

use spec::{NAME_LABEL, NAMESPACE_LABEL};

pub type Client = AgentServiceClient<Channel>;

/// How long an agent's lease lasts unless renewed: an agent cut off from the controller for
/// this long stops its highly available VMs (see the agent's `RenewLease`).
pub const DEFAULT_FENCE_TIMEOUT: Duration = Duration::from_secs(20);

/// An agent as discovered: where it is and what the scheduler may know about its node.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentInfo {
    pub node: String,
    pub address: Address,
    pub labels: BTreeMap<String, String>,
    pub carbon_intensity: Option<u32>,
    /// Drained: nothing new is placed there, and its VMs leave as their eviction strategy says.
    pub unschedulable: bool,
}

/// What changed, for the reconcilers to look again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// The VM with these labels changed on its agent.
    Vm { namespace: String, name: String },
    /// A node became reachable or unreachable, or its capacity changed.
    Node(String),
}

#[derive(Default)]
struct State {
    client: Option<Client>,
    node: Option<pb::Node>,
    vms: HashMap<String, pb::Vm>,
    /// Since when the agent has not answered (None while connected).
    lost_since: Option<Instant>,
    /// When the last lease renewal was sent (or may have been, by an earlier controller).
    lease_sent: Option<Instant>,
}

/// One agent and what it last reported.
pub struct Agent {
    pub info: AgentInfo,
    pub fence_timeout: Duration,
    state: RwLock<State>,
}

impl Agent {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A client while the agent is reachable.
    pub fn client(&self) -> Option<Client> {
        let s = self.read();
        s.lost_since.is_none().then(|| s.client.clone()).flatten()
    }

    pub fn node(&self) -> Option<pb::Node> {
        self.read().node.clone()
    }

    /// How long the agent has been unreachable (zero while it answers).
    pub fn lost_for(&self) -> Duration {
        let s = self.read();
        match (s.lost_since, &s.client) {
            (None, Some(_)) => Duration::ZERO,
            (Some(t), _) => t.elapsed(),
            // Never connected yet: counts as lost from the start.
            (None, None) => Duration::MAX,
        }
    }

    /// The latest instant at which the agent has fenced itself if it heard nothing since: the
    /// last renewal sent, plus the fence timeout.
    pub fn fenced_by(&self) -> Instant {
        let sent = self.read().lease_sent.unwrap_or_else(Instant::now);
        sent + self.fence_timeout
    }

    /// A renewal is about to be sent: once sent, it may arrive, however late.
    fn renewing(&self) {
        self.write().lease_sent = Some(Instant::now());
    }

    /// The agent's VM `name`, from its watch stream.
    pub fn vm(&self, name: &str) -> Option<pb::Vm> {
        self.read().vms.get(name).cloned()
    }

    /// Records a reply or stream event. A reply can arrive after newer stream events for the
    /// same VM: the higher status revision wins, so what is known never goes back in time.
    pub fn observe(&self, vm: pb::Vm) {
        let Some(name) = vm.spec.as_ref().map(|s| s.name.clone()) else {
            return;
        };
        let revision = |v: &pb::Vm| v.status.as_ref().map_or(0, |s| s.revision);
        let mut state = self.write();
        if state
            .vms
            .get(&name)
            .is_none_or(|old| revision(old) <= revision(&vm))
        {
            state.vms.insert(name, vm);
        }
    }

    pub fn forget(&self, name: &str) {
        self.write().vms.remove(name);
    }

    /// A new connected period: what the agent reported before is stale.
    fn connected(&self, client: Client, node: pb::Node) {
        let mut s = self.write();
        s.client = Some(client);
        s.node = Some(node);
        s.vms.clear();
        s.lost_since = None;
    }

    /// The connection broke; true when it was up until now.
    fn mark_lost(&self) -> bool {
        let mut s = self.write();
        let was = s.lost_since.is_none() && s.client.is_some();
        s.lost_since.get_or_insert_with(Instant::now);
        was
    }

    /// Records fresh node facts; true when they changed.
    fn set_node(&self, node: pb::Node) -> bool {
        let mut s = self.write();
        let changed = s.node.as_ref() != Some(&node);
        s.node = Some(node);
        changed
    }
}

/// Every known agent, by node name.
pub struct Agents {
    agents: RwLock<BTreeMap<String, Arc<Agent>>>,
    signals: broadcast::Sender<Signal>,
    fence_timeout: Duration,
    /// The controller's certificate for `https://` agents, read for every new connection.
    tls: Option<TlsFiles>,
}

impl Default for Agents {
    fn default() -> Self {
        Agents::new(DEFAULT_FENCE_TIMEOUT)
    }
}

impl Agents {
    /// Agents whose leases last `fence_timeout`, reached without TLS.
    pub fn new(fence_timeout: Duration) -> Agents {
        Agents {
            agents: RwLock::default(),
            signals: broadcast::channel(65536).0,
            fence_timeout,
            tls: None,
        }
    }

    /// The same, reaching `https://` agents with the controller's certificate.
    pub fn with_tls(self, tls: Option<TlsFiles>) -> Agents {
        Agents { tls, ..self }
    }

    /// The scheme agents found without an address (cluster pods) are reached with.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Signal> {
        self.signals.subscribe()
    }

    pub fn get(&self, node: &str) -> Option<Arc<Agent>> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<Agent>> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Makes the set of agents `wanted`: new ones get a connection task, removed ones are
    /// dropped (their task ends), changed addresses reconnect.
    pub fn sync(self: &Arc<Self>, wanted: Vec<AgentInfo>) {
        let mut agents = self.agents.write().unwrap_or_else(|p| p.into_inner());
        let names: Vec<String> = wanted.iter().map(|a| a.node.clone()).collect();
        agents.retain(|node, _| names.contains(node));
        for info in wanted {
            if agents.get(&info.node).is_some_and(|a| a.info == info) {
                continue;
            }
            let node = info.node.clone();
            let agent = Arc::new(Agent {
                info,
                fence_timeout: self.fence_timeout,
                // An earlier controller may have renewed the agent's lease just before now.
                state: RwLock::new(State {
                    lease_sent: Some(Instant::now()),
                    ..State::default()
                }),
            });
            agents.insert(node.clone(), agent.clone());
            let this = Arc::downgrade(self);
            tokio::spawn(
                connect::connection(this, Arc::downgrade(&agent))
                    .instrument(info_span!("agent", node = node.as_str())),
            );
            let _ = self.signals.send(Signal::Node(node));
        }
    }

    fn signal(&self, s: Signal) {
        let _ = self.signals.send(s);
    }
}

/// The VirtualMachine an agent VM belongs to, from its identity labels.
fn vm_signal(vm: &pb::Vm) -> Option<Signal> {
    let labels = &vm.spec.as_ref()?.labels;
    Some(Signal::Vm {
        namespace: labels.get(NAMESPACE_LABEL)?.clone(),
        name: labels.get(NAME_LABEL)?.clone(),
    })
}
