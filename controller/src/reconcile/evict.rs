//! Draining: a running VM on an unschedulable node leaves it as its
//! `highAvailability.evictionStrategy` says, through a VMOperation `migrate` that the VM owns
//! (so the move shows, with its progress, like one a user asked for): `LiveMigrate` live,
//! `Restart` (the default) stopped here and started on another node, `None` stays.

use kube::api::{Api, PostParams};
use kube::{Resource, ResourceExt};
use tracing::info;

use crate::context::Context;
use crate::crd::operation::{MigrateSpec, OperationKind, VMOperationSpec};
use crate::crd::vm::{EvictionStrategy, VirtualMachine};
use crate::crd::{LocalObjectReference, Reason, VMOperation};
use crate::error::Result;

/// Starts the VM's move off the drained `node`, once.
pub async fn evict(vm: &VirtualMachine, ns: &str, node: &str, ctx: &Context) -> Result<()> {
    let strategy = vm
        .spec
        .high_availability
        .as_ref()
        .map(|h| h.eviction_strategy)
        .unwrap_or_default();
    let Some(op) = operation(vm, ns, node, strategy) else {
        return Ok(());
    };
    let ops: Api<VMOperation> = Api::namespaced(ctx.client.clone(), ns);
    if ops.get_opt(&op.name_any()).await?.is_some() {
        return Ok(());
    }
    info!(node, ?strategy, "node drained: moving the VM");
    ops.create(&PostParams::default(), &op).await?;
    let msg = format!(
        "node {node} is drained: VMOperation {} moves the VM ({strategy:?})",
        op.name_any()
    );
    ctx.event(&vm.object_ref(&()), false, Reason::Evicting, msg)
        .await;
    Ok(())
}

/// The operation that moves `vm` off `node`, or None when its strategy keeps it there.
fn operation(
    vm: &VirtualMachine,
    ns: &str,
    node: &str,
    strategy: EvictionStrategy,
) -> Option<VMOperation> {
    let live = match strategy {
        EvictionStrategy::LiveMigrate => true,
        EvictionStrategy::Restart => false,
        EvictionStrategy::None => return None,
    };
    let spec = VMOperationSpec {
        vm_ref: LocalObjectReference {
            name: vm.name_any(),
        },
        operation: OperationKind::Migrate,
        migrate_spec: Some(MigrateSpec {
            live,
            ..MigrateSpec::default()
        }),
        clone_spec: None,
        resize_spec: None,
        snapshot_spec: None,
        restore_spec: None,
    };
    // One per VM and node: a VM drained off the same node again later reuses the record.
    let mut op = VMOperation::new(&format!("evict-{}-{node}", vm.name_any()), spec);
    op.metadata.namespace = Some(ns.to_string());
    op.metadata.owner_references = vm.owner_ref(&()).map(|r| vec![r]);
    Some(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::vm::VirtualMachineSpec;

    fn op(strategy: EvictionStrategy) -> Option<VMOperation> {
        let spec: VirtualMachineSpec =
            serde_json::from_value(serde_json::json!({"cpus": 1, "memory": "1Gi"})).unwrap();
        let mut vm = VirtualMachine::new("web", spec);
        vm.metadata.uid = Some("u-1".into());
        operation(&vm, "ns", "n1", strategy)
    }

    #[test]
    fn each_strategy_moves_the_vm_its_way() {
        let live = op(EvictionStrategy::LiveMigrate).unwrap();
        assert_eq!(live.name_any(), "evict-web-n1");
        assert!(live.spec.migrate_spec.as_ref().unwrap().live);
        assert_eq!(live.spec.migrate_spec.as_ref().unwrap().target_node, None);
        assert_eq!(live.owner_references()[0].name, "web");
        let cold = op(EvictionStrategy::Restart).unwrap();
        assert!(!cold.spec.migrate_spec.unwrap().live);
        assert!(op(EvictionStrategy::None).is_none());
    }
}
