//! The VMSnapshot reconciler: taken on the VM's node once the VM is there, owned by the VM,
//! deleted on the node with the object, and no longer Ready once the node no longer has it.

use hypersdk_controller::crd::snapshot::SnapshotPhase;
use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{Reason, VMOperation, VMSnapshot, VMTemplate, VirtualMachine};
use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Cluster, cond, on_agent, operation, owned_by, template, vm};

fn snapshot(name: &str, vm: &str) -> Value {
    json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VMSnapshot",
        "metadata": {"name": name}, "spec": {"vmRef": {"name": vm}, "includeMemory": true}})
}

fn phase(s: &VMSnapshot) -> Option<SnapshotPhase> {
    s.status.as_ref().and_then(|s| s.phase)
}

fn ready(s: &VMSnapshot) -> (String, String) {
    let c = cond(s.status.as_ref().map(|s| &s.conditions), "Ready").unwrap();
    (c.status.clone(), c.reason.clone())
}

#[tokio::test]
async fn taken_once_the_vm_runs_on_a_node_and_deleted_there_with_the_object() {
    let c = Cluster::start(&["node-1"]).await;
    c.create::<VMTemplate>(template()).await;
    c.create::<VMSnapshot>(snapshot("early", "a")).await;
    let early = c
        .wait("early", "Failed: no such VM", |s: &VMSnapshot| {
            phase(s) == Some(SnapshotPhase::Failed)
        })
        .await;
    assert_eq!(
        ready(&early),
        ("False".into(), Reason::VmNotFound.to_string())
    );

    c.create::<VirtualMachine>(vm("a", json!({"running": false})))
        .await;
    c.create::<VMSnapshot>(snapshot("s1", "a")).await;
    let pending = c
        .wait("s1", "Pending: the VM has no node", |s: &VMSnapshot| {
            phase(s) == Some(SnapshotPhase::Pending)
        })
        .await;
    assert_eq!(ready(&pending).1, Reason::VmNotPlaced.to_string());
    // The VM's placement wakes the snapshot (its next resync is minutes away).
    c.patch::<VirtualMachine>("a", json!({"spec": {"running": true}}))
        .await;
    let s1 = c
        .wait("s1", "Ready", |s: &VMSnapshot| {
            phase(s) == Some(SnapshotPhase::Ready)
        })
        .await;
    assert_eq!(ready(&s1), ("True".into(), Reason::Created.to_string()));
    let message = s1.status.as_ref().unwrap().message.clone().unwrap();
    assert_eq!(
        message,
        "on node node-1: 3 MiB, memory included, guest paused 0 ms"
    );
    let a = c.api::<VirtualMachine>().get("a").await.unwrap();
    assert!(owned_by(&s1, &a));
    let node = c.node("node-1");
    assert_eq!(node.snapshot_names(&on_agent("a")), ["s1"]);
    assert_eq!(s1.annotations()["hypersdk.io/taken-on"], "node-1");

    c.delete::<VMSnapshot>("s1").await;
    assert!(
        node.snapshot_names(&on_agent("a")).is_empty(),
        "deleted on the node"
    );
}

#[tokio::test]
async fn a_snapshot_gone_from_the_node_is_no_longer_ready() {
    let c = Cluster::start(&["node-1", "node-2"]).await;
    c.create::<VMTemplate>(template()).await;
    let pin = json!({"nodeSelector": {"hypersdk.io/node": "node-1"}});
    c.create::<VirtualMachine>(vm("a", pin)).await;
    for name in ["deleted-there", "moved-away"] {
        c.create::<VMSnapshot>(snapshot(name, "a")).await;
        c.wait(name, "Ready", |s: &VMSnapshot| {
            phase(s) == Some(SnapshotPhase::Ready)
        })
        .await;
    }
    let gone =
        |s: &VMSnapshot| phase(s) == Some(SnapshotPhase::Failed) && ready(s).1 == Reason::Gone;

    // Deleted on the node behind the controller's back: seen at the VM's next change.
    c.node("node-1")
        .forget_snapshot(&on_agent("a"), "deleted-there");
    c.patch::<VirtualMachine>(
        "a",
        json!({"metadata": {"annotations": {"touched": "yes"}}}),
    )
    .await;
    let s = c.wait("deleted-there", "Gone", gone).await;
    assert_eq!(
        s.status.unwrap().message.unwrap(),
        "deleted on node node-1, where VM a is"
    );
    let restore = json!({"restoreSpec": {"snapshotName": "deleted-there"}});
    c.create::<VMOperation>(operation("restore", "a", "restore", restore))
        .await;
    let op = c
        .wait("restore", "refused", |o: &VMOperation| {
            o.status.as_ref().and_then(|s| s.message.clone()).is_some()
        })
        .await;
    assert_eq!(
        op.status.unwrap().message.unwrap(),
        "restoreSpec.snapshotName: VMSnapshot deleted-there is not Ready"
    );

    // The VM moves (cold: its snapshots stay behind, with its disks).
    c.patch::<VirtualMachine>("a", json!({"spec": {"nodeSelector": null}}))
        .await;
    let cold = json!({"migrateSpec": {"targetNode": "node-2", "live": false}});
    c.create::<VMOperation>(operation("move", "a", "migrate", cold))
        .await;
    c.wait("a", "Running on node-2", |v: &VirtualMachine| {
        let s = v.status.as_ref();
        s.and_then(|s| s.node_name.as_deref()) == Some("node-2")
            && s.and_then(|s| s.phase) == Some(VmPhase::Running)
    })
    .await;
    // Seen as the VM leaves node-1 (its snapshots go with it) or once it is on node-2.
    let s = c.wait("moved-away", "Gone", gone).await;
    let message = s.status.unwrap().message.unwrap();
    assert!(
        [
            "VM a is no longer on node node-1; its snapshots went with it",
            "taken on node node-1; VM a is now on node node-2",
        ]
        .contains(&message.as_str()),
        "{message}"
    );
}
