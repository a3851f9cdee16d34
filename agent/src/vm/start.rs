//! Starting a VM: launching QEMU (or adopting one an earlier agent left running), connecting
//! QMP and the guest agent, and the spec it starts with (disks on their current layers).

use crate::context::now_ms;
use crate::error::AgentError;
use crate::firmware::nvram;
use crate::host::accel::Accel;
use crate::host::cgroup;
use crate::qemu::process;
use crate::qemu::qmp::{Qmp, QmpError};
use crate::snapshot::files;
use crate::snapshot::files::DiskLayers;
use crate::spec::argv::{self};
use crate::spec::resolve::resolve_with_layers;
use crate::spec::{FieldError, VmSpec};
use crate::store::SavedState;
use crate::vm::actor::DEFAULT_STOP_TIMEOUT;
use crate::vm::actor::QMP_CONNECT_TIMEOUT;
use crate::vm::actor::QMP_POLL_MAX;
use crate::vm::actor::Running;
use crate::vm::actor::Supervisor;
use crate::vm::guest::{self};
use crate::vm::phase::{self, Action, Phase};
use crate::vm::reason::Reason;
use hypersdk_proto::agent::v1 as pb;
use qapi::qmp;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, info, warn};

/// Why a launched QEMU could not be attached to.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("QEMU exited during start")]
    Exited,
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("QMP did not answer within {QMP_CONNECT_TIMEOUT:?}")]
    Timeout,
}

impl Supervisor {
    pub(crate) async fn start(&mut self) -> Result<pb::Vm, AgentError> {
        self.check(Action::Start)?;
        if self.spec.high_availability && self.ctx.fence.fenced() {
            return Err(AgentError::Conflict {
                name: self.spec.name.clone(),
                why: "not started: this node is fenced (its lease from the controller ran out), \
                      and a highly available VM may run on another node"
                    .into(),
            });
        }
        self.task.take_restart();
        self.make_disks().await?;
        let resolved = self.resolved_spec()?;
        self.launch(&resolved, &[], resolved.max_cpus - resolved.cpus)
            .await?;
        Ok(self.snapshot())
    }

    /// Spawns QEMU for `resolved` (plus `extra` arguments) and attaches to it. `cpu_adds`: the
    /// vCPUs it may still start (counted under TCG only, see [`hotplug::set_cpus`]).
    pub(crate) async fn launch(
        &mut self,
        resolved: &VmSpec,
        extra: &[&str],
        cpu_adds: u32,
    ) -> Result<(), AgentError> {
        if let Some(ci) = &resolved.cloud_init {
            // Written afresh for every process: the same bytes for the same spec.
            ci.volume()
                .and_then(|v| std::fs::write(&self.files.cidata, v))
                .map_err(|e| self.qemu_error(format!("writing the cloud-init volume: {e}")))?;
        }
        self.plug_nics(resolved)?;
        let loader = nvram::resolve(resolved.firmware, &self.ctx.ovmf_dir)?;
        nvram::ensure(&loader, &self.files.uefi_vars).map_err(|e| {
            self.qemu_error(format!(
                "cannot create the UEFI variable store {}: {e}",
                self.files.uefi_vars.display()
            ))
        })?;
        let mut argv = argv::build(resolved, &self.files, self.ctx.accel.accel, &loader);
        argv.extend(extra.iter().map(|a| a.to_string()));
        for sock in [
            &self.files.qmp_socket,
            &self.files.qga_socket,
            &self.files.console_socket,
        ] {
            let _ = std::fs::remove_file(sock);
        }
        let stderr_from = process::stderr_len(&self.dir);
        let launched = Instant::now();
        let qemu = process::spawn(&self.ctx.launcher, &self.ctx.qemu, &argv, &self.dir)
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
        self.set_phase(Phase::Starting, "QEMU launched", Reason::Starting);
        let cpu_adds_left = (self.ctx.accel.accel == Accel::Tcg).then_some(cpu_adds);
        self.attach(qemu, Some(launched), stderr_from, cpu_adds_left)
            .await
    }

    /// Takes over a QEMU left running by an earlier agent process.
    pub(crate) async fn adopt(&mut self, qemu: process::Qemu, saved: SavedState) {
        info!(pid = qemu.pid(), "adopting running QEMU");
        // The status begins in the saved phase (see `spawn`).
        self.status.started_at_ms = saved.started_at_ms;
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
                Reason::Adopted,
            );
            if saved.phase == Phase::Migrating {
                // Nobody drives that migration any more. The target never ran the guest (it
                // waits for a hand-over that will not come), so the VM stays here.
                self.resume_after_lost_migration(
                    "a migration was under way when the agent restarted: cancelled, the VM stays here",
                    Reason::MigrationFailed,
                )
                .await;
            } else if saved.phase == Phase::Running && self.status.phase == Phase::Paused {
                // Recorded running, found paused: the agent went down while it had the guest
                // paused for a memory snapshot (which was not finished, so not kept).
                self.resume_after_lost_migration(
                    "a snapshot was under way when the agent restarted: abandoned, the VM runs on",
                    Reason::SnapshotFailed,
                )
                .await;
            }
            if saved.phase == Phase::Stopping {
                // A stop was under way when the agent went down: see it through.
                let (reply, _) = oneshot::channel();
                self.begin_stop(DEFAULT_STOP_TIMEOUT, true, false, reply)
                    .await;
            }
        }
    }

    /// Cancels a migration (to another QEMU, or to a snapshot file) that nobody drives any
    /// more, and runs the guest on.
    pub(crate) async fn resume_after_lost_migration(&mut self, message: &str, reason: Reason) {
        let Some(qmp) = self.running.as_ref().map(|r| r.qmp.clone()) else {
            return;
        };
        let _ = qmp.execute(qmp::migrate_cancel {}).await;
        // A snapshot's file format must not stay on for a later live migration (a QEMU
        // without mapped-ram refuses the name: nothing to undo there).
        let mapped_ram_off = qmp::MigrationCapabilityStatus {
            capability: qmp::MigrationCapability::mapped_ram,
            state: false,
        };
        let _ = qmp
            .execute(qmp::migrate_set_capabilities {
                capabilities: vec![mapped_ram_off],
            })
            .await;
        if let Ok(s) = qmp.execute(qmp::query_status {}).await
            && !s.running
            && let Err(e) = qmp.execute(qmp::cont {}).await
        {
            warn!("resuming after the lost migration: {e}");
        }
        self.enter(Phase::Running);
        self.refresh_from_qemu().await;
        let phase = self.status.phase;
        self.set_phase(phase, message, reason);
    }

    /// Connects QMP and the guest agent to a live QEMU and makes it the VM's process. On
    /// failure the process is ended and the VM is Failed with QEMU's own words.
    pub(crate) async fn attach(
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
                let how = phase::how_it_ended(exit.code, exit.signal);
                let tail = process::stderr_tail(&self.dir, stderr_from, 600);
                let why = if tail.is_empty() {
                    format!("{why} ({how})")
                } else {
                    format!("{why}: {tail}")
                };
                self.status.started_at_ms = 0;
                self.set_phase(Phase::Failed, &why, Reason::StartFailed);
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
    pub(crate) async fn connect_qmp(&self, qemu: &mut process::Qemu) -> Result<Qmp, ConnectError> {
        let deadline = Instant::now() + QMP_CONNECT_TIMEOUT;
        let mut delay = Duration::from_millis(1);
        loop {
            if qemu.has_exited() {
                return Err(ConnectError::Exited);
            }
            if self.files.qmp_socket.exists() {
                match Qmp::connect(&self.files.qmp_socket).await {
                    Ok(qmp) => return Ok(qmp),
                    Err(e) if Instant::now() > deadline => return Err(e.into()),
                    Err(_) => {}
                }
            }
            if Instant::now() > deadline {
                return Err(ConnectError::Timeout);
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(QMP_POLL_MAX);
        }
    }
}

impl Supervisor {
    /// The spec with each disk on its current layer, resolved (paths checked, formats read).
    pub(crate) fn resolved_spec(&self) -> Result<VmSpec, FieldError> {
        self.resolve_on(&self.spec, &self.layers)
    }

    pub(crate) fn resolve_on(
        &self,
        spec: &VmSpec,
        layers: &DiskLayers,
    ) -> Result<VmSpec, FieldError> {
        let layers_dir = files::layers_dir(&self.dir);
        resolve_with_layers(spec, layers, &layers_dir, &self.ctx.policy)
    }
}
