//! One connection task per agent: it connects, reads the node's facts (GetNode, refreshed every
//! [`NODE_REFRESH`]) and follows its VMs (WatchVms) into the [`Agent`]'s state, signalling every
//! change. A broken stream marks the agent unreachable and reconnects with back-off.

use std::sync::Weak;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::{self, Address};
use tokio_stream::StreamExt;
use tracing::{info, warn};

use super::{Agent, Agents, Client, Signal, vm_signal};

/// How often node facts (capacity, allocations) are refreshed.
const NODE_REFRESH: Duration = Duration::from_secs(5);
/// Reconnection back-off: from the first to the longest wait.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LONGEST_RETRY: Duration = Duration::from_secs(2);

/// Why a connected period ended.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("connecting: {0}")]
    Connect(#[source] endpoint::ConnectError),
    #[error("agent call: {0}")]
    Call(#[from] tonic::Status),
    #[error("the watch stream ended")]
    Ended,
}

/// Keeps one agent connected until it is removed from the registry.
pub(super) async fn connection(agents: Weak<Agents>, agent: Weak<Agent>) {
    let mut backoff = FIRST_RETRY;
    loop {
        let Some(address) = agent.upgrade().map(|a| a.info.address.clone()) else {
            return;
        };
        match session(&agents, &agent, &address).await {
            Ok(()) => return,
            Err(e) => {
                let Some(a) = agent.upgrade() else { return };
                if a.mark_lost() {
                    warn!(%address, error = %e, "agent unreachable");
                    backoff = FIRST_RETRY;
                }
                if let Some(reg) = agents.upgrade() {
                    signal_lost(&reg, &a);
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LONGEST_RETRY);
    }
}

/// The node changed, and so do the conditions of every VM on it.
fn signal_lost(reg: &Agents, agent: &Agent) {
    reg.signal(Signal::Node(agent.info.node.clone()));
    let vms: Vec<_> = agent.read().vms.values().filter_map(vm_signal).collect();
    vms.into_iter().for_each(|s| reg.signal(s));
}

/// One connected period: Ok when the agent was removed, Err when the connection broke.
async fn session(
    agents: &Weak<Agents>,
    agent: &Weak<Agent>,
    address: &Address,
) -> Result<(), Broken> {
    let tls = agents.upgrade().and_then(|a| a.tls.clone());
    let mut client = endpoint::connect(address, tls.as_ref())
        .await
        .map_err(Broken::Connect)?;
    let node = client.get_node(pb::GetNodeRequest {}).await?.into_inner();
    let mut stream = client
        .watch_vms(pb::WatchVmsRequest {
            name: String::new(),
        })
        .await?
        .into_inner();
    let Some(a) = agent.upgrade() else {
        return Ok(());
    };
    a.connected(client.clone(), node);
    info!(%address, "agent connected");
    if let Some(reg) = agents.upgrade() {
        reg.signal(Signal::Node(a.info.node.clone()));
    }
    drop(a);
    let mut refresh =
        tokio::time::interval_at(tokio::time::Instant::now() + NODE_REFRESH, NODE_REFRESH);
    let (mut token, mut renewal) = (0, None);
    loop {
        let alive = tokio::select! {
            event = stream.next() => {
                let event = event.ok_or(Broken::Ended)??;
                on_event(agents, agent, event)
            }
            _ = refresh.tick() => refresh_node(agents, agent, &mut client).await?,
            _ = tick(&mut renewal, agent) => match agent.upgrade() {
                Some(a) => {
                    token = renew(&a, &mut client, token).await?;
                    true
                }
                None => false,
            },
        };
        if !alive {
            return Ok(());
        }
    }
}

/// Waits for the next lease renewal: four per fence timeout, the first at once.
async fn tick(renewal: &mut Option<tokio::time::Interval>, agent: &Weak<Agent>) {
    let every = agent
        .upgrade()
        .map_or(Duration::from_secs(1), |a| a.fence_timeout / 4);
    renewal
        .get_or_insert_with(|| tokio::time::interval(every))
        .tick()
        .await;
}

/// Renews the agent's lease with `token` (0: only asks for a first one); returns the next.
async fn renew(agent: &Agent, client: &mut Client, token: u64) -> Result<u64, Broken> {
    if token != 0 {
        agent.renewing();
    }
    let mut req = tonic::Request::new(pb::RenewLeaseRequest {
        token,
        fence_timeout_ms: agent.fence_timeout.as_millis() as u32,
    });
    // A renewal that takes a quarter of the timeout is as good as lost.
    req.set_timeout(agent.fence_timeout / 4);
    Ok(client.renew_lease(req).await?.into_inner().token)
}

/// Records one WatchVms event; false once the agent or the registry is gone.
fn on_event(agents: &Weak<Agents>, agent: &Weak<Agent>, event: pb::VmEvent) -> bool {
    let (Some(a), Some(reg)) = (agent.upgrade(), agents.upgrade()) else {
        return false;
    };
    let Some(vm) = event.vm else { return true };
    let signal = vm_signal(&vm);
    if event.r#type == pb::EventType::Deleted as i32 {
        let name = vm
            .spec
            .as_ref()
            .map(|s| s.name.as_str())
            .unwrap_or_default();
        a.forget(name);
    } else {
        a.observe(vm);
    }
    if let Some(s) = signal {
        reg.signal(s);
    }
    true
}

/// Reads the node's facts again, signalling a change; false once the agent is gone.
async fn refresh_node(
    agents: &Weak<Agents>,
    agent: &Weak<Agent>,
    client: &mut Client,
) -> Result<bool, Broken> {
    let node = client.get_node(pb::GetNodeRequest {}).await?.into_inner();
    let Some(a) = agent.upgrade() else {
        return Ok(false);
    };
    if a.set_node(node)
        && let Some(reg) = agents.upgrade()
    {
        reg.signal(Signal::Node(a.info.node.clone()));
    }
    Ok(true)
}
