//! VMOperation `migrate`: moves a running VM to another node. Live (the default): the source
//! agent copies it to the target agent (MigrateVm) while the operation's progress follows
//! the stream. Not live: the VM is stopped and deleted on its node and started on the target
//! from the same (shared) disks. Either way the VM's `status.nodeName` follows.
//!
//! While it runs the VM carries the [`MIGRATING`] annotation, so the VM reconciler does not
//! recreate on the old node a VM that has just left it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use super::operation::Outcome;
use crate::context::Context;
use crate::crd::Reason;
use crate::crd::operation::{MigrateSpec, Progress, VMOperation};
use crate::crd::vm::{VirtualMachine, VmPhase};
use crate::error::{AgentFailure, Result};
use crate::nodes::spec::SpecError;
use crate::nodes::spec::{agent_name, migration_options};
use crate::nodes::{Agent, Client};
use crate::scheduling::{self, Unschedulable};

/// Annotation on a VM that a VMOperation is moving; its value is the target node.
pub const MIGRATING: &str = "hypersdk.io/migrating-to";

/// How often live progress is written to the operation's status.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Why a migration does not start, or did not succeed: the failed operation's message.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("VM {0} is not placed on a node")]
    NotPlaced(String),
    #[error("migrateSpec.targetNode: no other node fits: {0}")]
    NoNodeFits(#[source] Unschedulable),
    #[error("migrateSpec.targetNode: node {node:?} is not known (known nodes: {known})")]
    UnknownNode { node: String, known: String },
    #[error("migrateSpec.targetNode: VM {vm} already runs on node {node}")]
    AlreadyThere { vm: String, node: String },
    #[error("VM {0} is not running (only a running VM migrates)")]
    NotRunning(String),
    #[error(transparent)]
    Source(AgentFailure),
    #[error("migrateSpec.targetNode: agent on node {0} does not answer")]
    TargetUnreachable(String),
    #[error(transparent)]
    Options(#[from] SpecError),
    #[error("{}", .0.message())]
    Refused(#[source] tonic::Status),
    #[error("migration stream: {}", .0.message())]
    Stream(#[source] tonic::Status),
    /// The source agent's last word: the phase the migration ended in, and why.
    #[error("migration {phase}: {message}")]
    Ended { phase: String, message: String },
    #[error("stopping: {}", .0.message())]
    Stop(#[source] tonic::Status),
    #[error("removing from its node: {}", .0.message())]
    Remove(#[source] tonic::Status),
}

pub(super) async fn run(
    op: &VMOperation,
    vm: &VirtualMachine,
    ns: &str,
    ctx: &Context,
    ops: &Api<VMOperation>,
) -> Result<Outcome> {
    let spec = op.spec.migrate_spec.clone().unwrap_or_default();
    let vm_name = vm.name_any();
    let Some(source) = vm.status.as_ref().and_then(|s| s.node_name.clone()) else {
        return Ok(Outcome::failed(MigrateError::NotPlaced(vm_name)));
    };
    let (target, target_agent) = match target(vm, &spec, &source, ctx) {
        Ok(t) => t,
        Err(why) => return Ok(Outcome::failed(why)),
    };
    if let Some(outcome) = resume(vm, ns, &source, &target_agent, ctx).await? {
        return Ok(outcome);
    }
    let (mut client, options) = match preflight(vm, &spec, &source, &target_agent, ctx) {
        Ok(ready) => ready,
        Err(why) => return Ok(Outcome::failed(why)),
    };
    mark(vm, ns, ctx, Some(&target)).await?;
    info!(source, target, live = spec.live, "migrating");
    let agent_vm = agent_name(ns, &vm_name);
    let outcome = if spec.live {
        let to = target_agent.info.address.to_string();
        live(op, ops, &mut client, &agent_vm, &to, options).await
    } else {
        cold(&mut client, &agent_vm, ctx).await
    };
    match outcome {
        Ok(message) => {
            finish(vm, ns, &target, ctx).await?;
            ctx.event(
                &vm.object_ref(&()),
                false,
                Reason::Migrated,
                message.clone(),
            )
            .await;
            Ok(Outcome::Done(message))
        }
        Err(why) => {
            mark(vm, ns, ctx, None).await?;
            Ok(Outcome::failed(why))
        }
    }
}

/// The target node (`migrateSpec.targetNode`, or the scheduler's choice) and its agent.
fn target(
    vm: &VirtualMachine,
    spec: &MigrateSpec,
    source: &str,
    ctx: &Context,
) -> std::result::Result<(String, Arc<Agent>), MigrateError> {
    let target = match &spec.target_node {
        Some(t) => t.clone(),
        None => choose_target(vm, source, ctx)?,
    };
    match ctx.agents.get(&target) {
        Some(agent) => Ok((target, agent)),
        None => {
            let known: Vec<String> = ctx
                .agents
                .all()
                .iter()
                .map(|a| a.info.node.clone())
                .collect();
            Err(MigrateError::UnknownNode {
                node: target,
                known: known.join(", "),
            })
        }
    }
}

/// A migration this operation started before a controller restart: done already (the hand-over
/// happened, not recorded yet), or still under way (the source agent drives it on its own).
/// None when there is none to resume.
async fn resume(
    vm: &VirtualMachine,
    ns: &str,
    source: &str,
    target: &Agent,
    ctx: &Context,
) -> Result<Option<Outcome>> {
    let vm_name = vm.name_any();
    let to = &target.info.node;
    if source == to {
        return Ok(Some(if is_moving(vm) {
            finish(vm, ns, to, ctx).await?;
            Outcome::Done(format!("VM {vm_name} runs on node {to}"))
        } else {
            Outcome::failed(MigrateError::AlreadyThere {
                vm: vm_name,
                node: to.clone(),
            })
        }));
    }
    if !is_moving(vm) {
        return Ok(None);
    }
    let phase = |v: pb::Vm| v.status.map(|s| s.phase());
    Ok(match target.vm(&agent_name(ns, &vm_name)).map(phase) {
        Some(Some(p)) if !matches!(p, pb::VmPhase::Migrating | pb::VmPhase::Incoming) => {
            finish(vm, ns, to, ctx).await?;
            Some(Outcome::Done(format!(
                "VM {vm_name} moved from {source} to {to}"
            )))
        }
        Some(_) => Some(Outcome::Waiting(
            50,
            format!("VM {vm_name} is arriving on node {to}"),
        )),
        None => None,
    })
}

/// What a migration needs before it starts: a running VM, both agents answering, valid options.
fn preflight(
    vm: &VirtualMachine,
    spec: &MigrateSpec,
    source: &str,
    target: &Agent,
    ctx: &Context,
) -> std::result::Result<(Client, pb::MigrationOptions), MigrateError> {
    if vm.status.as_ref().and_then(|s| s.phase) != Some(VmPhase::Running) {
        return Err(MigrateError::NotRunning(vm.name_any()));
    }
    let client = ctx
        .agents
        .get(source)
        .and_then(|a| a.client())
        .ok_or_else(|| MigrateError::Source(AgentFailure::Unreachable(source.into())))?;
    if target.client().is_none() {
        return Err(MigrateError::TargetUnreachable(target.info.node.clone()));
    }
    Ok((client, migration_options(spec)?))
}

/// The scheduler's choice among the other nodes.
fn choose_target(
    vm: &VirtualMachine,
    source: &str,
    ctx: &Context,
) -> std::result::Result<String, MigrateError> {
    let nodes: Vec<_> = ctx
        .placements
        .inventory(&ctx.agents)
        .into_iter()
        .filter(|n| n.name != source)
        .collect();
    let req = scheduling::Request::for_vm(&vm.spec);
    scheduling::schedule(&nodes, &req, &ctx.settings.policy)
        .map(|n| n.name.clone())
        .map_err(MigrateError::NoNodeFits)
}

/// Follows the source agent's migration stream, writing progress to the operation.
async fn live(
    op: &VMOperation,
    ops: &Api<VMOperation>,
    client: &mut Client,
    name: &str,
    target: &str,
    options: pb::MigrationOptions,
) -> std::result::Result<String, MigrateError> {
    let req = pb::MigrateVmRequest {
        name: name.to_string(),
        target: target.to_string(),
        options: Some(options),
    };
    let mut stream = client
        .migrate_vm(req)
        .await
        .map_err(MigrateError::Refused)?
        .into_inner();
    let mut written = Instant::now() - PROGRESS_EVERY;
    let mut last = pb::MigrationProgress::default();
    loop {
        match stream.message().await {
            Ok(Some(p)) => {
                if written.elapsed() >= PROGRESS_EVERY {
                    written = Instant::now();
                    // Progress is informative: a failed write does not stop the migration.
                    let _ = write_progress(ops, op, &p).await;
                }
                last = p;
            }
            Ok(None) => break,
            Err(s) => return Err(MigrateError::Stream(s)),
        }
    }
    match last.phase() {
        pb::MigrationPhase::Completed => Ok(format!(
            "migrated from {} to {} in {} ms, guest paused {} ms, {} sent{}",
            last.source_node,
            last.target_node,
            last.elapsed_ms,
            last.downtime_ms,
            mib(last.transferred_bytes),
            if last.encrypted { " over TLS" } else { "" }
        )),
        phase => Err(MigrateError::Ended {
            phase: phase_name(phase),
            message: last.message,
        }),
    }
}

async fn write_progress(
    ops: &Api<VMOperation>,
    op: &VMOperation,
    p: &pb::MigrationProgress,
) -> Result<()> {
    let total = p.transferred_bytes + p.remaining_bytes;
    let percent = match total {
        0 => 0,
        t => (p.transferred_bytes * 99 / t) as u32,
    };
    let stage = format!(
        "{}: {} of {} sent, {} passes",
        phase_name(p.phase()),
        hypersdk_proto::quantity::format_bytes(p.transferred_bytes),
        hypersdk_proto::quantity::format_bytes(total),
        p.iterations
    );
    let progress = Progress {
        percent,
        stage: Some(stage),
    };
    ops.patch_status(
        &op.name_any(),
        &PatchParams::apply(super::MANAGER),
        &Patch::Merge(json!({"status": {"phase": "Running", "progress": progress}})),
    )
    .await?;
    Ok(())
}

/// Not live: stop the guest and remove the VM here; the VM reconciler starts it on the target.
async fn cold(
    client: &mut Client,
    name: &str,
    ctx: &Context,
) -> std::result::Result<String, MigrateError> {
    let stop = pb::StopVmRequest {
        name: name.to_string(),
        timeout_seconds: ctx.settings.stop_timeout_seconds,
        force: false,
    };
    client.stop_vm(stop).await.map_err(MigrateError::Stop)?;
    client
        .delete_vm(pb::DeleteVmRequest {
            name: name.to_string(),
            // The target starts the VM from the same disks (shared storage).
            keep_disks: true,
        })
        .await
        .map_err(MigrateError::Remove)?;
    Ok("stopped on its node; starting on the target".into())
}

/// "precopy", "completed", ...: a migration phase as the status names it.
fn phase_name(phase: pb::MigrationPhase) -> String {
    phase
        .as_str_name()
        .trim_start_matches("MIGRATION_PHASE_")
        .to_lowercase()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn is_moving(vm: &VirtualMachine) -> bool {
    vm.annotations().contains_key(MIGRATING)
}

/// Sets (or with `None` removes) the [`MIGRATING`] annotation.
async fn mark(vm: &VirtualMachine, ns: &str, ctx: &Context, target: Option<&str>) -> Result<()> {
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), ns);
    let patch = json!({"metadata": {"annotations": {MIGRATING: target}}});
    api.patch(
        &vm.name_any(),
        &PatchParams::apply(super::MANAGER),
        &Patch::Merge(patch),
    )
    .await?;
    Ok(())
}

/// The VM now belongs to `target`: placement, status and annotation follow.
async fn finish(vm: &VirtualMachine, ns: &str, target: &str, ctx: &Context) -> Result<()> {
    let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), ns);
    let name = vm.name_any();
    api.patch_status(
        &name,
        &PatchParams::apply(super::MANAGER),
        &Patch::Merge(json!({"status": {"nodeName": target}})),
    )
    .await?;
    ctx.placements.moved(&(ns.to_string(), name), target);
    mark(vm, ns, ctx, None).await
}
