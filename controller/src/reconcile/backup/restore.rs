//! RestoreJob: a new VirtualMachine from a backup. A node is chosen (`destination.nodeName`, or
//! the reachable schedulable node with the most free memory), its agent writes the backup's
//! disks there (RestoreBackup, every chunk checked), and the VM is created with the backed-up
//! VirtualMachine spec on those disks, pinned to that node, running if `startAfterRestore`.
//! With `overwriteExisting`, a VM of that name is deleted first.

use std::sync::Arc;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::Action;
use tracing::info;

use crate::context::Context;
use crate::crd::backup::{BackupPhase, Provider, RestoreJob, RestoreJobStatus};
use crate::crd::{VirtualMachine, VirtualMachineSpec};
use crate::error::Result;
use crate::scheduling::NODE_LABEL;

const RETRY: Duration = Duration::from_secs(5);

#[tracing::instrument(skip_all, fields(restore = %job.name_any(), ns = job.namespace().unwrap_or_default()))]
pub async fn reconcile(job: Arc<RestoreJob>, ctx: Arc<Context>) -> Result<Action> {
    let ns = super::super::namespace(job.as_ref())?;
    let api: Api<RestoreJob> = Api::namespaced(ctx.client.clone(), &ns);
    let name = job.name_any();
    let old = job.status.clone().unwrap_or_default();
    if old.phase.is_some_and(BackupPhase::finished) {
        return Ok(Action::await_change());
    }
    let mut status = old.clone();
    if status.start_time.is_none() {
        status.start_time = Some(Time(Timestamp::now()));
    }
    let outcome = restore(&job, &ns, &ctx, &mut status).await?;
    let action = match outcome {
        Outcome::Done(vm) => {
            status.phase = Some(BackupPhase::Completed);
            status.restored_vm = Some(vm);
            status.message = None;
            status.completion_time = Some(Time(Timestamp::now()));
            Action::await_change()
        }
        Outcome::Wait(why) => {
            status.phase = Some(BackupPhase::Pending);
            status.message = Some(why);
            Action::requeue(RETRY)
        }
        Outcome::Fail(why) => {
            status.phase = Some(BackupPhase::Failed);
            status.message = Some(why);
            status.completion_time = Some(Time(Timestamp::now()));
            Action::await_change()
        }
    };
    super::super::write_status(&api, &name, Some(&old), &status).await?;
    Ok(action)
}

enum Outcome {
    Done(String),
    Wait(String),
    Fail(String),
}

async fn restore(
    job: &RestoreJob,
    ns: &str,
    ctx: &Context,
    status: &mut RestoreJobStatus,
) -> Result<Outcome> {
    let spec = &job.spec;
    let dest = &spec.destination;
    if dest.provider != Provider::Hypersdk {
        return Ok(Outcome::Fail(
            "destination.provider: only hypersdk VirtualMachines can be restored into".into(),
        ));
    }
    let key = match super::manifest_key(&spec.source.bucket, &spec.source.path) {
        Ok(k) => k,
        Err(why) => return Ok(Outcome::Fail(why)),
    };
    let vm_ns = dest.namespace.clone().unwrap_or_else(|| ns.to_string());
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &vm_ns);
    let overwrite = spec.options.as_ref().is_some_and(|o| o.overwrite_existing);
    if let Some(existing) = vms.get_opt(&dest.vm_name).await? {
        // Our own VM from an earlier pass whose status was not written: done.
        if existing.annotations().get(RESTORED_BY) == Some(&format!("{ns}/{}", job.name_any())) {
            return Ok(Outcome::Done(format!("{vm_ns}/{}", dest.vm_name)));
        }
        if !overwrite {
            return Ok(Outcome::Fail(format!(
                "destination.vmName: VirtualMachine {vm_ns}/{} exists; set options.overwriteExisting to replace it",
                dest.vm_name
            )));
        }
        if existing.metadata.deletion_timestamp.is_none() {
            vms.delete(&dest.vm_name, &DeleteParams::default()).await?;
        }
        return Ok(Outcome::Wait(format!(
            "deleting the existing VirtualMachine {}",
            dest.vm_name
        )));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = |name: String| {
        let secrets = secrets.clone();
        async move {
            secrets
                .get_opt(&name)
                .await
                .map(|s| s.map(|s| s.data.unwrap_or_default()))
        }
    };
    let credentials = match &spec.source.credentials_secret_ref {
        Some(r) => match secret(r.name.clone()).await? {
            Some(d) => Some(d),
            None => {
                return Ok(Outcome::Fail(format!(
                    "source.credentialsSecretRef: Secret {:?} not found",
                    r.name
                )));
            }
        },
        None => None,
    };
    let destination = crate::crd::backup::S3Destination {
        type_: spec.source.type_,
        bucket: spec.source.bucket.clone(),
        prefix: None,
        region: spec.source.region.clone(),
        storage_class: None,
        endpoint: spec.source.endpoint.clone(),
        credentials_secret_ref: None,
    };
    let location = match super::location(&destination, "", credentials.as_ref()) {
        Ok(l) => l,
        Err(why) => return Ok(Outcome::Fail(why.replace("destination.", "source."))),
    };
    let encryption_key = match &spec.source.key_secret_ref {
        Some(r) => match secret(r.name.clone()).await? {
            Some(d) => match super::secret_key(&d, &r.name, r.key.as_deref()) {
                Ok(k) => k,
                Err(why) => return Ok(Outcome::Fail(format!("source.keySecretRef: {why}"))),
            },
            None => {
                return Ok(Outcome::Fail(format!(
                    "source.keySecretRef: Secret {:?} not found",
                    r.name
                )));
            }
        },
        None => Vec::new(),
    };
    let Some((node, mut client)) = pick_node(ctx, dest.node_name.as_deref()) else {
        return Ok(Outcome::Wait(match &dest.node_name {
            Some(n) => format!("destination.nodeName: agent on node {n} does not answer"),
            None => "no node is reachable and schedulable".into(),
        }));
    };
    status.node_name = Some(node.clone());
    let agent_vm = crate::nodes::spec::agent_name(&vm_ns, &dest.vm_name);
    let restored = client
        .restore_backup(pb::RestoreBackupRequest {
            source: Some(location),
            manifest_key: key.clone(),
            encryption_key,
            name: agent_vm,
        })
        .await;
    let r = match restored {
        Ok(r) => r.into_inner(),
        Err(s) => {
            return Ok(Outcome::Fail(format!(
                "restoring on node {node}: {}",
                s.message()
            )));
        }
    };
    let mut vm_spec: VirtualMachineSpec = match serde_json::from_str(&r.spec_json) {
        Ok(s) => s,
        Err(e) => {
            return Ok(Outcome::Fail(format!(
                "the backup {key} holds no VirtualMachine spec ({e}): it was not made by a BackupJob"
            )));
        }
    };
    // The restored disks in the backup's order (the root first), each on its file, then the
    // spec's others (read-only ones are not backed up).
    let mut disks = Vec::new();
    for restored in &r.disks {
        let mut d = vm_spec
            .disks
            .iter()
            .find(|d| d.name == restored.name)
            .cloned()
            .unwrap_or(crate::crd::vm::Disk {
                name: restored.name.clone(),
                size: None,
                storage_class: None,
                boot_order: None,
                path: None,
                read_only: false,
            });
        d.path = Some(restored.path.clone());
        d.size = None;
        disks.push(d);
    }
    disks.extend(
        vm_spec
            .disks
            .iter()
            .filter(|d| !r.disks.iter().any(|x| x.name == d.name))
            .cloned(),
    );
    vm_spec.disks = disks;
    vm_spec.running = spec.options.as_ref().is_some_and(|o| o.start_after_restore);
    vm_spec
        .node_selector
        .insert(NODE_LABEL.into(), node.clone());
    if let Some(class) = &dest.storage_class {
        for d in &mut vm_spec.disks {
            d.storage_class = Some(class.clone());
        }
    }
    let mut vm = VirtualMachine::new(&dest.vm_name, vm_spec);
    vm.metadata = ObjectMeta {
        name: Some(dest.vm_name.clone()),
        namespace: Some(vm_ns.clone()),
        annotations: Some([(RESTORED_BY.to_string(), format!("{ns}/{}", job.name_any()))].into()),
        ..ObjectMeta::default()
    };
    vms.create(&PostParams::default(), &vm).await?;
    info!(
        vm = dest.vm_name,
        node,
        backup = key,
        "restored into a new VirtualMachine"
    );
    Ok(Outcome::Done(format!("{vm_ns}/{}", dest.vm_name)))
}

/// Annotation on a restored VM: the RestoreJob (`namespace/name`) that made it.
pub const RESTORED_BY: &str = "hypersdk.io/restored-by";

/// The node to restore on: the one asked for, or the reachable schedulable node with the most
/// free memory.
fn pick_node(ctx: &Context, wanted: Option<&str>) -> Option<(String, crate::nodes::Client)> {
    let mut best: Option<(u64, String, crate::nodes::Client)> = None;
    for a in ctx.agents.all() {
        if wanted.is_some_and(|w| w != a.info.node) || (wanted.is_none() && a.info.unschedulable) {
            continue;
        }
        let (Some(client), Some(node)) = (a.client(), a.node()) else {
            continue;
        };
        let free = node
            .memory_total_bytes
            .saturating_sub(node.allocated_memory_bytes);
        if best
            .as_ref()
            .is_none_or(|(f, n, _)| free > *f || (free == *f && a.info.node < *n))
        {
            best = Some((free, a.info.node.clone(), client));
        }
    }
    best.map(|(_, n, c)| (n, c))
}
