//! The VMTemplate reconciler: its usage count follows the VMs that name it, and its image
//! reference is checked.

use hypersdk_controller::crd::{Reason, VMTemplate, VirtualMachine};
use serde_json::json;

use super::{Cluster, cond, template, vm};

fn usage(t: &VMTemplate) -> Option<u32> {
    t.status.as_ref().map(|s| s.usage_count)
}

#[tokio::test]
async fn usage_follows_the_vms_and_the_image_is_checked() {
    let c = Cluster::start(&["node-1"]).await;
    c.create::<VMTemplate>(template()).await;
    for name in ["a", "b"] {
        c.create::<VirtualMachine>(vm(name, json!({}))).await;
    }
    let t = c
        .wait("tpl", "used twice", |t: &VMTemplate| usage(t) == Some(2))
        .await;
    let ready = cond(t.status.as_ref().map(|s| &s.conditions), "Ready").unwrap();
    assert_eq!(
        (
            ready.status.as_str(),
            ready.reason.clone(),
            ready.message.as_str()
        ),
        (
            "True",
            Reason::ImageReferenced.to_string(),
            "image /images/disk.qcow2"
        )
    );
    c.delete::<VirtualMachine>("a").await;
    c.wait("tpl", "used once", |t: &VMTemplate| usage(t) == Some(1))
        .await;

    let mut relative = template();
    relative["metadata"]["name"] = json!("relative");
    relative["spec"]["image"]["source"] = json!("disk.qcow2");
    c.create::<VMTemplate>(relative).await;
    let t = c
        .wait("relative", "checked", |t: &VMTemplate| {
            cond(t.status.as_ref().map(|s| &s.conditions), "Ready").is_some()
        })
        .await;
    let ready = cond(t.status.as_ref().map(|s| &s.conditions), "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.clone()),
        ("False", Reason::InvalidImage.to_string())
    );
    assert_eq!(
        ready.message,
        "image.source: \"disk.qcow2\" must be an absolute path on the nodes (or file:///path)"
    );
}
