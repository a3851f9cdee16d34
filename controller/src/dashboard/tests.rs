use super::*;

fn access(token: Option<&str>, exposed: bool, actions: bool) -> Access {
    Access {
        token: token.map(String::from),
        exposed,
        actions,
    }
}

#[test]
fn loopback_without_token_reads_and_acts_only_when_allowed() {
    assert_eq!(access(None, false, false).check(None, false), Ok(()));
    assert_eq!(
        access(None, false, false).check(None, true),
        Err(Refusal::ReadOnly)
    );
    assert_eq!(access(None, false, true).check(None, true), Ok(()));
}

#[test]
fn exposed_requires_the_token() {
    assert_eq!(
        access(None, true, true).check(Some("Bearer x"), false),
        Err(Refusal::NoTokenConfigured)
    );
    let a = access(Some("s3cret"), true, false);
    assert_eq!(a.check(None, false), Err(Refusal::BadToken));
    assert_eq!(a.check(Some("Bearer wrong"), false), Err(Refusal::BadToken));
    assert_eq!(a.check(Some("s3cret"), false), Err(Refusal::BadToken));
    assert_eq!(a.check(Some("Bearer s3cret"), false), Ok(()));
    assert_eq!(a.check(Some("Bearer s3cret"), true), Err(Refusal::ReadOnly));
    // A token set on loopback is required too.
    let l = access(Some("t"), false, true);
    assert_eq!(l.check(None, false), Err(Refusal::BadToken));
}

fn action(text: &str) -> Action {
    serde_json::from_str(text).unwrap()
}

#[test]
fn a_stop_is_the_vmoperation_a_user_writes() {
    let a = action(r#"{"kind":"VMOperation","vm":"my-vm","operation":"stop"}"#);
    assert_eq!(a.namespace(), "default");
    assert_eq!(
        a.object("abc").unwrap(),
        json!({
            "apiVersion": "hypersdk.io/v1alpha1", "kind": "VMOperation",
            "metadata": {"name": "my-vm-stop-abc", "namespace": "default"},
            "spec": {"vmRef": {"name": "my-vm"}, "operation": "stop"},
        })
    );
    let m = action(
        r#"{"kind":"VMOperation","vm":"my-vm","operation":"migrate","targetNode":"node-2"}"#,
    );
    assert_eq!(
        m.object("x").unwrap()["spec"]["migrateSpec"],
        json!({"targetNode": "node-2", "live": true})
    );
    let s = action(r#"{"kind":"VMSnapshot","vm":"my-vm","includeMemory":true}"#);
    let obj = s.object("x").unwrap();
    assert_eq!(obj["kind"], "VMSnapshot");
    assert_eq!(obj["spec"]["vmRef"]["name"], "my-vm");
    assert_eq!(obj["spec"]["includeMemory"], true);
}

#[test]
fn bad_actions_name_the_field() {
    let e = action(r#"{"kind":"VMOperation","vm":"My_VM","operation":"stop"}"#)
        .object("x")
        .unwrap_err();
    assert!(e.to_string().starts_with("vm: \"My_VM\""), "{e}");
    let e = action(r#"{"kind":"VMOperation","vm":"a","operation":"explode"}"#)
        .object("x")
        .unwrap_err();
    assert!(e.to_string().starts_with("operation: \"explode\""), "{e}");
    let e = action(r#"{"kind":"VMOperation","vm":"a","operation":"migrate","targetNode":"../x"}"#)
        .object("x")
        .unwrap_err();
    assert!(e.to_string().starts_with("targetNode:"), "{e}");
}

#[test]
fn migration_percent_counts_sent_bytes() {
    let m = Migration::new("Active".into(), "n2".into(), 300, 100);
    assert_eq!((m.total_bytes, m.percent), (400, 75));
    assert_eq!(Migration::new("Setup".into(), "n2".into(), 0, 0).percent, 0);
}

#[test]
fn state_sorts_objects_and_attaches_live_figures() {
    let vm = |name: &str| -> Arc<VirtualMachine> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "hypersdk.io/v1alpha1", "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": "default",
                             "managedFields": [{"manager": "x"}]},
                "spec": {"cpus": 1, "memory": "1Gi"},
            }))
            .unwrap(),
        )
    };
    let live = Live {
        guest_cpus: 2,
        ..Default::default()
    };
    let s = state(Inputs {
        vms: vec![(vm("b"), None), (vm("a"), Some(live))],
        operations: vec![],
        snapshots: vec![],
        templates: vec![],
        events: vec![],
        nodes: vec![],
        actions: true,
    });
    assert_eq!(s["vms"][0]["metadata"]["name"], "a");
    assert_eq!(s["vms"][0]["live"]["guestCpus"], 2);
    assert_eq!(s["vms"][1]["live"], Value::Null);
    assert!(s["vms"][0]["metadata"].get("managedFields").is_none());
    assert_eq!(s["access"]["actions"], true);
}
