//! The node agents the controller talks to: one connection task per agent keeps its node facts
//! (GetNode) and a live copy of its VMs (WatchVms), and signals every change so the reconcilers
//! run again. An agent whose stream breaks is unreachable until it answers again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_client::AgentServiceClient;
use hypersdk_proto::endpoint::{self, Address};
use tokio::sync::broadcast;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tracing::{Instrument, info, info_span, warn};

use crate::agentspec::{NAME_LABEL, NAMESPACE_LABEL};

pub type Client = AgentServiceClient<Channel>;

/// How often node facts (capacity, allocations) are refreshed.
const NODE_REFRESH: Duration = Duration::from_secs(5);

/// An agent as discovered: where it is and what the scheduler may know about its node.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentInfo {
    pub node: String,
    pub address: Address,
    pub labels: BTreeMap<String, String>,
    pub carbon_intensity: Option<u32>,
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
}

/// One agent and what it last reported.
pub struct Agent {
    pub info: AgentInfo,
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
}

/// Every known agent, by node name.
pub struct Agents {
    agents: RwLock<BTreeMap<String, Arc<Agent>>>,
    signals: broadcast::Sender<Signal>,
}

impl Default for Agents {
    fn default() -> Self {
        Agents {
            agents: RwLock::default(),
            signals: broadcast::channel(65536).0,
        }
    }
}

impl Agents {
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
                state: RwLock::default(),
            });
            agents.insert(node.clone(), agent.clone());
            let this = Arc::downgrade(self);
            tokio::spawn(
                connection(this, Arc::downgrade(&agent))
                    .instrument(info_span!("agent", node = node.as_str())),
            );
            let _ = self.signals.send(Signal::Node(node));
        }
    }

    fn signal(&self, s: Signal) {
        let _ = self.signals.send(s);
    }
}

fn vm_signal(vm: &pb::Vm) -> Option<Signal> {
    let labels = &vm.spec.as_ref()?.labels;
    Some(Signal::Vm {
        namespace: labels.get(NAMESPACE_LABEL)?.clone(),
        name: labels.get(NAME_LABEL)?.clone(),
    })
}

/// Keeps one agent connected until it is removed from the registry.
async fn connection(agents: std::sync::Weak<Agents>, agent: std::sync::Weak<Agent>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(a) = agent.upgrade() else { return };
        let address = a.info.address.clone();
        drop(a);
        match session(&agents, &agent, &address).await {
            Ok(()) => return,
            Err(e) => {
                let Some(a) = agent.upgrade() else { return };
                let was_connected = {
                    let mut s = a.write();
                    let was = s.lost_since.is_none() && s.client.is_some();
                    if s.lost_since.is_none() {
                        s.lost_since = Some(Instant::now());
                    }
                    was
                };
                if was_connected {
                    warn!(%address, error = %e, "agent unreachable");
                    backoff = Duration::from_millis(100);
                }
                if let Some(reg) = agents.upgrade() {
                    reg.signal(Signal::Node(a.info.node.clone()));
                    // Its VMs' conditions change too.
                    let vms: Vec<_> = a.read().vms.values().filter_map(vm_signal).collect();
                    vms.into_iter().for_each(|s| reg.signal(s));
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One connected period: Ok when the agent was removed, Err when the connection broke.
async fn session(
    agents: &std::sync::Weak<Agents>,
    agent: &std::sync::Weak<Agent>,
    address: &Address,
) -> Result<(), tonic::Status> {
    let mut client = endpoint::connect(address)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let node = client.get_node(pb::GetNodeRequest {}).await?.into_inner();
    let mut stream = client
        .watch_vms(pb::WatchVmsRequest {
            name: String::new(),
        })
        .await?
        .into_inner();
    {
        let Some(a) = agent.upgrade() else {
            return Ok(());
        };
        let mut s = a.write();
        s.client = Some(client.clone());
        s.node = Some(node);
        s.vms.clear();
        s.lost_since = None;
        info!(%address, "agent connected");
    }
    if let (Some(reg), Some(a)) = (agents.upgrade(), agent.upgrade()) {
        reg.signal(Signal::Node(a.info.node.clone()));
    }
    let mut refresh = tokio::time::interval(NODE_REFRESH);
    refresh.tick().await;
    loop {
        tokio::select! {
            event = stream.next() => {
                let event = event.ok_or_else(|| tonic::Status::unavailable("watch stream ended"))??;
                let (Some(a), Some(reg)) = (agent.upgrade(), agents.upgrade()) else { return Ok(()) };
                let Some(vm) = event.vm else { continue };
                let signal = vm_signal(&vm);
                let name = vm.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                if event.r#type == pb::EventType::Deleted as i32 {
                    a.forget(&name);
                } else {
                    a.observe(vm);
                }
                if let Some(s) = signal {
                    reg.signal(s);
                }
            }
            _ = refresh.tick() => {
                let node = client.get_node(pb::GetNodeRequest {}).await?.into_inner();
                let Some(a) = agent.upgrade() else { return Ok(()) };
                let changed = a.read().node.as_ref() != Some(&node);
                a.write().node = Some(node);
                if changed && let Some(reg) = agents.upgrade() {
                    reg.signal(Signal::Node(a.info.node.clone()));
                }
            }
        }
    }
}
