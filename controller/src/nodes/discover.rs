//! Where the agents are: from `--agent NODE=ADDR` flags (standalone), or in a cluster from the
//! agent DaemonSet's pods (node name, pod IP, port) and their Node objects (labels, carbon
//! intensity annotation).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use hypersdk_proto::endpoint::{Address, AddressError};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tracing::warn;

use crate::nodes::{AgentInfo, Agents};

/// Node annotation with the grid carbon intensity (gCO2eq/kWh) where the node runs.
pub const CARBON_ANNOTATION: &str = "hypersdk.io/carbon-intensity";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("--agent {0:?}: expected NODE=ADDR, e.g. node-1=unix:///run/hypersdk/agent.sock")]
    Agent(String),
    #[error("--agent {flag:?}: {source}")]
    Address {
        flag: String,
        #[source]
        source: AddressError,
    },
    #[error("--agent {0:?}: node {1:?} is given twice")]
    Duplicate(String, String),
    #[error("--node-label {0:?}: expected NODE=KEY=VALUE for a node given with --agent")]
    Label(String),
    #[error(
        "--carbon-intensity {0:?}: expected NODE=GRAMS (gCO2eq/kWh) for a node given with --agent"
    )]
    Carbon(String),
    #[error("--unschedulable {0:?}: not a node given with --agent")]
    Unschedulable(String),
}

/// Marks the `drained` nodes of `agents` unschedulable (`--unschedulable NODE`).
pub fn drain(agents: &mut [AgentInfo], drained: &[String]) -> Result<(), FlagError> {
    for node in drained {
        let agent = agents.iter_mut().find(|a| &a.node == node);
        agent
            .ok_or_else(|| FlagError::Unschedulable(node.clone()))?
            .unschedulable = true;
    }
    Ok(())
}

/// The agents named by flags, with the labels and carbon intensities given for their nodes.
pub fn from_flags(
    agents: &[String],
    labels: &[String],
    carbon: &[String],
) -> Result<Vec<AgentInfo>, FlagError> {
    let mut out: Vec<AgentInfo> = Vec::new();
    for flag in agents {
        let (node, addr) = flag
            .split_once('=')
            .ok_or_else(|| FlagError::Agent(flag.clone()))?;
        if node.is_empty() {
            return Err(FlagError::Agent(flag.clone()));
        }
        let address: Address = addr.parse().map_err(|source| FlagError::Address {
            flag: flag.clone(),
            source,
        })?;
        if out.iter().any(|a| a.node == node) {
            return Err(FlagError::Duplicate(flag.clone(), node.into()));
        }
        out.push(AgentInfo {
            node: node.into(),
            address,
            labels: BTreeMap::new(),
            carbon_intensity: None,
            unschedulable: false,
        });
    }
    for flag in labels {
        let bad = || FlagError::Label(flag.clone());
        let (node, kv) = flag.split_once('=').ok_or_else(bad)?;
        let (k, v) = kv.split_once('=').ok_or_else(bad)?;
        let agent = out.iter_mut().find(|a| a.node == node).ok_or_else(bad)?;
        agent.labels.insert(k.into(), v.into());
    }
    for flag in carbon {
        let bad = || FlagError::Carbon(flag.clone());
        let (node, grams) = flag.split_once('=').ok_or_else(bad)?;
        let agent = out.iter_mut().find(|a| a.node == node).ok_or_else(bad)?;
        agent.carbon_intensity = Some(grams.parse().map_err(|_| bad())?);
    }
    Ok(out)
}

/// Keeps `agents` in step with the agent pods matching `selector` in `namespace` and with
/// their Node objects: watches both, and works the agents out again on every change.
pub async fn watch_pods(
    client: kube::Client,
    agents: Arc<Agents>,
    namespace: String,
    selector: String,
    port: u16,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let nodes: Api<Node> = Api::all(client);
    let (pod_store, pod_writer) = reflector::store();
    let (node_store, node_writer) = reflector::store();
    let pod_events = reflector(
        pod_writer,
        watcher(pods, watcher::Config::default().labels(&selector)),
    )
    .default_backoff()
    .map_ok(|_| ());
    let node_events = reflector(node_writer, watcher(nodes, watcher::Config::default()))
        .default_backoff()
        .map_ok(|_| ());
    let mut events = std::pin::pin!(futures::stream::select(pod_events, node_events));
    while let Some(event) = events.next().await {
        match event {
            Ok(()) => {
                let found = agents_from(&pod_store.state(), &node_store, agents.scheme(), port);
                agents.sync(found);
            }
            Err(e) => warn!(error = %e, "watching agent pods and nodes"),
        }
    }
}

/// The agents of running `pods` (those with a node and an IP), with what their Node objects
/// say (labels, drain, carbon intensity).
pub fn agents_from(
    pods: &[Arc<Pod>],
    nodes: &Store<Node>,
    scheme: &str,
    port: u16,
) -> Vec<AgentInfo> {
    let mut out: Vec<AgentInfo> = pods
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter_map(|pod| {
            let node = pod.spec.as_ref()?.node_name.clone()?;
            let ip = pod.status.as_ref()?.pod_ip.clone()?;
            let address = format!("{scheme}://{ip}:{port}").parse().ok()?;
            let found = nodes.get(&ObjectRef::new(&node));
            let unschedulable = found
                .as_ref()
                .and_then(|n| n.spec.as_ref()?.unschedulable)
                .unwrap_or(false);
            let meta = found.map(|n| n.metadata.clone()).unwrap_or_default();
            Some(AgentInfo {
                unschedulable,
                carbon_intensity: meta
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(CARBON_ANNOTATION))
                    .and_then(|v| v.parse().ok()),
                labels: meta.labels.unwrap_or_default(),
                node,
                address,
            })
        })
        .collect();
    // One agent per node: a pod being replaced and its successor may both be listed.
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out.dedup_by(|a, b| a.node == b.node);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_agent_flags() {
        let a = from_flags(
            &s(&["n1=unix:///a.sock", "n2=http://127.0.0.1:7443"]),
            &s(&["n1=zone=a"]),
            &s(&["n2=120"]),
        )
        .unwrap();
        assert_eq!(a[0].labels["zone"], "a");
        assert_eq!(a[1].carbon_intensity, Some(120));
        assert_eq!(
            from_flags(&s(&["n1"]), &[], &[]),
            Err(FlagError::Agent("n1".into()))
        );
        let e = from_flags(&s(&["n1=/a.sock"]), &[], &[]).unwrap_err();
        assert!(matches!(e, FlagError::Address { .. }), "{e:?}");
        assert!(std::error::Error::source(&e).is_some(), "keeps its source");
        assert!(matches!(
            from_flags(&s(&["n=unix:///a", "n=unix:///b"]), &[], &[]),
            Err(FlagError::Duplicate(..))
        ));
        assert!(matches!(
            from_flags(&s(&["n=unix:///a"]), &s(&["x=k=v"]), &[]),
            Err(FlagError::Label(_))
        ));
        assert!(matches!(
            from_flags(&s(&["n=unix:///a"]), &[], &s(&["n=lots"])),
            Err(FlagError::Carbon(_))
        ));
        let mut a = a;
        drain(&mut a, &s(&["n2"])).unwrap();
        assert!(!a[0].unschedulable && a[1].unschedulable);
        assert_eq!(
            drain(&mut a, &s(&["n3"])),
            Err(FlagError::Unschedulable("n3".into()))
        );
    }

    #[test]
    fn agents_come_from_running_pods_and_their_nodes() {
        use k8s_openapi::api::core::v1::{NodeSpec, PodSpec, PodStatus};
        let pod = |name: &str, node: &str, ip: Option<&str>| {
            let mut p = Pod::default();
            p.metadata.name = Some(name.into());
            p.spec = Some(PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            });
            p.status = Some(PodStatus {
                pod_ip: ip.map(str::to_string),
                ..Default::default()
            });
            Arc::new(p)
        };
        let (store, mut writer) = reflector::store::<Node>();
        let mut node = Node::default();
        node.metadata.name = Some("n1".into());
        node.metadata.labels = Some(BTreeMap::from([("zone".into(), "a".into())]));
        node.metadata.annotations =
            Some(BTreeMap::from([(CARBON_ANNOTATION.into(), "120".into())]));
        node.spec = Some(NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        writer.apply_watcher_event(&watcher::Event::Apply(node));
        let pods = [
            pod("a", "n1", Some("10.0.0.1")),
            pod("b", "n2", None),
            pod("c", "n3", Some("10.0.0.3")),
        ];
        let found = agents_from(&pods, &store, "https", 7443);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].node, "n1");
        assert_eq!(found[0].address.to_string(), "https://10.0.0.1:7443");
        assert!(found[0].unschedulable);
        assert_eq!(found[0].carbon_intensity, Some(120));
        assert_eq!(found[0].labels["zone"], "a");
        // A pod whose Node object is not seen yet: no labels, schedulable.
        assert_eq!(found[1].node, "n3");
        assert!(!found[1].unschedulable && found[1].labels.is_empty());
    }
}
