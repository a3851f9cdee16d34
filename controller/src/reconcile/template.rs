//! VMTemplate: counts the VirtualMachines that use it and checks its image reference.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;

use crate::context::Context;
use crate::crd::template::{VMTemplate, VMTemplateSpec};
use crate::crd::vm::VirtualMachine;
use crate::crd::{Reason, Status, set_condition};
use crate::error::Result;

pub const READY: &str = "Ready";

#[tracing::instrument(skip_all, fields(template = %tpl.name_any(), ns = tpl.namespace().unwrap_or_default()))]
pub async fn reconcile(tpl: Arc<VMTemplate>, ctx: Arc<Context>) -> Result<Action> {
    let ns = super::namespace(tpl.as_ref())?;
    let name = tpl.name_any();
    let vms = Api::<VirtualMachine>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?;
    let usage = vms
        .items
        .iter()
        .filter(|vm| {
            vm.spec
                .image
                .as_ref()
                .is_some_and(|i| i.template_ref.name == name)
        })
        .count();
    let mut status = tpl.status.clone().unwrap_or_default();
    status.usage_count = usage as u32;
    let (ready, reason, message) = image_check(&tpl.spec);
    let generation = tpl.metadata.generation;
    set_condition(
        &mut status.conditions,
        READY,
        ready,
        reason,
        message,
        generation,
    );
    let api: Api<VMTemplate> = Api::namespaced(ctx.client.clone(), &ns);
    super::write_status(&api, &name, tpl.status.as_ref(), &status).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The template's image reference: an absolute node path (or `file://` URL) is usable.
fn image_check(spec: &VMTemplateSpec) -> (Status, Reason, String) {
    let source = spec
        .image
        .source
        .strip_prefix("file://")
        .unwrap_or(&spec.image.source);
    if source.starts_with('/') {
        (
            Status::True,
            Reason::ImageReferenced,
            format!("image {source}"),
        )
    } else {
        let msg = format!(
            "image.source: {source:?} must be an absolute path on the nodes (or file:///path)"
        );
        (Status::False, Reason::InvalidImage, msg)
    }
}
