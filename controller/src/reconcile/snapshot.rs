//! VMSnapshot: checks the VM it names and reports that the node agent cannot take snapshots yet;
//! applies the retention policy (expiry, auto-delete) either way.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use tracing::warn;

use crate::context::Context;
use crate::crd::snapshot::{SnapshotPhase, VMSnapshot};
use crate::crd::vm::VirtualMachine;
use crate::crd::{Status, set_condition};
use crate::error::{Error, Result};

pub const READY: &str = "Ready";

#[tracing::instrument(skip_all, fields(snapshot = %snap.name_any(), ns = snap.namespace().unwrap_or_default()))]
pub async fn reconcile(snap: Arc<VMSnapshot>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.inc("hypersdk_reconciles_total", "VMSnapshot");
    let ns = super::namespace(snap.as_ref())?;
    let api: Api<VMSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = snap.status.clone().unwrap_or_default();
    if let Some(expires) = expiry(&snap)
        && k8s_openapi::jiff::Timestamp::now() >= expires
    {
        if snap.spec.retention.as_ref().is_some_and(|r| r.auto_delete) {
            api.delete(&snap.name_any(), &DeleteParams::default())
                .await?;
            return Ok(Action::await_change());
        }
        status.phase = Some(SnapshotPhase::Expired);
        status.message = Some("past retention.keepDays".into());
        super::write_status(&api, &snap.name_any(), snap.status.as_ref(), &status).await?;
        return Ok(Action::await_change());
    }
    let vm_name = &snap.spec.vm_ref.name;
    let vm = Api::<VirtualMachine>::namespaced(ctx.client.clone(), &ns)
        .get_opt(vm_name)
        .await?;
    let (phase, reason, message) = match vm {
        None => (
            SnapshotPhase::Failed,
            "VMNotFound",
            format!("spec.vmRef: VirtualMachine {vm_name:?} not found in namespace {ns}"),
        ),
        Some(_) => (
            SnapshotPhase::Pending,
            "Unsupported",
            "snapshots are not supported by the node agent API yet; the snapshot stays Pending"
                .to_string(),
        ),
    };
    status.phase = Some(phase);
    status.message = Some(message.clone());
    set_condition(
        &mut status.conditions,
        READY,
        Status::False,
        reason,
        message,
        snap.metadata.generation,
    );
    super::write_status(&api, &snap.name_any(), snap.status.as_ref(), &status).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
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
