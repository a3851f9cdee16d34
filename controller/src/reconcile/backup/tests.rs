use super::*;
use chrono::TimeZone;
use serde_json::json;

fn spec(v: serde_json::Value) -> BackupJobSpec {
    serde_json::from_value(v).unwrap()
}

fn base() -> serde_json::Value {
    json!({"source": {"vmName": "v"}, "destination": {"type": "s3", "bucket": "b"}})
}

#[test]
fn unsupported_options_are_named() {
    assert_eq!(unsupported(&spec(base())), None);
    let mut v = base();
    v["source"]["provider"] = json!("kubevirt");
    let why = unsupported(&spec(v)).unwrap();
    assert!(
        why.starts_with("source.provider: kubevirt is not available"),
        "{why}"
    );
    let mut v = base();
    v["options"] = json!({"encryption": {"enabled": true, "kmsKeyId": "arn:aws:kms:..."}});
    assert!(
        unsupported(&spec(v))
            .unwrap()
            .starts_with("options.encryption.kmsKeyId: ")
    );
    let mut v = base();
    v["options"] = json!({"encryption": {"enabled": true}});
    assert!(
        unsupported(&spec(v))
            .unwrap()
            .starts_with("options.encryption.keySecretRef: ")
    );
    let mut v = base();
    v["options"] = json!({"encryption": {"enabled": true, "keySecretRef": {"name": "k"}}});
    assert_eq!(unsupported(&spec(v)), None);
    let mut v = base();
    v["options"] = json!({"includeMemory": true});
    assert!(
        unsupported(&spec(v))
            .unwrap()
            .starts_with("options.includeMemory: ")
    );
}

#[test]
fn location_takes_credentials_from_the_secret() {
    let d: S3Destination = serde_json::from_value(
        json!({"bucket": "b", "endpoint": "http://127.0.0.1:1", "region": "r", "storageClass": "STANDARD_IA"}),
    )
    .unwrap();
    let mut data = BTreeMap::new();
    data.insert("accessKeyId".to_string(), ByteString(b"ak".to_vec()));
    data.insert("secretAccessKey".to_string(), ByteString(b"sk\n".to_vec()));
    let l = location(&d, "p", Some(&data)).unwrap();
    assert_eq!(
        (
            l.access_key_id.as_str(),
            l.secret_access_key.as_str(),
            l.prefix.as_str()
        ),
        ("ak", "sk", "p")
    );
    assert_eq!(l.storage_class, "STANDARD_IA");
    data.remove("secretAccessKey");
    assert!(
        location(&d, "p", Some(&data))
            .unwrap_err()
            .contains("secretAccessKey")
    );
    assert_eq!(location(&d, "", None).unwrap().access_key_id, "");
    let mut k = BTreeMap::new();
    k.insert("key".to_string(), ByteString(vec![1; 32]));
    assert_eq!(secret_key(&k, "s", None).unwrap().len(), 32);
    assert!(
        secret_key(&k, "s", Some("other"))
            .unwrap_err()
            .contains("\"other\"")
    );
}

#[test]
fn sizes_and_manifest_keys() {
    assert_eq!(quantity(0), "0");
    assert_eq!(quantity(512), "512");
    assert_eq!(quantity(300 << 20), "300Mi");
    assert_eq!(quantity(45 << 30), "45Gi");
    assert_eq!(quantity(3 << 29), "1.5Gi");
    assert_eq!(
        manifest_key("b", "s3://b/daily/backups/vm/x.json").unwrap(),
        "daily/backups/vm/x.json"
    );
    assert_eq!(
        manifest_key("b", "backups/vm/x.json").unwrap(),
        "backups/vm/x.json"
    );
    // The seed's path names a qcow2 file, not a backup of this repository.
    let e = manifest_key("my-backups", "kubevirt/daily/ubuntu-vm-1-20260204.qcow2").unwrap_err();
    assert!(e.starts_with("source.path: "), "{e}");
}

fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 4, h, m, s).unwrap()
}

#[test]
fn schedule_runs_when_due_with_the_concurrency_policy() {
    let every_minute = cron("* * * * *").unwrap();
    // Not due yet.
    assert_eq!(
        decide(
            &every_minute,
            t(10, 0, 0),
            t(10, 0, 30),
            ConcurrencyPolicy::Allow,
            &[]
        )
        .unwrap(),
        Decision::Wait(t(10, 1, 0))
    );
    // Due: one run for the latest time due, missed ones are not made up.
    assert_eq!(
        decide(
            &every_minute,
            t(10, 0, 0),
            t(10, 3, 10),
            ConcurrencyPolicy::Allow,
            &["j".into()]
        )
        .unwrap(),
        Decision::Run {
            at: t(10, 3, 0),
            replace: vec![]
        }
    );
    assert_eq!(
        decide(
            &every_minute,
            t(10, 0, 0),
            t(10, 1, 0),
            ConcurrencyPolicy::Forbid,
            &["j".into()]
        )
        .unwrap(),
        Decision::Skip {
            at: t(10, 1, 0),
            running: "j".into()
        }
    );
    assert_eq!(
        decide(
            &every_minute,
            t(10, 0, 0),
            t(10, 1, 0),
            ConcurrencyPolicy::Forbid,
            &[]
        )
        .unwrap(),
        Decision::Run {
            at: t(10, 1, 0),
            replace: vec![]
        }
    );
    assert_eq!(
        decide(
            &every_minute,
            t(10, 0, 0),
            t(10, 1, 0),
            ConcurrencyPolicy::Replace,
            &["j".into()]
        )
        .unwrap(),
        Decision::Run {
            at: t(10, 1, 0),
            replace: vec!["j".into()]
        }
    );
    let nightly = cron("0 2 * * *").unwrap();
    assert_eq!(
        decide(
            &nightly,
            t(10, 0, 0),
            t(10, 5, 0),
            ConcurrencyPolicy::Allow,
            &[]
        )
        .unwrap(),
        Decision::Wait(Utc.with_ymd_and_hms(2026, 2, 5, 2, 0, 0).unwrap())
    );
    assert!(cron("every day").unwrap_err().starts_with("schedule: "));
    assert_eq!(
        job_name("nightly-backup", t(2, 0, 0)),
        "nightly-backup-1770170400"
    );
}

#[test]
fn history_limits_keep_the_newest() {
    let jobs = vec![
        ("a".to_string(), true, 1),
        ("b".to_string(), true, 2),
        ("c".to_string(), false, 3),
        ("d".to_string(), true, 4),
        ("e".to_string(), false, 5),
    ];
    assert_eq!(beyond_history(&jobs, 2, 1), ["a", "c"]);
    assert_eq!(beyond_history(&jobs, 0, 0), ["a", "b", "c", "d", "e"]);
    assert!(beyond_history(&jobs, 3, 2).is_empty());
}
