//! What every reconciler shares: the API client, the agents, placements, settings, metrics,
//! events, waits and retries.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::debug;

use crate::crd::Reason;
use crate::metrics::Metrics;
use crate::nodes::Agents;
use crate::retries::Retries;
use crate::scheduling::Policy;
use crate::scheduling::placement::Placements;
use crate::waiting::Waiting;

pub const DEFAULT_FENCE_MARGIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Settings {
    pub policy: Policy,
    /// Waited beyond a lost agent's fence timeout before its highly available VMs move: for
    /// clocks that run apart and the agent's check interval.
    pub fence_margin: Duration,
    /// Seconds a guest gets to power off before the agent ends it.
    pub stop_timeout_seconds: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            policy: Policy::default(),
            fence_margin: DEFAULT_FENCE_MARGIN,
            stop_timeout_seconds: 30,
        }
    }
}

pub struct Context {
    pub client: kube::Client,
    pub agents: Arc<Agents>,
    pub placements: Placements,
    pub settings: Settings,
    pub metrics: Metrics,
    /// Which objects wait for which other object to change.
    pub waiting: Waiting,
    /// Back-off of the objects whose reconciliation fails.
    pub retries: Retries,
    /// The backups whose progress this process follows.
    pub backups: crate::reconcile::backup::Running,
    recorder: Recorder,
}

impl Context {
    pub fn new(client: kube::Client, agents: Arc<Agents>, settings: Settings) -> Self {
        let reporter = Reporter {
            controller: "hypersdk-controller".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            agents,
            placements: Placements::default(),
            settings,
            metrics: Metrics::default(),
            waiting: Waiting::default(),
            retries: Retries::default(),
            backups: Default::default(),
        }
    }

    /// Records a Kubernetes event on `object`; a failure to record is logged, never fatal.
    pub async fn event(
        &self,
        object: &ObjectReference,
        warning: bool,
        reason: Reason,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.as_str().into(),
            note: Some(note),
            action: reason.as_str().into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, object).await {
            debug!(error = %e, %reason, "recording event");
        }
    }
}
