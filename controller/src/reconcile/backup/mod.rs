//! BackupJob, BackupSchedule and RestoreJob. The agent on the VM's node does the work (reads
//! the disks, talks to S3); these reconcilers resolve what the objects name (VMs, Secrets,
//! nodes), start it, follow its progress into status, and schedule jobs.
//!
//! This file holds the pure parts: what is not supported, the S3 location and keys from the
//! Secrets, sizes as quantities, the schedule's decisions and the jobs' history.

pub mod job;
pub mod restore;
pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use hypersdk_proto::agent::v1 as pb;
use k8s_openapi::ByteString;

use crate::crd::backup::{
    BackupJobSpec, BackupRetention, ConcurrencyPolicy, Provider, S3Destination, StorageType,
};

/// Label on the BackupJobs a BackupSchedule creates: the schedule's name.
pub const SCHEDULE_LABEL: &str = "hypersdk.io/backup-schedule";

/// What the seeds describe but this controller does not do, said the way status reports it;
/// None when the job can run.
pub fn unsupported(spec: &BackupJobSpec) -> Option<String> {
    if spec.source.provider != Provider::Hypersdk {
        let p = serde_json::to_value(spec.source.provider).unwrap_or_default();
        return Some(format!(
            "source.provider: {} is not available; only hypersdk (this project's VirtualMachines) can be backed up",
            p.as_str().unwrap_or("?")
        ));
    }
    if spec.source.vm_name.is_none() && spec.source.vm_selector.is_none() {
        return Some("source: vmName or vmSelector is required for provider hypersdk".into());
    }
    if spec.destination.type_ != StorageType::S3 {
        return Some("destination.type: only s3 is available".into());
    }
    let options = spec.options.clone().unwrap_or_default();
    if options.include_memory {
        return Some(
            "options.includeMemory: backups hold disks only; use a VMSnapshot with includeMemory for memory state".into(),
        );
    }
    if let Some(e) = options.encryption.filter(|e| e.enabled) {
        if e.kms_key_id.is_some() {
            return Some(
                "options.encryption.kmsKeyId: KMS keys are not supported; give the key in a Secret with keySecretRef".into(),
            );
        }
        if e.key_secret_ref.is_none() {
            return Some(
                "options.encryption.keySecretRef: encryption needs the key's Secret".into(),
            );
        }
    }
    None
}

/// The S3 location the agent writes to, with the credentials from the Secret's data
/// (`accessKeyId`/`secretAccessKey`, or the AWS environment names).
pub fn location(
    d: &S3Destination,
    prefix: &str,
    credentials: Option<&BTreeMap<String, ByteString>>,
) -> Result<pb::S3Location, String> {
    let get = |names: &[&str]| {
        credentials.and_then(|data| {
            names
                .iter()
                .find_map(|n| data.get(*n))
                .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
        })
    };
    let access = get(&["accessKeyId", "AWS_ACCESS_KEY_ID"]);
    let secret = get(&["secretAccessKey", "AWS_SECRET_ACCESS_KEY"]);
    if credentials.is_some() && (access.is_none() || secret.is_none()) {
        return Err(
            "destination.credentialsSecretRef: the Secret needs accessKeyId and secretAccessKey"
                .into(),
        );
    }
    Ok(pb::S3Location {
        endpoint: d.endpoint.clone().unwrap_or_default(),
        region: d.region.clone().unwrap_or_default(),
        bucket: d.bucket.clone(),
        prefix: prefix.to_string(),
        access_key_id: access.unwrap_or_default(),
        secret_access_key: secret.unwrap_or_default(),
        storage_class: d.storage_class.clone().unwrap_or_default(),
    })
}

/// The encryption key from a Secret's data entry `key` (the default entry name is `key`).
pub fn secret_key(
    data: &BTreeMap<String, ByteString>,
    name: &str,
    key: Option<&str>,
) -> Result<Vec<u8>, String> {
    let entry = key.unwrap_or("key");
    data.get(entry)
        .map(|v| v.0.clone())
        .ok_or_else(|| format!("Secret {name} has no {entry:?} entry"))
}

pub fn retention(r: Option<&BackupRetention>) -> Option<pb::BackupRetention> {
    r.map(|r| pb::BackupRetention {
        keep_last: r.keep_last.unwrap_or(0),
        keep_daily: r.keep_daily.unwrap_or(0),
        keep_weekly: r.keep_weekly.unwrap_or(0),
        keep_monthly: r.keep_monthly.unwrap_or(0),
    })
}

/// Bytes as a Kubernetes quantity, as the seeds write sizes ("45Gi", "1.5Gi", "300Mi").
pub fn quantity(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    let s = format!("{v:.1}");
    let s = s.trim_end_matches(".0");
    format!("{s}{}", UNITS[unit])
}

/// A RestoreJob's `source.path` as a manifest key: `backupLocation` (`s3://bucket/key`) or the
/// key itself.
pub fn manifest_key(bucket: &str, path: &str) -> Result<String, String> {
    let key = path
        .strip_prefix(&format!("s3://{bucket}/"))
        .unwrap_or(path)
        .trim_start_matches('/');
    if key.ends_with(".json") && (key.starts_with("backups/") || key.contains("/backups/")) {
        Ok(key.to_string())
    } else {
        Err(format!(
            "source.path: {path:?} is not a backup manifest (a BackupJob's status.backupLocation, …/backups/<vm>/<id>.json)"
        ))
    }
}

/// What a schedule does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing due; look again at this time.
    Wait(DateTime<Utc>),
    /// Create the job for the run due at this time (the latest due, as a CronJob does), after
    /// deleting `replace` (Replace policy).
    Run {
        at: DateTime<Utc>,
        replace: Vec<String>,
    },
    /// A run was due but the previous job still runs (Forbid): skipped, recorded as scheduled.
    Skip { at: DateTime<Utc>, running: String },
}

/// The schedule's parsed cron (five fields, or six with seconds).
pub fn cron(schedule: &str) -> Result<croner::Cron, String> {
    croner::Cron::new(schedule)
        .with_seconds_optional()
        .parse()
        .map_err(|e| format!("schedule: {schedule:?} is not a cron expression: {e}"))
}

/// What to do at `now`, the last run having been scheduled at `last` (or the schedule created
/// then), with `active` jobs still running.
pub fn decide(
    cron: &croner::Cron,
    last: DateTime<Utc>,
    now: DateTime<Utc>,
    policy: ConcurrencyPolicy,
    active: &[String],
) -> Result<Decision, String> {
    let next = |t: &DateTime<Utc>| {
        cron.find_next_occurrence(t, false)
            .map_err(|e| format!("schedule: no next run: {e}"))
    };
    let mut due = None;
    let mut t = next(&last)?;
    // The latest run due (runs missed meanwhile are not made up, as with CronJob).
    while t <= now {
        due = Some(t);
        t = next(&t)?;
    }
    let Some(at) = due else {
        return Ok(Decision::Wait(t));
    };
    Ok(match (policy, active.first()) {
        (ConcurrencyPolicy::Forbid, Some(running)) => Decision::Skip {
            at,
            running: running.clone(),
        },
        (ConcurrencyPolicy::Replace, _) => Decision::Run {
            at,
            replace: active.to_vec(),
        },
        _ => Decision::Run {
            at,
            replace: Vec::new(),
        },
    })
}

/// The name of a schedule's job for the run at `at`: unique per run (schedules may have seconds),
/// so a pass that created it but lost its status finds it again.
pub fn job_name(schedule: &str, at: DateTime<Utc>) -> String {
    let mut base = schedule.to_string();
    base.truncate(50);
    format!("{base}-{}", at.timestamp())
}

/// Finished jobs beyond the history limits, to delete: of `finished` (name, succeeded,
/// completion time), all but the newest `keep_ok` successes and `keep_failed` failures.
pub fn beyond_history(
    finished: &[(String, bool, i64)],
    keep_ok: usize,
    keep_failed: usize,
) -> Vec<String> {
    let mut sorted: Vec<_> = finished.iter().collect();
    sorted.sort_by(|a, b| b.2.cmp(&a.2).then(b.0.cmp(&a.0)));
    let mut kept: HashMap<bool, usize> = HashMap::new();
    let mut out = Vec::new();
    for (name, ok, _) in sorted {
        let n = kept.entry(*ok).or_default();
        let limit = if *ok { keep_ok } else { keep_failed };
        if *n < limit {
            *n += 1;
        } else {
            out.push(name.clone());
        }
    }
    out.sort();
    out
}

/// The backups this controller runs, by `namespace/name`: their progress is followed by a task
/// of this process, which ends with them.
#[derive(Default)]
pub struct Running(Mutex<HashMap<String, tokio::task::AbortHandle>>);

impl Running {
    pub fn contains(&self, key: &str) -> bool {
        let mut m = self.0.lock().expect("running backups");
        m.retain(|_, h| !h.is_finished());
        m.contains_key(key)
    }
    pub fn insert(&self, key: String, handle: tokio::task::AbortHandle) {
        self.0.lock().expect("running backups").insert(key, handle);
    }
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Running(..)")
    }
}

#[cfg(test)]
mod tests;
