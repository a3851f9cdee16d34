//! VMSnapshot: takes the snapshot on the node agent of the VM it names (memory too with
//! `includeMemory`, the guest's filesystems frozen with `quiesce`), reports it Ready or Failed,
//! applies the retention policy (expiry, auto-delete), and deletes it from the agent when the
//! object goes (finalizer).

use std::sync::Arc;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use tracing::{info, warn};

use crate::context::Context;
use crate::crd::snapshot::{SnapshotPhase, VMSnapshot};
use crate::crd::vm::VirtualMachine;
use crate::crd::{Status, set_condition};
use crate::error::{Error, Result};
use crate::nodes::Client;
use crate::nodes::spec::agent_name;

pub const READY: &str = "Ready";
const FINALIZER: &str = "hypersdk.io/snapshot";
/// Looked at again this often for retention, once it is Ready.
const RESYNC: Duration = Duration::from_secs(300);

#[tracing::instrument(skip_all, fields(snapshot = %snap.name_any(), ns = snap.namespace().unwrap_or_default()))]
pub async fn reconcile(snap: Arc<VMSnapshot>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.inc("hypersdk_reconciles_total", "VMSnapshot");
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

/// Where the snapshot is taken: the VM's node and the VM's name on its agent.
enum Target {
    On {
        node: String,
        client: Client,
        vm: String,
    },
    /// Not now, with the reason and the phase to report.
    Not(SnapshotPhase, &'static str, String),
}

async fn target(snap: &VMSnapshot, ns: &str, ctx: &Context) -> Result<Target> {
    let vm_name = &snap.spec.vm_ref.name;
    let Some(vm) = Api::<VirtualMachine>::namespaced(ctx.client.clone(), ns)
        .get_opt(vm_name)
        .await?
    else {
        return Ok(Target::Not(
            SnapshotPhase::Failed,
            "VMNotFound",
            format!("spec.vmRef: VirtualMachine {vm_name:?} not found in namespace {ns}"),
        ));
    };
    let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) else {
        return Ok(Target::Not(
            SnapshotPhase::Pending,
            "VMNotPlaced",
            format!("VM {vm_name} is not placed on a node yet"),
        ));
    };
    let Some(client) = ctx.agents.get(&node).and_then(|a| a.client()) else {
        return Ok(Target::Not(
            SnapshotPhase::Pending,
            "AgentUnreachable",
            format!("agent on node {node} does not answer"),
        ));
    };
    Ok(Target::On {
        node,
        client,
        vm: agent_name(ns, vm_name),
    })
}

async fn apply(
    snap: &VMSnapshot,
    ns: &str,
    api: &Api<VMSnapshot>,
    ctx: &Context,
) -> Result<Action> {
    if let Some(action) = retention(snap, api).await? {
        return Ok(action);
    }
    let phase = snap.status.as_ref().and_then(|s| s.phase);
    if matches!(
        phase,
        Some(SnapshotPhase::Ready | SnapshotPhase::Failed | SnapshotPhase::Expired)
    ) {
        return Ok(Action::requeue(RESYNC));
    }
    let (verdict, action) = match target(snap, ns, ctx).await? {
        Target::Not(phase, reason, message) => (
            Verdict::not_ready(phase, reason, message),
            Action::requeue(Duration::from_secs(5)),
        ),
        Target::On { node, client, vm } => (
            take(snap, api, &node, client, vm).await?,
            Action::requeue(RESYNC),
        ),
    };
    verdict.write(snap, api).await?;
    Ok(action)
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
    let taken = client
        .list_snapshots(pb::ListSnapshotsRequest { name: vm.clone() })
        .await
        .map_err(|s| Error::agent(node, s))?
        .into_inner()
        .snapshots
        .into_iter()
        .find(|s| s.name == name);
    let result = match taken {
        Some(s) => Ok(s),
        None => {
            let message = format!("taking the snapshot on node {node}");
            Verdict::not_ready(SnapshotPhase::Creating, "Creating", message)
                .write(snap, api)
                .await?;
            let req = pb::CreateSnapshotRequest {
                name: vm,
                snapshot: name.clone(),
                memory: snap.spec.include_memory,
                quiesce: snap.spec.quiesce,
                description: snap.spec.description.clone().unwrap_or_default(),
            };
            client
                .create_snapshot(req)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    Ok(match result {
        Ok(s) => {
            info!(node, pause_ms = s.pause_ms, "snapshot ready");
            Verdict {
                phase: SnapshotPhase::Ready,
                ready: Status::True,
                reason: "Created",
                message: ready_message(node, &s),
            }
        }
        Err(s) => {
            let message = format!("agent on node {node}: {}", s.message());
            Verdict::not_ready(SnapshotPhase::Failed, "Failed", message)
        }
    })
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
    reason: &'static str,
    message: String,
}

impl Verdict {
    fn not_ready(phase: SnapshotPhase, reason: &'static str, message: String) -> Self {
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
    if let Target::On {
        node,
        mut client,
        vm,
    } = target(snap, ns, ctx).await?
    {
        let r = client
            .delete_snapshot(pb::DeleteSnapshotRequest {
                name: vm,
                snapshot: snap.name_any(),
            })
            .await;
        match r {
            Ok(_) => info!(node, "snapshot deleted from agent"),
            // Never taken (it failed), or already gone.
            Err(s) if s.code() == tonic::Code::InvalidArgument => {}
            Err(s) => return Err(Error::agent(&node, s)),
        }
    }
    Ok(Action::await_change())
}

pub fn error_policy(snap: Arc<VMSnapshot>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .inc("hypersdk_reconcile_errors_total", "VMSnapshot");
    warn!(snapshot = %snap.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
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
