//! The source side of a live migration, run as its own task beside the VM's supervisor: it asks
//! the target agent for a receiving QEMU, starts QEMU's `migrate`, publishes progress, watches
//! the target agent and the completion timeout, and hands the VM over. Any failure before the
//! target runs the VM leaves the VM running here.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_client::AgentServiceClient;
use hypersdk_proto::endpoint::{self, Address};
use hypersdk_tls::TlsFiles;
use qapi::qmp;
use tokio::sync::{broadcast, oneshot, watch};
use tonic::Code;
use tonic::transport::Channel;
use tracing::{Instrument, info, warn};

use crate::context::now_ms;
use crate::error::AgentError;
use crate::migration::{self, Deadline, Options, QemuStatus, encrypt};
use crate::qemu::qmp::{Qmp, QmpError};
use crate::vm::actor::{Migration, Supervisor, Task};
use crate::vm::phase::{Action, Phase};
use crate::vm::reason::Reason;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Starting a QEMU on the target, plugging its vCPUs and opening the port.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// The target loads the last state and runs the guest.
const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);
/// How often the target agent must answer while the migration runs.
const TARGET_CHECK: Duration = Duration::from_secs(1);

pub struct Outgoing {
    pub name: String,
    pub source_node: String,
    pub target: Address,
    /// This agent's certificate, which it presents to an `https://` target, and to the
    /// target QEMU when the stream runs over TLS.
    pub tls: Option<TlsFiles>,
    /// Where the source QEMU reads its credentials for the stream.
    pub tls_dir: PathBuf,
    pub spec: pb::VmSpec,
    pub layout: pb::MachineLayout,
    pub options: Options,
    pub qmp: Qmp,
    pub progress: watch::Sender<pb::MigrationProgress>,
    /// Becomes true when a cancel is asked for.
    pub cancel: watch::Receiver<bool>,
    /// Pause the guest for the whole copy (a stop-and-copy, not a live migration), as
    /// `--migration-copy` says: by default under TCG, where QEMU 10's dirty tracking misses
    /// writes made through TLB entries that outlive a bitmap sync, and guests arrived with
    /// stale memory. KVM tracks dirty pages in the host.
    pub pause_for_copy: bool,
    /// When the guest was paused for the copy.
    pub paused_at: Option<Instant>,
}

/// How a migration ended. The supervisor acts on `outcome` (removes the VM here, or resumes
/// it) before it publishes the final phase, so that a client who sees COMPLETED finds the VM
/// gone from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub outcome: Outcome,
    pub phase: pb::MigrationPhase,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The target runs the VM; the local QEMU must go.
    HandedOver,
    /// Ended without a hand-over; the local QEMU still has the VM.
    NotMoved,
    /// It is unknown whether the target runs the VM: the local QEMU stays paused.
    Unknown,
}

/// Why the target never received the VM's state (the VM keeps running here).
#[derive(Debug, thiserror::Error)]
enum PrepareError {
    #[error("target agent {0} did not answer in {CONNECT_TIMEOUT:?}")]
    NoAnswer(Address),
    #[error("cannot reach target agent {target}: {source}")]
    Unreachable {
        target: Address,
        #[source]
        source: endpoint::ConnectError,
    },
    #[error("target agent did not prepare within {PREPARE_TIMEOUT:?}")]
    NotPrepared,
    #[error("target agent refused: {}", .0.message())]
    Refused(#[source] tonic::Status),
    #[error("pausing the guest for the copy: {0}")]
    Pause(#[source] QmpError),
    #[error("QEMU refused to migrate: {0}")]
    Migrate(#[source] QmpError),
    #[error(
        "target agent takes the migration stream only over TLS, and this agent has no --tls-cert"
    )]
    NoCertificate,
    #[error(transparent)]
    Encrypt(#[from] encrypt::EncryptError),
}

impl Outgoing {
    pub async fn run(mut self) -> Ended {
        let started = Instant::now();
        let mut target = match self.prepare().await {
            Ok(t) => t,
            Err(why) => {
                self.resume_after_pause().await;
                return self.end(pb::MigrationPhase::Failed, why.to_string(), started);
            }
        };
        match self.migrate(&mut target, started).await {
            Ok(stopped_at) => self.hand_over(&mut target, stopped_at, started).await,
            Err((phase, why)) => {
                self.abort_target(&mut target).await;
                self.resume_after_pause().await;
                self.end(phase, why, started)
            }
        }
    }

    /// Runs the guest again if this migration paused it for the copy.
    async fn resume_after_pause(&self) {
        if self.paused_at.is_some()
            && let Err(e) = self.qmp.execute(qmp::cont {}).await
        {
            warn!("resuming after the migration: {e}");
        }
    }

    /// Connects to the target agent and has it start the receiving QEMU.
    async fn prepare(&mut self) -> Result<AgentServiceClient<Channel>, PrepareError> {
        self.update(|p| p.phase = pb::MigrationPhase::Preparing as i32);
        let mut client = tokio::time::timeout(
            CONNECT_TIMEOUT,
            endpoint::connect(&self.target, self.tls.as_ref()),
        )
        .await
        .map_err(|_| PrepareError::NoAnswer(self.target.clone()))?
        .map_err(|source| PrepareError::Unreachable {
            target: self.target.clone(),
            source,
        })?;
        let req = pb::PrepareIncomingRequest {
            spec: Some(self.spec.clone()),
            layout: Some(self.layout.clone()),
            multifd_channels: self.options.multifd_channels,
            source_node: self.source_node.clone(),
        };
        let resp = tokio::time::timeout(PREPARE_TIMEOUT, client.prepare_incoming(req))
            .await
            .map_err(|_| PrepareError::NotPrepared)?
            .map_err(PrepareError::Refused)?
            .into_inner();
        info!(uri = resp.uri, target = resp.node_name, "target prepared");
        self.update(|p| p.target_node = resp.node_name.clone());
        if self.pause_for_copy {
            self.qmp
                .execute(qmp::stop {})
                .await
                .map_err(PrepareError::Pause)?;
            self.paused_at = Some(Instant::now());
            self.update(|p| {
                p.message = "the guest is paused for the copy (--migration-copy; by default under TCG, whose software dirty tracking is not reliable for a live copy)".into();
            });
        }
        // Capabilities and parameters are the source's to set per migration.
        let qmp = &self.qmp;
        let setup = async {
            self.encrypt(&resp.tls_hostname).await?;
            let migrate = async {
                qmp.execute(migration::capabilities(&self.options, true))
                    .await?;
                qmp.execute(migration::parameters(&self.options, true))
                    .await?;
                qmp.execute(migration::migrate(&resp.uri)).await
            };
            migrate.await.map_err(PrepareError::Migrate)
        };
        if let Err(e) = setup.await {
            self.abort_target(&mut client).await;
            return Err(e);
        }
        self.update(|p| p.phase = pb::MigrationPhase::Active as i32);
        Ok(client)
    }

    /// Puts the stream over TLS when the target asks for it (it named the host its certificate
    /// carries).
    async fn encrypt(&self, hostname: &str) -> Result<(), PrepareError> {
        if hostname.is_empty() {
            return Ok(());
        }
        let files = self.tls.as_ref().ok_or(PrepareError::NoCertificate)?;
        let end = encrypt::End::Source;
        encrypt::enable(&self.qmp, files, &self.tls_dir, end, Some(hostname)).await?;
        self.update(|p| p.encrypted = true);
        Ok(())
    }

    /// Follows QEMU's migration to its end. Ok: QEMU completed; the instant the guest was
    /// paused for the switch-over (if seen).
    async fn migrate(
        &mut self,
        target: &mut AgentServiceClient<Channel>,
        started: Instant,
    ) -> Result<Option<Instant>, (pb::MigrationPhase, String)> {
        let mut events = self.qmp.events();
        let mut poll = tokio::time::interval(POLL);
        let mut check = tokio::time::interval(TARGET_CHECK);
        let mut f = Follow {
            stopped_at: self.paused_at,
            ..Follow::default()
        };
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(ev) if ev.name == "STOP" => {
                        f.stopped_at = f.stopped_at.or(Some(Instant::now()));
                    }
                    Ok(ev) if ev.name == "MIGRATION" => {
                        let s = ev.data["status"].as_str().unwrap_or_default();
                        if migration::qemu_status(s) == QemuStatus::Going {
                            continue;
                        }
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(failed("QEMU went away during the migration"));
                    }
                },
                _ = poll.tick() => self.on_deadline(started, &mut f).await,
                _ = check.tick() => {
                    if f.cancelled.is_none()
                        && let Some(why) = target_lost(&self.name, target).await
                    {
                        warn!("{why}; cancelling");
                        let end = failed(&format!("{why}; cancelled, the VM keeps running here"));
                        self.cancel_with(&mut f, end).await;
                    }
                    continue;
                }
                _ = self.cancel.changed() => {
                    info!("migration cancel requested");
                    let end = (pb::MigrationPhase::Cancelled, "cancelled on request; the VM keeps running here".into());
                    self.cancel_with(&mut f, end).await;
                    continue;
                }
            }
            if let Some(end) = self.progress(started, &mut f).await {
                return end;
            }
        }
    }

    /// Past the completion timeout the guest is throttled; past twice that, the migration is
    /// cancelled.
    async fn on_deadline(&self, started: Instant, f: &mut Follow) {
        let timeout = self.options.completion_timeout;
        match migration::deadline(started.elapsed(), timeout, f.escalated) {
            Deadline::Wait => {}
            Deadline::Escalate => {
                f.escalated = true;
                warn!("migration not done after {timeout:?}: throttling the guest");
                let _ = self.qmp.execute(migration::escalation()).await;
                self.update(|p| {
                    p.phase = pb::MigrationPhase::Throttling as i32;
                    p.message = "completion timeout passed: bandwidth cap lifted, guest throttled up to 99 %".into();
                });
            }
            Deadline::Cancel => {
                let end = failed(&format!(
                    "did not converge within {:?} even throttled; cancelled, the VM keeps running here",
                    timeout * 2
                ));
                self.cancel_with(f, end).await;
            }
        }
    }

    /// Cancels QEMU's migration once, remembering why for the end.
    async fn cancel_with(&self, f: &mut Follow, end: (pb::MigrationPhase, String)) {
        if f.cancelled.is_none() {
            f.cancelled = Some(end);
            let _ = self.qmp.execute(qmp::migrate_cancel {}).await;
        }
    }

    /// Publishes QEMU's figures; Some once the migration has ended.
    async fn progress(
        &self,
        started: Instant,
        f: &mut Follow,
    ) -> Option<Result<Option<Instant>, (pb::MigrationPhase, String)>> {
        let reply = match self.qmp.execute(qmp::query_migrate {}).await {
            Ok(reply) => reply,
            Err(e) => return Some(Err(failed(&format!("query-migrate: {e}")))),
        };
        let mut status = QemuStatus::Going;
        let mut error = String::new();
        self.update(|p| {
            (status, error) = migration::read_query_migrate(&reply, p);
            p.elapsed_ms = started.elapsed().as_millis() as u64;
            if status == QemuStatus::Switchover {
                p.phase = pb::MigrationPhase::Switchover as i32;
            }
        });
        match status {
            QemuStatus::Going | QemuStatus::Switchover => None,
            QemuStatus::Completed => Some(Ok(f.stopped_at)),
            QemuStatus::Failed | QemuStatus::Cancelled => {
                let detail = if error.is_empty() {
                    "no detail"
                } else {
                    &error
                };
                Some(Err(f.cancelled.take().unwrap_or_else(|| {
                    failed(&format!("QEMU failed to migrate: {detail}"))
                })))
            }
        }
    }

    /// QEMU has sent everything: the target runs the VM, or the VM runs here again.
    async fn hand_over(
        self,
        target: &mut AgentServiceClient<Channel>,
        stopped_at: Option<Instant>,
        started: Instant,
    ) -> Ended {
        self.update(|p| p.phase = pb::MigrationPhase::Switchover as i32);
        let finish = pb::FinishIncomingRequest {
            name: self.name.clone(),
        };
        let called = Instant::now();
        let result = tokio::time::timeout(FINISH_TIMEOUT, target.finish_incoming(finish)).await;
        let done = Instant::now();
        let why = match result {
            Ok(Ok(_)) => {
                let qemu_ms = self.progress.borrow().qemu_downtime_ms;
                let downtime = match stopped_at {
                    Some(at) => done - at,
                    None => Duration::from_millis(qemu_ms.into()) + (done - called),
                };
                self.update(|p| p.downtime_ms = downtime.as_millis() as u32);
                info!(?downtime, total = ?started.elapsed(), "VM handed over");
                return self.end(pb::MigrationPhase::Completed, String::new(), started);
            }
            // Never reached the target: nothing runs there.
            Ok(Err(s)) if s.code() == Code::Unavailable => s.message().to_string(),
            Ok(Err(s)) => s.message().to_string(),
            Err(_) => format!("no answer within {FINISH_TIMEOUT:?}"),
        };
        warn!("target did not take over: {why}");
        // Resume here only when the target certainly does not run the VM.
        let abort = pb::AbortIncomingRequest {
            name: self.name.clone(),
        };
        let aborted = tokio::time::timeout(CLEANUP_TIMEOUT, target.abort_incoming(abort)).await;
        let outcome = match aborted {
            Ok(Ok(_)) => Outcome::NotMoved,
            Ok(Err(s)) if s.code() == Code::NotFound => Outcome::NotMoved,
            Ok(Err(s)) if s.code() == Code::FailedPrecondition => Outcome::HandedOver,
            _ => Outcome::Unknown,
        };
        match outcome {
            Outcome::NotMoved => {
                if let Err(e) = self.qmp.execute(qmp::cont {}).await {
                    warn!("resuming after the failed hand-over: {e}");
                }
                self.end(
                    pb::MigrationPhase::Failed,
                    format!("the target did not take over ({why}); the VM keeps running here"),
                    started,
                )
            }
            Outcome::HandedOver => self.end(pb::MigrationPhase::Completed, String::new(), started),
            Outcome::Unknown => Ended {
                outcome: Outcome::Unknown,
                ..self.end(
                    pb::MigrationPhase::Failed,
                    format!(
                        "the target did not confirm the hand-over ({why}) and cannot be reached: \
                         the VM stays paused here so that it never runs twice; check the target \
                         node, then resume it here or delete it"
                    ),
                    started,
                )
            },
        }
    }

    /// Removes the receiving VM on the target; a target that is gone has nothing to remove
    /// (its agent removes an unfinished incoming VM when it starts again).
    async fn abort_target(&self, target: &mut AgentServiceClient<Channel>) {
        let req = pb::AbortIncomingRequest {
            name: self.name.clone(),
        };
        match tokio::time::timeout(CLEANUP_TIMEOUT, target.abort_incoming(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if s.code() == Code::NotFound => {}
            Ok(Err(s)) => warn!("target cleanup: {}", s.message()),
            Err(_) => warn!("target cleanup: no answer"),
        }
    }

    /// The end of the migration; the final phase is the supervisor's to publish.
    fn end(&self, phase: pb::MigrationPhase, message: String, started: Instant) -> Ended {
        if phase != pb::MigrationPhase::Completed {
            warn!(?phase, "migration ended: {message}");
        }
        self.update(|p| p.elapsed_ms = started.elapsed().as_millis() as u64);
        Ended {
            outcome: match phase {
                pb::MigrationPhase::Completed => Outcome::HandedOver,
                _ => Outcome::NotMoved,
            },
            phase,
            message,
        }
    }

    fn update(&self, f: impl FnOnce(&mut pb::MigrationProgress)) {
        self.progress.send_modify(f);
    }
}

fn failed(why: &str) -> (pb::MigrationPhase, String) {
    (pb::MigrationPhase::Failed, why.to_string())
}

/// The progress record a migration starts with.
pub fn initial(name: &str, source_node: &str) -> pb::MigrationProgress {
    pb::MigrationProgress {
        vm: name.to_string(),
        phase: pb::MigrationPhase::Preparing as i32,
        source_node: source_node.to_string(),
        started_at_ms: now_ms() as u64,
        ..Default::default()
    }
}

/// The machine layout of the live QEMU behind `qmp`.
pub async fn read_layout(qmp: &Qmp) -> Result<pb::MachineLayout, QmpError> {
    let slots = qmp.execute(qmp::query_hotpluggable_cpus {}).await?;
    let memory = crate::hotplug::memory(qmp).await?;
    Ok(migration::layout(&slots, &memory))
}

impl Supervisor {
    /// Starts moving the VM to the agent at `target`; the work goes on in an [`Outgoing`] task
    /// while this supervisor keeps answering (a cancel, a delete).
    pub(crate) async fn migrate(
        &mut self,
        target: Address,
        options: Options,
        progress_tx: oneshot::Sender<watch::Receiver<pb::MigrationProgress>>,
    ) -> Result<pb::Vm, AgentError> {
        self.check(Action::Migrate)?;
        if !self.layers.active.is_empty() {
            return Err(self.conflict(
                "its disks run on snapshot layers in this node's data dir, which the target cannot see; delete its snapshots first (that merges the layers back into the disks)".into(),
            ));
        }
        let qmp = self.live_qmp()?;
        let layout = read_layout(&qmp)
            .await
            .map_err(|e| self.qemu_error(format!("reading the machine layout: {e}")))?;
        let (progress, progress_rx) = watch::channel(initial(&self.spec.name, &self.ctx.node_name));
        let (cancel, cancel_rx) = watch::channel(false);
        info!(%target, "migration starting");
        let task = tokio::spawn(
            Outgoing {
                name: self.spec.name.clone(),
                source_node: self.ctx.node_name.clone(),
                target,
                tls: self.ctx.tls.clone(),
                tls_dir: self.files.migration_tls.clone(),
                spec: pb::VmSpec::from(&self.spec),
                layout,
                options,
                qmp,
                progress: progress.clone(),
                cancel: cancel_rx,
                pause_for_copy: self.ctx.pause_for_copy,
                paused_at: None,
            }
            .run()
            .instrument(tracing::Span::current()),
        );
        self.status.migration = Some(progress_rx.borrow().clone());
        let _ = progress_tx.send(progress_rx.clone());
        self.task = Task::Migrating(Migration {
            progress: progress_rx,
            publish: progress,
            cancel,
            task,
        });
        self.set_phase(
            Phase::Migrating,
            "live migration under way",
            Reason::Migrating,
        );
        Ok(self.snapshot())
    }

    pub(crate) fn cancel_migration(&mut self) -> Result<pb::Vm, AgentError> {
        match &self.task {
            Task::Migrating(m) => {
                let _ = m.cancel.send(true);
                Ok(self.snapshot())
            }
            _ => Err(self.conflict("no migration is under way".into())),
        }
    }

    pub(crate) async fn on_migration_end(&mut self, ended: Ended) {
        if let Some(m) = self.task.take_migration() {
            self.conclude_migration(m, ended).await;
        }
    }

    /// The QEMU a migration reads from has ended: the migration cannot go on. It is seen to
    /// its end before the exit is handled, so that its outcome is published first.
    pub(crate) async fn end_migration_with_process(&mut self) {
        let Some(mut m) = self.task.take_migration() else {
            return;
        };
        let _ = m.cancel.send(true);
        let ended = joined(&mut m.task).await;
        self.conclude_migration(m, ended).await;
    }

    async fn conclude_migration(&mut self, m: Migration, ended: Ended) {
        let mut last = m.progress.borrow().clone();
        last.phase = ended.phase as i32;
        last.message = ended.message.clone();
        let message = ended.message;
        self.status.migration = Some(last.clone());
        match ended.outcome {
            Outcome::HandedOver => {
                info!("migrated away");
                let _ = self.remove(Reason::MigratedAway).await;
            }
            Outcome::NotMoved | Outcome::Unknown if self.running.is_some() => {
                self.enter(Phase::Running);
                self.refresh_from_qemu().await;
                let phase = self.status.phase;
                self.set_phase(phase, &message, Reason::MigrationFailed);
            }
            // QEMU ended meanwhile: its exit sets the phase.
            _ => self.publish(Reason::MigrationFailed, &message),
        }
        m.publish.send_replace(last);
    }
}

/// The end of a migration task (a task that panicked ends it as failed, with nothing known
/// of the target).
pub(crate) async fn joined(task: &mut tokio::task::JoinHandle<Ended>) -> Ended {
    task.await.unwrap_or_else(|e| Ended {
        outcome: Outcome::Unknown,
        phase: pb::MigrationPhase::Failed,
        message: format!("the migration task failed: {e}"),
    })
}

/// What [`Outgoing::migrate`] keeps between wake-ups.
#[derive(Default)]
struct Follow {
    /// When the guest was paused for the switch-over.
    stopped_at: Option<Instant>,
    /// The completion timeout has passed and the guest is throttled.
    escalated: bool,
    /// Set when the agent itself cancels, with why.
    cancelled: Option<(pb::MigrationPhase, String)>,
}

/// Why the target agent can no longer take the VM, if it cannot.
async fn target_lost(name: &str, target: &mut AgentServiceClient<Channel>) -> Option<String> {
    let req = pb::GetVmRequest { name: name.into() };
    match tokio::time::timeout(TARGET_CHECK * 2, target.get_vm(req)).await {
        Err(_) => Some("the target agent stopped answering".to_string()),
        Ok(Err(s)) if s.code() == Code::Unavailable => Some(format!(
            "the target agent stopped answering ({})",
            s.message()
        )),
        Ok(Err(s)) => Some(format!(
            "the target agent lost the incoming VM: {}",
            s.message()
        )),
        Ok(Ok(_)) => None,
    }
}
