//! The web dashboard in headless Chromium, against the controller over the in-process API with a
//! real agent booting the real test guest: the seed VM shows up, its phase follows the API within
//! a second (measured, event → DOM), a "Stop" click (confirmed) creates the VMOperation that stops
//! it, a read-only dashboard has no working action, an exposed one refuses requests without its
//! token. Also: the standalone binary's page reconnects after the controller restarts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use hypersdk_controller::context::Context;
use hypersdk_controller::crd::VirtualMachine;
use hypersdk_controller::crd::operation::OperationPhase;
use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::dashboard::Access;
use hypersdk_controller::dashboard::serve::Dashboard;
use hypersdk_controller::http::{Readiness, serve};
use hypersdk_controller::nodes::Agents;
use hypersdk_controller::standalone::FakeApi;
use hypersdk_tests::browser::{Browser, PAGE};
use hypersdk_tests::controller::{
    Controller, http_get, http_request, images, settings, start_node, wait_for,
};
use hypersdk_tests::free_port;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(180);
const VM_ROW: &str = r#"tr[data-key="default/my-vm"]"#;
const PHASE: &str = r#"tr[data-key="default/my-vm"] td[data-field="phase"]"#;

/// Serves a dashboard of `ctx` with `access` on a free loopback port; returns the port.
async fn dashboard(ctx: &Arc<Context>, access: Access) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ready = Arc::new(Readiness::default());
    ready.set(true);
    tokio::spawn(serve(listener, Dashboard::new(ctx.clone(), access), ready));
    port
}

fn phase(vm: &VirtualMachine) -> Option<VmPhase> {
    vm.status.as_ref()?.phase
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Records each phase my-vm takes in the API, with the time the watch saw it.
fn api_phases(vms: Api<VirtualMachine>) -> Arc<Mutex<Vec<(String, i64)>>> {
    let log = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    let out = log.clone();
    tokio::spawn(
        watcher(vms, watcher::Config::default())
            .applied_objects()
            .for_each(move |vm| {
                if let Ok(vm) = vm
                    && vm.metadata.name.as_deref() == Some("my-vm")
                {
                    let p = phase(&vm).map(|p| format!("{p:?}")).unwrap_or_default();
                    let mut log = out.lock().unwrap();
                    if log.last().map(|(l, _)| l) != Some(&p) {
                        log.push((p, now_ms()));
                    }
                }
                async {}
            }),
    );
    log
}

/// Records in the page each phase text of my-vm's row, with the time the DOM changed.
const DOM_PHASES: &str = r#"
  const cell = () => document.querySelector('tr[data-key="default/my-vm"] td[data-field="phase"]');
  window.phaseLog = [];
  let last = cell() && cell().textContent;
  new MutationObserver(() => {
    const now = cell() && cell().textContent;
    if (now !== last) { last = now; window.phaseLog.push([now, Date.now()]); }
  }).observe(document.getElementById('main'), {subtree: true, childList: true, characterData: true});
"#;

async fn set_running(ctl: &Controller, running: bool) {
    ctl.vms()
        .patch(
            "my-vm",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"running": running}})),
        )
        .await
        .unwrap();
}

/// For each phase the page showed after `since`, how long after the API's change it came.
fn latencies(dom: &Value, api: &[(String, i64)], since: i64) -> Vec<(String, i64)> {
    let dom: Vec<(String, i64)> = serde_json::from_value(dom.clone()).unwrap();
    dom.into_iter()
        .filter_map(|(p, at)| {
            let (_, api_at) = api.iter().rev().find(|(a, t)| *a == p && *t >= since)?;
            Some((p, at - api_at))
        })
        .collect()
}

/// Saves a screenshot of `path` in light and dark under $HYPERSDK_SCREENSHOTS (scripts/screenshots.sh).
async fn screenshots(b: &Browser, port: u16, pages: &[(&str, &str)]) {
    let Ok(dir) = std::env::var("HYPERSDK_SCREENSHOTS") else {
        return;
    };
    for (name, path) in pages {
        for theme in ["light", "dark"] {
            let url = format!("http://127.0.0.1:{port}{path}?theme={theme}");
            b.client.goto(&url).await.unwrap();
            b.wait_text("#live", "Live", PAGE).await;
            let png = b.client.screenshot().await.unwrap();
            let file = format!("{dir}/dashboard-{name}-{theme}.png");
            std::fs::write(&file, png).unwrap();
            println!("screenshot {file}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_follows_the_seed_vm_and_stops_it_with_a_confirmed_click() {
    let images = images();
    // The seed VM has 8Gi (TCG allocates it lazily).
    let node = start_node("node-1", images.path(), &["--allocatable-memory", "32Gi"]).await;
    let ctl = Controller::start(&[&node], settings());
    ctl.create_seed_vm(images.path()).await;
    let api = api_phases(ctl.vms());
    let actions = Access {
        actions: true,
        ..Access::default()
    };
    let port = dashboard(&ctl.ctx, actions).await;
    let b = Browser::start().await;
    b.client
        .goto(&format!("http://127.0.0.1:{port}/k8s/vms"))
        .await
        .unwrap();
    b.wait_text("#live", "Live", PAGE).await;
    b.wait_text(PHASE, "Running", BOOT).await;
    assert_eq!(
        b.text(&format!(r#"{VM_ROW} td[data-field="node"]"#))
            .await
            .as_deref(),
        Some("node-1")
    );

    // Stopped through the API: every phase reaches the page within a second.
    b.js(DOM_PHASES).await;
    let since = now_ms();
    set_running(&ctl, false).await;
    b.wait_text(PHASE, "Stopped", BOOT).await;
    let seen = latencies(
        &b.js("return window.phaseLog").await,
        &api.lock().unwrap(),
        since,
    );
    println!("update latency, API watch -> DOM (ms): {seen:?}");
    assert!(seen.iter().any(|(p, _)| p == "Stopped"), "{seen:?}");
    for (p, ms) in &seen {
        assert!(*ms < 1000, "{p} reached the page {ms} ms after the API");
    }

    set_running(&ctl, true).await;
    b.wait_text(PHASE, "Running", BOOT).await;
    screenshots(
        &b,
        port,
        &[
            ("overview", "/"),
            ("vms", "/k8s/vms"),
            ("charts", "/k8s/charts"),
        ],
    )
    .await;
    b.client
        .goto(&format!("http://127.0.0.1:{port}/k8s/vms"))
        .await
        .unwrap();
    b.wait_text(PHASE, "Running", PAGE).await;

    // "Stop" asks first; cancelled, nothing is created; confirmed, the VMOperation stops the VM.
    let stop = format!(r#"{VM_ROW} button[data-action="stop"]"#);
    b.click(&stop).await;
    b.click(r#"#confirm button[value="cancel"]"#).await;
    b.click(&stop).await;
    b.click("#confirm-ok").await;
    let op = hypersdk_tests::eventually(PAGE, "a VMOperation from the click", async || {
        let ops = ctl.ops().list(&Default::default()).await.unwrap().items;
        match ops.as_slice() {
            [op] => Ok(op.clone()),
            other => Err(format!("{} operations", other.len())),
        }
    })
    .await;
    assert_eq!(op.spec.vm_ref.name, "my-vm");
    assert_eq!(op.spec.operation.as_str(), "stop");
    let name = op.metadata.name.clone().unwrap();
    wait_for(&ctl.ops(), &name, BOOT, "Succeeded", |o| {
        o.status.as_ref().and_then(|s| s.phase) == Some(OperationPhase::Succeeded)
    })
    .await;
    b.wait_text(PHASE, "Stopped", PAGE).await;
    let activity = format!(r#"{VM_ROW} td[data-field="activity"]"#);
    b.wait_text(&activity, "stop Succeeded", PAGE).await;
    screenshots(&b, port, &[("operations", "/k8s/operations")]).await;

    read_only_has_no_working_action(&ctl, &b).await;
    exposed_refuses_without_the_token(&ctl, &b).await;
    b.client.clone().close().await.unwrap();
}

/// Read-only (the default): the buttons are disabled, and the API refuses an action anyway.
async fn read_only_has_no_working_action(ctl: &Controller, b: &Browser) {
    let port = dashboard(&ctl.ctx, Access::default()).await;
    b.client
        .goto(&format!("http://127.0.0.1:{port}/k8s/vms"))
        .await
        .unwrap();
    b.wait_text(PHASE, "Stopped", PAGE).await;
    let buttons = b
        .js("return [...document.querySelectorAll('button[data-action]')].map(b => [b.dataset.action, b.disabled])")
        .await;
    let buttons: Vec<(String, bool)> = serde_json::from_value(buttons).unwrap();
    assert!(!buttons.is_empty(), "no action buttons shown");
    assert!(buttons.iter().all(|(_, disabled)| *disabled), "{buttons:?}");
    let start = r#"{"kind":"VMOperation","vm":"my-vm","operation":"start"}"#;
    let resp = http_request(port, "POST", "/api/actions", &[], start);
    assert!(resp.starts_with("HTTP/1.0 403"), "{resp}");
    assert!(resp.contains("--dashboard-actions"), "{resp}");
    assert_eq!(
        ctl.ops()
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

/// Exposed: without the token, or without one configured, every API request is refused; the
/// page asks for the token and then shows the VMs.
async fn exposed_refuses_without_the_token(ctl: &Controller, b: &Browser) {
    let no_token = Access {
        exposed: true,
        ..Access::default()
    };
    let port = dashboard(&ctl.ctx, no_token).await;
    let resp = http_get(port, "/api/state");
    assert!(resp.starts_with("HTTP/1.0 401"), "{resp}");
    assert!(resp.contains("--dashboard-token-file"), "{resp}");

    let with_token = Access {
        token: Some("s3cret-token".into()),
        exposed: true,
        actions: false,
    };
    let port = dashboard(&ctl.ctx, with_token).await;
    for headers in [&[][..], &[("Authorization", "Bearer wrong")][..]] {
        let resp = http_request(port, "GET", "/api/state", headers, "");
        assert!(resp.starts_with("HTTP/1.0 401"), "{resp}");
        let resp = http_request(port, "GET", "/api/events", headers, "");
        assert!(resp.starts_with("HTTP/1.0 401"), "{resp}");
    }
    let good = [("Authorization", "Bearer s3cret-token")];
    let resp = http_request(port, "GET", "/api/state", &good, "");
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    assert!(resp.contains(r#""name":"my-vm""#), "{resp}");

    b.client
        .goto(&format!("http://127.0.0.1:{port}/k8s/vms"))
        .await
        .unwrap();
    let field = b.find("#login[open] #token").await;
    field.send_keys("s3cret-token").await.unwrap();
    b.click(r#"#login button[value="ok"]"#).await;
    b.wait_text(PHASE, "Stopped", PAGE).await;
}

/// A controller process, ended on drop.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The standalone binary behind a token (on loopback, a token file still applies), with a
/// simulated agent: the page asks for the token, and after the controller is killed and started
/// again it says so and comes back live by itself, without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_of_the_standalone_binary_reconnects_after_a_restart() {
    let images = tempfile::tempdir().unwrap();
    let sim = [
        "--simulate",
        "--simulate-cpus",
        "8",
        "--simulate-memory",
        "16Gi",
    ];
    let node = start_node("sim-1", images.path(), &sim).await;
    let dir = tempfile::tempdir().unwrap();
    for (from, to) in [
        ("vmtemplate-ubuntu.yaml", "template.yaml"),
        ("vm-my-vm.yaml", "vm.yaml"),
    ] {
        let from = hypersdk_tests::repo_root()
            .join("deploy/examples")
            .join(from);
        std::fs::copy(from, dir.path().join(to)).unwrap();
    }
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let port = free_port();
    let start = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("controller.log"))
            .unwrap();
        let child = std::process::Command::new(hypersdk_tests::bin("hypersdk-controller"))
            .args(["--standalone", "--manifests"])
            .arg(dir.path())
            .args(["--agent", &format!("sim-1={}", node.address)])
            .args(["--carbon-intensity", "sim-1=120"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .arg("--dashboard-token-file")
            .arg(&token)
            .stderr(log)
            .spawn()
            .unwrap();
        Process(child)
    };
    let ctl = start();
    let b = Browser::start().await;
    let url = format!("http://127.0.0.1:{port}/k8s/vms");
    let up = async || std::net::TcpStream::connect(("127.0.0.1", port));
    hypersdk_tests::eventually(PAGE, "the controller's port", up).await;
    b.client.goto(&url).await.unwrap();
    let field = b.find("#login[open] #token").await;
    field.send_keys("t0ken").await.unwrap();
    b.click(r#"#login button[value="ok"]"#).await;
    b.wait_text(PHASE, "Running", PAGE).await;
    b.wait_text("#live", "Live", PAGE).await;
    b.js("window.sameDocument = true").await;

    drop(ctl);
    b.wait_text("#live", "Reconnecting…", PAGE).await;
    let _ctl = start();
    b.wait_text("#live", "Live", PAGE).await;
    b.wait_text(PHASE, "Running", PAGE).await;
    assert_eq!(b.js("return window.sameDocument").await, json!(true));
    b.client.clone().close().await.unwrap();
}

/// `n` VirtualMachines with a Running status on `nodes` nodes, written straight to the API (no
/// agents or controllers: the page only reads them).
async fn simulated_vms(vms: &Api<VirtualMachine>, n: usize, nodes: usize) {
    for i in 0..n {
        let name = format!("vm-{i:04}");
        let doc = json!({
            "apiVersion": "hypersdk.io/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"cpus": 1, "memory": "512Mi", "running": false, "boot": {"kernel": "/k"}},
        });
        let vm: VirtualMachine = serde_json::from_value(doc).unwrap();
        vms.create(&Default::default(), &vm).await.unwrap();
        let status = json!({"status": {"phase": "Running", "nodeName": format!("node-{}", i % nodes),
                                        "cpus": 1, "memory": "512Mi"}});
        vms.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .unwrap();
    }
}

/// Loads /k8s/vms until `rows` rows show; returns (ms to the first render, bytes of the page:
/// HTML, script, style and the state document).
async fn first_render(b: &Browser, port: u16, rows: usize) -> (f64, usize) {
    b.client
        .goto(&format!("http://127.0.0.1:{port}/k8s/vms"))
        .await
        .unwrap();
    let count = "return document.querySelectorAll('tbody tr').length";
    hypersdk_tests::eventually(PAGE, &format!("{rows} rows"), async || {
        b.js(count).await == json!(rows)
    })
    .await;
    let ms = b
        .js("return performance.getEntriesByName('dashboard:first-render')[0].startTime")
        .await;
    let assets = b
        .js("return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource')).filter(e => !e.name.includes('/api/')).reduce((a, e) => a + e.transferSize, 0)")
        .await;
    let state = http_get(port, "/api/state");
    let state = state
        .split_once("\r\n\r\n")
        .map_or(0, |(_, body)| body.len());
    (
        ms.as_f64().unwrap(),
        assets.as_u64().unwrap() as usize + state,
    )
}

/// Page weight and time to first render with 1,000 VMs, against an empty cluster in the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_vms_page_weight_and_first_render() {
    let client = FakeApi::new().client("default");
    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(Agents::default()),
        settings(),
    ));
    let port = dashboard(&ctx, Access::default()).await;
    let b = Browser::start().await;
    let (empty_ms, empty_bytes) = first_render(&b, port, 0).await;
    simulated_vms(&Api::namespaced(client, "default"), 1000, 4).await;
    let (ms, bytes) = first_render(&b, port, 1000).await;
    println!(
        "first render: {ms:.0} ms with 1,000 VMs ({empty_ms:.0} ms with none); \
         page weight {} KiB ({} KiB with none)",
        bytes / 1024,
        empty_bytes / 1024
    );
    let row = r#"tr[data-key="default/vm-0999"] td[data-field="node"]"#;
    b.wait_text(row, "node-3", PAGE).await;
    b.client.clone().close().await.unwrap();
}
