//! The controller in tests: in-process over the in-memory API, with real agents as its nodes,
//! and what tests of it wait for and look at.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hypersdk_controller::context::{Context, Settings};
use hypersdk_controller::crd::operation::OperationPhase;
use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{VMOperation, VMTemplate, VirtualMachine, condition};
use hypersdk_controller::nodes::{AgentInfo, Agents};
use hypersdk_controller::scheduling::Policy;
use hypersdk_controller::standalone::FakeApi;
use hypersdk_controller::standalone::parse_documents;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::Address;
use kube::Api;
use kube::api::{DynamicObject, PostParams};
use kube::core::ApiResource;
use serde_json::{Value, json};

use crate::hosts::Hosts;
use crate::pki::{Pki, tls_flags_on};
use crate::{Agent, GUEST_CMDLINE, eventually, guest, repo_root};

/// A node of the test: an agent whose --image-dir is shared with the other agents of the test,
/// so that one VMTemplate (image paths are node paths) fits every node, and whose VMs' disks
/// are made there too (the shared storage live migration needs).
pub async fn start_node(name: &str, images: &Path, extra: &[&str]) -> Agent {
    start_node_in(name, None, images, extra).await
}

/// The same in network namespace `netns` (a [`crate::hosts::Host`]).
pub async fn start_node_in(
    name: &str,
    netns: Option<&str>,
    images: &Path,
    extra: &[&str],
) -> Agent {
    let disks = images.join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let disks = disks.to_str().unwrap().to_string();
    let mut args = vec![
        "--image-dir",
        images.to_str().unwrap(),
        "--disk-dir",
        &disks,
        "--cgroup-parent",
        "",
    ];
    args.extend_from_slice(extra);
    Agent::start_in(name, netns, &args).await
}

/// A node on each of `hosts`: its agent serves gRPC only over mutual TLS on the host's address
/// (port 7443, a certificate from `pki` naming it) and migrates from that address. Returns the
/// agents and how the controller reaches them.
pub async fn start_host_nodes(
    hosts: &Hosts,
    pki: &Pki,
    images: &Path,
) -> (Vec<Agent>, Vec<AgentInfo>) {
    let mut nodes = vec![];
    let mut infos = vec![];
    for h in &hosts.hosts {
        let ip = h.ip.to_string();
        let mut flags = tls_flags_on(&ip, 7443, &pki.issue_for_host(&h.name, &ip));
        flags.extend(["--migration-address".into(), ip.clone()]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let node = start_node_in(&h.name, Some(&h.name), images, &flags).await;
        infos.push(AgentInfo {
            address: Address::Tls(format!("{ip}:7443")),
            ..info(&node)
        });
        nodes.push(node);
    }
    (nodes, infos)
}

/// How the controller finds `agent`, labelled with its node name for nodeSelectors.
pub fn info(agent: &Agent) -> AgentInfo {
    AgentInfo {
        node: agent.name.clone(),
        address: agent.address.clone(),
        labels: BTreeMap::from([("hypersdk.io/node".to_string(), agent.name.clone())]),
        carbon_intensity: None,
        unschedulable: false,
    }
}

/// Shared image directory holding the test guest.
pub fn images() -> tempfile::TempDir {
    let g = guest();
    let dir = tempfile::Builder::new()
        .prefix("hs-img-")
        .tempdir_in("/tmp")
        .unwrap();
    for f in [&g.kernel, &g.initrd, &g.disk] {
        std::fs::copy(f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// A GET over plain HTTP/1.0; returns the whole response.
pub fn http_get(port: u16, path: &str) -> String {
    http_request(port, "GET", path, &[], "")
}

/// A request over plain HTTP/1.0 with `headers` and `body`; returns the whole response.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: localhost\r\n").unwrap();
    for (k, v) in headers {
        write!(s, "{k}: {v}\r\n").unwrap();
    }
    write!(s, "Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The controllers, in-process over the in-memory API.
pub struct Controller {
    pub client: kube::Client,
    pub agents: Arc<Agents>,
    pub ctx: Arc<Context>,
    task: tokio::task::JoinHandle<()>,
}

impl Controller {
    pub fn start(nodes: &[&Agent], settings: Settings) -> Controller {
        let nodes = nodes.iter().map(|n| info(n)).collect();
        Controller::start_with(nodes, settings, Agents::default())
    }

    /// With the nodes as given (reached through a [`crate::link::Link`], say) and `agents`
    /// configured by the test (lease length, TLS).
    pub fn start_with(nodes: Vec<AgentInfo>, settings: Settings, agents: Agents) -> Self {
        let client = FakeApi::new().client("default");
        let agents = Arc::new(agents);
        agents.sync(nodes);
        let ctx = Arc::new(Context::new(client.clone(), agents.clone(), settings));
        let task = tokio::spawn(hypersdk_controller::controllers::run(
            ctx.clone(),
            std::future::pending(),
        ));
        Controller {
            client,
            agents,
            ctx,
            task,
        }
    }

    /// The example template (pointed at the test guest in `images`) and the seed VM
    /// `my-vm` of it, its manifest unchanged (4 vCPUs, 8Gi, template ubuntu-22-04-template).
    pub async fn create_seed_vm(&self, images: &Path) {
        self.create::<VMTemplate>(guest_template(images))
            .await
            .unwrap();
        self.create::<VirtualMachine>(example("vm-my-vm.yaml"))
            .await
            .unwrap();
    }

    /// The example template (pointed at the test guest in `images`) and a small highly
    /// available VM "ha" of it.
    pub async fn create_ha_vm(&self, images: &Path) {
        self.create::<VMTemplate>(guest_template(images))
            .await
            .unwrap();
        self.create::<VirtualMachine>(small_vm("ha", true, None))
            .await
            .unwrap();
    }

    /// Waits for VMOperation `name` to end, and checks that it succeeded.
    pub async fn op_succeeded(&self, name: &str) -> VMOperation {
        let op = wait_for(&self.ops(), name, BOOT, "done", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(OperationPhase::is_final)
        })
        .await;
        let status = op.status.as_ref().unwrap();
        assert_eq!(status.phase, Some(OperationPhase::Succeeded), "{status:?}");
        op
    }

    pub fn vms(&self) -> Api<VirtualMachine> {
        Api::namespaced(self.client.clone(), "default")
    }

    pub fn ops(&self) -> Api<VMOperation> {
        Api::namespaced(self.client.clone(), "default")
    }

    /// Sends `doc` as it is (no typed round trip), as kubectl would.
    pub async fn create<K: kube::Resource<DynamicType = ()>>(
        &self,
        doc: Value,
    ) -> Result<DynamicObject, kube::Error> {
        let ar = ApiResource::erase::<K>(&());
        let obj: DynamicObject = serde_json::from_value(doc).unwrap();
        Api::<DynamicObject>::namespaced_with(self.client.clone(), "default", &ar)
            .create(&PostParams::default(), &obj)
            .await
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn settings() -> Settings {
    Settings {
        policy: Policy::default(),
        fence_margin: Duration::from_secs(1),
        stop_timeout_seconds: 10,
    }
}

pub fn example(file: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join("deploy/examples").join(file)).unwrap();
    parse_documents(&text).unwrap().remove(0)
}

/// The example template, pointed at the test guest in `images`.
pub fn guest_template(images: &Path) -> Value {
    let mut t = example("vmtemplate-ubuntu.yaml");
    let p = |f: &str| images.join(f).to_string_lossy().into_owned();
    t["spec"]["defaultSpec"]["boot"] =
        json!({"kernel": p("vmlinuz"), "initrd": p("initrd.img"), "cmdline": GUEST_CMDLINE});
    t["spec"]["image"]["source"] = json!(p("disk.qcow2"));
    t
}

/// Polls `name` until `pred` holds; panics with the last state after `limit`.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    limit: Duration,
    what: &str,
    mut pred: impl FnMut(&K) -> bool,
) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(limit, &format!("{name}: {what}"), async || {
        match api.get_opt(name).await.unwrap() {
            Some(o) if pred(&o) => Ok(o),
            last => Err(format!("{last:#?}")),
        }
    })
    .await
}

/// Waits until `name` is gone from the API.
pub async fn wait_gone<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(
        Duration::from_secs(60),
        &format!("{name} deleted"),
        async || api.get_opt(name).await.unwrap().is_none(),
    )
    .await
}

pub fn phase(vm: &VirtualMachine) -> Option<VmPhase> {
    vm.status.as_ref().and_then(|s| s.phase)
}

pub fn cond<'a>(
    vm: &'a VirtualMachine,
    type_: &str,
) -> Option<&'a hypersdk_controller::crd::Condition> {
    condition(&vm.status.as_ref()?.conditions, type_)
}

/// Waits until the guest agent of my-vm on `node` answers.
pub async fn wait_guest_agent(node: &Agent) {
    eventually(BOOT, "the guest agent of my-vm", async || {
        agent_vm(node, "my-vm")
            .await
            .unwrap()
            .status
            .unwrap()
            .agent_connected
    })
    .await;
}

pub async fn agent_vm(node: &Agent, name: &str) -> Result<pb::Vm, tonic::Status> {
    let agent_name = hypersdk_controller::nodes::spec::agent_name("default", name);
    node.client()
        .await
        .get_vm(pb::GetVmRequest { name: agent_name })
        .await
        .map(|r| r.into_inner())
}

pub const BOOT: Duration = Duration::from_secs(180);

pub fn small_vm(name: &str, ha: bool, selector: Option<&str>) -> Value {
    let mut v = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"cpus": 1, "memory": "256Mi", "running": true,
                 "image": {"templateRef": {"name": "ubuntu-22-04-template"}},
                 "highAvailability": {"enabled": ha, "restartPolicy": "Always"}}});
    if let Some(node) = selector {
        v["spec"]["nodeSelector"] = json!({"hypersdk.io/node": node});
    }
    v
}
