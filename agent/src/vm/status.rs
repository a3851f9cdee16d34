//! The VM's status as the actor publishes it: phase changes, the saved state, events.

use crate::context::now_ms;
use crate::store::SavedState;
use crate::vm::actor::Supervisor;
use crate::vm::actor::Task;
use crate::vm::guest::GuestView;
use crate::vm::phase::{self, Phase};
use crate::vm::reason::{Reason, event};
use hypersdk_proto::agent::v1 as pb;
use tracing::{error, warn};

impl Supervisor {
    /// The one place the phase changes, checked against the state machine. A change it does
    /// not have is a bug: refused (the VM keeps its phase), and fatal in debug builds so that
    /// tests find it.
    pub(crate) fn enter(&mut self, to: Phase) {
        match phase::valid_transition(self.status.phase, to) {
            Ok(()) => {
                if to != self.status.phase {
                    self.status.phase_changed_at_ms = now_ms();
                }
                self.status.phase = to;
            }
            Err(e) => {
                error!("{e}");
                debug_assert!(false, "{e}");
            }
        }
    }

    /// Enters `phase` and tells everyone: saved for a restarted agent, published with `reason`.
    pub(crate) fn set_phase(&mut self, phase: Phase, message: &str, reason: Reason) {
        self.enter(phase);
        self.status.message = message.to_string();
        self.save_state();
        self.publish(reason, message);
    }

    /// Writes what survives an agent restart about the process.
    pub(crate) fn save_state(&self) {
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

    pub(crate) fn publish(&mut self, reason: Reason, message: &str) {
        self.status.revision += 1;
        let vm = self.snapshot();
        self.publish.send_replace(vm.clone());
        let _ = self
            .ctx
            .events
            .send(event(pb::EventType::Modified, vm, reason, message));
    }

    /// The status message: why the VM is in its phase, and when it restarts if it will.
    pub(crate) fn message(&self) -> String {
        match &self.task {
            Task::Restart(r) => format!(
                "{}; restarting in {:?} (restart policy {:?})",
                self.status.message, r.delay, self.spec.restart_policy
            ),
            _ => self.status.message.clone(),
        }
    }

    /// The guest's interfaces, each named after the spec's network whose NIC has its MAC.
    fn interfaces(&self) -> Vec<pb::GuestInterface> {
        let macs: Vec<String> = (0..self.spec.networks.len())
            .map(|i| crate::spec::argv::mac_address(&self.spec.name, i))
            .collect();
        self.status
            .guest
            .interfaces
            .iter()
            .map(|nic| pb::GuestInterface {
                network: macs
                    .iter()
                    .position(|m| *m == nic.mac)
                    .map(|i| self.spec.networks[i].name.clone())
                    .unwrap_or_default(),
                interface_name: nic.name.clone(),
                mac: nic.mac.clone(),
                ip_addresses: nic.ips.clone(),
            })
            .collect()
    }

    pub(crate) fn snapshot(&self) -> pb::Vm {
        let s = &self.status;
        pb::Vm {
            spec: Some(pb::VmSpec::from(&self.spec)),
            status: Some(pb::VmStatus {
                phase: pb::VmPhase::from(s.phase) as i32,
                message: self.message(),
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
                next_restart_at_ms: match &self.task {
                    Task::Restart(r) => r.at_ms,
                    _ => 0,
                },
                guest_cpus: s.guest.cpus,
                guest_memory_bytes: s.guest.memory_bytes,
                interfaces: self.interfaces(),
                migration: s.migration.clone(),
                import: s.import.clone(),
            }),
        }
    }
}

/// What the supervisor knows about the VM, published as `pb::VmStatus`.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub(crate) phase: Phase,
    pub(crate) message: String,
    pub(crate) qemu_status: String,
    pub(crate) cpus: u32,
    pub(crate) memory_bytes: u64,
    pub(crate) agent_connected: bool,
    pub(crate) started_at_ms: i64,
    pub(crate) phase_changed_at_ms: i64,
    pub(crate) revision: u64,
    pub(crate) timings: pb::StartupTimings,
    pub(crate) restart_count: u32,
    /// What the guest agent reports.
    pub(crate) guest: GuestView,
    /// The migration under way, or the last one.
    pub(crate) migration: Option<pb::MigrationProgress>,
    /// The image import under way, or the last one.
    pub(crate) import: Option<pb::ImportProgress>,
}

pub(crate) fn phase_reason(phase: Phase) -> Reason {
    match phase {
        Phase::Running => Reason::Running,
        Phase::Paused => Reason::Paused,
        _ => Reason::PhaseChanged,
    }
}
