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
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::accel::Accel;
use crate::argv::{self, VmFiles};
use crate::cgroup;
use crate::context::{Context, now_ms};
use crate::error::AgentError;
use crate::guest::{self, GuestView};
use crate::hotplug;
use crate::migration::{self, Options};
use crate::outgoing::{self, Ended, Outcome, Outgoing};
use crate::process;
use crate::qmp::{self, Qmp};
use crate::quantity::format_bytes;
use crate::snapshot_files::DiskLayers;
use crate::spec::{FieldError, MIN_MEMORY, MemoryHotplug, VmSpec};
use crate::state::{self, Action, Exit, Phase};
use crate::store::SavedState;

mod clone;
mod snapshots;
pub use snapshots::SnapshotRequest;

/// How long QEMU may take from launch to answering QMP.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait between looks for the QMP socket of a starting QEMU (a stat each): QEMU
/// creates it 50-100 ms after exec, and every millisecond of overshoot delays the start.
const QMP_POLL_MAX: Duration = Duration::from_millis(4);
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a migration target may take to load the last of the state once the source is done.
const INCOMING_LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a guest may take to bring resized vCPUs and memory online.
const GUEST_RESIZE_TIMEOUT: Duration = Duration::from_secs(20);
/// x86 Linux memory block size: the unit the guest agent reports memory in.
const GUEST_MEMORY_BLOCK: u64 = 128 << 20;

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
    Delete,
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

/// What the supervisor knows about the VM, published as `pb::VmStatus`.
#[derive(Debug, Clone)]
struct Status {
    phase: Phase,
    message: String,
    qemu_status: String,
    cpus: u32,
    memory_bytes: u64,
    agent_connected: bool,
    started_at_ms: i64,
    phase_changed_at_ms: i64,
    revision: u64,
    timings: pb::StartupTimings,
    restart_count: u32,
    /// What the guest agent reports.
    guest: GuestView,
    /// When the restart policy starts the VM again.
    restart_at: Option<(tokio::time::Instant, i64)>,
    /// The migration under way, or the last one.
    migration: Option<pb::MigrationProgress>,
}

/// A live QEMU process and the connections to it.
struct Running {
    qemu: process::Qemu,
    pid: u32,
    /// When this agent launched it; None for a process adopted after a restart.
    launched: Option<Instant>,
    stderr_from: u64,
    /// See [`hotplug::set_cpus`].
    cpu_adds_left: Option<u32>,
    qmp: Qmp,
    events: broadcast::Receiver<qmp::Event>,
    qmp_closed: bool,
    guest_shutdown: Option<String>,
    guest_panicked: bool,
    qga_task: tokio::task::JoinHandle<()>,
    refresh: guest::Refresh,
    guest_commands: guest::Commands,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.qga_task.abort();
    }
}

/// A stop in progress: when the process ends, these callers get their answer.
struct Stopping {
    deadline: tokio::time::Instant,
    /// When the ACPI power button is pressed again (graceful stops only).
    next_powerdown: Option<tokio::time::Instant>,
    waiters: Vec<Reply>,
    restart: bool,
}

impl Stopping {
    fn next_tick(&self) -> tokio::time::Instant {
        self.next_powerdown
            .map_or(self.deadline, |p| p.min(self.deadline))
    }
}

/// A guest may miss the power button (it is pressed before its ACPI button driver loads):
/// press it again at this interval until the stop timeout.
const POWERDOWN_REPEAT: Duration = Duration::from_secs(1);

/// An outgoing migration under way (see [`outgoing`]).
struct Migration {
    progress: watch::Receiver<pb::MigrationProgress>,
    /// For the final phase, which this supervisor publishes once it has acted on the end.
    publish: watch::Sender<pb::MigrationProgress>,
    cancel: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Ended>,
}

pub struct Supervisor {
    ctx: Arc<Context>,
    spec: VmSpec,
    files: VmFiles,
    dir: PathBuf,
    status: Status,
    running: Option<Running>,
    stopping: Option<Stopping>,
    publish: watch::Sender<pb::Vm>,
    requests: mpsc::Receiver<Request>,
    /// Reports of the current process's guest-agent watcher (a fresh channel per process, so
    /// nothing said about an earlier process is applied to the next).
    qga_rx: mpsc::Receiver<GuestView>,
    migration: Option<Migration>,
    /// The layer each disk runs on (after snapshots), and the snapshot they descend from.
    layers: DiskLayers,
    /// The VM has left this agent; the task ends.
    gone: bool,
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
        restart_at: None,
        migration: None,
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
        stopping: None,
        publish,
        requests: req_rx,
        qga_rx,
        migration: None,
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
            let deadline = self.stopping.as_ref().map(Stopping::next_tick);
            let restart_at = self.status.restart_at.map(|(at, _)| at);
            tokio::select! {
                req = self.requests.recv() => match req {
                    Some(req) => self.handle(req).await,
                    None => return,
                },
                event = watch_migration(&mut self.migration) => match event {
                    MigrationEvent::Progress(p) => {
                        self.status.migration = Some(p);
                        self.publish("MigrationProgress", "");
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
            Op::Delete => self.remove("Deleted").await,
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
                Phase::Incoming => self.remove("IncomingAborted").await,
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

    fn check(&self, action: Action) -> Result<(), AgentError> {
        state::check(self.status.phase, action).map_err(|why| self.conflict(why))
    }

    async fn start(&mut self) -> Result<pb::Vm, AgentError> {
        self.check(Action::Start)?;
        self.status.restart_at = None;
        let resolved = self.resolved_spec()?;
        self.launch(&resolved, &[], resolved.max_cpus - resolved.cpus)
            .await?;
        Ok(self.snapshot())
    }

    /// Spawns QEMU for `resolved` (plus `extra` arguments) and attaches to it. `cpu_adds`: the
    /// vCPUs it may still start (counted under TCG only, see [`hotplug::set_cpus`]).
    async fn launch(
        &mut self,
        resolved: &VmSpec,
        extra: &[&str],
        cpu_adds: u32,
    ) -> Result<(), AgentError> {
        let mut argv = argv::build(resolved, &self.files, self.ctx.accel.accel);
        argv.extend(extra.iter().map(|a| a.to_string()));
        for sock in [&self.files.qmp_socket, &self.files.qga_socket] {
            let _ = std::fs::remove_file(sock);
        }
        let stderr_from = process::stderr_len(&self.dir);
        let launched = Instant::now();
        let qemu = process::spawn(&self.ctx.qemu, &argv, &self.dir)
            .map_err(|e| self.qemu_error(format!("cannot run {}: {e}", self.ctx.qemu.display())))?;
        info!(
            pid = qemu.pid(),
            accel = self.ctx.accel.accel.as_str(),
            "QEMU launched"
        );
        if let Ok(cg) = &self.ctx.cgroups
            && let Err(e) = cg.place(&self.spec.name, qemu.pid(), &cgroup::limits(resolved))
        {
            warn!("cannot place QEMU in its cgroup: {e}");
        }
        self.status.started_at_ms = now_ms();
        self.status.timings = Default::default();
        self.status.qemu_status.clear();
        self.set_phase(Phase::Starting, "QEMU launched", "Starting");
        let cpu_adds_left = (self.ctx.accel.accel == Accel::Tcg).then_some(cpu_adds);
        self.attach(qemu, Some(launched), stderr_from, cpu_adds_left)
            .await
    }

    /// Takes over a QEMU left running by an earlier agent process.
    async fn adopt(&mut self, qemu: process::Qemu, saved: SavedState) {
        info!(pid = qemu.pid(), "adopting running QEMU");
        self.status.started_at_ms = saved.started_at_ms;
        self.status.phase = saved.phase;
        let from = process::stderr_len(&self.dir);
        // Under TCG an adopted process with no record of its vCPU starts gets no more.
        let cpu_adds_left = match self.ctx.accel.accel {
            Accel::Tcg => Some(saved.cpu_adds_left.unwrap_or(0)),
            Accel::Kvm => None,
        };
        if self.attach(qemu, None, from, cpu_adds_left).await.is_ok() {
            // Saves the state afresh (its file may have been the damaged part).
            let phase = self.status.phase;
            self.set_phase(
                phase,
                "QEMU kept running while the agent restarted",
                "Adopted",
            );
            if saved.phase == Phase::Migrating {
                // Nobody drives that migration any more. The target never ran the guest (it
                // waits for a hand-over that will not come), so the VM stays here.
                self.resume_after_lost_migration(
                    "a migration was under way when the agent restarted: cancelled, the VM stays here",
                    "MigrationFailed",
                )
                .await;
            } else if saved.phase == Phase::Running && self.status.phase == Phase::Paused {
                // Recorded running, found paused: the agent went down while it had the guest
                // paused for a memory snapshot (which was not finished, so not kept).
                self.resume_after_lost_migration(
                    "a snapshot was under way when the agent restarted: abandoned, the VM runs on",
                    "SnapshotFailed",
                )
                .await;
            }
            if saved.phase == Phase::Stopping {
                // A stop was under way when the agent went down: see it through.
                let (reply, _) = oneshot::channel();
                self.status.phase = Phase::Running;
                self.stop(DEFAULT_STOP_TIMEOUT, false, false, reply).await;
            }
        }
    }

    /// Cancels a migration (to another QEMU, or to a snapshot file) that nobody drives any
    /// more, and runs the guest on.
    async fn resume_after_lost_migration(&mut self, message: &str, reason: &str) {
        let Some(qmp) = self.running.as_ref().map(|r| r.qmp.clone()) else {
            return;
        };
        let _ = qmp.execute_value("migrate_cancel", json!({})).await;
        // A snapshot's file format must not stay on for a later live migration (a QEMU
        // without mapped-ram refuses the name: nothing to undo there).
        let _ = qmp
            .execute_value(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "mapped-ram", "state": false}]}),
            )
            .await;
        if let Ok(s) = qmp.execute(qapi::qmp::query_status {}).await
            && !s.running
            && let Err(e) = qmp.execute(qapi::qmp::cont {}).await
        {
            warn!("resuming after the lost migration: {e}");
        }
        self.status.phase = Phase::Running;
        self.refresh_from_qemu().await;
        let phase = self.status.phase;
        self.set_phase(phase, message, reason);
    }

    /// Connects QMP and the guest agent to a live QEMU and makes it the VM's process. On
    /// failure the process is ended and the VM is Failed with QEMU's own words.
    async fn attach(
        &mut self,
        mut qemu: process::Qemu,
        launched: Option<Instant>,
        stderr_from: u64,
        cpu_adds_left: Option<u32>,
    ) -> Result<(), AgentError> {
        let qmp = match self.connect_qmp(&mut qemu).await {
            Ok(qmp) => qmp,
            Err(why) => {
                qemu.kill();
                let exit = qemu.wait().await;
                let how = state::how_it_ended(exit.code, exit.signal);
                let tail = process::stderr_tail(&self.dir, stderr_from, 600);
                let why = if tail.is_empty() {
                    format!("{why} ({how})")
                } else {
                    format!("{why}: {tail}")
                };
                self.status.started_at_ms = 0;
                self.set_phase(Phase::Failed, &why, "StartFailed");
                return Err(self.qemu_error(why));
            }
        };
        if let Some(launched) = launched {
            self.status.timings.qmp_ready_ms = launched.elapsed().as_millis() as u32;
        }
        let events = qmp.events();
        let refresh = guest::Refresh::default();
        let (qga_tx, qga_rx) = mpsc::channel(4);
        self.qga_rx = qga_rx;
        let (guest_commands, commands_rx) = guest::commands();
        let qga_task = tokio::spawn(
            guest::watch(
                self.files.qga_socket.clone(),
                refresh.clone(),
                qga_tx,
                commands_rx,
            )
            .instrument(tracing::Span::current()),
        );
        self.running = Some(Running {
            pid: qemu.pid(),
            qemu,
            launched,
            stderr_from,
            cpu_adds_left,
            qmp,
            events,
            qmp_closed: false,
            guest_shutdown: None,
            guest_panicked: false,
            qga_task,
            refresh,
            guest_commands,
        });
        self.refresh_from_qemu().await;
        Ok(())
    }

    /// Connects to QMP as soon as QEMU has created the socket; fails early if QEMU exits.
    async fn connect_qmp(&self, qemu: &mut process::Qemu) -> Result<Qmp, String> {
        let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
        let mut delay = Duration::from_millis(1);
        loop {
            if qemu.has_exited() {
                return Err("QEMU exited during start".into());
            }
            if self.files.qmp_socket.exists() {
                match Qmp::connect(&self.files.qmp_socket).await {
                    Ok(qmp) => return Ok(qmp),
                    Err(e) if Instant::now() > deadline => return Err(e.to_string()),
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                return Err(format!("QMP did not answer within {QMP_CONNECT_TIMEOUT:?}"));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(QMP_POLL_MAX);
        }
    }

    /// Reads run state and actual size from QEMU into the status.
    async fn refresh_from_qemu(&mut self) {
        let Some(run) = &self.running else { return };
        let qmp = run.qmp.clone();
        let launched = run.launched;
        match qmp.execute(qapi::qmp::query_status {}).await {
            Ok(s) => {
                self.status.qemu_status = enum_name(&s.status);
                let next = state::on_run_state(self.status.phase, s.running);
                if let (true, Some(launched)) = (s.running, launched)
                    && self.status.timings.running_ms == 0
                {
                    self.status.timings.running_ms = launched.elapsed().as_millis() as u32;
                }
                if next != self.status.phase {
                    self.set_phase(next, "", phase_reason(next));
                }
            }
            Err(e) => warn!("query-status: {e}"),
        }
        if let Ok(cpus) = qmp.execute_value("query-cpus-fast", json!({})).await {
            self.status.cpus = cpus.as_array().map_or(0, |a| a.len() as u32);
        }
        if let Ok(mem) = qmp
            .execute_value("query-memory-size-summary", json!({}))
            .await
        {
            let get = |k: &str| mem.get(k).and_then(Value::as_u64).unwrap_or(0);
            self.status.memory_bytes = get("base-memory") + get("plugged-memory");
        }
        self.publish("Refreshed", "");
    }

    /// Resizes in place by hotplug when running, in the spec when stopped. Limits are checked
    /// before anything is touched; a step the guest refuses leaves the VM running at its real
    /// size, which the status shows.
    async fn resize(
        &mut self,
        cpus: Option<u32>,
        memory: Option<u64>,
    ) -> Result<pb::Vm, AgentError> {
        let want_cpus = cpus.unwrap_or(self.spec.cpus);
        let want_memory = memory.unwrap_or(self.spec.memory);
        if want_cpus == 0 {
            return Err(FieldError::new("cpus", "must be at least 1").into());
        }
        if want_cpus > self.spec.max_cpus {
            let msg = format!("{want_cpus} is above maxCpus ({})", self.spec.max_cpus);
            return Err(FieldError::new("cpus", msg).into());
        }
        if want_memory > self.spec.max_memory {
            let msg = format!(
                "{} is above maxMemory ({})",
                format_bytes(want_memory),
                format_bytes(self.spec.max_memory)
            );
            return Err(FieldError::new("memory", msg).into());
        }
        if want_memory < MIN_MEMORY {
            let msg = format!(
                "{} is below the minimum of {}",
                format_bytes(want_memory),
                format_bytes(MIN_MEMORY)
            );
            return Err(FieldError::new("memory", msg).into());
        }
        let growth = want_memory.saturating_sub(self.spec.memory);
        let available = crate::node::memory().1;
        if growth > available {
            let msg = format!(
                "the node has only {} of memory available",
                format_bytes(available)
            );
            return Err(FieldError::new("memory", msg).into());
        }
        match self.status.phase {
            Phase::Running => {}
            Phase::Pending | Phase::Stopped | Phase::Failed => {
                // Takes effect at the next start.
                if self.spec.memory_hotplug == MemoryHotplug::Dimm {
                    crate::spec::check_dimm_range("memory", want_memory, self.spec.max_memory)?;
                }
                self.spec.cpus = want_cpus;
                self.spec.memory = want_memory;
                self.save_spec()?;
                self.publish("Resized", "new size applies at the next start");
                return Ok(self.snapshot());
            }
            other => {
                return Err(self.conflict(format!("cannot resize a VM that is {}", other.name())));
            }
        }
        let qmp = self
            .running
            .as_ref()
            .map(|r| r.qmp.clone())
            .expect("Running has a process");
        let mut result = Ok(());
        if want_cpus != self.spec.cpus {
            let mut adds_left = self.running.as_ref().and_then(|r| r.cpu_adds_left);
            result = hotplug::set_cpus(&qmp, want_cpus, &mut adds_left).await;
            if let Some(run) = &mut self.running {
                run.cpu_adds_left = adds_left;
            }
            if result.is_ok() {
                self.spec.cpus = want_cpus;
            }
        }
        if result.is_ok() && want_memory != self.spec.memory {
            let (mode, max) = (self.spec.memory_hotplug, self.spec.max_memory);
            result = hotplug::set_memory(&qmp, mode, max, want_memory).await;
            if result.is_ok() {
                self.spec.memory = want_memory;
            }
        }
        self.save_spec()?;
        self.save_state();
        self.refresh_from_qemu().await;
        if result.is_ok() && self.status.agent_connected {
            result = self.await_guest_size(want_cpus, want_memory).await;
        }
        match result {
            Ok(()) => {
                info!(cpus = want_cpus, memory = want_memory, "resized");
                self.publish("Resized", "");
                Ok(self.snapshot())
            }
            Err(why) => {
                warn!("resize: {why}");
                self.publish("ResizeFailed", &why);
                Err(self.qemu_error(format!("resize: {why}")))
            }
        }
    }

    /// Waits until the guest agent reports the new vCPU count and memory. The guest counts
    /// memory in blocks (128 MiB on x86), so memory matches to within one block.
    async fn await_guest_size(&mut self, cpus: u32, memory: u64) -> Result<(), String> {
        if let Some(run) = &self.running {
            run.refresh.closely();
        }
        let deadline = tokio::time::Instant::now() + GUEST_RESIZE_TIMEOUT;
        loop {
            let g = self.status.guest;
            if g.cpus == cpus && g.memory_bytes.abs_diff(memory) < GUEST_MEMORY_BLOCK {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.qga_rx.recv()).await {
                Ok(Some(view)) => self.on_guest_view(view),
                _ => {
                    return Err(format!(
                        "after {GUEST_RESIZE_TIMEOUT:?} the guest reports {} vCPUs and {}",
                        g.cpus,
                        format_bytes(g.memory_bytes)
                    ));
                }
            }
        }
    }

    fn save_spec(&self) -> Result<(), AgentError> {
        self.ctx
            .store
            .save_spec(&self.spec)
            .map_err(|e| AgentError::Internal(format!("saving the spec: {e}")))
    }

    async fn pause(&mut self) -> Result<pb::Vm, AgentError> {
        self.check(Action::Pause)?;
        self.qmp_call(|q| async move { q.execute(qapi::qmp::stop {}).await })
            .await?;
        self.status.qemu_status = "paused".into();
        self.set_phase(Phase::Paused, "paused", "Paused");
        Ok(self.snapshot())
    }

    async fn resume(&mut self) -> Result<pb::Vm, AgentError> {
        self.check(Action::Resume)?;
        self.qmp_call(|q| async move { q.execute(qapi::qmp::cont {}).await })
            .await?;
        self.status.qemu_status = "running".into();
        self.set_phase(Phase::Running, "resumed", "Resumed");
        Ok(self.snapshot())
    }

    /// Begins a stop; `reply` is answered when QEMU has exited (and, for a restart, started again).
    async fn stop(&mut self, timeout: Duration, force: bool, restart: bool, reply: Reply) {
        let action = if restart {
            Action::Restart
        } else {
            Action::Stop
        };
        if !restart && self.status.restart_at.take().is_some() {
            // Stopping a VM that waits for its restart policy cancels the restart.
            self.set_phase(
                Phase::Stopped,
                "restart cancelled by a stop request",
                "Stopped",
            );
            let _ = reply.send(Ok(self.snapshot()));
            return;
        }
        if let Err(e) = self.check(action) {
            let _ = reply.send(Err(e));
            return;
        }
        if let Some(stopping) = &mut self.stopping {
            // Already stopping: join the wait; a forced stop cuts the grace period short.
            stopping.waiters.push(reply);
            // A stop wins over a restart under way; a restart joins a stop as a stop.
            stopping.restart &= restart;
            if force {
                self.kill();
            }
            return;
        }
        // A paused guest cannot react to ACPI, and a starting one may not listen yet.
        let graceful = !force && self.status.phase == Phase::Running;
        self.stopping = Some(Stopping {
            deadline: tokio::time::Instant::now() + if graceful { timeout } else { Duration::ZERO },
            next_powerdown: graceful.then(|| tokio::time::Instant::now() + POWERDOWN_REPEAT),
            waiters: vec![reply],
            restart,
        });
        self.set_phase(
            Phase::Stopping,
            if graceful {
                "ACPI power-down sent"
            } else {
                "stopping"
            },
            "Stopping",
        );
        if graceful {
            if let Err(e) = self
                .qmp_call(|q| async move { q.execute(qapi::qmp::system_powerdown {}).await })
                .await
            {
                warn!("system_powerdown failed, ending QEMU: {e}");
                self.kill();
            }
        } else {
            self.kill();
        }
    }

    async fn on_stop_tick(&mut self) {
        let Some(s) = &mut self.stopping else { return };
        let now = tokio::time::Instant::now();
        if now < s.deadline {
            s.next_powerdown = Some(now + POWERDOWN_REPEAT);
            let _ = self
                .qmp_call(|q| async move { q.execute(qapi::qmp::system_powerdown {}).await })
                .await;
            return;
        }
        if let Some(s) = &mut self.stopping {
            // Only once: the process exit ends the stop.
            s.next_powerdown = None;
            s.deadline = now + Duration::from_secs(3600);
            warn!("guest did not power off in time; ending QEMU");
            self.status.message = "guest did not power off in time; QEMU ended".into();
            self.kill();
        }
    }

    /// Ends the VM here: its QEMU (if any) and its files. `reason` goes out with the DELETED
    /// event ("Deleted", "MigratedAway", "IncomingAborted").
    async fn remove(&mut self, reason: &str) -> Result<pb::Vm, AgentError> {
        if let Some(m) = &self.migration {
            let _ = m.cancel.send(true);
        }
        if let Some(mut run) = self.running.take() {
            run.qemu.kill();
            run.qemu.wait().await;
        }
        for waiter in self.stopping.take().into_iter().flat_map(|s| s.waiters) {
            let _ = waiter.send(Err(AgentError::NotFound(self.spec.name.clone())));
        }
        self.status.restart_at = None;
        if let Ok(cg) = &self.ctx.cgroups {
            cg.remove(&self.spec.name);
        }
        self.ctx
            .store
            .remove(&self.spec.name)
            .map_err(|e| AgentError::Internal(format!("removing {}: {e}", self.dir.display())))?;
        // Snapshots of a VM that left this node cannot be restored here.
        self.ctx.snapshots.remove_vm(&self.spec.name);
        if reason == "Deleted" {
            // The disks a clone was given go with it (after a migration they may be in use on
            // the target, which sees them through shared storage: kept then).
            let dir = crate::clone::clone_dir(&self.ctx.images_dir, &self.spec.name);
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!("removing {}: {e}", dir.display());
            }
        }
        info!(reason, "removed from this node");
        self.gone = true;
        let vm = self.snapshot();
        let _ = self.ctx.events.send(pb::VmEvent {
            r#type: pb::EventType::Deleted as i32,
            vm: Some(vm.clone()),
            reason: reason.into(),
            message: String::new(),
        });
        Ok(vm)
    }

    // ----- live migration -------------------------------------------------------------------

    /// Starts moving the VM to the agent at `target`; the work goes on in an [`Outgoing`] task
    /// while this supervisor keeps answering (a cancel, a delete).
    async fn migrate(
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
        let qmp = self
            .running
            .as_ref()
            .map(|r| r.qmp.clone())
            .expect("Running has a process");
        let layout = outgoing::read_layout(&qmp)
            .await
            .map_err(|e| self.qemu_error(format!("reading the machine layout: {e}")))?;
        let (progress, progress_rx) =
            watch::channel(outgoing::initial(&self.spec.name, &self.ctx.node_name));
        let (cancel, cancel_rx) = watch::channel(false);
        info!(%target, "migration starting");
        let task = tokio::spawn(
            Outgoing {
                name: self.spec.name.clone(),
                source_node: self.ctx.node_name.clone(),
                target,
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
        self.migration = Some(Migration {
            progress: progress_rx,
            publish: progress,
            cancel,
            task,
        });
        self.set_phase(Phase::Migrating, "live migration under way", "Migrating");
        Ok(self.snapshot())
    }

    fn cancel_migration(&mut self) -> Result<pb::Vm, AgentError> {
        match &self.migration {
            Some(m) => {
                let _ = m.cancel.send(true);
                Ok(self.snapshot())
            }
            None => Err(self.conflict("no migration is under way".into())),
        }
    }

    async fn on_migration_end(&mut self, ended: Ended) {
        let Some(m) = self.migration.take() else {
            return;
        };
        let mut last = m.progress.borrow().clone();
        last.phase = ended.phase as i32;
        last.message = ended.message.clone();
        let message = ended.message;
        self.status.migration = Some(last.clone());
        match ended.outcome {
            Outcome::HandedOver => {
                info!("migrated away");
                let _ = self.remove("MigratedAway").await;
            }
            Outcome::NotMoved | Outcome::Unknown if self.running.is_some() => {
                self.status.phase = Phase::Running;
                self.refresh_from_qemu().await;
                let phase = self.status.phase;
                self.set_phase(phase, &message, "MigrationFailed");
            }
            // QEMU ended meanwhile: its exit has set the phase.
            _ => self.publish("MigrationFailed", &message),
        }
        m.publish.send_replace(last);
    }

    /// Target side: a QEMU with the source's machine layout, paused (`-S`) and listening for
    /// the state on a port of this agent's range.
    async fn incoming(
        &mut self,
        layout: &pb::MachineLayout,
        multifd_channels: u32,
        source_node: &str,
        uri_tx: oneshot::Sender<String>,
    ) -> Result<pb::Vm, AgentError> {
        if self.status.phase != Phase::Pending {
            return Err(self.conflict("already exists on this node".into()));
        }
        migration::check_layout(layout, &self.spec)?;
        let mut launch = self.spec.clone();
        launch.cpus = layout.boot_cpus;
        launch.memory = layout.boot_memory_bytes;
        let resolved = self.resolve_on(&launch, &DiskLayers::default())?;
        self.launch(
            &resolved,
            &["-S", "-incoming", "defer"],
            resolved.max_cpus - resolved.cpus,
        )
        .await?;
        if let Some(run) = &self.running
            && let Err(e) = process::prioritize_loading(run.pid)
        {
            warn!("the incoming QEMU runs at normal priority: {e}");
        }
        self.set_phase(
            Phase::Incoming,
            &format!("arriving by live migration from {source_node}"),
            "Incoming",
        );
        let options = Options {
            multifd_channels,
            ..Options::default()
        };
        match self.listen_incoming(layout, &options).await {
            Ok(uri) => {
                info!(uri, source = source_node, "waiting for the migration");
                let _ = uri_tx.send(uri);
                Ok(self.snapshot())
            }
            Err(why) => {
                let _ = self.remove("IncomingAborted").await;
                Err(self.qemu_error(format!("preparing for the migration: {why}")))
            }
        }
    }

    /// Recreates hot-plugged vCPUs and memory, sets the migration capabilities and opens the
    /// first free port of the range.
    async fn listen_incoming(
        &mut self,
        layout: &pb::MachineLayout,
        options: &Options,
    ) -> Result<String, String> {
        self.replay_layout(layout).await?;
        self.open_incoming_port(options).await
    }

    /// Plugs what the source QEMU had plugged since its start: the state loads only into the
    /// same devices.
    async fn replay_layout(&mut self, layout: &pb::MachineLayout) -> Result<(), String> {
        let run = self.running.as_mut().ok_or("QEMU is gone")?;
        let qmp = run.qmp.clone();
        let err = |e: qmp::QmpError| e.to_string();
        if !layout.hotplugged_cpus.is_empty() {
            let slots = hotplug::parse_slots(
                &qmp.execute_value("query-hotpluggable-cpus", json!({}))
                    .await
                    .map_err(err)?,
            );
            for cpu in &layout.hotplugged_cpus {
                let args = migration::cpu_to_add(&slots, cpu)?;
                let mut left = run.cpu_adds_left;
                hotplug::check_adds(&[hotplug::CpuChange::Add { args: args.clone() }], left)?;
                qmp.execute_value("device_add", args).await.map_err(err)?;
                if let Some(l) = &mut left {
                    *l -= 1;
                }
                run.cpu_adds_left = left;
            }
        }
        for dimm in &layout.dimms {
            hotplug::plug_dimm(&qmp, dimm).await?;
        }
        if layout.virtio_mem_requested_bytes > 0 {
            qmp.execute_value(
                "qom-set",
                json!({"path": hotplug::VMEM_ID, "property": "requested-size",
                       "value": layout.virtio_mem_requested_bytes}),
            )
            .await
            .map_err(err)?;
        }
        Ok(())
    }

    /// Sets the incoming-migration capabilities and opens the first free port of the range.
    async fn open_incoming_port(&self, options: &Options) -> Result<String, String> {
        let qmp = self.running.as_ref().ok_or("QEMU is gone")?.qmp.clone();
        let err = |e: qmp::QmpError| e.to_string();
        qmp.execute_value(
            "migrate-set-capabilities",
            migration::capabilities(options, false),
        )
        .await
        .map_err(err)?;
        qmp.execute_value(
            "migrate-set-parameters",
            migration::parameters(options, false),
        )
        .await
        .map_err(err)?;
        let host = match self.ctx.migration_address {
            std::net::IpAddr::V4(a) => a.to_string(),
            std::net::IpAddr::V6(a) => format!("[{a}]"),
        };
        // QEMU takes one migrate-incoming per process (a failed one leaves it unusable), so
        // the port is found free first: the first one that binds, as QEMU will bind it.
        let ports = &self.ctx.migration_ports.0;
        let port = ports
            .clone()
            .find(|p| std::net::TcpListener::bind((self.ctx.migration_address, *p)).is_ok())
            .ok_or_else(|| {
                format!(
                    "no free port in {}-{} on {}",
                    ports.start(),
                    ports.end(),
                    self.ctx.migration_address
                )
            })?;
        let uri = format!("tcp:{host}:{port}");
        qmp.execute_value("migrate-incoming", json!({ "uri": uri }))
            .await
            .map_err(|e| e.to_string())?;
        Ok(uri)
    }

    /// Target side: waits for the state to be loaded, then runs the guest.
    async fn finish_incoming(&mut self) -> Result<pb::Vm, AgentError> {
        if self.status.phase != Phase::Incoming {
            return Err(self.conflict(format!(
                "is {} here, not waiting for a migration",
                self.status.phase.name()
            )));
        }
        let qmp = self
            .running
            .as_ref()
            .map(|r| r.qmp.clone())
            .expect("Incoming has a process");
        await_migration(&qmp, INCOMING_LOAD_TIMEOUT)
            .await
            .map_err(|why| self.qemu_error(format!("loading the migrated state: {why}")))?;
        self.qmp_call(|q| async move { q.execute(qapi::qmp::cont {}).await })
            .await?;
        if let Some(run) = &self.running {
            if let Err(e) = process::reset_priority(run.pid) {
                warn!("QEMU keeps the raised priority of loading a migration: {e}");
            }
            run.refresh.now();
        }
        self.status.qemu_status = "running".into();
        self.set_phase(Phase::Running, "arrived by live migration", "Migrated");
        Ok(self.snapshot())
    }

    // ----- observations ---------------------------------------------------------------------

    async fn on_exit(&mut self, info: process::ExitInfo) {
        let Some(run) = self.running.take() else {
            return;
        };
        let tail = process::stderr_tail(&self.dir, run.stderr_from, 600);
        if self.status.phase == Phase::Incoming {
            // The VM still lives at the source; nothing of it stays here.
            warn!(
                "the incoming QEMU ended ({}): {tail}",
                state::how_it_ended(info.code, info.signal)
            );
            drop(run);
            let _ = self.remove("IncomingFailed").await;
            return;
        }
        let exit = Exit {
            guest_shutdown: run.guest_shutdown.clone(),
            guest_panicked: run.guest_panicked,
            code: info.code,
            signal: info.signal,
            stderr_tail: tail,
        };
        drop(run);
        let (phase, mut message) = state::on_exit(self.status.phase, &exit);
        if phase == Phase::Stopped && self.status.message.contains("did not power off") {
            message = self.status.message.clone();
        }
        info!(?phase, message, "QEMU exited");
        let ran_for = Duration::from_millis((now_ms() - self.status.started_at_ms).max(0) as u64);
        self.forget_process();
        let reason = if phase == Phase::Failed {
            "ProcessExited"
        } else {
            "Stopped"
        };
        self.set_phase(phase, &message, reason);
        match self.stopping.take() {
            Some(stopping) => {
                let result = if stopping.restart {
                    self.start().await
                } else {
                    Ok(self.snapshot())
                };
                for w in stopping.waiters {
                    let _ = w.send(result.clone());
                }
            }
            None => self.schedule_restart(ran_for),
        }
    }

    /// Clears what belonged to the QEMU process that has just ended: its status figures, the
    /// guest-agent reports still queued from it, its sockets and its cgroup.
    fn forget_process(&mut self) {
        self.qga_rx = mpsc::channel(1).1;
        self.status.agent_connected = false;
        self.status.guest = GuestView::default();
        self.status.qemu_status.clear();
        self.status.started_at_ms = 0;
        for sock in [&self.files.qmp_socket, &self.files.qga_socket] {
            let _ = std::fs::remove_file(sock);
        }
        if let Ok(cg) = &self.ctx.cgroups {
            cg.remove(&self.spec.name);
        }
    }

    /// Applies the restart policy after QEMU ended without being asked to.
    fn schedule_restart(&mut self, ran_for: Duration) {
        if ran_for >= state::STEADY_RUN {
            self.status.restart_count = 0;
        }
        let policy = self.spec.restart_policy;
        let Some(delay) =
            state::restart_delay(policy, self.status.phase, self.status.restart_count)
        else {
            return;
        };
        let at_ms = now_ms() + delay.as_millis() as i64;
        self.status.restart_at = Some((tokio::time::Instant::now() + delay, at_ms));
        let cause = self
            .status
            .message
            .split("; restarting in")
            .next()
            .unwrap_or_default();
        let message = format!("{cause}; restarting in {delay:?} (restart policy {policy:?})");
        info!(?delay, "restart scheduled");
        self.status.message = message.clone();
        self.publish("RestartScheduled", &message);
    }

    async fn auto_restart(&mut self) {
        self.status.restart_at = None;
        self.status.restart_count += 1;
        info!(attempt = self.status.restart_count, "restarting by policy");
        if let Err(e) = self.start().await {
            warn!("restart failed: {e}");
            // A launch that fails counts like a crash: back off and try again.
            self.schedule_restart(Duration::ZERO);
        }
    }

    async fn on_event(&mut self, event: qmp::Event) {
        tracing::debug!(event = event.name, data = %event.data, "QMP event");
        match event.name.as_str() {
            "STOP" | "RESUME" => {
                let running = event.name == "RESUME";
                self.status.qemu_status = if running { "running" } else { "paused" }.into();
                let next = state::on_run_state(self.status.phase, running);
                if next != self.status.phase {
                    let msg = if running {
                        "resumed by QEMU"
                    } else {
                        "paused by QEMU"
                    };
                    self.set_phase(next, msg, phase_reason(next));
                }
            }
            "SHUTDOWN" => {
                let reason = event
                    .data
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("shutdown");
                if let Some(run) = &mut self.running {
                    run.guest_shutdown = Some(reason.to_string());
                }
                self.publish("Shutdown", reason);
            }
            "RESET" => self.publish("Reset", "the guest reset"),
            "GUEST_PANICKED" => {
                if let Some(run) = &mut self.running {
                    run.guest_panicked = true;
                }
                self.publish("GuestPanicked", &event.data.to_string());
            }
            _ => {}
        }
    }

    fn on_guest_view(&mut self, view: GuestView) {
        let was = self.status.guest;
        self.status.guest = view;
        self.status.agent_connected = view.connected;
        if let (true, Some(Some(launched))) =
            (view.connected, self.running.as_ref().map(|r| r.launched))
            && self.status.timings.agent_connected_ms == 0
        {
            self.status.timings.agent_connected_ms = launched.elapsed().as_millis() as u32;
        }
        let reason = match (was.connected, view.connected) {
            (false, true) => "GuestAgentConnected",
            (true, false) => "GuestAgentDisconnected",
            _ => "GuestChanged",
        };
        self.publish(reason, "");
    }

    // ----- helpers --------------------------------------------------------------------------

    /// Runs a QMP command on the live process.
    async fn qmp_call<T, F, Fut>(&self, f: F) -> Result<T, AgentError>
    where
        F: FnOnce(Qmp) -> Fut,
        Fut: Future<Output = Result<T, qmp::QmpError>>,
    {
        let run = self
            .running
            .as_ref()
            .ok_or_else(|| self.conflict("no QEMU process".into()))?;
        f(run.qmp.clone())
            .await
            .map_err(|e| self.qemu_error(e.to_string()))
    }

    fn kill(&mut self) {
        if let Some(run) = &mut self.running {
            run.qemu.kill();
        }
    }

    fn conflict(&self, why: String) -> AgentError {
        AgentError::Conflict {
            name: self.spec.name.clone(),
            why,
        }
    }

    fn qemu_error(&self, why: String) -> AgentError {
        AgentError::Qemu {
            name: self.spec.name.clone(),
            why,
        }
    }

    fn set_phase(&mut self, phase: Phase, message: &str, reason: &str) {
        if phase != self.status.phase {
            self.status.phase_changed_at_ms = now_ms();
        }
        self.status.phase = phase;
        self.status.message = message.to_string();
        self.save_state();
        self.publish(reason, message);
    }

    /// Writes what survives an agent restart about the process.
    fn save_state(&self) {
        let saved = SavedState {
            phase: self.status.phase,
            message: self.status.message.clone(),
            pid: self.running.as_ref().map_or(0, |r| r.pid),
            started_at_ms: self.status.started_at_ms,
            cpu_adds_left: self.running.as_ref().and_then(|r| r.cpu_adds_left),
        };
        if let Err(e) = self.ctx.store.save_state(&self.spec.name, &saved) {
            warn!("saving state: {e}");
        }
    }

    fn publish(&mut self, reason: &str, message: &str) {
        self.status.revision += 1;
        let vm = self.snapshot();
        self.publish.send_replace(vm.clone());
        let _ = self.ctx.events.send(pb::VmEvent {
            r#type: pb::EventType::Modified as i32,
            vm: Some(vm),
            reason: reason.to_string(),
            message: message.to_string(),
        });
    }

    fn snapshot(&self) -> pb::Vm {
        let s = &self.status;
        pb::Vm {
            spec: Some(pb::VmSpec::from(&self.spec)),
            status: Some(pb::VmStatus {
                phase: pb::VmPhase::from(s.phase) as i32,
                message: s.message.clone(),
                pid: self.running.as_ref().map_or(0, |r| r.pid),
                cpus: s.cpus,
                memory_bytes: s.memory_bytes,
                agent_connected: s.agent_connected,
                qemu_status: s.qemu_status.clone(),
                accelerator: self.ctx.accel.accel.as_str().into(),
                node_name: self.ctx.node_name.clone(),
                started_at_ms: s.started_at_ms,
                phase_changed_at_ms: s.phase_changed_at_ms,
                serial_log: self.files.serial_log.to_string_lossy().into(),
                data_dir: self.dir.to_string_lossy().into(),
                revision: s.revision,
                startup: Some(s.timings),
                restart_count: s.restart_count,
                next_restart_at_ms: s.restart_at.map_or(0, |(_, ms)| ms),
                guest_cpus: s.guest.cpus,
                guest_memory_bytes: s.guest.memory_bytes,
                migration: s.migration.clone(),
            }),
        }
    }
}

fn phase_reason(phase: Phase) -> &'static str {
    match phase {
        Phase::Running => "Running",
        Phase::Paused => "Paused",
        _ => "PhaseChanged",
    }
}

/// QAPI enums serialise as their QMP string ("running").
fn enum_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Waits until QEMU's migration has completed: an incoming one (from a source QEMU or a file)
/// loaded, or one to a file written. Err: QEMU's reason, or the time limit.
async fn await_migration(qmp: &Qmp, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    // A live migration's end is announced (its "events" capability is on) and answered at
    // once; saves and restores, which have no events, are polled.
    let mut events = qmp.events();
    loop {
        let reply = qmp
            .execute_value("query-migrate", json!({}))
            .await
            .map_err(|e| e.to_string())?;
        match migration::qemu_status(reply["status"].as_str().unwrap_or_default()) {
            migration::QemuStatus::Completed => return Ok(()),
            migration::QemuStatus::Failed | migration::QemuStatus::Cancelled => {
                return Err(reply["error-desc"]
                    .as_str()
                    .unwrap_or("QEMU gave no detail")
                    .to_string());
            }
            _ if Instant::now() > deadline => {
                return Err(format!("not done within {limit:?}"));
            }
            _ => {
                let _ = tokio::time::timeout(Duration::from_millis(2), events.recv()).await;
            }
        }
    }
}

enum MigrationEvent {
    Progress(pb::MigrationProgress),
    Ended(Ended),
}

/// The next thing an outgoing migration does: new figures, or its end.
async fn watch_migration(migration: &mut Option<Migration>) -> MigrationEvent {
    let Some(m) = migration else {
        return std::future::pending().await;
    };
    tokio::select! {
        biased;
        Ok(()) = m.progress.changed() => {
            MigrationEvent::Progress(m.progress.borrow_and_update().clone())
        }
        ended = &mut m.task => MigrationEvent::Ended(ended.unwrap_or_else(|e| Ended {
            outcome: Outcome::Unknown,
            phase: pb::MigrationPhase::Failed,
            message: format!("the migration task failed: {e}"),
        })),
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
