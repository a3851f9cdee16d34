//! The CRDs in deploy/crds match the Rust types, are structural, and accept every example
//! manifest (the user's seeds, unchanged) while refusing bad ones with the field named.

use std::path::{Path, PathBuf};

use hypersdk_controller::crd::{
    self, BackupJobSpec, BackupScheduleSpec, RestoreJobSpec, VMOperationSpec, VMSnapshotSpec,
    VMTemplateSpec, VirtualMachineSpec,
};
use hypersdk_controller::standalone::parse_documents;
use hypersdk_controller::standalone::schema::{self, openapi_schema};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn schema_of(kind: &str) -> Value {
    let crd = crd::all()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    openapi_schema(&crd)
}

#[test]
fn deploy_crds_match_the_types() {
    let dir = repo().join("deploy/crds");
    let fix = "regenerate with `cargo run -p hypersdk-controller -- crds`";
    let rendered = crd::render();
    for (file, yaml) in &rendered {
        let on_disk = std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("deploy/crds/{file}: {e}; {fix}"));
        assert!(
            on_disk == *yaml,
            "deploy/crds/{file} differs from the Rust types; {fix}"
        );
    }
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        files,
        rendered.len(),
        "deploy/crds has files no type generates; {fix}"
    );
}

#[test]
fn crds_are_structural_with_names_columns_and_status() {
    let short: Vec<_> = crd::all()
        .iter()
        .map(|c| c.spec.names.short_names.clone().unwrap()[0].clone())
        .collect();
    assert_eq!(
        short,
        [
            "vm",
            "vmop",
            "vmsnap",
            "vmtpl",
            "vmbackup",
            "vmbackupsched",
            "vmrestore"
        ]
    );
    for c in crd::all() {
        let kind = &c.spec.names.kind;
        assert_eq!(
            (c.spec.group.as_str(), c.spec.versions[0].name.as_str()),
            ("hypersdk.io", "v1alpha1")
        );
        let problems = schema::structural_problems(&openapi_schema(&c));
        assert!(
            problems.is_empty(),
            "{kind} schema is not structural: {problems:#?}"
        );
        let v = &c.spec.versions[0];
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind} has no status subresource"
        );
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| c.len() >= 3),
            "{kind} printer columns"
        );
    }
    let vm = crd::all().remove(0);
    let columns: Vec<_> = vm.spec.versions[0]
        .additional_printer_columns
        .clone()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(columns, ["Phase", "Node", "CPUs", "Memory", "Age"]);
}

/// Deserialises the document's spec with the Rust type of its kind.
fn typed_spec(kind: &str, spec: &Value) -> Result<(), serde_json::Error> {
    let spec = spec.clone();
    match kind {
        "VirtualMachine" => serde_json::from_value::<VirtualMachineSpec>(spec).map(drop),
        "VMOperation" => serde_json::from_value::<VMOperationSpec>(spec).map(drop),
        "VMSnapshot" => serde_json::from_value::<VMSnapshotSpec>(spec).map(drop),
        "VMTemplate" => serde_json::from_value::<VMTemplateSpec>(spec).map(drop),
        "BackupJob" => serde_json::from_value::<BackupJobSpec>(spec).map(drop),
        "BackupSchedule" => serde_json::from_value::<BackupScheduleSpec>(spec).map(drop),
        "RestoreJob" => serde_json::from_value::<RestoreJobSpec>(spec).map(drop),
        other => panic!("example of unknown kind {other}"),
    }
}

#[test]
fn every_example_fits_the_types_and_the_schema() {
    let dir = repo().join("deploy/examples");
    let mut kinds = std::collections::BTreeSet::new();
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let docs = parse_documents(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap().to_string();
            assert_eq!(
                doc["apiVersion"],
                "hypersdk.io/v1alpha1",
                "{}",
                path.display()
            );
            typed_spec(&kind, &doc["spec"]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let problems = schema::Schema::new(schema_of(&kind)).validate(&doc, None);
            assert!(problems.is_empty(), "{}: {problems:?}", path.display());
            kinds.insert(kind);
            count += 1;
        }
    }
    assert!(count >= 6, "examples missing: {count}");
    assert_eq!(kinds.len(), 7);
}

fn vm(spec: Value) -> Value {
    json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VirtualMachine", "metadata": {"name": "v"}, "spec": spec})
}

fn problems(kind: &str, obj: &Value) -> Vec<String> {
    schema::Schema::new(schema_of(kind))
        .validate(obj, None)
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn bad_manifests_are_refused_naming_the_field() {
    let tpl = json!({"templateRef": {"name": "t"}});
    assert_eq!(
        problems(
            "VirtualMachine",
            &vm(json!({"memory": "1Gi", "image": tpl}))
        ),
        ["spec.cpus: Required value"]
    );
    let p = problems(
        "VirtualMachine",
        &vm(json!({"cpus": 1, "memory": "8XB", "image": tpl})),
    );
    assert_eq!(p.len(), 1);
    assert!(
        p[0].starts_with("spec.memory: \"8XB\" does not match"),
        "{p:?}"
    );
    assert_eq!(
        problems(
            "VirtualMachine",
            &vm(json!({"cpus": 0, "memory": "1Gi", "image": tpl}))
        ),
        ["spec.cpus: must be at least 1"]
    );
    assert_eq!(
        problems(
            "VirtualMachine",
            &vm(json!({"cpus": 1, "memory": "1Gi", "image": tpl, "cpu": 2}))
        ),
        ["spec.cpu: unknown field"]
    );
    assert_eq!(
        problems(
            "VirtualMachine",
            &vm(
                json!({"cpus": 1, "memory": "1Gi", "image": tpl, "networks": [{"name": "n", "type": "bridge"}]})
            )
        ),
        ["spec.networks[0].type: \"bridge\" is not one of \"pod-network\", \"user\""]
    );
    // Rules across fields (CEL).
    let p = problems(
        "VirtualMachine",
        &vm(json!({"cpus": 4, "maxCpus": 2, "memory": "1Gi", "image": tpl})),
    );
    assert!(
        p.iter()
            .any(|m| m.contains("maxCpus must be at least cpus")),
        "{p:?}"
    );
    let p = problems(
        "VirtualMachine",
        &vm(json!({"cpus": 1, "memory": "2Gi", "maxMemory": "1Gi", "image": tpl})),
    );
    assert!(
        p.iter()
            .any(|m| m.contains("maxMemory must be at least memory")),
        "{p:?}"
    );
    let p = problems("VirtualMachine", &vm(json!({"cpus": 1, "memory": "1Gi"})));
    assert!(
        p.iter()
            .any(|m| m.contains("image.templateRef or boot.kernel")),
        "{p:?}"
    );
    let op = |spec: Value| json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VMOperation", "metadata": {"name": "o"}, "spec": spec});
    let p = problems(
        "VMOperation",
        &op(json!({"vmRef": {"name": "v"}, "operation": "resize"})),
    );
    assert!(
        p.iter().any(|m| m.contains("resize needs resizeSpec")),
        "{p:?}"
    );
    assert_eq!(
        problems(
            "VMOperation",
            &op(json!({"vmRef": {"name": "v"}, "operation": "teleport"}))
        ),
        [
            "spec.operation: \"teleport\" is not one of \"start\", \"stop\", \"restart\", \"pause\", \"resume\", \"clone\", \"migrate\", \"resize\", \"snapshot\", \"restore\""
        ]
    );
    let p = problems(
        "VMOperation",
        &op(
            json!({"vmRef": {"name": "v"}, "operation": "migrate", "migrateSpec": {"bandwidth": "fast"}}),
        ),
    );
    assert!(p[0].starts_with("spec.migrateSpec.bandwidth: "), "{p:?}");
}

#[test]
fn bad_backup_manifests_are_refused_naming_the_field() {
    let job = |spec: Value| json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "BackupJob", "metadata": {"name": "b"}, "spec": spec});
    let dest = json!({"type": "s3", "bucket": "backups"});
    let p = problems(
        "BackupJob",
        &job(json!({"source": {"namespace": "default"}, "destination": dest})),
    );
    assert!(
        p.iter()
            .any(|m| m.contains("source needs vmName or vmSelector")),
        "{p:?}"
    );
    assert_eq!(
        problems(
            "BackupJob",
            &job(
                json!({"source": {"vmName": "v"}, "destination": {"type": "gcs", "bucket": "backups"}})
            )
        ),
        ["spec.destination.type: \"gcs\" is not one of \"s3\""]
    );
    let p = problems(
        "BackupJob",
        &job(json!({"source": {"vmName": "v"}, "destination": {"bucket": "Bad_Bucket"}})),
    );
    assert!(p[0].starts_with("spec.destination.bucket: "), "{p:?}");
    assert_eq!(
        problems(
            "BackupJob",
            &job(
                json!({"source": {"vmName": "v"}, "destination": dest, "retention": {"keepLast": 0}})
            )
        ),
        ["spec.retention.keepLast: must be at least 1"]
    );
    let sched = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "BackupSchedule", "metadata": {"name": "s"},
        "spec": {"schedule": "* * * * *", "concurrencyPolicy": "Sometimes",
                 "jobTemplate": {"spec": {"source": {"vmName": "v"}, "destination": dest}}}});
    assert_eq!(
        problems("BackupSchedule", &sched),
        ["spec.concurrencyPolicy: \"Sometimes\" is not one of \"Allow\", \"Forbid\", \"Replace\""]
    );
    let restore = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "RestoreJob", "metadata": {"name": "r"},
        "spec": {"source": {"bucket": "backups", "path": "p"}, "destination": {}}});
    assert_eq!(
        problems("RestoreJob", &restore),
        ["spec.destination.vmName: Required value"]
    );
}
