//! Applying an [`Edit`]: the RestartRequired condition, a live resize, and making a stopped VM
//! again with its edited spec.

use hypersdk_proto::agent::v1 as pb;
use kube::Resource;
use tracing::info;

use super::super::{Pass, RESTART_REQUIRED, call};
use super::Edit;
use crate::context::Context;
use crate::crd::{Reason, Status};
use crate::error::{Error, Result};
use crate::nodes::Client;

/// RestartRequired: the fields that change at the next start, or none.
pub(in crate::reconcile::vm) fn report_edit(pass: &mut Pass<'_>, edit: &Edit) {
    match edit.restart.is_empty() {
        true => pass.set(
            RESTART_REQUIRED,
            Status::False,
            Reason::SpecApplied,
            "the node runs the spec as it is",
        ),
        false => pass.set(
            RESTART_REQUIRED,
            Status::True,
            Reason::SpecChanged,
            format!(
                "{} change at the next start (set spec.running false, then true)",
                edit.restart.join(", ")
            ),
        ),
    }
}

/// Makes the stopped VM again on its node with the edited spec (its disks kept), started.
pub(in crate::reconcile::vm) async fn recreate(
    pass: &mut Pass<'_>,
    node: &str,
    mut client: Client,
    desired: &pb::VmSpec,
    edit: &Edit,
    ctx: &Context,
) -> Result<pb::Vm> {
    info!(node, fields = ?edit.restart, "making the VM again with its edited spec");
    let name = desired.name.clone();
    let keep = pb::DeleteVmRequest {
        name,
        keep_disks: true,
    };
    call(node, client.delete_vm(keep).await)?;
    let create = pb::CreateVmRequest {
        spec: Some(desired.clone()),
        start: true,
    };
    let vm = call(node, client.create_vm(create).await)?;
    report_edit(pass, &Edit::default());
    let msg = format!(
        "made again on node {node} with the edited {} (disks kept), and started",
        edit.restart.join(", ")
    );
    ctx.event(&pass.vm.object_ref(&()), false, Reason::Recreated, msg)
        .await;
    Ok(vm)
}

/// Applies an edit of cpus or memory to the running VM; a refusal is a warning event, and the
/// VM runs on as it is.
pub(in crate::reconcile::vm) async fn resize(
    pass: &mut Pass<'_>,
    node: &str,
    mut client: Client,
    current: pb::Vm,
    edit: Edit,
    ctx: &Context,
) -> Result<pb::Vm> {
    let name = current
        .spec
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let req = pb::ResizeVmRequest {
        name,
        cpus: edit.cpus,
        memory: edit.memory.clone(),
    };
    let me = pass.vm.object_ref(&());
    match client.resize_vm(req).await {
        Ok(r) => {
            let msg = format!(
                "resized live on node {node} to {:?} vCPUs, {:?} memory",
                edit.cpus, edit.memory
            );
            ctx.event(&me, false, Reason::Resized, msg).await;
            Ok(r.into_inner())
        }
        Err(s) if s.code() == tonic::Code::Unavailable => Err(Error::agent(node, s)),
        Err(s) => {
            let msg = format!("resize refused by node {node}: {}", s.message());
            ctx.event(&me, true, Reason::Resized, msg).await;
            Ok(current)
        }
    }
}
