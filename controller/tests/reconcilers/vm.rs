//! The VirtualMachine reconciler: placement, the VM on its agent as `spec.running` says, status
//! and conditions from what the agent reports, waits woken by templates and nodes, a lost node,
//! deletion.

use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{Reason, VMTemplate, VirtualMachine};
use hypersdk_proto::agent::v1 as pb;
use serde_json::json;

use super::{Cluster, cond, on_agent, template, vm};

fn phase(v: &VirtualMachine) -> Option<VmPhase> {
    v.status.as_ref().and_then(|s| s.phase)
}

fn reason(v: &VirtualMachine, type_: &str) -> Option<String> {
    cond(v.status.as_ref().map(|s| &s.conditions), type_).map(|c| c.reason.clone())
}

fn node_of(v: &VirtualMachine) -> String {
    v.status.as_ref().unwrap().node_name.clone().unwrap()
}

#[tokio::test]
async fn a_vm_runs_on_its_node_and_reports_what_the_agent_reports() {
    let c = Cluster::start(&["node-1", "node-2"]).await;
    c.create::<VMTemplate>(template()).await;
    let nets = json!([{"name": "default", "type": "pod-network"}]);
    c.create::<VirtualMachine>(vm(
        "a",
        json!({"cpus": 2, "memory": "512Mi", "networks": nets}),
    ))
    .await;
    let a = c.running("a").await;
    let status = a.status.clone().unwrap();
    assert_eq!(
        (status.cpus, status.memory.as_deref()),
        (Some(2), Some("512Mi"))
    );
    assert_eq!(status.observed_generation, a.metadata.generation);
    for (type_, want) in [
        ("Ready", Reason::Phase(VmPhase::Running)),
        ("Scheduled", Reason::Scheduled),
        ("NodeReachable", Reason::AgentAnswers),
        ("DiskReady", Reason::Attached),
        ("NetworkReady", Reason::UserNetworking),
        ("AgentConnected", Reason::GuestAgentNotConnected),
    ] {
        assert_eq!(reason(&a, type_).unwrap(), want, "{type_}");
    }
    let node = c.node(&node_of(&a));
    assert_eq!(node.phase(&on_agent("a")).await, Some(pb::VmPhase::Running));
    let on_node = node.vm(&on_agent("a")).await.unwrap().spec.unwrap();
    // These agents have no node network: pod-network runs as QEMU user networking there.
    assert!(
        matches!(
            on_node.networks[0].backend,
            Some(pb::network::Backend::User(_))
        ),
        "{:?}",
        on_node.networks
    );
    let image = on_node.disks[0]
        .image
        .as_ref()
        .expect("the template's image");
    assert_eq!(image.source, "/images/disk.qcow2");
    let reasons: Vec<String> = c.events("a").await.into_iter().map(|e| e.0).collect();
    for want in [Reason::Scheduled, Reason::Created] {
        assert!(reasons.iter().any(|r| *r == want), "{want} in {reasons:?}");
    }
}

#[tokio::test]
async fn a_missing_template_is_reported_until_it_appears() {
    let c = Cluster::start(&["node-1"]).await;
    c.create::<VirtualMachine>(vm("a", json!({}))).await;
    let a = c
        .wait("a", "TemplateNotFound", |v: &VirtualMachine| {
            reason(v, "Ready").is_some_and(|r| r == Reason::TemplateNotFound)
        })
        .await;
    assert_eq!(phase(&a), Some(VmPhase::Pending));
    let message = &a.status.as_ref().unwrap().message;
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("VMTemplate \"tpl\" not found")),
        "{message:?}"
    );
    // The template's creation wakes the VM (its next resync is minutes away).
    c.create::<VMTemplate>(template()).await;
    c.wait(
        "a",
        "Running once the template exists",
        |v: &VirtualMachine| phase(v) == Some(VmPhase::Running),
    )
    .await;
}

#[tokio::test]
async fn an_unschedulable_vm_is_placed_when_a_node_with_room_comes() {
    let mut c = Cluster::start(&["node-1"]).await;
    c.create::<VMTemplate>(template()).await;
    // 8 CPUs at the default overcommit of 4 hold 32 vCPUs: 20 fit once, not twice.
    c.create::<VirtualMachine>(vm("big", json!({"cpus": 20})))
        .await;
    c.running("big").await;
    c.create::<VirtualMachine>(vm("bigger", json!({"cpus": 20})))
        .await;
    let v = c
        .wait("bigger", "Unschedulable", |v: &VirtualMachine| {
            reason(v, "Scheduled").is_some_and(|r| r == Reason::Unschedulable)
        })
        .await;
    let message = v.status.unwrap().message.unwrap();
    assert_eq!(message, "0/1 nodes are available: 1 insufficient cpu");
    assert!(
        c.events("bigger")
            .await
            .iter()
            .any(|(r, note)| *r == Reason::FailedScheduling && *note == message)
    );
    c.add_node("node-2");
    let v = c
        .wait("bigger", "Running on the new node", |v: &VirtualMachine| {
            phase(v) == Some(VmPhase::Running)
        })
        .await;
    assert_eq!(node_of(&v), "node-2");
}

#[tokio::test]
async fn running_false_stops_it_and_deleting_it_removes_it_from_its_agent() {
    let c = Cluster::start(&["node-1"]).await;
    c.create::<VMTemplate>(template()).await;
    c.create::<VirtualMachine>(vm("a", json!({}))).await;
    c.running("a").await;
    c.patch::<VirtualMachine>("a", json!({"spec": {"running": false}}))
        .await;
    let a = c
        .wait("a", "Stopped", |v: &VirtualMachine| {
            phase(v) == Some(VmPhase::Stopped)
        })
        .await;
    let status = a.status.unwrap();
    assert_eq!((status.cpus, status.memory), (None, None), "nothing runs");
    let node = c.node("node-1");
    assert_eq!(node.phase(&on_agent("a")).await, Some(pb::VmPhase::Stopped));
    c.delete::<VirtualMachine>("a").await;
    assert!(
        node.vm(&on_agent("a")).await.is_none(),
        "deleted on the agent"
    );
}

#[tokio::test]
async fn a_lost_node_is_reported_and_a_highly_available_vm_moves() {
    let c = Cluster::start(&["node-1", "node-2"]).await;
    c.create::<VMTemplate>(template()).await;
    let pinned = json!({"nodeSelector": {"hypersdk.io/node": "node-1"}});
    c.create::<VirtualMachine>(vm("pinned", pinned)).await;
    let ha = json!({"nodeSelector": {"hypersdk.io/node": "node-1"},
                    "highAvailability": {"enabled": true}});
    c.create::<VirtualMachine>(vm("ha", ha)).await;
    for name in ["pinned", "ha"] {
        c.running(name).await;
    }
    // The HA VM may go anywhere once its node is lost: its selector goes.
    c.patch::<VirtualMachine>("ha", json!({"spec": {"nodeSelector": null}}))
        .await;
    c.node("node-1").set_down(true);
    let lost = std::time::Instant::now();
    let pinned = c
        .wait("pinned", "NodeReachable False", |v: &VirtualMachine| {
            reason(v, "NodeReachable").is_some_and(|r| r == Reason::AgentUnreachable)
        })
        .await;
    assert_eq!(reason(&pinned, "Ready").unwrap(), Reason::NodeLost);
    c.wait("ha", "Running on node-2", |v: &VirtualMachine| {
        phase(v) == Some(VmPhase::Running) && node_of(v) == "node-2"
    })
    .await;
    // Not before the node's lease has run out (1 s after its last renewal, which is at most
    // 250 ms old) and the margin (0.5 s) has passed.
    let waited = lost.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1250),
        "moved after {waited:?}"
    );
    assert!(
        c.events("ha")
            .await
            .iter()
            .any(|(r, _)| *r == Reason::Rescheduling)
    );
    assert_eq!(
        c.node("node-2").phase(&on_agent("ha")).await,
        Some(pb::VmPhase::Running)
    );
    assert_eq!(node_of(&pinned), "node-1", "not highly available: it stays");
    // The node's return wakes the VM that waits for it.
    c.node("node-1").set_down(false);
    c.wait("pinned", "NodeReachable again", |v: &VirtualMachine| {
        reason(v, "NodeReachable").is_some_and(|r| r == Reason::AgentAnswers)
            && phase(v) == Some(VmPhase::Running)
    })
    .await;
}
