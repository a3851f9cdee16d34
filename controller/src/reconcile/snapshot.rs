//! VMSnapshot: takes the snapshot on the node agent of the VM it names (memory too with
//! `includeMemory`, the guest's filesystems frozen with `quiesce`), reports it Ready or Failed,
//! follows it while Ready (Failed, reason Gone, once the agent no longer has it: the VM moved
//! away or was deleted, or the snapshot was deleted on the node), applies the retention policy
//! (expiry, auto-delete), and deletes it from the agent when the object goes (finalizer).
//! The VMSnapshot is owned by its VirtualMachine.

use std::sync::Arc;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use crate::context::Context;
use crate::crd::snapshot::{SnapshotPhase, VMSnapshot};
use crate::crd::vm::VirtualMachine;
use crate::crd::{Reason, Status, set_condition};
use crate::error::{AgentFailure, Error, Result};
use crate::nodes::Client;
use crate::nodes::spec::agent_name;

pub const READY: &str = "Ready";
const FINALIZER: &str = "hypersdk.io/snapshot";
/// Annotation on a Ready VMSnapshot: the node it was taken on.
pub const TAKEN_ON: &str = "hypersdk.io/taken-on";
/// Looked at again this often (retention; an agent-side snapshot deleted on the node).
const RESYNC: Duration = Duration::from_secs(300);

#[tracing::instrument(skip_all, fields(snapshot = %snap.name_any(), ns = snap.namespace().unwrap_or_default()))]
pub async fn reconcile(snap: Arc<VMSnapshot>, ctx: Arc<Context>) -> Result<Action> {
    let ns = super::namespace(snap.as_ref())?;
    let api: Api<VMSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, snap, |event| async {
        match event {
            Finalizer::Apply(snap) => apply(&snap, &ns, &api, &ctx).await,
            Finalizer::Cleanup(snap) => cleanup(&snap, &ns, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Where the snapshot is: the VM's node and the VM's name on its agent.
enum Target {
    On {
        node: String,
        client: Client,
        vm: String,
    },
    /// The VM does not exist (any more).
    NoVm(String),
    /// Not now: the VM has no node yet, or its agent does not answer (reason, message).
    NotNow(Reason, String),
}

async fn vm_of(snap: &VMSnapshot, ns: &str, ctx: &Context) -> Result<Option<VirtualMachine>> {
    Ok(Api::<VirtualMachine>::namespaced(ctx.client.clone(), ns)
        .get_opt(&snap.spec.vm_ref.name)
        .await?)
}

fn target(vm: Option<&VirtualMachine>, snap: &VMSnapshot, ns: &str, ctx: &Context) -> Target {
    let vm_name = &snap.spec.vm_ref.name;
    let Some(vm) = vm else {
        return Target::NoVm(format!(
            "spec.vmRef: VirtualMachine {vm_name:?} not found in namespace {ns}"
        ));
    };
    let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) else {
        let message = format!("VM {vm_name} is not placed on a node yet");
        return Target::NotNow(Reason::VmNotPlaced, message);
    };
    let Some(client) = ctx.agents.get(&node).and_then(|a| a.client()) else {
        let message = AgentFailure::Unreachable(node).to_string();
        return Target::NotNow(Reason::AgentUnreachable, message);
    };
    Target::On {
        node,
        client,
        vm: agent_name(ns, vm_name),
    }
}

async fn apply(
    snap: &VMSnapshot,
    ns: &str,
    api: &Api<VMSnapshot>,
    ctx: &Context,
) -> Result<Action> {
    let vm_key = (ns.to_string(), snap.spec.vm_ref.name.clone());
    let me = ObjectRef::from(snap);
    if let Some(action) = retention(snap, api).await? {
        ctx.waiting.snapshots.cancel(&vm_key, &me);
        return Ok(action);
    }
    let phase = snap.status.as_ref().and_then(|s| s.phase);
    if matches!(phase, Some(SnapshotPhase::Failed | SnapshotPhase::Expired)) {
        ctx.waiting.snapshots.cancel(&vm_key, &me);
        return Ok(Action::requeue(RESYNC));
    }
    // Woken when the VM changes: placed, its agent back, moved to another node, deleted.
    ctx.waiting.snapshots.wait(vm_key.clone(), me.clone());
    let vm = vm_of(snap, ns, ctx).await?;
    if let Some(vm) = &vm {
        super::own(api, snap, vm.owner_ref(&())).await?;
    }
    let target = target(vm.as_ref(), snap, ns, ctx);
    let verdict = if phase == Some(SnapshotPhase::Ready) {
        still_there(snap, target).await?
    } else {
        Some(match target {
            Target::NoVm(message) => {
                Verdict::not_ready(SnapshotPhase::Failed, Reason::VmNotFound, message)
            }
            Target::NotNow(reason, message) => {
                Verdict::not_ready(SnapshotPhase::Pending, reason, message)
            }
            Target::On { node, client, vm } => take(snap, api, &node, client, vm).await?,
        })
    };
    if let Some(verdict) = verdict {
        if verdict.phase == SnapshotPhase::Failed {
            ctx.waiting.snapshots.cancel(&vm_key, &me);
        }
        verdict.write(snap, api).await?;
    }
    Ok(Action::requeue(RESYNC))
}

/// A Ready snapshot whose agent-side snapshot is gone says so: its VM was deleted, or moved to
/// another node (snapshots stay on the node they were taken on: a live migration refuses a VM
/// with snapshots, other moves leave them), or the node no longer has the VM or the snapshot.
/// None while it is there, or while that cannot be told.
async fn still_there(snap: &VMSnapshot, target: Target) -> Result<Option<Verdict>> {
    let vm_name = &snap.spec.vm_ref.name;
    let message = match target {
        Target::NotNow(..) => return Ok(None),
        Target::NoVm(_) => format!("VM {vm_name} no longer exists; its snapshots went with it"),
        Target::On { node, .. } if taken_on(snap).is_some_and(|t| t != node) => format!(
            "taken on node {}; VM {vm_name} is now on node {node}",
            taken_on(snap).unwrap_or_default()
        ),
        Target::On { node, client, vm } => match listed(client, &node, vm).await? {
            Some(l) if l.iter().any(|s| s.name == snap.name_any()) => return Ok(None),
            Some(_) => format!("deleted on node {node}, where VM {vm_name} is"),
            None => format!("VM {vm_name} is no longer on node {node}; its snapshots went with it"),
        },
    };
    Ok(Some(Verdict::not_ready(
        SnapshotPhase::Failed,
        Reason::Gone,
        message,
    )))
}

/// The node the snapshot was taken on (recorded once it is Ready).
fn taken_on(snap: &VMSnapshot) -> Option<&str> {
    snap.annotations().get(TAKEN_ON).map(String::as_str)
}

/// The agent's snapshots of its VM `vm`; None when the agent has no such VM.
async fn listed(mut client: Client, node: &str, vm: String) -> Result<Option<Vec<pb::Snapshot>>> {
    match client
        .list_snapshots(pb::ListSnapshotsRequest { name: vm })
        .await
    {
        Ok(r) => Ok(Some(r.into_inner().snapshots)),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(Error::agent(node, s)),
    }
}

/// Past `retention.keepDays`: deleted (`autoDelete`) or marked Expired; then nothing to wait for.
async fn retention(snap: &VMSnapshot, api: &Api<VMSnapshot>) -> Result<Option<Action>> {
    let Some(expires) = expiry(snap) else {
        return Ok(None);
    };
    if k8s_openapi::jiff::Timestamp::now() < expires {
        return Ok(None);
    }
    if snap.spec.retention.as_ref().is_some_and(|r| r.auto_delete) {
        api.delete(&snap.name_any(), &DeleteParams::default())
            .await?;
        return Ok(Some(Action::await_change()));
    }
    let mut status = snap.status.clone().unwrap_or_default();
    status.phase = Some(SnapshotPhase::Expired);
    status.message = Some("past retention.keepDays".into());
    super::write_status(api, &snap.name_any(), snap.status.as_ref(), &status).await?;
    Ok(Some(Action::await_change()))
}

/// Takes the snapshot on `node` unless it is there already (a pass that ended before its status
/// was written); says how it went.
async fn take(
    snap: &VMSnapshot,
    api: &Api<VMSnapshot>,
    node: &str,
    mut client: Client,
    vm: String,
) -> Result<Verdict> {
    let name = snap.name_any();
    let taken = listed(client.clone(), node, vm.clone())
        .await?
        .ok_or_else(|| Error::NotOnAgent {
            node: node.into(),
            vm: vm.clone(),
        })?
        .into_iter()
        .find(|s| s.name == name);
    let result = match taken {
        Some(s) => Ok(s),
        None => {
            let message = format!("taking the snapshot on node {node}");
            Verdict::not_ready(SnapshotPhase::Creating, Reason::Creating, message)
                .write(snap, api)
                .await?;
            let req = create_request(snap, vm);
            client
                .create_snapshot(req)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    Ok(match result {
        Ok(s) => {
            info!(node, pause_ms = s.pause_ms, "snapshot ready");
            let taken_on = json!({"metadata": {"annotations": {TAKEN_ON: node}}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(taken_on))
                .await?;
            Verdict {
                phase: SnapshotPhase::Ready,
                ready: Status::True,
                reason: Reason::Created,
                message: ready_message(node, &s),
            }
        }
        Err(s) => {
            let message = AgentFailure::refused(node, s).to_string();
            Verdict::not_ready(SnapshotPhase::Failed, Reason::Failed, message)
        }
    })
}

fn create_request(snap: &VMSnapshot, vm: String) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        name: vm,
        snapshot: snap.name_any(),
        memory: snap.spec.include_memory,
        quiesce: snap.spec.quiesce,
        description: snap.spec.description.clone().unwrap_or_default(),
    }
}

fn ready_message(node: &str, s: &pb::Snapshot) -> String {
    let memory = if s.memory {
        format!(", memory included, guest paused {} ms", s.pause_ms)
    } else {
        String::new()
    };
    format!("on node {node}: {} MiB{memory}", s.size_bytes >> 20)
}

/// What the snapshot's status says after a pass: its phase and its Ready condition.
struct Verdict {
    phase: SnapshotPhase,
    ready: Status,
    reason: Reason,
    message: String,
}

impl Verdict {
    fn not_ready(phase: SnapshotPhase, reason: Reason, message: String) -> Self {
        Verdict {
            phase,
            ready: Status::False,
            reason,
            message,
        }
    }

    async fn write(self, snap: &VMSnapshot, api: &Api<VMSnapshot>) -> Result<()> {
        let mut status = snap.status.clone().unwrap_or_default();
        status.phase = Some(self.phase);
        status.message = Some(self.message.clone());
        set_condition(
            &mut status.conditions,
            READY,
            self.ready,
            self.reason,
            self.message,
            snap.metadata.generation,
        );
        super::write_status(api, &snap.name_any(), snap.status.as_ref(), &status).await
    }
}

/// Deletes the snapshot from the VM's agent. A VM or agent that is gone cannot hold the
/// deletion hostage: the snapshot went with the VM, or stays on an agent nobody reaches.
async fn cleanup(snap: &VMSnapshot, ns: &str, ctx: &Context) -> Result<Action> {
    let vm = vm_of(snap, ns, ctx).await?;
    if let Target::On {
        node,
        mut client,
        vm,
    } = target(vm.as_ref(), snap, ns, ctx)
    {
        let r = client
            .delete_snapshot(pb::DeleteSnapshotRequest {
                name: vm,
                snapshot: snap.name_any(),
            })
            .await;
        match r {
            Ok(_) => info!(node, "snapshot deleted from agent"),
            // Never taken (it failed), already gone, or gone with the VM from that node.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::InvalidArgument | tonic::Code::NotFound
                ) => {}
            Err(s) => return Err(Error::agent(&node, s)),
        }
    }
    let me = ObjectRef::from(snap);
    ctx.waiting
        .snapshots
        .cancel(&(ns.to_string(), snap.spec.vm_ref.name.clone()), &me);
    Ok(Action::await_change())
}

/// When the snapshot passes `retention.keepDays`.
fn expiry(snap: &VMSnapshot) -> Option<k8s_openapi::jiff::Timestamp> {
    let days = snap.spec.retention.as_ref()?.keep_days?;
    let created = snap.metadata.creation_timestamp.as_ref()?.0;
    created
        .checked_add(k8s_openapi::jiff::SignedDuration::from_hours(
            24 * days as i64,
        ))
        .ok()
}
