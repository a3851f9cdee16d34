//! The agent's gRPC API: the service over the VM registry, the server that exposes it (with
//! health and reflection), and `--simulate`, the same API with no QEMU behind it.

pub mod attach;
pub mod convert;
pub mod pipe;
pub mod server;
pub mod service;
pub mod simulate;

use std::pin::Pin;

use hypersdk_proto::agent::v1 as pb;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::vm::reason::{Reason, event};

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::VmEvent, Status>> + Send>>;

/// A WatchVms stream: the VMs there are (`existing`, listed after `changes` was subscribed to,
/// so that no change falls between), then every change; only VM `filter` when it is not empty.
pub fn watch_stream(
    changes: broadcast::Receiver<pb::VmEvent>,
    existing: Vec<pb::Vm>,
    filter: String,
) -> EventStream {
    let initial = existing
        .into_iter()
        .map(|vm| Ok(event(pb::EventType::Added, vm, Reason::Existing, "")));
    let changes = BroadcastStream::new(changes).map(|r| match r {
        Ok(ev) => Ok(ev),
        // A slow watcher missed events: tell it, so it re-lists rather than trusting a gap.
        Err(BroadcastStreamRecvError::Lagged(n)) => Err(Status::data_loss(format!(
            "watch fell behind by {n} events; watch again"
        ))),
    });
    let matches = move |ev: &pb::VmEvent| {
        filter.is_empty()
            || ev
                .vm
                .as_ref()
                .and_then(|v| v.spec.as_ref())
                .is_some_and(|s| s.name == filter)
    };
    let stream = tokio_stream::iter(initial)
        .chain(changes)
        .filter(move |r| r.as_ref().map_or(true, &matches));
    Box::pin(stream)
}
