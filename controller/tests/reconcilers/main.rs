//! Each reconciler against the in-process API with simulated node agents: the real kube-runtime
//! controllers, gRPC to fake agents on unix sockets, no guest booted. Seconds, not minutes.
//!
//! Waits are bounded by [`BOUND`], far below the reconcilers' safety resyncs (5 minutes): what
//! happens within it was triggered by a watch or an agent signal, not by a periodic look.

mod fake_agent;
mod operation;
mod snapshot;
mod template;
mod vm;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_agent::{FakeAgent, Peers};
use hypersdk_controller::context::{Context, Settings};
use hypersdk_controller::crd::VirtualMachine;
use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{Condition, condition};
use hypersdk_controller::nodes::spec::agent_name;
use hypersdk_controller::nodes::{AgentInfo, Agents};
use hypersdk_controller::standalone::FakeApi;
use hypersdk_proto::agent::v1::agent_service_server::AgentServiceServer;
use hypersdk_proto::endpoint::Address;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::NamespaceResourceScope;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;

/// The longest any test waits for something to happen.
pub const BOUND: Duration = Duration::from_secs(20);

/// Polls `f` until it gives a value; panics after [`BOUND`] naming `what` and the last state.
pub async fn eventually<T, S: Debug>(what: &str, mut f: impl AsyncFnMut() -> Result<T, S>) -> T {
    let deadline = Instant::now() + BOUND;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("not within {BOUND:?}: {what}; last: {last:#?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A node of the test cluster: its fake agent, served on a unix socket.
pub struct Node {
    pub name: String,
    pub agent: FakeAgent,
    address: Address,
    server: JoinHandle<()>,
}

impl Node {
    fn info(&self) -> AgentInfo {
        AgentInfo {
            node: self.name.clone(),
            address: self.address.clone(),
            labels: BTreeMap::from([("hypersdk.io/node".to_string(), self.name.clone())]),
            carbon_intensity: None,
            unschedulable: false,
        }
    }
}

/// The controllers over an in-process API, with simulated nodes.
pub struct Cluster {
    pub client: kube::Client,
    pub ctx: Arc<Context>,
    agents: Arc<Agents>,
    nodes: Vec<Node>,
    peers: Peers,
    dir: tempfile::TempDir,
    controllers: JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.controllers.abort();
        self.nodes.iter().for_each(|n| n.server.abort());
    }
}

impl Cluster {
    /// The controllers, with a node (8 CPUs, 16 GiB) per name; a highly available VM moves
    /// 1.5 s after the last lease renewal its lost node got.
    pub async fn start(nodes: &[&str]) -> Cluster {
        let client = FakeApi::new().client("default");
        let agents = Arc::new(Agents::new(Duration::from_secs(1)));
        let settings = Settings {
            fence_margin: Duration::from_millis(500),
            stop_timeout_seconds: 1,
            ..Settings::default()
        };
        let ctx = Arc::new(Context::new(client.clone(), agents.clone(), settings));
        let controllers = tokio::spawn(hypersdk_controller::controllers::run(
            ctx.clone(),
            std::future::pending(),
        ));
        let mut cluster = Cluster {
            client,
            ctx,
            agents,
            nodes: Vec::new(),
            peers: Arc::new(Mutex::default()),
            dir: tempfile::tempdir().unwrap(),
            controllers,
        };
        for name in nodes {
            cluster.add_node(name);
        }
        cluster
    }

    /// A new node whose agent the controller connects to.
    pub fn add_node(&mut self, name: &str) {
        let path = self.dir.path().join(format!("{name}.sock"));
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let address: Address = format!("unix://{}", path.display()).parse().unwrap();
        let agent = FakeAgent::new(name, self.peers.clone());
        self.peers
            .lock()
            .unwrap()
            .insert(address.to_string(), agent.clone());
        let service = AgentServiceServer::new(agent.clone());
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await
                .unwrap();
        });
        self.nodes.push(Node {
            name: name.into(),
            agent,
            address,
            server,
        });
        self.agents
            .sync(self.nodes.iter().map(Node::info).collect());
    }

    pub fn node(&self, name: &str) -> &FakeAgent {
        let node = self.nodes.iter().find(|n| n.name == name);
        &node.unwrap_or_else(|| panic!("no node {name}")).agent
    }

    pub fn api<K: Object>(&self) -> Api<K> {
        Api::namespaced(self.client.clone(), "default")
    }

    /// Creates the object `doc` describes (in namespace "default").
    pub async fn create<K: Object + Serialize>(&self, doc: Value) -> K {
        let obj: K = serde_json::from_value(doc).unwrap();
        self.api::<K>()
            .create(&PostParams::default(), &obj)
            .await
            .unwrap()
    }

    /// Merges `patch` into object `name`.
    pub async fn patch<K: Object>(&self, name: &str, patch: Value) {
        self.api::<K>()
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
    }

    /// Deletes object `name` and waits until it is gone (its finalizers done).
    pub async fn delete<K: Object>(&self, name: &str) {
        self.api::<K>()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        self.wait_gone::<K>(name).await;
    }

    /// Waits until object `name` exists and `pred` holds for it.
    pub async fn wait<K: Object>(&self, name: &str, what: &str, pred: impl Fn(&K) -> bool) -> K {
        let found = self.until(name, what, |o: Option<&K>| o.is_some_and(&pred));
        found.await.unwrap()
    }

    /// Waits until object `name` no longer exists.
    pub async fn wait_gone<K: Object>(&self, name: &str) {
        self.until(name, "deleted", |o: Option<&K>| o.is_none())
            .await;
    }

    /// Waits until VirtualMachine `name` runs.
    pub async fn running(&self, name: &str) -> VirtualMachine {
        self.wait(name, "Running", |v: &VirtualMachine| {
            v.status.as_ref().and_then(|s| s.phase) == Some(VmPhase::Running)
        })
        .await
    }

    async fn until<K: Object>(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(Option<&K>) -> bool,
    ) -> Option<K> {
        let api = self.api::<K>();
        eventually(&format!("{name}: {what}"), async || {
            let obj = api.get_opt(name).await.unwrap();
            if pred(obj.as_ref()) {
                Ok(obj)
            } else {
                Err(obj)
            }
        })
        .await
    }

    /// (reason, note) of every event recorded about object `name`.
    pub async fn events(&self, name: &str) -> Vec<(String, String)> {
        let events = self.api::<Event>().list(&Default::default()).await.unwrap();
        events
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }
}

/// A namespaced kind these tests read and write.
pub trait Object:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned
{
}

impl<K> Object for K where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned
{
}

/// The agent's name of VirtualMachine `name` in namespace "default".
pub fn on_agent(name: &str) -> String {
    agent_name("default", name)
}

/// The template every test VM boots from.
pub fn template() -> Value {
    json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VMTemplate",
        "metadata": {"name": "tpl"},
        "spec": {"image": {"source": "/images/disk.qcow2", "format": "qcow2"},
                 "defaultSpec": {"boot": {"kernel": "/images/vmlinuz"}}}})
}

/// A running VM of 1 CPU and 256 MiB from [`template`], with `spec` merged over it.
pub fn vm(name: &str, spec: Value) -> Value {
    let mut doc = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"cpus": 1, "memory": "256Mi", "running": true,
                 "image": {"templateRef": {"name": "tpl"}}}});
    json_patch::merge(&mut doc["spec"], &spec);
    doc
}

/// A VMOperation `name` of `operation` on VM `vm`, with `extra` merged into its spec.
pub fn operation(name: &str, vm: &str, operation: &str, extra: Value) -> Value {
    let mut doc = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VMOperation",
        "metadata": {"name": name},
        "spec": {"vmRef": {"name": vm}, "operation": operation}});
    json_patch::merge(&mut doc["spec"], &extra);
    doc
}

/// Condition `type_` of an object's status conditions.
pub fn cond<'a>(conditions: Option<&'a Vec<Condition>>, type_: &str) -> Option<&'a Condition> {
    condition(conditions?, type_)
}

/// Whether `obj` has an ownerReference to `owner`.
pub fn owned_by<K: Resource, O: Resource>(obj: &K, owner: &O) -> bool {
    obj.owner_references()
        .iter()
        .any(|r| Some(&r.uid) == owner.meta().uid.as_ref() && r.name == owner.name_any())
}
