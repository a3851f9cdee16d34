//! BackupJob: checks what the job asks for, resolves its VMs, Secrets and nodes, then has each
//! VM's agent back it up (BackupVm), following the progress into status: phase, progress,
//! backupSize, backupLocation, whether it was incremental and if not why. A job runs once;
//! Completed and Failed are final. With carbonAware, the job waits (up to maxDelayHours) for
//! its node's carbon intensity to be at most maxIntensity, saying so in status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hypersdk_proto::agent::v1 as pb;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{Instrument, info, warn};

use crate::context::Context;
use crate::crd::VirtualMachine;
use crate::crd::backup::{BackupJob, BackupJobStatus, BackupPhase, BackupProgress};
use crate::error::Result;
use crate::nodes::Client;
use crate::nodes::spec::agent_name;

/// How often a waiting job looks again (its VM's node, carbon intensity).
const RETRY: Duration = Duration::from_secs(30);

#[tracing::instrument(skip_all, fields(backup = %job.name_any(), ns = job.namespace().unwrap_or_default()))]
pub async fn reconcile(job: Arc<BackupJob>, ctx: Arc<Context>) -> Result<Action> {
    let ns = super::super::namespace(job.as_ref())?;
    let api: Api<BackupJob> = Api::namespaced(ctx.client.clone(), &ns);
    let name = job.name_any();
    let old = job.status.clone().unwrap_or_default();
    if old.phase.is_some_and(BackupPhase::finished) {
        return Ok(Action::await_change());
    }
    let key = format!("{ns}/{name}");
    if ctx.backups.contains(&key) {
        return Ok(Action::await_change());
    }
    let mut status = old.clone();
    if old.phase == Some(BackupPhase::Running) {
        // Its progress was followed by a controller that is gone; the agent may have finished
        // it, but nothing here can tell what it wrote.
        fail(
            &mut status,
            "the controller restarted while the backup ran; create a new BackupJob to back up again",
        );
        super::super::write_status(&api, &name, Some(&old), &status).await?;
        return Ok(Action::await_change());
    }
    match prepare(&job, &ns, &ctx).await? {
        Prepared::Fail(why) => {
            fail(&mut status, &why);
            super::super::write_status(&api, &name, Some(&old), &status).await?;
            Ok(Action::await_change())
        }
        Prepared::Wait(why) => {
            status.phase = Some(BackupPhase::Pending);
            status.message = Some(why);
            super::super::write_status(&api, &name, Some(&old), &status).await?;
            Ok(Action::requeue(RETRY))
        }
        Prepared::Go(runs) => {
            status.phase = Some(BackupPhase::Running);
            status.start_time = Some(Time(Timestamp::now()));
            status.message = None;
            status.progress = Some(BackupProgress::default());
            super::super::write_status(&api, &name, Some(&old), &status).await?;
            let span = tracing::info_span!("backup-run", backup = %name, ns = %ns);
            let task = tokio::spawn(run(api.clone(), name, status, runs).instrument(span));
            ctx.backups.insert(key, task.abort_handle());
            Ok(Action::await_change())
        }
    }
}

fn fail(status: &mut BackupJobStatus, why: &str) {
    status.phase = Some(BackupPhase::Failed);
    status.message = Some(why.to_string());
    status.completion_time = Some(Time(Timestamp::now()));
}

/// One VM to back up: its agent and the request.
struct Run {
    node: String,
    client: Client,
    request: pb::BackupVmRequest,
}

enum Prepared {
    Go(Vec<Run>),
    Wait(String),
    Fail(String),
}

async fn prepare(job: &BackupJob, ns: &str, ctx: &Context) -> Result<Prepared> {
    let spec = &job.spec;
    if let Some(why) = super::unsupported(spec) {
        return Ok(Prepared::Fail(why));
    }
    let vm_ns = spec
        .source
        .namespace
        .clone()
        .unwrap_or_else(|| ns.to_string());
    let vms_api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &vm_ns);
    let vms = match (&spec.source.vm_name, &spec.source.vm_selector) {
        (Some(name), _) => match vms_api.get_opt(name).await? {
            Some(vm) => vec![vm],
            None => {
                return Ok(Prepared::Fail(format!(
                    "source.vmName: VirtualMachine {name:?} not found in namespace {vm_ns}"
                )));
            }
        },
        (None, Some(selector)) => {
            let labels = selector
                .match_labels
                .clone()
                .unwrap_or_default()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let found = vms_api
                .list(&ListParams::default().labels(&labels))
                .await?
                .items;
            if found.is_empty() {
                return Ok(Prepared::Fail(format!(
                    "source.vmSelector: no VirtualMachine in namespace {vm_ns} has labels {labels}"
                )));
            }
            found
        }
        (None, None) => unreachable!("checked by unsupported()"),
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let credentials = match &spec.destination.credentials_secret_ref {
        Some(r) => match secrets.get_opt(&r.name).await? {
            Some(s) => Some(s.data.unwrap_or_default()),
            None => {
                return Ok(Prepared::Fail(format!(
                    "destination.credentialsSecretRef: Secret {:?} not found",
                    r.name
                )));
            }
        },
        None => None,
    };
    let prefix = spec.destination.prefix.clone().unwrap_or_default();
    let destination = match super::location(&spec.destination, &prefix, credentials.as_ref()) {
        Ok(l) => l,
        Err(why) => return Ok(Prepared::Fail(why)),
    };
    let options = spec.options.clone().unwrap_or_default();
    let encryption_key = match options
        .encryption
        .filter(|e| e.enabled)
        .and_then(|e| e.key_secret_ref)
    {
        Some(r) => match secrets.get_opt(&r.name).await? {
            Some(s) => {
                match super::secret_key(&s.data.unwrap_or_default(), &r.name, r.key.as_deref()) {
                    Ok(k) => k,
                    Err(why) => {
                        return Ok(Prepared::Fail(format!(
                            "options.encryption.keySecretRef: {why}"
                        )));
                    }
                }
            }
            None => {
                return Ok(Prepared::Fail(format!(
                    "options.encryption.keySecretRef: Secret {:?} not found",
                    r.name
                )));
            }
        },
        None => Vec::new(),
    };
    let mut runs = Vec::new();
    for vm in vms {
        let vm_name = vm.name_any();
        let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) else {
            return Ok(Prepared::Wait(format!(
                "VM {vm_name} is not placed on a node yet"
            )));
        };
        let Some(agent) = ctx.agents.get(&node) else {
            return Ok(Prepared::Wait(format!("agent on node {node} is not known")));
        };
        let Some(client) = agent.client() else {
            return Ok(Prepared::Wait(format!(
                "agent on node {node} does not answer"
            )));
        };
        if let Some(why) = carbon_wait(job, agent.info.carbon_intensity) {
            return Ok(Prepared::Wait(why));
        }
        let backup_id = match runs.len() {
            0 => job.name_any(),
            n => format!("{}-{n}", job.name_any()),
        };
        runs.push(Run {
            node,
            client,
            request: pb::BackupVmRequest {
                name: agent_name(&vm_ns, &vm_name),
                destination: Some(destination.clone()),
                backup_id,
                compress: options.compression.unwrap_or(true),
                encryption_key: encryption_key.clone(),
                retention: super::retention(spec.retention.as_ref()),
                spec_json: serde_json::to_string(&vm.spec)?,
                quiesce: true,
            },
        });
    }
    Ok(Prepared::Go(runs))
}

/// With carbonAware: why the job waits, while the node's grid (the intensity the scheduler
/// uses) is above maxIntensity and the job's delay allowance (maxDelayHours since it was
/// created) lasts.
fn carbon_wait(job: &BackupJob, intensity: Option<u32>) -> Option<String> {
    let c = job.spec.carbon_aware.as_ref().filter(|c| c.enabled)?;
    let max = c.max_intensity?;
    let intensity = intensity?;
    if intensity <= max {
        return None;
    }
    let created = job.meta().creation_timestamp.as_ref()?.0;
    let deadline = created.checked_add(k8s_openapi::jiff::SignedDuration::from_hours(
        c.max_delay_hours.unwrap_or(0).into(),
    ));
    match deadline {
        Ok(d) if Timestamp::now() < d => Some(format!(
            "waiting for lower carbon intensity: {intensity} gCO2eq/kWh on the node, at most {max} asked; starting by {d} at the latest"
        )),
        _ => None,
    }
}

/// Backs up each VM in turn, writing progress and the outcome into the job's status.
async fn run(api: Api<BackupJob>, name: String, mut status: BackupJobStatus, runs: Vec<Run>) {
    let mut locations = Vec::new();
    let mut total_bytes = 0;
    let mut incremental = true;
    let mut reasons = Vec::new();
    let mut done = BackupProgress::default();
    for run in runs {
        match follow(&api, &name, &mut status, run, &done).await {
            Ok(p) => {
                locations.push(p.location.clone());
                total_bytes += p.backup_bytes;
                incremental &= p.incremental;
                if !p.full_reason.is_empty() {
                    reasons.push(format!("full read of {}", p.full_reason));
                }
                done.bytes_read += p.bytes_read;
                done.bytes_uploaded += p.bytes_uploaded;
                done.chunks_total += p.chunks_total;
                done.chunks_new += p.chunks_new;
            }
            Err(why) => {
                warn!("backup failed: {why}");
                fail(&mut status, &why);
                write(&api, &name, &status).await;
                return;
            }
        }
    }
    done.percent = 100;
    status.phase = Some(BackupPhase::Completed);
    status.completion_time = Some(Time(Timestamp::now()));
    status.backup_size = Some(super::quantity(total_bytes));
    status.backup_location = Some(locations.join(","));
    status.incremental = Some(incremental);
    status.progress = Some(done);
    status.message = (!reasons.is_empty()).then(|| reasons.join("; "));
    info!(location = status.backup_location, "backup completed");
    write(&api, &name, &status).await;
}

/// Streams one VM's backup; writes progress as the percent moves. Returns the final figures,
/// or why it failed.
async fn follow(
    api: &Api<BackupJob>,
    name: &str,
    status: &mut BackupJobStatus,
    run: Run,
    before: &BackupProgress,
) -> std::result::Result<pb::BackupProgress, String> {
    let Run {
        node,
        mut client,
        request,
    } = run;
    let vm = request.name.clone();
    let mut stream = client
        .backup_vm(request)
        .await
        .map_err(|s| format!("agent on node {node}: {}", s.message()))?
        .into_inner();
    let mut last_percent = None;
    while let Some(msg) = stream.next().await {
        let p = msg.map_err(|s| format!("backing up {vm} on node {node}: {}", s.message()))?;
        if p.done {
            return Ok(p);
        }
        let percent = (p.bytes_read * 100)
            .checked_div(p.bytes_total)
            .map_or(0, |v| v.min(99) as u32);
        if last_percent != Some(percent) {
            last_percent = Some(percent);
            status.progress = Some(BackupProgress {
                percent,
                bytes_read: before.bytes_read + p.bytes_read,
                bytes_uploaded: before.bytes_uploaded + p.bytes_uploaded,
                chunks_total: before.chunks_total + p.chunks_total,
                chunks_new: before.chunks_new + p.chunks_new,
            });
            write(api, name, status).await;
        }
    }
    Err(format!(
        "the agent on node {node} ended the backup of {vm} without a result"
    ))
}

async fn write(api: &Api<BackupJob>, name: &str, status: &BackupJobStatus) {
    if let Err(e) = super::super::write_status(api, name, None, status).await {
        warn!("writing the backup's status: {e}");
    }
}
