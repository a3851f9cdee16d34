//! The VMOperation reconciler: each operation against a VM on simulated agents, its outcome
//! and conditions, its ownerReference to the VM, and that it is never run twice.

use hypersdk_controller::crd::operation::OperationPhase;
use hypersdk_controller::crd::snapshot::SnapshotPhase;
use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{Reason, VMOperation, VMSnapshot, VMTemplate, VirtualMachine};
use hypersdk_proto::agent::v1 as pb;
use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Cluster, cond, on_agent, operation, owned_by, template, vm};

fn op_phase(o: &VMOperation) -> Option<OperationPhase> {
    o.status.as_ref().and_then(|s| s.phase)
}

fn message(o: &VMOperation) -> String {
    o.status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default()
}

/// A cluster with VM `a` running on node-1.
async fn running(nodes: &[&str]) -> (Cluster, VirtualMachine) {
    let c = Cluster::start(nodes).await;
    c.create::<VMTemplate>(template()).await;
    let spec = json!({"nodeSelector": {"hypersdk.io/node": "node-1"},
                      "maxCpus": 4, "maxMemory": "1Gi"});
    c.create::<VirtualMachine>(vm("a", spec)).await;
    let a = c.running("a").await;
    (c, a)
}

/// Runs operation `name` to its end; returns it.
async fn finish(c: &Cluster, doc: Value) -> VMOperation {
    let name = doc["metadata"]["name"].as_str().unwrap().to_string();
    c.create::<VMOperation>(doc).await;
    c.wait(&name, "finished", |o: &VMOperation| {
        op_phase(o).is_some_and(OperationPhase::is_final)
    })
    .await
}

fn assert_succeeded(o: &VMOperation) {
    let status = o.status.as_ref().unwrap();
    assert_eq!(status.phase, Some(OperationPhase::Succeeded), "{status:?}");
    let done = cond(Some(&status.conditions), "Succeeded").unwrap();
    assert_eq!(
        (done.status.as_str(), done.reason.clone()),
        ("True", Reason::Succeeded.to_string())
    );
    assert_eq!(status.progress.as_ref().map(|p| p.percent), Some(100));
    assert!(status.start_time.is_some() && status.completion_time.is_some());
}

#[tokio::test]
async fn stop_start_pause_resume_restart_and_resize_act_on_the_agent() {
    let (c, a) = running(&["node-1"]).await;
    let node = c.node("node-1");
    let name = on_agent("a");
    let steps = [
        ("stop", pb::VmPhase::Stopped),
        ("start", pb::VmPhase::Running),
        ("pause", pb::VmPhase::Paused),
        ("resume", pb::VmPhase::Running),
        ("restart", pb::VmPhase::Running),
    ];
    for (verb, want) in steps {
        let op = finish(&c, operation(verb, "a", verb, json!({}))).await;
        assert_succeeded(&op);
        assert!(owned_by(&op, &a), "{verb} is owned by its VM");
        c.wait("a", "status follows", |v: &VirtualMachine| {
            v.status.as_ref().and_then(|s| s.phase)
                == Some(match want {
                    pb::VmPhase::Stopped => VmPhase::Stopped,
                    pb::VmPhase::Paused => VmPhase::Paused,
                    _ => VmPhase::Running,
                })
        })
        .await;
        assert_eq!(node.phase(&name).await, Some(want), "after {verb}");
    }
    let resize = json!({"resizeSpec": {"cpus": 2, "memory": "512Mi"}});
    assert_succeeded(&finish(&c, operation("resize", "a", "resize", resize)).await);
    let spec = node.vm(&name).await.unwrap().spec.unwrap();
    assert_eq!((spec.cpus, spec.memory.as_str()), (2, "512Mi"));
    let a = c.api::<VirtualMachine>().get("a").await.unwrap();
    assert_eq!(
        (a.spec.cpus, a.spec.memory.as_str()),
        (2, "512Mi"),
        "declared size follows"
    );
    let ev = c.events("restart").await;
    assert!(
        ev.iter()
            .any(|(r, note)| *r == Reason::Succeeded && note.starts_with("restart: "))
    );
}

#[tokio::test]
async fn a_finished_operation_is_never_run_again_and_refusals_fail_it() {
    let (c, _) = running(&["node-1"]).await;
    let node = c.node("node-1");
    let paused = finish(&c, operation("pause", "a", "pause", json!({}))).await;
    assert_succeeded(&paused);
    // Resumed behind the operation's back, then the operation is touched: the finished pause
    // must not pause the VM again.
    node.resume(&on_agent("a")).await;
    let touch = json!({"metadata": {"annotations": {"touched": "yes"}}});
    c.patch::<VMOperation>("pause", touch).await;
    // A resume of the running VM is refused by the agent, as a real one refuses it.
    let refused = finish(&c, operation("resume", "a", "resume", json!({}))).await;
    assert_eq!(op_phase(&refused), Some(OperationPhase::Failed));
    assert!(
        message(&refused).starts_with("agent on node node-1: "),
        "{}",
        message(&refused)
    );
    let failed = cond(refused.status.as_ref().map(|s| &s.conditions), "Succeeded").unwrap();
    assert_eq!(
        (failed.status.as_str(), failed.reason.clone()),
        ("False", Reason::Failed.to_string())
    );
    assert_eq!(node.phase(&on_agent("a")).await, Some(pb::VmPhase::Running));
    let after = c.api::<VMOperation>().get("pause").await.unwrap();
    assert_eq!(
        after.status, paused.status,
        "the finished pause is as it was"
    );

    let missing = finish(&c, operation("nothing", "b", "pause", json!({}))).await;
    assert_eq!(op_phase(&missing), Some(OperationPhase::Failed));
    assert_eq!(
        message(&missing),
        "spec.vmRef: VirtualMachine \"b\" not found in namespace default"
    );
}

#[tokio::test]
async fn a_snapshot_operation_waits_for_its_snapshot_and_restore_uses_it() {
    let (c, a) = running(&["node-1"]).await;
    let take = json!({"snapshotSpec": {"snapshotName": "s1", "includeMemory": true}});
    let op = finish(&c, operation("take", "a", "snapshot", take)).await;
    assert_succeeded(&op);
    assert!(
        message(&op).starts_with("VMSnapshot s1 is Ready"),
        "{}",
        message(&op)
    );
    let snap = c.api::<VMSnapshot>().get("s1").await.unwrap();
    assert!(
        owned_by(&snap, &a) && owned_by(&snap, &op),
        "owned by the VM and the operation"
    );
    assert!(snap.spec.include_memory);
    assert_eq!(c.node("node-1").snapshot_names(&on_agent("a")), ["s1"]);

    let restore = json!({"restoreSpec": {"snapshotName": "s1"}});
    assert_succeeded(&finish(&c, operation("restore", "a", "restore", restore)).await);
    let nothing = json!({"restoreSpec": {"snapshotName": "none"}});
    let failed = finish(&c, operation("restore-none", "a", "restore", nothing)).await;
    assert_eq!(op_phase(&failed), Some(OperationPhase::Failed));
    assert_eq!(
        message(&failed),
        "restoreSpec.snapshotName: VMSnapshot \"none\" not found in namespace default"
    );
}

#[tokio::test]
async fn a_clone_is_a_new_vm_on_the_same_node() {
    let (c, _) = running(&["node-1", "node-2"]).await;
    let spec = json!({"cloneSpec": {"targetName": "copy", "startAfterClone": true}});
    let op = finish(&c, operation("clone", "a", "clone", spec)).await;
    assert_succeeded(&op);
    let copy = c.running("copy").await;
    assert_eq!(copy.annotations()["hypersdk.io/cloned-by"], "clone");
    let node = copy.status.unwrap().node_name.unwrap();
    assert_eq!(node, "node-1", "where its disks are");
    assert_eq!(
        c.node("node-1").phase(&on_agent("copy")).await,
        Some(pb::VmPhase::Running)
    );
    let again = json!({"cloneSpec": {"targetName": "copy"}});
    let op = finish(&c, operation("clone-again", "a", "clone", again)).await;
    assert_eq!(
        message(&op),
        "cloneSpec.targetName: VirtualMachine \"copy\" already exists"
    );
}

#[tokio::test]
async fn migrations_move_the_vm_and_its_node_name_follows() {
    let (c, _) = running(&["node-1", "node-2"]).await;
    let (one, two) = (c.node("node-1"), c.node("node-2"));
    let live = json!({"migrateSpec": {"targetNode": "node-2"}});
    let op = finish(&c, operation("live", "a", "migrate", live)).await;
    assert_succeeded(&op);
    assert!(
        message(&op).starts_with("migrated from node-1 to node-2"),
        "{}",
        message(&op)
    );
    let moved = |node: &'static str| {
        move |v: &VirtualMachine| {
            let s = v.status.as_ref();
            s.and_then(|s| s.node_name.as_deref()) == Some(node)
                && s.and_then(|s| s.phase) == Some(VmPhase::Running)
        }
    };
    let a = c.wait("a", "Running on node-2", moved("node-2")).await;
    assert!(!a.annotations().contains_key("hypersdk.io/migrating-to"));
    assert!(
        one.vm(&on_agent("a")).await.is_none(),
        "not created again on node-1"
    );
    assert_eq!(two.phase(&on_agent("a")).await, Some(pb::VmPhase::Running));

    let cold = json!({"migrateSpec": {"targetNode": "node-1", "live": false}});
    assert_succeeded(&finish(&c, operation("cold", "a", "migrate", cold)).await);
    c.wait("a", "Running on node-1", moved("node-1")).await;
    assert!(two.vm(&on_agent("a")).await.is_none());

    let nowhere = json!({"migrateSpec": {"targetNode": "node-9"}});
    let op = finish(&c, operation("nowhere", "a", "migrate", nowhere)).await;
    assert_eq!(
        message(&op),
        "migrateSpec.targetNode: node \"node-9\" is not known (known nodes: node-1, node-2)"
    );
    let here = json!({"migrateSpec": {"targetNode": "node-1"}});
    let op = finish(&c, operation("here", "a", "migrate", here)).await;
    assert_eq!(
        message(&op),
        "migrateSpec.targetNode: VM a already runs on node node-1"
    );
}

#[tokio::test]
async fn operations_and_snapshots_go_with_their_vm() {
    let (c, _) = running(&["node-1"]).await;
    assert_succeeded(&finish(&c, operation("pause", "a", "pause", json!({}))).await);
    let take = json!({"snapshotSpec": {"snapshotName": "s1"}});
    assert_succeeded(&finish(&c, operation("take", "a", "snapshot", take)).await);
    // Deleting the operation that took it leaves the snapshot: the VM still owns it.
    c.delete::<VMOperation>("take").await;
    let snap = c.api::<VMSnapshot>().get("s1").await.unwrap();
    assert_eq!(snap.status.unwrap().phase, Some(SnapshotPhase::Ready));
    c.delete::<VirtualMachine>("a").await;
    c.wait_gone::<VMOperation>("pause").await;
    c.wait_gone::<VMSnapshot>("s1").await;
}
