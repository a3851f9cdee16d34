//! VMOperation: runs a one-shot action on a VirtualMachine and records how it ended. Start and
//! stop change `spec.running` (so the VM reconciler does not undo them) and finish when the VM
//! gets there; snapshot creates a VMSnapshot and waits for it; migrate moves the VM
//! ([`super::migrate`]); clone makes a new VM from its disks ([`super::clone`]); the rest call
//! the VM's agent.
//! A finished operation is never run again. The operation is owned by its VirtualMachine (it
//! goes with it); one under way is woken by the VM's changes and by its VMSnapshot's.

use std::sync::Arc;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use crate::context::Context;
use crate::crd::operation::{
    OperationKind, OperationPhase, Progress, ResizeSpec, VMOperation, VMOperationStatus,
};
use crate::crd::snapshot::{SnapshotPhase, VMSnapshot, VMSnapshotSpec};
use crate::crd::vm::{VirtualMachine, VmPhase};
use crate::crd::{Reason, Status, set_condition};
use crate::error::{AgentFailure, Result};
use crate::nodes::Client;
use crate::nodes::spec::agent_name;

/// Condition on a finished operation: True when it succeeded.
pub const SUCCEEDED: &str = "Succeeded";
/// An operation under way is looked at again this often even if nothing wakes it.
const RESYNC: Duration = Duration::from_secs(300);

#[tracing::instrument(skip_all, fields(op = %op.name_any(), ns = op.namespace().unwrap_or_default()))]
pub async fn reconcile(op: Arc<VMOperation>, ctx: Arc<Context>) -> Result<Action> {
    let ns = super::namespace(op.as_ref())?;
    let api: Api<VMOperation> = Api::namespaced(ctx.client.clone(), &ns);
    // Read afresh: the cache can lag behind this reconciler's own status write of a moment
    // ago, and a finished restart or restore must not run twice.
    let Some(op) = api.get_opt(&op.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if op
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(OperationPhase::is_final)
    {
        return Ok(Action::await_change());
    }
    // Woken when the VM changes (a start or stop waits for its phase, a migration for its node).
    let vm_key = (ns.clone(), op.spec.vm_ref.name.clone());
    let me = ObjectRef::from(&op);
    ctx.waiting.operations.wait(vm_key.clone(), me.clone());
    let outcome = run(&op, &ns, &ctx, &api).await?;
    if !matches!(outcome, Outcome::Waiting(..)) {
        ctx.waiting.operations.cancel(&vm_key, &me);
    }
    let status = conclude(&op, &outcome);
    if let Outcome::Done(message) | Outcome::Failed(message) = &outcome {
        let verb = op.spec.operation.as_str();
        let failed = matches!(outcome, Outcome::Failed(_));
        info!(verb, failed, message, "operation finished");
        let reason = if failed {
            Reason::Failed
        } else {
            Reason::Succeeded
        };
        ctx.event(
            &op.object_ref(&()),
            failed,
            reason,
            format!("{verb}: {message}"),
        )
        .await;
    }
    super::write_status(&api, &op.name_any(), op.status.as_ref(), &status).await?;
    Ok(match outcome {
        // The VM or the VMSnapshot waited for wakes it; this is a safety net.
        Outcome::Waiting(..) => Action::requeue(RESYNC),
        _ => Action::await_change(),
    })
}

/// The operation's status after `outcome`.
fn conclude(op: &VMOperation, outcome: &Outcome) -> VMOperationStatus {
    let mut status = op.status.clone().unwrap_or_default();
    status.start_time.get_or_insert_with(now);
    let (phase, message) = match outcome {
        Outcome::Done(m) => (OperationPhase::Succeeded, m),
        Outcome::Failed(m) => (OperationPhase::Failed, m),
        Outcome::Waiting(percent, m) => {
            status.progress = Some(Progress {
                percent: *percent,
                stage: Some(m.clone()),
            });
            (OperationPhase::Running, m)
        }
    };
    status.phase = Some(phase);
    status.message = Some(message.clone());
    if !phase.is_final() {
        return status;
    }
    status.completion_time = Some(now());
    let (s, reason) = if phase == OperationPhase::Succeeded {
        status.progress = Some(Progress {
            percent: 100,
            stage: None,
        });
        (Status::True, Reason::Succeeded)
    } else {
        (Status::False, Reason::Failed)
    };
    let generation = op.metadata.generation;
    set_condition(
        &mut status.conditions,
        SUCCEEDED,
        s,
        reason,
        message.clone(),
        generation,
    );
    status
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

pub(super) enum Outcome {
    Done(String),
    Failed(String),
    /// Under way: percent done and what it waits for.
    Waiting(u32, String),
}

impl Outcome {
    /// Failed, saying why.
    pub(super) fn failed(why: impl std::error::Error) -> Self {
        Outcome::Failed(why.to_string())
    }
}

async fn run(op: &VMOperation, ns: &str, ctx: &Context, ops: &Api<VMOperation>) -> Result<Outcome> {
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), ns);
    let vm_name = &op.spec.vm_ref.name;
    let Some(vm) = vms.get_opt(vm_name).await? else {
        return Ok(Outcome::Failed(format!(
            "spec.vmRef: VirtualMachine {vm_name:?} not found in namespace {ns}"
        )));
    };
    super::own(ops, op, vm.owner_ref(&())).await?;
    let kind = op.spec.operation;
    let phase = vm.status.as_ref().and_then(|s| s.phase);
    match kind {
        OperationKind::Start | OperationKind::Stop => {
            let want = kind == OperationKind::Start;
            if vm.spec.running != want {
                let patch = Patch::Merge(json!({"spec": {"running": want}}));
                vms.patch(vm_name, &PatchParams::apply(super::MANAGER), &patch)
                    .await?;
            }
            let target = if want {
                VmPhase::Running
            } else {
                VmPhase::Stopped
            };
            if phase == Some(target) && vm.spec.running == want {
                return Ok(Outcome::Done(format!(
                    "VM {vm_name} is {}",
                    target.as_str()
                )));
            }
            Ok(Outcome::Waiting(
                50,
                format!("waiting for VM {vm_name} to be {}", target.as_str()),
            ))
        }
        OperationKind::Restart
        | OperationKind::Pause
        | OperationKind::Resume
        | OperationKind::Resize => on_agent(op, &vm, ns, ctx).await,
        OperationKind::Migrate => super::migrate::run(op, &vm, ns, ctx, ops).await,
        OperationKind::Snapshot => snapshot(op, &vm, ns, ctx).await,
        OperationKind::Restore => restore(op, &vm, ns, ctx).await,
        OperationKind::Clone => super::clone::run(op, &vm, ns, ctx).await,
    }
}

/// Creates the VMSnapshot the operation names (or named after the operation) and waits for it.
/// The snapshot is owned by the VM and by the operation (whose controller it wakes), so that it
/// goes when the VM goes but outlives the operation.
async fn snapshot(
    op: &VMOperation,
    vm: &VirtualMachine,
    ns: &str,
    ctx: &Context,
) -> Result<Outcome> {
    let name = op
        .spec
        .snapshot_spec
        .as_ref()
        .and_then(|s| s.snapshot_name.clone())
        .unwrap_or_else(|| op.name_any());
    let snaps: Api<VMSnapshot> = Api::namespaced(ctx.client.clone(), ns);
    let snap = match snaps.get_opt(&name).await? {
        Some(s) => s,
        None => {
            let new = new_snapshot(op, vm, ns, &name);
            snaps.create(&PostParams::default(), &new).await?
        }
    };
    if snap.spec.vm_ref.name != op.spec.vm_ref.name {
        return Ok(Outcome::Failed(format!(
            "snapshotSpec.snapshotName: VMSnapshot {name} belongs to VM {}",
            snap.spec.vm_ref.name
        )));
    }
    let status = snap.status.clone().unwrap_or_default();
    let message = status.message.unwrap_or_default();
    Ok(match status.phase {
        Some(SnapshotPhase::Ready) => {
            Outcome::Done(format!("VMSnapshot {name} is Ready ({message})"))
        }
        Some(SnapshotPhase::Failed | SnapshotPhase::Expired) => {
            Outcome::Failed(format!("VMSnapshot {name}: {message}"))
        }
        _ => {
            // One that existed already: its changes wake this operation from now on.
            super::own(&snaps, &snap, op.owner_ref(&())).await?;
            Outcome::Waiting(50, format!("waiting for VMSnapshot {name} to be Ready"))
        }
    })
}

/// The VMSnapshot `name` a snapshot operation takes of `vm`.
fn new_snapshot(op: &VMOperation, vm: &VirtualMachine, ns: &str, name: &str) -> VMSnapshot {
    let spec = VMSnapshotSpec {
        vm_ref: op.spec.vm_ref.clone(),
        include_memory: op
            .spec
            .snapshot_spec
            .as_ref()
            .is_some_and(|s| s.include_memory),
        quiesce: false,
        description: Some(format!("taken by VMOperation {}", op.name_any())),
        retention: None,
    };
    let mut new = VMSnapshot::new(name, spec);
    new.metadata.namespace = Some(ns.to_string());
    let owners = [vm.owner_ref(&()), op.owner_ref(&())];
    new.metadata.owner_references = Some(owners.into_iter().flatten().collect());
    new
}

/// Returns the VM to a Ready VMSnapshot of it, on its agent.
async fn restore(
    op: &VMOperation,
    vm: &VirtualMachine,
    ns: &str,
    ctx: &Context,
) -> Result<Outcome> {
    let Some(name) = op
        .spec
        .restore_spec
        .as_ref()
        .map(|r| r.snapshot_name.clone())
    else {
        return Ok(Outcome::Failed("restoreSpec: is required".into()));
    };
    let snap = Api::<VMSnapshot>::namespaced(ctx.client.clone(), ns)
        .get_opt(&name)
        .await?;
    let ready = snap
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.phase)
        == Some(SnapshotPhase::Ready);
    match snap {
        None => Ok(Outcome::Failed(format!(
            "restoreSpec.snapshotName: VMSnapshot {name:?} not found in namespace {ns}"
        ))),
        Some(s) if s.spec.vm_ref.name != vm.name_any() => Ok(Outcome::Failed(format!(
            "restoreSpec.snapshotName: VMSnapshot {name} belongs to VM {}",
            s.spec.vm_ref.name
        ))),
        Some(_) if !ready => Ok(Outcome::Failed(format!(
            "restoreSpec.snapshotName: VMSnapshot {name} is not Ready"
        ))),
        Some(_) => on_agent(op, vm, ns, ctx).await,
    }
}

/// Operations the VM's agent performs directly.
async fn on_agent(
    op: &VMOperation,
    vm: &VirtualMachine,
    ns: &str,
    ctx: &Context,
) -> Result<Outcome> {
    let vm_name = vm.name_any();
    let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) else {
        return Ok(Outcome::Failed(format!(
            "VM {vm_name} is not placed on a node (spec.running is {})",
            vm.spec.running
        )));
    };
    let agent = ctx.agents.get(&node);
    let Some((agent, client)) = agent.and_then(|a| Some((a.clone(), a.client()?))) else {
        return Ok(Outcome::failed(AgentFailure::Unreachable(node)));
    };
    let reply = call(op, client, agent_name(ns, &vm_name), ctx).await;
    if reply.is_ok()
        && let Some(resize) = &op.spec.resize_spec
        && op.spec.operation == OperationKind::Resize
    {
        declare_size(vm, ns, resize, ctx).await?;
    }
    Ok(match reply {
        Ok(r) => {
            agent.observe(r.into_inner());
            Outcome::Done(format!(
                "{} of VM {vm_name} done on node {node}",
                op.spec.operation.as_str()
            ))
        }
        Err(s) => Outcome::failed(AgentFailure::refused(&node, s)),
    })
}

/// The agent call of a restart, pause, resume, restore or resize of the agent's VM `name`.
async fn call(
    op: &VMOperation,
    mut client: Client,
    name: String,
    ctx: &Context,
) -> std::result::Result<tonic::Response<pb::Vm>, tonic::Status> {
    match op.spec.operation {
        OperationKind::Restart => {
            let req = pb::RestartVmRequest {
                name,
                timeout_seconds: ctx.settings.stop_timeout_seconds,
                force: false,
            };
            client.restart_vm(req).await
        }
        OperationKind::Pause => client.pause_vm(pb::PauseVmRequest { name }).await,
        OperationKind::Resume => client.resume_vm(pb::ResumeVmRequest { name }).await,
        OperationKind::Restore => {
            let snapshot = op
                .spec
                .restore_spec
                .as_ref()
                .map(|r| r.snapshot_name.clone())
                .unwrap_or_default();
            client
                .restore_snapshot(pb::RestoreSnapshotRequest { name, snapshot })
                .await
                .map(|r| r.map(|r| r.vm.unwrap_or_default()))
        }
        _ => {
            let spec = op.spec.resize_spec.clone();
            let req = pb::ResizeVmRequest {
                name,
                cpus: spec.as_ref().and_then(|s| s.cpus),
                memory: spec.and_then(|s| s.memory),
            };
            client.resize_vm(req).await
        }
    }
}

/// The declared size follows a resize, so the VM's next start keeps it.
async fn declare_size(
    vm: &VirtualMachine,
    ns: &str,
    spec: &ResizeSpec,
    ctx: &Context,
) -> Result<()> {
    let mut patch = serde_json::Map::new();
    if let Some(c) = spec.cpus {
        patch.insert("cpus".into(), json!(c));
    }
    if let Some(m) = &spec.memory {
        patch.insert("memory".into(), json!(m));
    }
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), ns);
    vms.patch(
        &vm.name_any(),
        &PatchParams::apply(super::MANAGER),
        &Patch::Merge(json!({"spec": patch})),
    )
    .await?;
    Ok(())
}
