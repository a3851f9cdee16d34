//! One task per VM: owns its QEMU process and state machine, carries out requests one at a
//! time, and publishes every status change.
//!
//! Reads (GetVm, ListVms) never wait for the task: they read the last published status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::Address;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{Instrument, info_span, warn};

use crate::context::{Context, now_ms};
use crate::error::AgentError;
use crate::migration::Options;
use crate::migration::source::{Ended, joined};
use crate::qemu::process;
use crate::qemu::qmp::{self, Qmp};
use crate::snapshot::files::DiskLayers;
use crate::spec::VmSpec;
use crate::spec::argv::VmFiles;
use crate::store::SavedState;
use crate::vm::guest::{self, GuestView};
use crate::vm::phase::{self, Action, Phase};
use crate::vm::reason::Reason;
use crate::vm::status::Status;

pub use crate::snapshot::create::SnapshotRequest;

/// How long QEMU may take from launch to answering QMP.
pub(crate) const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait between looks for the QMP socket of a starting QEMU (a stat each): QEMU
/// creates it 50-100 ms after exec, and every millisecond of overshoot delays the start.
pub(crate) const QMP_POLL_MAX: Duration = Duration::from_millis(4);
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a migration target may take to load the last of the state once the source is done.
pub(crate) const INCOMING_LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a guest may take to bring resized vCPUs and memory online.
pub(crate) const GUEST_RESIZE_TIMEOUT: Duration = Duration::from_secs(20);
/// x86 Linux memory block size: the unit the guest agent reports memory in.
pub(crate) const GUEST_MEMORY_BLOCK: u64 = 128 << 20;

pub type Reply = oneshot::Sender<Result<pb::Vm, AgentError>>;

#[derive(Debug)]
pub enum Op {
    Start,
    Stop {
        timeout: Duration,
        force: bool,
    },
    Restart {
        timeout: Duration,
        force: bool,
    },
    Pause,
    Resume,
    /// New vCPUs and/or memory in bytes; checked against the spec's limits here.
    Resize {
        cpus: Option<u32>,
        memory: Option<u64>,
    },
    /// Removes the VM; its disks too unless `keep_disks`.
    Delete {
        keep_disks: bool,
    },
    /// The node's lease ran out: end QEMU at once and do not restart it (see `crate::fence`).
    Fence,
    /// Live-migrate to the agent at `target`; `progress` gets the figures as they change.
    Migrate {
        target: Address,
        options: Options,
        progress: oneshot::Sender<watch::Receiver<pb::MigrationProgress>>,
    },
    CancelMigration,
    /// Target side: launch a QEMU that waits for the VM's state; `uri` gets where it listens.
    Incoming {
        layout: pb::MachineLayout,
        multifd_channels: u32,
        source_node: String,
        uri: oneshot::Sender<String>,
    },
    /// Target side: the state has been sent; run the VM here.
    FinishIncoming,
    /// Target side: the migration ended without a hand-over; remove the waiting VM.
    AbortIncoming,
    /// Takes a snapshot; `done` gets it once it is ready.
    Snapshot {
        request: SnapshotRequest,
        done: oneshot::Sender<pb::Snapshot>,
    },
    /// Returns the VM to a snapshot; `done` gets (total, memory load) milliseconds.
    Restore {
        snapshot: String,
        done: oneshot::Sender<(u32, u32)>,
    },
    /// Deletes a snapshot; `freed` gets the bytes given back.
    DeleteSnapshot {
        snapshot: String,
        freed: oneshot::Sender<u64>,
    },
    /// Exposes the disks at one instant for a backup (see `crate::backup::expose`).
    ExposeBackup {
        request: crate::backup::expose::ExposeRequest,
        done: oneshot::Sender<crate::backup::expose::Exposed>,
    },
    /// Ends a backup's exposure; `success` moves the incremental base on.
    ReleaseBackup {
        exposed: Box<crate::backup::expose::Exposed>,
        success: bool,
        done: oneshot::Sender<()>,
    },
    /// Copies the disks for a clone named `target`; `spec` gets the clone's spec.
    CloneDisks {
        target: String,
        linked: bool,
        labels: BTreeMap<String, String>,
        spec: oneshot::Sender<VmSpec>,
    },
}

#[derive(Debug)]
pub struct Request {
    pub op: Op,
    pub reply: Reply,
}

/// The handle the registry keeps for a VM.
#[derive(Debug, Clone)]
pub struct VmHandle {
    requests: mpsc::Sender<Request>,
    status: watch::Receiver<pb::Vm>,
}

impl VmHandle {
    pub fn current(&self) -> pb::Vm {
        self.status.borrow().clone()
    }

    /// The VM left this agent (deleted, or migrated away): its task has ended.
    pub fn is_gone(&self) -> bool {
        self.requests.is_closed()
    }

    pub async fn call(&self, name: &str, op: Op) -> Result<pb::Vm, AgentError> {
        let (reply, rx) = oneshot::channel();
        let gone = || AgentError::NotFound(name.to_string());
        self.requests
            .send(Request { op, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// A live QEMU process and the connections to it.
pub(crate) struct Running {
    pub(crate) qemu: process::Qemu,
    pub(crate) pid: u32,
    /// When this agent launched it; None for a process adopted after a restart.
    pub(crate) launched: Option<Instant>,
    pub(crate) stderr_from: u64,
    /// See [`hotplug::set_cpus`].
    pub(crate) cpu_adds_left: Option<u32>,
    pub(crate) qmp: Qmp,
    pub(crate) events: broadcast::Receiver<qmp::Event>,
    pub(crate) qmp_closed: bool,
    pub(crate) guest_shutdown: Option<String>,
    pub(crate) guest_panicked: bool,
    pub(crate) qga_task: tokio::task::JoinHandle<()>,
    pub(crate) refresh: guest::Refresh,
    pub(crate) guest_commands: guest::Commands,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.qga_task.abort();
    }
}

/// A stop in progress: when the process ends, these callers get their answer.
pub(crate) struct Stopping {
    pub(crate) deadline: tokio::time::Instant,
    /// When the ACPI power button is pressed again (graceful stops only).
    pub(crate) next_powerdown: Option<tokio::time::Instant>,
    pub(crate) waiters: Vec<Reply>,
    pub(crate) restart: bool,
    /// The guest did not power off within the timeout, and QEMU was ended.
    pub(crate) timed_out: bool,
    /// Ended because the node's lease ran out.
    pub(crate) fenced: bool,
}

impl Stopping {
    fn next_tick(&self) -> tokio::time::Instant {
        self.next_powerdown
            .map_or(self.deadline, |p| p.min(self.deadline))
    }
}

/// A guest may miss the power button (it is pressed before its ACPI button driver loads):
/// press it again at this interval until the stop timeout.
pub(crate) const POWERDOWN_REPEAT: Duration = Duration::from_secs(1);

/// An outgoing migration under way (see [`crate::migration::source`]).
pub(crate) struct Migration {
    pub(crate) progress: watch::Receiver<pb::MigrationProgress>,
    /// For the final phase, which this supervisor publishes once it has acted on the end.
    pub(crate) publish: watch::Sender<pb::MigrationProgress>,
    pub(crate) cancel: watch::Sender<bool>,
    pub(crate) task: tokio::task::JoinHandle<Ended>,
}

/// The restart policy will start the VM again.
pub(crate) struct ScheduledRestart {
    pub(crate) at: tokio::time::Instant,
    pub(crate) at_ms: i64,
    pub(crate) delay: Duration,
}

/// What the VM is in the middle of, besides its phase: at most one thing at a time (a stop
/// cancels a scheduled restart, a migration refuses stops, a delete ends them all).
#[derive(Default)]
pub(crate) enum Task {
    #[default]
    None,
    Stopping(Stopping),
    Migrating(Migration),
    Restart(ScheduledRestart),
}

impl Task {
    /// Takes the task out if `pick` matches it; leaves any other in place.
    pub(crate) fn take_if<T>(&mut self, pick: impl FnOnce(Task) -> Result<T, Task>) -> Option<T> {
        match pick(std::mem::take(self)) {
            Ok(t) => Some(t),
            Err(other) => {
                *self = other;
                None
            }
        }
    }

    pub(crate) fn take_stopping(&mut self) -> Option<Stopping> {
        self.take_if(|t| match t {
            Task::Stopping(s) => Ok(s),
            other => Err(other),
        })
    }

    pub(crate) fn take_migration(&mut self) -> Option<Migration> {
        self.take_if(|t| match t {
            Task::Migrating(m) => Ok(m),
            other => Err(other),
        })
    }

    pub(crate) fn take_restart(&mut self) -> Option<ScheduledRestart> {
        self.take_if(|t| match t {
            Task::Restart(r) => Ok(r),
            other => Err(other),
        })
    }

    fn stop_tick(&self) -> Option<tokio::time::Instant> {
        match self {
            Task::Stopping(s) => Some(s.next_tick()),
            _ => None,
        }
    }

    fn restart_at(&self) -> Option<tokio::time::Instant> {
        match self {
            Task::Restart(r) => Some(r.at),
            _ => None,
        }
    }
}

pub struct Supervisor {
    pub(crate) ctx: Arc<Context>,
    pub(crate) spec: VmSpec,
    pub(crate) files: VmFiles,
    pub(crate) dir: PathBuf,
    pub(crate) status: Status,
    pub(crate) running: Option<Running>,
    pub(crate) task: Task,
    pub(crate) publish: watch::Sender<pb::Vm>,
    pub(crate) requests: mpsc::Receiver<Request>,
    /// Reports of the current process's guest-agent watcher (a fresh channel per process, so
    /// nothing said about an earlier process is applied to the next).
    pub(crate) qga_rx: mpsc::Receiver<GuestView>,
    /// The layer each disk runs on (after snapshots), and the snapshot they descend from.
    pub(crate) layers: DiskLayers,
    /// The VM has left this agent; the task ends.
    pub(crate) gone: bool,
}

/// How a supervisor begins.
pub enum Init {
    /// No process: the VM is in this phase.
    Idle { phase: Phase, message: String },
    /// Its QEMU ended while no agent watched it: the restart policy applies.
    Lost { phase: Phase, message: String },
    /// A QEMU left running by an earlier agent process.
    Adopt {
        qemu: Box<process::Qemu>,
        saved: SavedState,
    },
}

/// Starts the task for a VM whose directory and spec exist; returns its handle once the VM's
/// status is known (for an adopted QEMU: after QMP has answered).
pub async fn spawn(ctx: Arc<Context>, spec: VmSpec, init: Init) -> VmHandle {
    let lost = matches!(init, Init::Lost { .. });
    let (phase, message, adopt) = match init {
        Init::Idle { phase, message } | Init::Lost { phase, message } => (phase, message, None),
        Init::Adopt { qemu, saved } => (saved.phase, String::new(), Some((*qemu, saved))),
    };
    let dir = ctx.store.vm_dir(&spec.name);
    let (req_tx, req_rx) = mpsc::channel(16);
    let (_, qga_rx) = mpsc::channel(1);
    let status = Status {
        phase,
        message,
        qemu_status: String::new(),
        cpus: 0,
        memory_bytes: 0,
        agent_connected: false,
        started_at_ms: 0,
        phase_changed_at_ms: now_ms(),
        revision: 1,
        timings: Default::default(),
        restart_count: 0,
        guest: GuestView::default(),
        migration: None,
        import: None,
    };
    let (publish, status_rx) = watch::channel(pb::Vm::default());
    let span = info_span!("vm", name = %spec.name);
    let layers = DiskLayers::load(&dir).unwrap_or_else(|e| {
        warn!(vm = %spec.name, "disk layer record unreadable, disks run on their own files: {e}");
        DiskLayers::default()
    });
    let mut sup = Supervisor {
        files: VmFiles::in_dir(&dir),
        dir,
        ctx,
        spec,
        status,
        running: None,
        task: Task::None,
        publish,
        requests: req_rx,
        qga_rx,
        layers,
        gone: false,
    };
    if let Some((qemu, saved)) = adopt {
        sup.adopt(qemu, saved).instrument(span.clone()).await;
    }
    if lost {
        sup.schedule_restart(Duration::ZERO);
    }
    sup.publish.send_replace(sup.snapshot());
    tokio::spawn(sup.run().instrument(span));
    VmHandle {
        requests: req_tx,
        status: status_rx,
    }
}

impl Supervisor {
    async fn run(mut self) {
        loop {
            let deadline = self.task.stop_tick();
            let restart_at = self.task.restart_at();
            tokio::select! {
                req = self.requests.recv() => match req {
                    Some(req) => self.handle(req).await,
                    None => return,
                },
                event = watch_migration(&mut self.task) => match event {
                    MigrationEvent::Progress(p) => {
                        self.status.migration = Some(p);
                        self.publish(Reason::MigrationProgress, "");
                    }
                    MigrationEvent::Ended(outcome) => self.on_migration_end(outcome).await,
                },
                event = watch_process(&mut self.running) => match event {
                    ProcessEvent::Exited(status) => self.on_exit(status).await,
                    ProcessEvent::Qmp(event) => self.on_event(event).await,
                },
                Some(view) = self.qga_rx.recv() => self.on_guest_view(view),
                _ = sleep_until(deadline) => self.on_stop_tick().await,
                _ = sleep_until(restart_at) => self.auto_restart().await,
            }
            if self.gone {
                return;
            }
        }
    }

    async fn handle(&mut self, Request { op, reply }: Request) {
        let result = match op {
            Op::Start => self.start().await,
            Op::Pause => self.pause().await,
            Op::Resume => self.resume().await,
            Op::Resize { cpus, memory } => self.resize(cpus, memory).await,
            Op::Stop { timeout, force } => return self.stop(timeout, force, false, reply).await,
            Op::Restart { timeout, force } => {
                return self.stop(timeout, force, true, reply).await;
            }
            Op::Delete { keep_disks: false } => self.remove(Reason::Deleted).await,
            // Its disks serve the VM where it runs now, as after a migration.
            Op::Delete { keep_disks: true } => self.remove(Reason::MigratedAway).await,
            Op::Fence => return self.fence(reply).await,
            Op::Migrate {
                target,
                options,
                progress,
            } => self.migrate(target, options, progress).await,
            Op::CancelMigration => self.cancel_migration(),
            Op::Incoming {
                layout,
                multifd_channels,
                source_node,
                uri,
            } => {
                self.incoming(&layout, multifd_channels, &source_node, uri)
                    .await
            }
            Op::FinishIncoming => {
                // The source waits for this answer with the guest paused there: QEMU's
                // figures are read after it.
                let r = self.finish_incoming().await;
                let ran = r.is_ok();
                let _ = reply.send(r);
                if ran {
                    self.refresh_from_qemu().await;
                }
                return;
            }
            Op::Snapshot { request, done } => {
                let r = self.create_snapshot(request).await;
                self.answer(r, done)
            }
            Op::Restore { snapshot, done } => {
                let r = self.restore_snapshot(&snapshot).await;
                self.answer(r, done)
            }
            Op::DeleteSnapshot { snapshot, freed } => {
                let r = self.delete_snapshot(&snapshot).await;
                self.answer(r, freed)
            }
            Op::ExposeBackup { request, done } => {
                let r = self.expose_disks(request).await;
                self.answer(r, done)
            }
            Op::ReleaseBackup {
                exposed,
                success,
                done,
            } => {
                self.release_disks(*exposed, success).await;
                self.answer(Ok(()), done)
            }
            Op::CloneDisks {
                target,
                linked,
                labels,
                spec,
            } => {
                let r = self.clone_disks(&target, linked, labels).await;
                self.answer(r, spec)
            }
            Op::AbortIncoming => match self.status.phase {
                Phase::Incoming => self.remove(Reason::IncomingAborted).await,
                other => Err(self.conflict(format!(
                    "is {} here, not waiting for a migration",
                    other.name()
                ))),
            },
        };
        let _ = reply.send(result);
    }

    /// For an op that answers with a value besides the VM: the value goes to `to`, the
    /// caller's reply is the VM as it is now.
    fn answer<T>(
        &self,
        result: Result<T, AgentError>,
        to: oneshot::Sender<T>,
    ) -> Result<pb::Vm, AgentError> {
        let value = result?;
        let _ = to.send(value);
        Ok(self.snapshot())
    }

    // ----- requests -------------------------------------------------------------------------

    pub(crate) fn check(&self, action: Action) -> Result<(), AgentError> {
        phase::check(self.status.phase, action).map_err(|e| self.conflict(e.to_string()))
    }

    /// Runs a QMP command on the live process.
    pub(crate) async fn qmp_call<T, F, Fut>(&self, f: F) -> Result<T, AgentError>
    where
        F: FnOnce(Qmp) -> Fut,
        Fut: Future<Output = Result<T, qmp::QmpError>>,
    {
        f(self.live_qmp()?).await.map_err(|e| self.qemu_error(e))
    }

    pub(crate) fn kill(&mut self) {
        if let Some(run) = &mut self.running {
            run.qemu.kill();
        }
    }

    pub(crate) fn conflict(&self, why: String) -> AgentError {
        AgentError::Conflict {
            name: self.spec.name.clone(),
            why,
        }
    }

    pub(crate) fn qemu_error(&self, why: impl std::fmt::Display) -> AgentError {
        AgentError::Qemu {
            name: self.spec.name.clone(),
            why: why.to_string(),
        }
    }
}

enum MigrationEvent {
    Progress(pb::MigrationProgress),
    Ended(Ended),
}

/// The next thing an outgoing migration does: new figures, or its end.
async fn watch_migration(task: &mut Task) -> MigrationEvent {
    let Task::Migrating(m) = task else {
        return std::future::pending().await;
    };
    tokio::select! {
        biased;
        Ok(()) = m.progress.changed() => {
            MigrationEvent::Progress(m.progress.borrow_and_update().clone())
        }
        ended = joined(&mut m.task) => MigrationEvent::Ended(ended),
    }
}

enum ProcessEvent {
    Exited(process::ExitInfo),
    Qmp(qmp::Event),
}

/// The next thing the QEMU process does: an event on QMP, or its exit.
async fn watch_process(running: &mut Option<Running>) -> ProcessEvent {
    let Some(run) = running else {
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            info = run.qemu.wait() => return ProcessEvent::Exited(info),
            event = run.events.recv(), if !run.qmp_closed => match event {
                Ok(ev) => return ProcessEvent::Qmp(ev),
                Err(broadcast::error::RecvError::Lagged(n)) => warn!("missed {n} QMP events"),
                // QMP is gone; the exit follows.
                Err(broadcast::error::RecvError::Closed) => run.qmp_closed = true,
            },
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    /// The live process's QMP; a conflict when there is none (the phase says there should
    /// be one, but a request raced its exit).
    pub(crate) fn live_qmp(&self) -> Result<Qmp, AgentError> {
        self.running
            .as_ref()
            .map(|r| r.qmp.clone())
            .ok_or_else(|| self.conflict("no QEMU process".into()))
    }
}
