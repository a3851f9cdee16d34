//! The four kube-runtime Controllers, one per kind, and what triggers each besides its own kind:
//!
//! - VirtualMachine: agent signals (a VM changed on its agent; a node answers again, goes away
//!   or changes its room: the VMs waiting for that node or for room), templates (the VMs
//!   waiting for one), and every VM when signals were lost.
//! - VMOperation: the VMSnapshots it owns (a snapshot operation's) and VirtualMachines (the
//!   operations waiting for one).
//! - VMSnapshot: VirtualMachines (the snapshots that follow one).
//! - VMTemplate: VirtualMachines (the template each names, whose usage count follows).
//! - BackupJob, RestoreJob: their own kind (a running backup's progress is followed by a task).
//! - BackupSchedule: the BackupJobs it owns, and its next run time.
//!
//! Who waits for what is in [`crate::waiting`]; a failed reconciliation is retried with
//! per-object back-off ([`crate::retries`]).

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tracing::warn;

use crate::context::Context;
use crate::crd::{
    BackupJob, BackupSchedule, RestoreJob, VMOperation, VMSnapshot, VMTemplate, VirtualMachine,
};
use crate::error::{Error, Result};
use crate::metrics;
use crate::nodes::Signal;
use crate::reconcile::{backup, operation, snapshot, template, vm};
use crate::waiting::{Key, Waiters, Waiting, key};

/// Runs every controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let vms = drive(vms(&ctx), stopped(), vm::reconcile, &ctx);
    let ops = drive(operations(&ctx), stopped(), operation::reconcile, &ctx);
    let snaps = drive(snapshots(&ctx), stopped(), snapshot::reconcile, &ctx);
    let tpls = drive(templates(&ctx), stopped(), template::reconcile, &ctx);
    let backups = drive(
        Controller::new(all::<BackupJob>(&ctx), watcher::Config::default()),
        stopped(),
        backup::job::reconcile,
        &ctx,
    );
    let restores = drive(
        Controller::new(all::<RestoreJob>(&ctx), watcher::Config::default()),
        stopped(),
        backup::restore::reconcile,
        &ctx,
    );
    let schedules = drive(
        Controller::new(all::<BackupSchedule>(&ctx), watcher::Config::default())
            .owns(all::<BackupJob>(&ctx), watcher::Config::default()),
        stopped(),
        backup::schedule::reconcile,
        &ctx,
    );
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    tokio::join!(vms, ops, snaps, tpls, backups, restores, schedules);
}

fn all<K>(ctx: &Context) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    Api::all(ctx.client.clone())
}

fn vms(ctx: &Arc<Context>) -> Controller<VirtualMachine> {
    let (signals, lost) = agent_signals(ctx);
    let waiting = ctx.clone();
    Controller::new(all::<VirtualMachine>(ctx), watcher::Config::default())
        .reconcile_on(signals)
        .reconcile_all_on(lost)
        .watches(
            all::<VMTemplate>(ctx),
            watcher::Config::default(),
            move |t| waiting.waiting.template.wake(&key(&t)),
        )
}

fn operations(ctx: &Arc<Context>) -> Controller<VMOperation> {
    let ops = Controller::new(all::<VMOperation>(ctx), watcher::Config::default())
        .owns(all::<VMSnapshot>(ctx), watcher::Config::default());
    woken_by_vms(ops, ctx, |w| &w.operations)
}

fn snapshots(ctx: &Arc<Context>) -> Controller<VMSnapshot> {
    let snaps = Controller::new(all::<VMSnapshot>(ctx), watcher::Config::default());
    woken_by_vms(snaps, ctx, |w| &w.snapshots)
}

/// `controller` also watches VirtualMachines: a VM's change wakes the objects in `waiters` that
/// wait for it.
fn woken_by_vms<K>(
    controller: Controller<K>,
    ctx: &Arc<Context>,
    waiters: fn(&Waiting) -> &Waiters<Key, K>,
) -> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let waiting = ctx.clone();
    controller.watches(
        all::<VirtualMachine>(ctx),
        watcher::Config::default(),
        move |vm| waiters(&waiting.waiting).wake(&key(&vm)),
    )
}

fn templates(ctx: &Arc<Context>) -> Controller<VMTemplate> {
    Controller::new(all::<VMTemplate>(ctx), watcher::Config::default()).watches(
        all::<VirtualMachine>(ctx),
        watcher::Config::default(),
        |vm| {
            let ns = vm.namespace().unwrap_or_default();
            vm.spec
                .image
                .as_ref()
                .map(|i| ObjectRef::new(&i.template_ref.name).within(&ns))
        },
    )
}

/// Runs `controller` with `reconcile` until `stopped`: counts each reconciliation, and resets an
/// object's back-off when it succeeds.
async fn drive<K, F, Fut>(
    controller: Controller<K>,
    stopped: impl Future<Output = ()> + Send + Sync + 'static,
    reconcile: F,
    ctx: &Arc<Context>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Action>> + Send + 'static,
{
    let reconcile = Arc::new(reconcile);
    controller
        .graceful_shutdown_on(stopped)
        .run(
            move |obj: Arc<K>, ctx: Arc<Context>| {
                let reconcile = reconcile.clone();
                async move {
                    ctx.metrics.inc(metrics::RECONCILES, &K::kind(&()));
                    let who = ObjectRef::from(obj.as_ref()).erase();
                    let result = reconcile(obj, ctx.clone()).await;
                    if result.is_ok() {
                        ctx.retries.succeeded(&who);
                    }
                    result
                }
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {})
        .await
}

/// Logs and counts the failure; the object is tried again after its back-off.
fn error_policy<K>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&());
    ctx.metrics.inc(metrics::RECONCILE_ERRORS, &kind);
    let retry = ctx.retries.failed(ObjectRef::from(obj.as_ref()).erase());
    warn!(%kind, name = obj.name_any(), %error, ?retry, "reconcile failed");
    Action::requeue(retry)
}

/// Agent signals as VMs to reconcile: the VM itself, or for a node change the VMs waiting for
/// that node or for room on any node. The second stream fires when signals were lost (a lagging
/// receiver), to look at every VM again.
fn agent_signals(
    ctx: &Arc<Context>,
) -> (
    impl Stream<Item = ObjectRef<VirtualMachine>> + Send + 'static,
    impl Stream<Item = ()> + Send + 'static,
) {
    let (lost_tx, lost_rx) = mpsc::unbounded();
    let ctx = ctx.clone();
    let refs = BroadcastStream::new(ctx.agents.subscribe()).flat_map(move |signal| {
        let refs: Vec<ObjectRef<VirtualMachine>> = match signal {
            Ok(Signal::Vm { namespace, name }) => vec![ObjectRef::new(&name).within(&namespace)],
            Ok(Signal::Node(node)) => {
                let mut refs = ctx.waiting.node.wake(&Some(node));
                refs.extend(ctx.waiting.node.wake(&None));
                refs
            }
            Err(BroadcastStreamRecvError::Lagged(_)) => {
                let _ = lost_tx.unbounded_send(());
                Vec::new()
            }
        };
        futures::stream::iter(refs)
    });
    (refs, lost_rx)
}
