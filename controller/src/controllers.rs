//! Wires the four kube-runtime controllers: what triggers each reconciler besides its own kind
//! (agent signals, templates, VMs) and how long they run.

use std::sync::Arc;

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::context::Context;
use crate::crd::{VMOperation, VMSnapshot, VMTemplate, VirtualMachine};
use crate::nodes::Signal;
use crate::reconcile::{operation, snapshot, template, vm};

/// Runs every controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let client = ctx.client.clone();
    let cfg = watcher::Config::default;

    let vms = Controller::new(Api::<VirtualMachine>::all(client.clone()), cfg());
    let vm_store = vms.store();
    let vm_signals = signal_refs(&ctx, vm_store.clone());
    let store_for_templates = vm_store.clone();
    let vms = vms
        .reconcile_on(vm_signals)
        .watches(Api::<VMTemplate>::all(client.clone()), cfg(), move |tpl| {
            users_of(&store_for_templates, &tpl)
        })
        .graceful_shutdown_on(stopped())
        .run(vm::reconcile, vm::error_policy, ctx.clone())
        .for_each(|_| async {});

    let ops = Controller::new(Api::<VMOperation>::all(client.clone()), cfg());
    let op_store = ops.store();
    let ops = ops
        .watches(
            Api::<VirtualMachine>::all(client.clone()),
            cfg(),
            move |vm| {
                op_store
                    .state()
                    .into_iter()
                    .filter(|op| {
                        op.spec.vm_ref.name == vm.metadata.name.clone().unwrap_or_default()
                            && op.metadata.namespace == vm.metadata.namespace
                    })
                    .map(|op| ObjectRef::from(op.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(stopped())
        .run(operation::reconcile, operation::error_policy, ctx.clone())
        .for_each(|_| async {});

    let snaps = Controller::new(Api::<VMSnapshot>::all(client.clone()), cfg())
        .graceful_shutdown_on(stopped())
        .run(snapshot::reconcile, snapshot::error_policy, ctx.clone())
        .for_each(|_| async {});

    let tpls = Controller::new(Api::<VMTemplate>::all(client.clone()), cfg())
        .watches(Api::<VirtualMachine>::all(client), cfg(), |vm| {
            let ns = vm.metadata.namespace.clone().unwrap_or_default();
            vm.spec
                .image
                .as_ref()
                .map(|i| ObjectRef::new(&i.template_ref.name).within(&ns))
        })
        .graceful_shutdown_on(stopped())
        .run(template::reconcile, template::error_policy, ctx.clone())
        .for_each(|_| async {});

    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    tokio::join!(vms, ops, snaps, tpls);
}

/// VMs that use `tpl`, to look at again when it changes (e.g. it was missing and now exists).
fn users_of(store: &Store<VirtualMachine>, tpl: &VMTemplate) -> Vec<ObjectRef<VirtualMachine>> {
    store
        .state()
        .into_iter()
        .filter(|vm| vm.metadata.namespace == tpl.metadata.namespace)
        .filter(|vm| {
            vm.spec.image.as_ref().map(|i| &i.template_ref.name) == tpl.metadata.name.as_ref()
        })
        .map(|vm| ObjectRef::from(vm.as_ref()))
        .collect()
}

/// Agent signals as VMs to reconcile: the VM itself, or for a node change every VM on that node
/// and every VM waiting for a node. A lagging receiver re-checks everything.
fn signal_refs(
    ctx: &Context,
    store: Store<VirtualMachine>,
) -> impl futures::Stream<Item = ObjectRef<VirtualMachine>> + Send + 'static {
    BroadcastStream::new(ctx.agents.subscribe()).flat_map(move |signal| {
        let refs: Vec<ObjectRef<VirtualMachine>> = match signal {
            Ok(Signal::Vm { namespace, name }) => vec![ObjectRef::new(&name).within(&namespace)],
            Ok(Signal::Node(node)) => store
                .state()
                .into_iter()
                .filter(|vm| {
                    let placed = vm.status.as_ref().and_then(|s| s.node_name.as_deref());
                    placed.is_none() || placed == Some(node.as_str())
                })
                .map(|vm| ObjectRef::from(vm.as_ref()))
                .collect(),
            Err(BroadcastStreamRecvError::Lagged(_)) => store
                .state()
                .iter()
                .map(|vm| ObjectRef::from(vm.as_ref()))
                .collect(),
        };
        futures::stream::iter(refs)
    })
}
