//! BackupJob, RestoreJob and BackupSchedule through the in-process controller, with two real
//! agents and a real S3-compatible server (versitygw): a running VM backed up twice (the second
//! incremental), restored into a new VM on the other node that boots with the data; options
//! the seeds name but this controller does not do are refused in status; a schedule runs every
//! two seconds with Forbid and history limits, and stops when suspended.

use std::time::Duration;

use hypersdk_controller::crd::backup::{BackupJob, BackupPhase, BackupSchedule, RestoreJob};
use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{VMTemplate, VirtualMachine};
use hypersdk_tests::controller::*;
use hypersdk_tests::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use hypersdk_tests::{count_markers, disk_counters_in, eventually};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const BUCKET: &str = "vm-backups";
const JOB: Duration = Duration::from_secs(180);

fn job(name: &str, s3: &S3Server, vm: &str) -> Value {
    json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "BackupJob", "metadata": {"name": name},
        "spec": {"source": {"vmName": vm},
                 "destination": {"type": "s3", "bucket": BUCKET, "prefix": "daily", "endpoint": s3.endpoint(),
                                 "credentialsSecretRef": {"name": "s3"}},
                 "options": {"compression": true}}})
}

async fn secret(ctl: &Controller) {
    let s: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "s3"},
        "stringData": {}, "data": {
            "accessKeyId": base64(ACCESS_KEY.as_bytes()),
            "secretAccessKey": base64(SECRET_KEY.as_bytes())}}))
    .unwrap();
    Api::<Secret>::namespaced(ctl.client.clone(), "default")
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn phase_of(j: &BackupJob) -> Option<BackupPhase> {
    j.status.as_ref().and_then(|s| s.phase)
}

async fn finished(api: &Api<BackupJob>, name: &str) -> BackupJob {
    wait_for(api, name, JOB, "finished", |j| {
        phase_of(j).is_some_and(BackupPhase::finished)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_job_then_restore_job_into_a_vm_on_another_node() {
    let images = images();
    let a = start_node("a", images.path(), &[]).await;
    let b = start_node("b", images.path(), &[]).await;
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let ctl = Controller::start(&[&a, &b], settings());
    secret(&ctl).await;
    ctl.create::<VMTemplate>(guest_template(images.path()))
        .await
        .unwrap();
    ctl.create::<VirtualMachine>(small_vm("src", false, Some("a")))
        .await
        .unwrap();
    wait_for(&ctl.vms(), "src", BOOT, "Running", |vm| {
        phase(vm) == Some(VmPhase::Running)
    })
    .await;
    let src = agent_vm(&a, "src").await.unwrap();
    let log = src.status.as_ref().unwrap().serial_log.clone();
    eventually(BOOT, "the source counting", async || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("HYPERSDK-COUNTER")
            .count()
            >= 3
    })
    .await;

    let jobs: Api<BackupJob> = Api::namespaced(ctl.client.clone(), "default");
    ctl.create::<BackupJob>(job("first", &s3, "src"))
        .await
        .unwrap();
    let first = finished(&jobs, "first").await;
    let st = first.status.clone().unwrap();
    println!("first: {st:?}");
    assert_eq!(st.phase, Some(BackupPhase::Completed), "{st:?}");
    let location = st.backup_location.clone().unwrap();
    assert!(
        location.starts_with(&format!("s3://{BUCKET}/daily/backups/"))
            && location.ends_with("/first.json")
    );
    assert_eq!(st.progress.as_ref().unwrap().percent, 100);
    assert!(st.backup_size.is_some() && st.start_time.is_some() && st.completion_time.is_some());
    assert_eq!(st.incremental, Some(false));

    let before = s3.objects(BUCKET, "daily/chunks").len();
    ctl.create::<BackupJob>(job("second", &s3, "src"))
        .await
        .unwrap();
    let st = finished(&jobs, "second").await.status.unwrap();
    println!("second: {st:?}");
    assert_eq!(
        (st.phase, st.incremental),
        (Some(BackupPhase::Completed), Some(true)),
        "{st:?}"
    );
    let p = st.progress.unwrap();
    assert_eq!(
        s3.objects(BUCKET, "daily/chunks").len() - before,
        p.chunks_new as usize
    );

    // The first backup as a new VM on node b, started.
    let restore = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "RestoreJob", "metadata": {"name": "r1"},
        "spec": {"source": {"type": "s3", "bucket": BUCKET, "path": location, "endpoint": s3.endpoint(),
                            "credentialsSecretRef": {"name": "s3"}},
                 "destination": {"vmName": "copy", "nodeName": "b"},
                 "options": {"startAfterRestore": true}}});
    ctl.create::<RestoreJob>(restore).await.unwrap();
    let restores: Api<RestoreJob> = Api::namespaced(ctl.client.clone(), "default");
    let r = wait_for(&restores, "r1", JOB, "finished", |r| {
        r.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(BackupPhase::finished)
    })
    .await;
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(BackupPhase::Completed), "{rs:?}");
    assert_eq!(rs.restored_vm.as_deref(), Some("default/copy"));
    let copy = wait_for(&ctl.vms(), "copy", BOOT, "Running on b", |vm| {
        phase(vm) == Some(VmPhase::Running)
            && vm.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some("b")
    })
    .await;
    assert!(
        copy.spec.disks[0]
            .path
            .as_deref()
            .unwrap()
            .contains("/restored/")
    );
    let copy_vm = agent_vm(&b, "copy").await.unwrap();
    let copy_log = copy_vm.status.as_ref().unwrap().serial_log.clone();
    let restored = eventually(BOOT, "the copy's disk counter", async || {
        let text = std::fs::read_to_string(&copy_log).unwrap_or_default();
        disk_counters_in(&text)
            .first()
            .copied()
            .filter(|_| count_markers(&text, "HYPERSDK-GUEST-READY") >= 1)
    })
    .await;
    println!("restored VM booted with disk counter {restored}");
    assert!(
        restored >= 1,
        "the source had counted on its disk before the backup"
    );

    // What the seeds name but is not available: accepted by the schema, refused in status.
    let mut kv = job("kubevirt", &s3, "src");
    kv["spec"]["source"]["provider"] = json!("kubevirt");
    ctl.create::<BackupJob>(kv).await.unwrap();
    let mut kms = job("kms", &s3, "src");
    kms["spec"]["options"]["encryption"] = json!({"enabled": true, "kmsKeyId": "arn:aws:kms:..."});
    ctl.create::<BackupJob>(kms).await.unwrap();
    for (name, field) in [
        ("kubevirt", "source.provider: kubevirt"),
        ("kms", "options.encryption.kmsKeyId"),
    ] {
        let st = finished(&jobs, name).await.status.unwrap();
        assert_eq!(st.phase, Some(BackupPhase::Failed));
        assert!(st.message.as_deref().unwrap().starts_with(field), "{st:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_forbids_overlap_keeps_history_and_suspends() {
    let images = images();
    let a = start_node("a", images.path(), &[]).await;
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let ctl = Controller::start(&[&a], settings());
    secret(&ctl).await;
    ctl.create::<VMTemplate>(guest_template(images.path()))
        .await
        .unwrap();
    ctl.create::<VirtualMachine>(small_vm("src", false, None))
        .await
        .unwrap();
    wait_for(&ctl.vms(), "src", BOOT, "Running", |vm| {
        phase(vm) == Some(VmPhase::Running)
    })
    .await;

    // Every second (six-field cron): a backup takes longer, so Forbid skips runs.
    let sched = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "BackupSchedule", "metadata": {"name": "often"},
        "spec": {"schedule": "* * * * * *", "concurrencyPolicy": "Forbid",
                 "successfulJobsHistoryLimit": 2, "failedJobsHistoryLimit": 1,
                 "jobTemplate": {"spec": job("x", &s3, "src")["spec"].clone()}}});
    ctl.create::<BackupSchedule>(sched).await.unwrap();
    let schedules: Api<BackupSchedule> = Api::namespaced(ctl.client.clone(), "default");
    let jobs: Api<BackupJob> = Api::namespaced(ctl.client.clone(), "default");
    let mut skipped = false;
    let mut most_active = 0;
    let mut most_kept = 0;
    eventually(
        Duration::from_secs(600),
        "scheduled backups that succeed, and a skipped run",
        async || {
            let s = schedules
                .get("often")
                .await
                .unwrap()
                .status
                .unwrap_or_default();
            skipped |= s.message.as_deref().is_some_and(|m| m.contains("Forbid"));
            most_active = most_active.max(s.active.len());
            let all = jobs.list(&ListParams::default()).await.unwrap().items;
            let done = all
                .iter()
                .filter(|j| phase_of(j) == Some(BackupPhase::Completed))
                .count();
            most_kept = most_kept.max(done);
            let names: Vec<String> = all
                .iter()
                .map(|j| j.metadata.name.clone().unwrap())
                .collect();
            (s.last_successful_time.is_some() && names.len() >= 2 && skipped)
                .then_some(())
                .ok_or(format!("{s:?} {names:?}"))
        },
    )
    .await;
    assert!(
        most_active <= 1,
        "Forbid: at most one job at a time, saw {most_active}"
    );
    assert!(
        most_kept <= 2 + 1,
        "history limit 2 (one more may finish before the next pass)"
    );

    // Suspended: no job is created after the running one ends.
    schedules
        .patch(
            "often",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .unwrap();
    let s = wait_for(
        &schedules,
        "often",
        JOB,
        "suspended, nothing running",
        |s| {
            s.status.as_ref().is_some_and(|st| {
                st.message.as_deref() == Some("suspended") && st.active.is_empty()
            })
        },
    )
    .await;
    let last = s.status.unwrap().last_schedule_time;
    let count = jobs.list(&ListParams::default()).await.unwrap().items.len();
    // What is tested is that time passes without a run: three schedule times go by.
    tokio::time::sleep(Duration::from_secs(3)).await;
    schedules
        .patch(
            "often",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .unwrap();
    let s = wait_for(&schedules, "often", JOB, "still suspended", |s| {
        s.status
            .as_ref()
            .is_some_and(|st| st.message.as_deref() == Some("suspended"))
    })
    .await;
    assert_eq!(s.status.unwrap().last_schedule_time, last);
    let all = jobs.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all.len(), count);
    let kept: Vec<_> = all
        .iter()
        .map(|j| (j.metadata.name.clone().unwrap(), phase_of(j)))
        .collect();
    println!(
        "jobs kept after suspension: {kept:?} (at most one active seen, a run skipped under Forbid)"
    );
    let completed = kept
        .iter()
        .filter(|(_, p)| *p == Some(BackupPhase::Completed))
        .count();
    assert!(completed <= 2, "successfulJobsHistoryLimit 2: {kept:?}");
}
