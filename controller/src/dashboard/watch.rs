//! The dashboard's view of the cluster: a reflector store per kind, fed by watches on the API
//! (no polling), and a counter bumped on every change there or on an agent, which the open
//! pages wait on.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_stream::wrappers::BroadcastStream;

use super::{Inputs, Live, Migration};
use crate::context::Context;
use crate::crd::{VMOperation, VMSnapshot, VMTemplate, VirtualMachine};
use crate::nodes::Agents;
use crate::nodes::spec::agent_name;

pub struct Stores {
    vms: Store<VirtualMachine>,
    operations: Store<VMOperation>,
    snapshots: Store<VMSnapshot>,
    templates: Store<VMTemplate>,
    events: Store<Event>,
    changed: watch::Sender<u64>,
}

impl Stores {
    /// Starts the watches (they run as long as the process).
    pub fn start(ctx: &Context) -> Arc<Stores> {
        let (changed, _) = watch::channel(0);
        let stores = Stores {
            vms: reflect(&ctx.client, &changed),
            operations: reflect(&ctx.client, &changed),
            snapshots: reflect(&ctx.client, &changed),
            templates: reflect(&ctx.client, &changed),
            events: reflect(&ctx.client, &changed),
            changed,
        };
        let signals = BroadcastStream::new(ctx.agents.subscribe());
        let changed = stores.changed.clone();
        tokio::spawn(signals.for_each(move |_| {
            changed.send_modify(|n| *n += 1);
            async {}
        }));
        Arc::new(stores)
    }

    /// Resolves at the next change (of any kind) after this call.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Resolves once the watches of the hypersdk kinds have listed them (events, which the
    /// controller may not be allowed to list, come when they come).
    pub async fn ready(&self) {
        let _ = tokio::join!(
            self.vms.wait_until_ready(),
            self.operations.wait_until_ready(),
            self.snapshots.wait_until_ready(),
            self.templates.wait_until_ready(),
        );
    }

    /// What the page shows now.
    pub fn inputs(&self, ctx: &Context, actions: bool) -> Inputs {
        let vms = self
            .vms
            .state()
            .into_iter()
            .map(|vm| {
                let live = live(&ctx.agents, &vm);
                (vm, live)
            })
            .collect();
        Inputs {
            vms,
            operations: self.operations.state(),
            snapshots: self.snapshots.state(),
            templates: self.templates.state(),
            events: self.events.state(),
            nodes: ctx.placements.inventory(&ctx.agents),
            actions,
        }
    }
}

/// A store of `K` in every namespace, bumping `changed` on each event of its watch.
fn reflect<K>(client: &kube::Client, changed: &watch::Sender<u64>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff();
    let changed = changed.clone();
    tokio::spawn(stream.for_each(move |_| {
        changed.send_modify(|n| *n += 1);
        async {}
    }));
    reader
}

/// The figures the agent of `vm`'s node reports for it.
fn live(agents: &Agents, vm: &VirtualMachine) -> Option<Live> {
    let node = vm.status.as_ref()?.node_name.as_ref()?;
    let name = agent_name(&vm.namespace().unwrap_or_default(), &vm.name_any());
    let seen = agents.get(node)?.vm(&name)?;
    let status = seen.status?;
    let migration = status.migration.map(|m| {
        let phase = format!("{:?}", m.phase());
        Migration::new(phase, m.target_node, m.transferred_bytes, m.remaining_bytes)
    });
    Some(Live {
        guest_cpus: status.guest_cpus,
        guest_memory_bytes: status.guest_memory_bytes,
        agent_connected: status.agent_connected,
        migration,
    })
}
