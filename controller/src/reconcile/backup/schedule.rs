//! BackupSchedule: creates a BackupJob from `jobTemplate` at each time `schedule` (cron, UTC)
//! names, as a Kubernetes CronJob does: `concurrencyPolicy` (Allow, Forbid: skip while one
//! runs, Replace: delete the running one first), `suspend`, and history limits on the finished
//! jobs it keeps. Its jobs carry its label and are owned by it; status says when it last ran,
//! when a job last succeeded, and which run now.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::info;

use super::{Decision, SCHEDULE_LABEL, beyond_history, cron, decide, job_name};
use crate::context::Context;
use crate::crd::backup::{BackupJob, BackupPhase, BackupSchedule, JobReference};
use crate::error::Result;

/// Longest wait between looks (the jobs' progress also wakes the schedule).
const MAX_WAIT: Duration = Duration::from_secs(300);

#[tracing::instrument(skip_all, fields(schedule = %s.name_any(), ns = s.namespace().unwrap_or_default()))]
pub async fn reconcile(s: Arc<BackupSchedule>, ctx: Arc<Context>) -> Result<Action> {
    let ns = super::super::namespace(s.as_ref())?;
    let api: Api<BackupSchedule> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs: Api<BackupJob> = Api::namespaced(ctx.client.clone(), &ns);
    let name = s.name_any();
    let old = s.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let mine = jobs
        .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={name}")))
        .await?
        .items;
    let finished = |j: &BackupJob| {
        j.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(BackupPhase::finished)
    };
    let mut active: Vec<String> = mine
        .iter()
        .filter(|j| !finished(j))
        .map(ResourceExt::name_any)
        .collect();
    active.sort();
    let completed = |j: &BackupJob| j.status.as_ref().and_then(|s| s.completion_time.clone());
    status.last_successful_time = mine
        .iter()
        .filter(|j| j.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed))
        .filter_map(completed)
        .max_by_key(|t| t.0)
        .or(status.last_successful_time.take());
    // History: finished jobs beyond the limits go.
    let history: Vec<(String, bool, i64)> = mine
        .iter()
        .filter(|j| finished(j))
        .map(|j| {
            let ok = j.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed);
            let at = completed(j).map_or(0, |t| t.0.as_millisecond());
            (j.name_any(), ok, at)
        })
        .collect();
    let keep_ok = s.spec.successful_jobs_history_limit.unwrap_or(3) as usize;
    let keep_failed = s.spec.failed_jobs_history_limit.unwrap_or(1) as usize;
    for old_job in beyond_history(&history, keep_ok, keep_failed) {
        jobs.delete(&old_job, &DeleteParams::background()).await?;
    }

    let mut wait = MAX_WAIT;
    if s.spec.suspend {
        status.message = Some("suspended".into());
    } else {
        match cron(&s.spec.schedule) {
            Err(why) => status.message = Some(why),
            Ok(c) => {
                let now = Utc::now();
                let last = status
                    .last_schedule_time
                    .as_ref()
                    .or(s.meta().creation_timestamp.as_ref())
                    .map_or(now, |t| to_chrono(&t.0));
                match decide(&c, last, now, s.spec.concurrency_policy, &active) {
                    Err(why) => status.message = Some(why),
                    Ok(Decision::Wait(next)) => {
                        status.message = None;
                        wait = until(next, now).min(MAX_WAIT);
                    }
                    Ok(Decision::Skip { at, running }) => {
                        status.message = Some(format!(
                            "skipped the run at {at}: {running} still runs (concurrencyPolicy Forbid)"
                        ));
                        status.last_schedule_time = Some(Time(from_chrono(at)));
                        wait = Duration::from_secs(1);
                    }
                    Ok(Decision::Run { at, replace }) => {
                        for j in &replace {
                            jobs.delete(j, &DeleteParams::background()).await?;
                            active.retain(|a| a != j);
                        }
                        let job = create(&jobs, &s, &ns, at).await?;
                        if !active.contains(&job) {
                            active.push(job);
                        }
                        status.message = None;
                        status.last_schedule_time = Some(Time(from_chrono(at)));
                        wait = Duration::from_secs(1);
                    }
                }
            }
        }
    }
    status.active = active
        .into_iter()
        .map(|name| JobReference {
            name,
            namespace: Some(ns.clone()),
        })
        .collect();
    super::super::write_status(&api, &name, Some(&old), &status).await?;
    Ok(Action::requeue(wait))
}

/// Creates the job for the run at `at` (already there after a pass whose status was lost: kept).
async fn create(
    jobs: &Api<BackupJob>,
    s: &BackupSchedule,
    ns: &str,
    at: DateTime<Utc>,
) -> Result<String> {
    let name = job_name(&s.name_any(), at);
    let mut job = BackupJob::new(&name, s.spec.job_template.spec.clone());
    job.metadata = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(ns.to_string()),
        labels: Some([(SCHEDULE_LABEL.to_string(), s.name_any())].into()),
        owner_references: s.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    };
    match jobs.create(&PostParams::default(), &job).await {
        Ok(_) => info!(job = name, "scheduled backup created"),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(name)
}

fn to_chrono(t: &Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.as_millisecond()).unwrap_or_default()
}

fn from_chrono(t: DateTime<Utc>) -> Timestamp {
    Timestamp::from_millisecond(t.timestamp_millis()).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn until(t: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (t - now).to_std().unwrap_or_default() + Duration::from_millis(50)
}
