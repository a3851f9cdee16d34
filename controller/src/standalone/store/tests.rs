//! The store's write rules, watch log and garbage collection.

use super::*;

fn vms() -> Resource {
    ("hypersdk.io".into(), "virtualmachines".into())
}

fn store() -> Store {
    let mut s = Store::default();
    s.register_schema(
        vms(),
        "VirtualMachine".into(),
        json!({"type": "object", "properties": {
            "metadata": {"type": "object"},
            "spec": {"type": "object", "properties": {"cpus": {"type": "integer", "minimum": 1}}},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
        }}),
    );
    s
}

#[test]
fn generation_moves_with_spec_only_and_status_needs_subresource() {
    let mut s = store();
    let ns = Some("default");
    s.create(
        &vms(),
        ns,
        json!({"metadata": {"name": "a"}, "spec": {"cpus": 1}}),
    )
    .unwrap();
    let v = s
        .update(
            &vms(),
            ns,
            "a",
            true,
            Change::MergePatch(&json!({"status": {"phase": "Running"}})),
        )
        .unwrap();
    assert_eq!(v["metadata"]["generation"], 1);
    assert_eq!(v["status"]["phase"], "Running");
    let v = s
        .update(
            &vms(),
            ns,
            "a",
            false,
            Change::MergePatch(&json!({"spec": {"cpus": 2}, "status": {"phase": "X"}})),
        )
        .unwrap();
    assert_eq!(v["metadata"]["generation"], 2);
    assert_eq!(
        v["status"]["phase"], "Running",
        "status ignored on the main resource"
    );
    let e = s
        .update(
            &vms(),
            ns,
            "a",
            false,
            Change::MergePatch(&json!({"spec": {"cpus": 0}})),
        )
        .unwrap_err();
    assert_eq!(
        e,
        ApiError::Invalid(
            "VirtualMachine.hypersdk.io \"a\" is invalid: spec.cpus: must be at least 1".into()
        )
    );
    let e = s
        .update(
            &vms(),
            ns,
            "a",
            false,
            Change::Replace(
                &json!({"metadata": {"name": "a", "resourceVersion": "1"}, "spec": {}}),
            ),
        )
        .unwrap_err();
    assert_eq!(e.code(), 409);
}

#[test]
fn finalizers_hold_deletion_and_watch_log_replays() {
    let mut s = store();
    let ns = Some("default");
    s.create(
        &vms(),
        ns,
        json!({"metadata": {"name": "a", "finalizers": ["x"]}, "spec": {}}),
    )
    .unwrap();
    let rv = s.resource_version();
    let v = s.delete(&vms(), ns, "a").unwrap();
    assert!(v["metadata"]["deletionTimestamp"].is_string());
    assert!(s.get(&vms(), ns, "a").is_ok());
    s.update(
        &vms(),
        ns,
        "a",
        false,
        Change::MergePatch(&json!({"metadata": {"finalizers": null}})),
    )
    .unwrap();
    assert_eq!(s.get(&vms(), ns, "a").unwrap_err().code(), 404);
    let types: Vec<_> = s
        .events_since(&vms(), ns, rv)
        .unwrap()
        .iter()
        .map(|e| e.type_)
        .collect();
    assert_eq!(types, ["MODIFIED", "DELETED"]);
    assert!(s.events_since(&vms(), Some("other"), 1).unwrap().is_empty());
    assert_eq!(
        s.create(&vms(), ns, json!({"metadata": {}}))
            .unwrap_err()
            .code(),
        422
    );
}

#[test]
fn dependents_go_when_all_their_owners_are_gone() {
    let mut s = store();
    let ns = Some("default");
    let uid = |s: &Store, name: &str| s.get(&vms(), ns, name).unwrap()["metadata"]["uid"].clone();
    for name in ["owner", "other"] {
        s.create(&vms(), ns, json!({"metadata": {"name": name}, "spec": {}}))
            .unwrap();
    }
    let (owner, other) = (uid(&s, "owner"), uid(&s, "other"));
    let owned = |name: &str, uids: &[&Value], finalizers: &[&str]| {
        let refs: Vec<Value> = uids.iter().map(|u| json!({"uid": u})).collect();
        json!({"metadata": {"name": name, "ownerReferences": refs, "finalizers": finalizers}, "spec": {}})
    };
    s.create(&vms(), ns, owned("only-owner", &[&owner], &[]))
        .unwrap();
    s.create(&vms(), ns, owned("held", &[&owner], &["x"]))
        .unwrap();
    s.create(&vms(), ns, owned("two-owners", &[&owner, &other], &[]))
        .unwrap();
    s.create(
        &vms(),
        ns,
        owned("grandchild", &[&uid(&s, "only-owner")], &[]),
    )
    .unwrap();
    s.delete(&vms(), ns, "owner").unwrap();
    assert_eq!(s.get(&vms(), ns, "only-owner").unwrap_err().code(), 404);
    assert_eq!(s.get(&vms(), ns, "grandchild").unwrap_err().code(), 404);
    let held = s.get(&vms(), ns, "held").unwrap();
    assert!(held["metadata"]["deletionTimestamp"].is_string(), "{held}");
    assert!(
        s.get(&vms(), ns, "two-owners").is_ok(),
        "another owner remains"
    );
    s.delete(&vms(), ns, "other").unwrap();
    assert_eq!(s.get(&vms(), ns, "two-owners").unwrap_err().code(), 404);
}
