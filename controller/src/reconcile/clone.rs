//! VMOperation `clone`: the source VM's agent copies its disks into a new VM on the same node
//! (CloneVm), and a VirtualMachine `cloneSpec.targetName` is created for it, booting from
//! those copies. The VM reconciler finds the new VM already on that node and keeps it there.
//!
//! Idempotent: a clone the agent already made (the controller restarted half-way) is taken
//! as it is, and a VirtualMachine this operation created is recognised by [`CLONED_BY`].

use hypersdk_proto::agent::v1 as pb;
use kube::api::{Api, PostParams};
use kube::{Resource, ResourceExt};

use super::operation::Outcome;
use crate::context::Context;
use crate::crd::Reason;
use crate::crd::operation::{CloneSpec, VMOperation};
use crate::crd::vm::{Boot, Disk, VirtualMachine, VirtualMachineSpec};
use crate::error::{AgentFailure, Result};
use crate::nodes::spec::{agent_name, identity_labels};

/// Annotation on a VirtualMachine made by a clone operation: the operation's name.
pub const CLONED_BY: &str = "hypersdk.io/cloned-by";

pub(super) async fn run(
    op: &VMOperation,
    vm: &VirtualMachine,
    ns: &str,
    ctx: &Context,
) -> Result<Outcome> {
    let Some(spec) = op.spec.clone_spec.clone() else {
        return Ok(Outcome::Failed("cloneSpec: is required".into()));
    };
    let vms: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), ns);
    let target = &spec.target_name;
    if let Some(existing) = vms.get_opt(target).await? {
        return Ok(
            if existing.annotations().get(CLONED_BY) == Some(&op.name_any()) {
                Outcome::Done(format!("VM {target} is a clone of {}", vm.name_any()))
            } else {
                Outcome::Failed(format!(
                    "cloneSpec.targetName: VirtualMachine {target:?} already exists"
                ))
            },
        );
    }
    let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) else {
        return Ok(Outcome::Failed(format!(
            "VM {} is not placed on a node (its disks are made there when it first runs)",
            vm.name_any()
        )));
    };
    let cloned = match clone_on_agent(vm, ns, &node, &spec, ctx).await {
        Ok(c) => c,
        Err(why) => return Ok(Outcome::failed(why)),
    };
    let mut new = VirtualMachine::new(target, clone_spec(&vm.spec, &spec, &cloned));
    new.metadata.namespace = Some(ns.to_string());
    new.metadata.annotations = Some([(CLONED_BY.to_string(), op.name_any())].into());
    vms.create(&PostParams::default(), &new).await?;
    let how = if spec.linked_clone { "linked" } else { "full" };
    let msg = format!("{how} clone {target} made on node {node}");
    ctx.event(&vm.object_ref(&()), false, Reason::Cloned, msg)
        .await;
    Ok(Outcome::Done(format!(
        "{how} clone {target} of VM {} made on node {node}",
        vm.name_any()
    )))
}

/// Has the VM's agent copy it as `cloneSpec.targetName`; a clone it made already (before a
/// controller restart) is taken as it is.
async fn clone_on_agent(
    vm: &VirtualMachine,
    ns: &str,
    node: &str,
    spec: &CloneSpec,
    ctx: &Context,
) -> std::result::Result<pb::Vm, AgentFailure> {
    let agent = ctx.agents.get(node);
    let Some((agent, mut client)) = agent.and_then(|a| Some((a.clone(), a.client()?))) else {
        return Err(AgentFailure::Unreachable(node.into()));
    };
    let target = agent_name(ns, &spec.target_name);
    let req = pb::CloneVmRequest {
        name: agent_name(ns, &vm.name_any()),
        target_name: target.clone(),
        linked: spec.linked_clone,
        start: spec.start_after_clone,
        labels: identity_labels(ns, &spec.target_name),
    };
    let cloned = match client.clone_vm(req).await {
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            client.get_vm(pb::GetVmRequest { name: target }).await
        }
        other => other,
    };
    let cloned = cloned
        .map(tonic::Response::into_inner)
        .map_err(|s| AgentFailure::refused(node, s))?;
    agent.observe(cloned.clone());
    Ok(cloned)
}

/// The clone's VirtualMachine: the source's, booting and running from what the agent made
/// (its disks are the copies; no template, since a full clone no longer needs one).
fn clone_spec(source: &VirtualMachineSpec, c: &CloneSpec, cloned: &pb::Vm) -> VirtualMachineSpec {
    let agent = cloned.spec.clone().unwrap_or_default();
    let non_empty = |s: String| (!s.is_empty()).then_some(s);
    VirtualMachineSpec {
        running: c.start_after_clone,
        image: None,
        // Without a kernel the copy boots its disk through the source's firmware.
        boot: agent.boot.map(|boot| Boot {
            kernel: boot.kernel,
            initrd: non_empty(boot.initrd),
            cmdline: non_empty(boot.cmdline),
        }),
        disks: agent
            .disks
            .into_iter()
            .map(|d| Disk {
                name: d.name,
                size: None,
                storage_class: None,
                boot_order: (d.boot_order > 0).then_some(d.boot_order),
                path: Some(d.path),
                read_only: d.read_only,
            })
            .collect(),
        ..source.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clone_boots_from_the_copies() {
        let source: VirtualMachineSpec = serde_json::from_value(serde_json::json!({
            "cpus": 2, "memory": "1Gi", "running": true,
            "image": {"templateRef": {"name": "t"}},
            "disks": [{"name": "root", "size": "50Gi"}]
        }))
        .unwrap();
        let cloned = pb::Vm {
            spec: Some(pb::VmSpec {
                boot: Some(pb::Boot {
                    kernel: "/img/vmlinuz".into(),
                    initrd: String::new(),
                    cmdline: "console=ttyS0".into(),
                }),
                disks: vec![pb::Disk {
                    name: "root".into(),
                    path: "/data/images/clones/c/root.qcow2".into(),
                    read_only: false,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        };
        let c = CloneSpec {
            target_name: "c".into(),
            linked_clone: false,
            start_after_clone: false,
        };
        let spec = clone_spec(&source, &c, &cloned);
        assert!(!spec.running && spec.image.is_none());
        assert_eq!((spec.cpus, spec.memory.as_str()), (2, "1Gi"));
        let boot = spec.boot.unwrap();
        assert_eq!((boot.kernel.as_str(), boot.initrd), ("/img/vmlinuz", None));
        assert_eq!(
            spec.disks[0].path.as_deref(),
            Some("/data/images/clones/c/root.qcow2")
        );
    }
}
