//! The in-process API through a real `kube::Client`: CRUD, status subresource, finalizers,
//! validation errors, and a kube-runtime watcher seeing every change.

use futures::StreamExt;
use hypersdk_controller::crd::VirtualMachine;
use hypersdk_controller::standalone::FakeApi;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;

fn vm(name: &str) -> VirtualMachine {
    serde_json::from_value(json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name}, "spec": {"cpus": 1, "memory": "1Gi", "boot": {"kernel": "/k"}}}))
    .unwrap()
}

#[tokio::test]
async fn kube_client_and_watcher_work_over_the_in_process_api() {
    let api: Api<VirtualMachine> = Api::namespaced(FakeApi::new().client("default"), "default");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    assert!(matches!(
        events.next().await,
        Some(Ok(watcher::Event::Init))
    ));
    assert!(matches!(
        events.next().await,
        Some(Ok(watcher::Event::InitDone))
    ));

    let created = api.create(&PostParams::default(), &vm("a")).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let e = api
        .create(&PostParams::default(), &vm("a"))
        .await
        .unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 409), "{e}");
    let mut bad = vm("b");
    bad.spec.memory = "8XB".into();
    let e = api.create(&PostParams::default(), &bad).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("VirtualMachine.hypersdk.io \"b\" is invalid: spec.memory"),
        "{e}"
    );

    let status = Patch::Merge(json!({"status": {"phase": "Running"}}));
    let v = api
        .patch_status("a", &PatchParams::default(), &status)
        .await
        .unwrap();
    assert_eq!(
        v.metadata.generation,
        Some(1),
        "status does not move the generation"
    );
    let finalizer = Patch::Merge(json!({"metadata": {"finalizers": ["x/y"]}}));
    api.patch("a", &PatchParams::default(), &finalizer)
        .await
        .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let held = api.get("a").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    let release = Patch::Json::<()>(
        serde_json::from_value(json!([{"op": "remove", "path": "/metadata/finalizers/0"}]))
            .unwrap(),
    );
    api.patch("a", &PatchParams::default(), &release)
        .await
        .unwrap();
    assert!(api.get_opt("a").await.unwrap().is_none());

    let mut seen = Vec::new();
    while seen.len() < 5 {
        match events.next().await.unwrap().unwrap() {
            watcher::Event::Apply(v) => {
                seen.push(format!("apply {:?}", v.status.and_then(|s| s.phase)))
            }
            watcher::Event::Delete(_) => seen.push("delete".into()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "apply None",
            "apply Some(Running)",
            "apply Some(Running)",
            "apply Some(Running)",
            "delete"
        ]
    );
}
