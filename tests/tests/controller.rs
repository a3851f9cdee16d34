//! The controller over the in-process Kubernetes API with real agents booting the real test guest:
//! the seed VirtualMachine runs on one of two nodes, stops, restarts, is deleted from its agent;
//! bad manifests are refused or get a clear condition; a lost node is reported and highly
//! available VMs move. The standalone binary is checked with simulated agents.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::time::Duration;

use futures::FutureExt;
use hypersdk_controller::crd::operation::OperationPhase;
use hypersdk_controller::crd::snapshot::SnapshotPhase;
use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{VMOperation, VMSnapshot, VMTemplate, VirtualMachine};
use hypersdk_controller::metrics::agent_gauges;
use hypersdk_controller::nodes::Agents;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::Address;
use hypersdk_tests::controller::*;
use hypersdk_tests::pki::{Pki, tls_flags};
use hypersdk_tests::{
    Agent, READY_MARKER, VmState, bin, count_markers, current_counter, eventually, free_port, list,
    repo_root, resumed_counter, serial, wait_boots, wait_counter_above,
};
use hypersdk_tls::role::Role;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

/// An object in the API, or a VM on an agent.
#[derive(Debug, PartialEq)]
enum Thing {
    Object(Value),
    Vm(Box<VmState>),
}

/// What the controller could change: every object in the API (by kind and name, without the
/// version the API bumps on every write) and every VM on the agents (by node and name).
async fn everything(ctl: &Controller, nodes: &[Agent]) -> BTreeMap<String, Thing> {
    let mut all = BTreeMap::new();
    for ar in [
        ApiResource::erase::<VirtualMachine>(&()),
        ApiResource::erase::<VMTemplate>(&()),
        ApiResource::erase::<VMOperation>(&()),
        ApiResource::erase::<VMSnapshot>(&()),
    ] {
        let api = Api::<DynamicObject>::namespaced_with(ctl.client.clone(), "default", &ar);
        for o in api.list(&Default::default()).await.unwrap() {
            let mut o = serde_json::to_value(&o).unwrap();
            o["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("resourceVersion");
            let key = format!("{}/{}", ar.kind, o["metadata"]["name"].as_str().unwrap());
            all.insert(key, Thing::Object(o));
        }
    }
    for node in nodes {
        for vm in list(&mut node.client().await).await {
            let key = format!("{}/{}", node.name, vm.spec.as_ref().unwrap().name);
            all.insert(key, Thing::Vm(Box::new(VmState::from(&vm))));
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_vm_runs_restarts_stops_and_is_deleted_bad_manifests_change_nothing() {
    let images = images();
    // The seed VM has 8Gi (TCG allocates it lazily); its clone as well.
    let room = ["--allocatable-memory", "32Gi"];
    let nodes = [
        start_node("node-1", images.path(), &room).await,
        start_node("node-2", images.path(), &room).await,
    ];
    let ctl = Controller::start(&[&nodes[0], &nodes[1]], settings());
    ctl.create_seed_vm(images.path()).await;
    let vm = wait_for(&ctl.vms(), "my-vm", BOOT, "Running", |v| {
        phase(v) == Some(VmPhase::Running)
    })
    .await;
    let node_name = vm.status.clone().unwrap().node_name.unwrap();
    let node = nodes
        .iter()
        .find(|n| n.name == node_name)
        .expect("placed on one of the two nodes");
    assert_eq!(cond(&vm, "Scheduled").unwrap().status, "True");
    assert_eq!(cond(&vm, "Ready").unwrap().status, "True");
    assert_eq!(vm.status.as_ref().unwrap().memory.as_deref(), Some("8Gi"));
    let on_agent = agent_vm(node, "my-vm").await.unwrap();
    assert_eq!(
        on_agent.status.as_ref().unwrap().phase,
        pb::VmPhase::Running as i32
    );
    // The real guest booted.
    wait_boots(&on_agent, 1, BOOT).await;
    let tpl: VMTemplate = Api::namespaced(ctl.client.clone(), "default")
        .get("ubuntu-22-04-template")
        .await
        .unwrap();
    assert_eq!(tpl.status.unwrap().usage_count, 1);
    wait_guest_agent(node).await;

    // Bad manifests: refused by the schema, or a clear condition; nothing else changes, in the
    // API or on the nodes.
    let before = everything(&ctl, &nodes).await;
    let mut no_cpus = example("vm-my-vm.yaml");
    no_cpus["metadata"]["name"] = json!("no-cpus");
    no_cpus["spec"].as_object_mut().unwrap().remove("cpus");
    let e = ctl.create::<VirtualMachine>(no_cpus).await.unwrap_err();
    assert!(e.to_string().contains("spec.cpus: Required value"), "{e}");
    let mut bad_mem = example("vm-my-vm.yaml");
    bad_mem["metadata"]["name"] = json!("bad-mem");
    bad_mem["spec"]["memory"] = json!("8XB");
    let e = ctl.create::<VirtualMachine>(bad_mem).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("spec.memory: \"8XB\" does not match"),
        "{e}"
    );
    let mut no_tpl = example("vm-my-vm.yaml");
    no_tpl["metadata"]["name"] = json!("no-template");
    no_tpl["spec"]["image"]["templateRef"]["name"] = json!("missing");
    ctl.create::<VirtualMachine>(no_tpl).await.unwrap();
    let v = wait_for(
        &ctl.vms(),
        "no-template",
        Duration::from_secs(60),
        "TemplateNotFound",
        |v| cond(v, "Ready").is_some_and(|c| c.reason == "TemplateNotFound"),
    )
    .await;
    assert!(
        cond(&v, "Ready")
            .unwrap()
            .message
            .contains("VMTemplate \"missing\" not found")
    );
    let mut migrate = example("vmoperation-migrate-my-vm.yaml");
    migrate["spec"]["migrateSpec"]["targetNode"] = json!("node-9");
    ctl.create::<VMOperation>(migrate).await.unwrap();
    let op = wait_for(
        &ctl.ops(),
        "migrate-my-vm",
        Duration::from_secs(60),
        "Failed",
        |o| o.status.as_ref().and_then(|s| s.phase) == Some(OperationPhase::Failed),
    )
    .await;
    let m = op.status.unwrap().message.unwrap();
    assert!(
        m.contains("migrateSpec.targetNode: node \"node-9\" is not known"),
        "{m}"
    );
    let vm = ctl.vms().get("my-vm").await.unwrap();
    assert_eq!(
        (phase(&vm), vm.status.unwrap().node_name),
        (Some(VmPhase::Running), Some(node_name.clone()))
    );
    let mut after = everything(&ctl, &nodes).await;
    for added in ["VirtualMachine/no-template", "VMOperation/migrate-my-vm"] {
        assert!(after.remove(added).is_some(), "{added} in {after:#?}");
    }
    for key in before.keys().chain(after.keys()) {
        assert_eq!(after.get(key), before.get(key), "{key} changed");
    }

    // Restart through a VMOperation: a second boot of the same guest.
    let restart = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VMOperation",
        "metadata": {"name": "restart-my-vm"}, "spec": {"vmRef": {"name": "my-vm"}, "operation": "restart"}});
    ctl.create::<VMOperation>(restart).await.unwrap();
    wait_for(&ctl.ops(), "restart-my-vm", BOOT, "Succeeded", |o| {
        o.status.as_ref().and_then(|s| s.phase) == Some(OperationPhase::Succeeded)
    })
    .await;
    wait_boots(&on_agent, 2, BOOT).await;

    // The seed's VMSnapshot (memory, quiesced) is taken on the VM's agent; a VMOperation
    // restores it; deleting the VMSnapshot deletes it there.
    wait_guest_agent(node).await;
    let snap_from = current_counter(&on_agent, BOOT).await;
    ctl.create::<VMSnapshot>(example("vmsnapshot-my-vm-snapshot.yaml"))
        .await
        .unwrap();
    let snaps: Api<VMSnapshot> = Api::namespaced(ctl.client.clone(), "default");
    let snap = wait_for(
        &snaps,
        "my-vm-snapshot",
        Duration::from_secs(120),
        "Ready",
        |s| s.status.as_ref().and_then(|s| s.phase) == Some(SnapshotPhase::Ready),
    )
    .await;
    let snap_to = current_counter(&on_agent, BOOT).await;
    println!("VMSnapshot: {:?}", snap.status.unwrap().message);
    let on_node = || async {
        node.client()
            .await
            .list_snapshots(pb::ListSnapshotsRequest {
                name: hypersdk_controller::nodes::spec::agent_name("default", "my-vm"),
            })
            .await
            .unwrap()
            .into_inner()
            .snapshots
            .into_iter()
            .map(|s| (s.name, s.memory, s.quiesced))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        on_node().await,
        [("my-vm-snapshot".to_string(), true, true)]
    );
    let restore = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VMOperation",
        "metadata": {"name": "restore-my-vm"}, "spec": {"vmRef": {"name": "my-vm"},
        "operation": "restore", "restoreSpec": {"snapshotName": "my-vm-snapshot"}}});
    // The guest runs on well past the snapshot, so that the restored guest is seen to go back.
    wait_counter_above(&on_agent, snap_to + 5, BOOT).await;
    let from = serial(&on_agent).len();
    let replaced_at = current_counter(&on_agent, BOOT).await;
    ctl.create::<VMOperation>(restore).await.unwrap();
    let op = wait_for(
        &ctl.ops(),
        "restore-my-vm",
        Duration::from_secs(60),
        "done",
        |o| {
            o.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(OperationPhase::is_final)
        },
    )
    .await;
    assert_eq!(
        op.status.as_ref().and_then(|s| s.phase),
        Some(OperationPhase::Succeeded),
        "{:?}",
        op.status
    );
    // A memory restore does not boot the guest: it goes on from the snapshot's counter.
    let restored = serial(&on_agent).len();
    let resumed = resumed_counter(&on_agent, from, restored, BOOT).await;
    assert!(
        (snap_from..replaced_at).contains(&resumed),
        "resumed at {resumed}: the snapshot was taken at {snap_from}..{snap_to}, \
         the guest it replaced was at {replaced_at}"
    );
    snaps
        .delete("my-vm-snapshot", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&snaps, "my-vm-snapshot").await;
    assert!(on_node().await.is_empty(), "deleted on the agent too");

    // The seed's VMOperation migrate (live, 100Mbps cap, auto-converge), aimed at the other
    // node: the guest moves without a reboot and the VM's nodeName follows it.
    let other = nodes.iter().find(|n| n.name != node_name).unwrap();
    let counter = current_counter(&on_agent, BOOT).await;
    let mut migrate = example("vmoperation-migrate-my-vm.yaml");
    migrate["metadata"]["name"] = json!("migrate-my-vm-live");
    migrate["spec"]["migrateSpec"]["targetNode"] = json!(other.name);
    ctl.create::<VMOperation>(migrate).await.unwrap();
    let mut saw_progress = false;
    let op = wait_for(&ctl.ops(), "migrate-my-vm-live", BOOT, "done", |o| {
        let s = o.status.as_ref();
        saw_progress |= s
            .and_then(|s| s.progress.as_ref())
            .is_some_and(|p| p.stage.as_deref().unwrap_or("").contains("sent"));
        s.and_then(|s| s.phase)
            .is_some_and(OperationPhase::is_final)
    })
    .await;
    let status = op.status.unwrap();
    println!("migrate: {:?}", status.message);
    assert_eq!(status.phase, Some(OperationPhase::Succeeded), "{status:?}");
    assert!(saw_progress, "live progress was written");
    let vm = wait_for(&ctl.vms(), "my-vm", Duration::from_secs(60), "moved", |v| {
        v.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some(other.name.as_str())
            && phase(v) == Some(VmPhase::Running)
    })
    .await;
    assert!(!vm.annotations().contains_key("hypersdk.io/migrating-to"));
    assert_eq!(
        agent_vm(node, "my-vm").await.unwrap_err().code(),
        tonic::Code::NotFound,
        "gone from the old node, not recreated there"
    );
    let node = other;
    let on_agent = agent_vm(node, "my-vm").await.unwrap();
    wait_counter_above(&on_agent, counter + 1, Duration::from_secs(60)).await;
    assert_eq!(
        count_markers(&serial(&on_agent), READY_MARKER),
        0,
        "the guest did not boot on the new node"
    );

    // The seed's VMOperation clone, unchanged (linked, started): a VM my-vm-clone on the same
    // node, over the template's image like my-vm, boots; my-vm runs on.
    ctl.create::<VMOperation>(example("vmoperation-clone-my-vm.yaml"))
        .await
        .unwrap();
    ctl.op_succeeded("clone-my-vm").await;
    let clone = wait_for(&ctl.vms(), "my-vm-clone", BOOT, "Running", |v| {
        phase(v) == Some(VmPhase::Running)
    })
    .await;
    assert_eq!(
        clone.status.unwrap().node_name.as_deref(),
        Some(node.name.as_str()),
        "the clone stays where its disks are"
    );
    let on_node = agent_vm(node, "my-vm-clone").await.unwrap();
    let copy = &on_node.spec.as_ref().unwrap().disks[0].path;
    let backing = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", copy])
        .output()
        .unwrap();
    let backing: Value = serde_json::from_slice(&backing.stdout).unwrap();
    assert_eq!(
        backing["backing-filename"],
        json!(images.path().join("disk.qcow2")),
        "a linked clone copies my-vm's overlay, over the template's image"
    );
    wait_boots(&on_node, 1, BOOT).await;
    assert_eq!(
        agent_vm(node, "my-vm").await.unwrap().status.unwrap().phase,
        pb::VmPhase::Running as i32
    );
    ctl.vms()
        .delete("my-vm-clone", &DeleteParams::default())
        .await
        .unwrap();

    // running: false stops it on its agent.
    let stop = Patch::Merge(json!({"spec": {"running": false}}));
    ctl.vms()
        .patch("my-vm", &PatchParams::default(), &stop)
        .await
        .unwrap();
    wait_for(
        &ctl.vms(),
        "my-vm",
        Duration::from_secs(60),
        "Stopped",
        |v| phase(v) == Some(VmPhase::Stopped),
    )
    .await;
    assert_eq!(
        agent_vm(node, "my-vm").await.unwrap().status.unwrap().phase,
        pb::VmPhase::Stopped as i32
    );

    // Deleting it removes it from the agent before the object goes.
    ctl.vms()
        .delete("my-vm", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&ctl.vms(), "my-vm").await;
    assert_eq!(
        agent_vm(node, "my-vm").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}

/// The controller reaches an https:// agent with its controller certificate and runs a VM on it.
#[tokio::test(flavor = "multi_thread")]
async fn controller_runs_a_vm_on_an_agent_over_mutual_tls() {
    let images = images();
    let pki = Pki::new();
    let port = free_port();
    let flags = tls_flags(port, &pki.issue("node-tls", Role::Agent("node-tls".into())));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = start_node("node-tls", images.path(), &flags).await;
    let mut over_tls = info(&node);
    over_tls.address = Address::Tls(format!("127.0.0.1:{port}"));
    let ctl_cert = pki.issue("ctl", Role::Controller("ctl".into()));
    let ctl = Controller::start_with(
        vec![over_tls],
        settings(),
        Agents::default().with_tls(Some(ctl_cert)),
    );
    ctl.create::<VMTemplate>(guest_template(images.path()))
        .await
        .unwrap();
    ctl.create::<VirtualMachine>(small_vm("tls-vm", false, None))
        .await
        .unwrap();
    let vm = wait_for(&ctl.vms(), "tls-vm", BOOT, "Running", |v| {
        phase(v) == Some(VmPhase::Running)
    })
    .await;
    assert_eq!(vm.status.unwrap().node_name.as_deref(), Some("node-tls"));
    let on_agent = agent_vm(&node, "tls-vm").await.unwrap();
    wait_boots(&on_agent, 1, BOOT).await;
    // The certificate (30 days) is in the controller's metrics, read from the agent's GetNode.
    let metrics = ctl.ctx.metrics.render(&agent_gauges(&ctl.agents.all()));
    let days = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hypersdk_agent_tls_days_left{node=\"node-tls\"} "));
    assert!(matches!(days, Some("29" | "30")), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_node_is_reported_and_highly_available_vms_move() {
    let images = images();
    let mut nodes = [
        start_node("node-1", images.path(), &[]).await,
        start_node("node-2", images.path(), &[]).await,
    ];
    let ctl = Controller::start(&[&nodes[0], &nodes[1]], settings());
    ctl.create_ha_vm(images.path()).await;
    let ha = wait_for(&ctl.vms(), "ha", BOOT, "Running", |v| {
        phase(v) == Some(VmPhase::Running)
    })
    .await;
    let placed = ha.status.unwrap().node_name.unwrap();
    // A cold migration (live: false): stopped here, started on the other node, nodeName follows.
    let other = nodes
        .iter()
        .find(|n| n.name != placed)
        .unwrap()
        .name
        .clone();
    let cold = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VMOperation",
        "metadata": {"name": "move-ha"}, "spec": {"vmRef": {"name": "ha"}, "operation": "migrate",
        "migrateSpec": {"targetNode": other, "live": false}}});
    ctl.create::<VMOperation>(cold).await.unwrap();
    wait_for(&ctl.ops(), "move-ha", BOOT, "Succeeded", |o| {
        o.status.as_ref().and_then(|s| s.phase) == Some(OperationPhase::Succeeded)
    })
    .await;
    let ha = wait_for(&ctl.vms(), "ha", BOOT, "Running on the other node", |v| {
        phase(v) == Some(VmPhase::Running)
            && v.status.as_ref().unwrap().node_name.as_deref() == Some(other.as_str())
    })
    .await;
    let old = nodes.iter().find(|n| n.name == placed).unwrap();
    assert_eq!(
        agent_vm(old, "ha").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let first = ha.status.unwrap().node_name.unwrap();
    // A VM without high availability on the same node.
    ctl.create::<VirtualMachine>(small_vm("pinned", false, Some(&first)))
        .await
        .unwrap();
    wait_for(&ctl.vms(), "pinned", BOOT, "Running", |v| {
        phase(v) == Some(VmPhase::Running)
    })
    .await;

    let lost = nodes.iter_mut().find(|n| n.name == first).unwrap();
    lost.kill_node();
    let pinned = wait_for(
        &ctl.vms(),
        "pinned",
        Duration::from_secs(60),
        "NodeReachable=False",
        |v| cond(v, "NodeReachable").is_some_and(|c| c.status == "False"),
    )
    .await;
    assert!(
        cond(&pinned, "NodeReachable")
            .unwrap()
            .message
            .contains(&first)
    );
    assert_eq!(cond(&pinned, "Ready").unwrap().reason, "NodeLost");
    let moved = wait_for(&ctl.vms(), "ha", BOOT, "Running elsewhere", |v| {
        phase(v) == Some(VmPhase::Running)
            && v.status.as_ref().unwrap().node_name.as_deref() != Some(first.as_str())
    })
    .await;
    let second = moved.status.unwrap().node_name.unwrap();
    let target = nodes.iter().find(|n| n.name == second).unwrap();
    let on_agent = agent_vm(target, "ha").await.unwrap();
    wait_boots(&on_agent, 1, BOOT).await;
    // The VM without high availability stays where it was, reported as lost.
    let pinned = ctl.vms().get("pinned").await.unwrap();
    assert_eq!(
        pinned.status.unwrap().node_name.as_deref(),
        Some(first.as_str())
    );
    assert!(ctl.agents.get(&first).unwrap().client().is_none());
}

/// The standalone binary: manifests in, status files out, with simulated agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_binary_applies_a_manifest_directory() {
    let images = tempfile::tempdir().unwrap();
    let sim = [
        "--simulate",
        "--simulate-cpus",
        "8",
        "--simulate-memory",
        "16Gi",
    ];
    let nodes = [
        start_node("sim-1", images.path(), &sim).await,
        start_node("sim-2", images.path(), &sim).await,
    ];
    let manifests = tempfile::tempdir().unwrap();
    let dir = manifests.path();
    std::fs::copy(
        repo_root().join("deploy/examples/vmtemplate-ubuntu.yaml"),
        dir.join("template.yaml"),
    )
    .unwrap();
    std::fs::copy(
        repo_root().join("deploy/examples/vm-my-vm.yaml"),
        dir.join("vm.yaml"),
    )
    .unwrap();
    std::fs::write(dir.join("bad.yaml"), "apiVersion: hypersdk.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: bad}\nspec: {cpus: 1, memory: 8XB, boot: {kernel: /k}}\n").unwrap();
    // Fits no node: 2 nodes x 8 CPUs x the default overcommit of 4.
    std::fs::write(dir.join("huge.yaml"), "apiVersion: hypersdk.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: huge}\nspec: {cpus: 40, memory: 1Gi, running: true, boot: {kernel: /k}}\n").unwrap();
    let port = free_port();
    let mut ctl = Command::new(bin("hypersdk-controller"))
        .args(["--standalone", "--manifests"])
        .arg(dir)
        .args(
            nodes
                .iter()
                .flat_map(|n| ["--agent".to_string(), format!("{}={}", n.name, n.address)]),
        )
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .stderr(std::fs::File::create(dir.join("controller.log")).unwrap())
        .spawn()
        .unwrap();
    let status = dir.join("status/virtualmachine-default-my-vm.yaml");
    let result = AssertUnwindSafe(async {
        eventually(
            STATUS_FILE,
            "my-vm Running in its status file",
            async || {
                std::fs::read_to_string(&status)
                    .is_ok_and(|s| s.contains("phase: Running") && s.contains("nodeName: sim-"))
            },
        )
        .await;
        let huge = dir.join("status/virtualmachine-default-huge.yaml");
        eventually(STATUS_FILE, "huge unschedulable", async || {
            std::fs::read_to_string(&huge).is_ok_and(|s| {
                s.contains("reason: Unschedulable")
                    && s.contains("0/2 nodes are available: 2 insufficient cpu")
            })
        })
        .await;
        let errors = std::fs::read_to_string(dir.join("status/errors.yaml")).unwrap();
        assert!(
            errors.contains("bad.yaml") && errors.contains("spec.memory"),
            "{errors}"
        );
        let metrics = http_get(port, "/metrics");
        assert!(metrics.contains("hypersdk_agents_reachable 2"), "{metrics}");
        assert!(http_get(port, "/readyz").ends_with("ok"));
        // The manifest goes: the VM goes, from the agent too.
        std::fs::remove_file(dir.join("vm.yaml")).unwrap();
        eventually(STATUS_FILE, "my-vm's status file removed", async || {
            !status.exists()
        })
        .await;
    })
    .catch_unwind()
    .await;
    let _ = ctl.kill();
    let _ = ctl.wait();
    if let Err(p) = result {
        eprintln!(
            "--- controller log ---\n{}",
            std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default()
        );
        std::panic::resume_unwind(p);
    }
    for n in &nodes {
        let vms = n
            .client()
            .await
            .list_vms(pb::ListVmsRequest {})
            .await
            .unwrap()
            .into_inner()
            .vms;
        assert!(vms.is_empty(), "{} still has {vms:?}", n.name);
    }
}

/// How long the standalone controller may take to write a status file (bounds the wait only).
const STATUS_FILE: Duration = Duration::from_secs(60);
