//! Support for tests of the controller: nodes sharing one image directory, the example
//! manifests pointed at the test guest, and plain HTTP on a free loopback port.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hypersdk_controller::context::{Context, Settings};
use hypersdk_controller::crd::{VMOperation, VirtualMachine};
use hypersdk_controller::nodes::{AgentInfo, Agents};
use hypersdk_controller::scheduling::Policy;
use hypersdk_controller::standalone::FakeApi;
use hypersdk_controller::standalone::parse_documents;
use kube::Api;
use kube::api::{DynamicObject, PostParams};
use kube::core::ApiResource;
use serde_json::{Value, json};

use crate::{Agent, GUEST_CMDLINE, eventually, guest, repo_root};

/// A node of the test: an agent whose --image-dir is shared with the other agents of the test,
/// so that one VMTemplate (image paths are node paths) fits every node.
pub async fn start_node(name: &str, images: &Path, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--image-dir",
        images.to_str().unwrap(),
        "--cgroup-parent",
        "",
    ];
    args.extend_from_slice(extra);
    Agent::start_with(name, &args).await
}

/// How the controller finds `agent`, labelled with its node name for nodeSelectors.
pub fn info(agent: &Agent) -> AgentInfo {
    AgentInfo {
        node: agent.name.clone(),
        address: agent.address.clone(),
        labels: BTreeMap::from([("hypersdk.io/node".to_string(), agent.name.clone())]),
        carbon_intensity: None,
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        let client = FakeApi::new().client("default");
        let agents = Arc::new(Agents::default());
        agents.sync(nodes.iter().map(|n| info(n)).collect());
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
        node_lost_grace: Duration::from_secs(2),
        stop_timeout_seconds: 10,
    }
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
