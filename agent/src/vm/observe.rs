//! What the actor learns without asking: QEMU's run state and size, QMP events, and the guest
//! agent's reports.

use crate::qemu::qmp::{self, enum_name};
use crate::vm::actor::Supervisor;
use crate::vm::guest::GuestView;
use crate::vm::phase::{self};
use crate::vm::reason::Reason;
use crate::vm::status::phase_reason;
use serde_json::Value;
use tracing::warn;

impl Supervisor {
    /// Reads run state and actual size from QEMU into the status.
    pub(crate) async fn refresh_from_qemu(&mut self) {
        let Some(run) = &self.running else { return };
        let qmp = run.qmp.clone();
        let launched = run.launched;
        match qmp.execute(qapi::qmp::query_status {}).await {
            Ok(s) => {
                self.status.qemu_status = enum_name(&s.status);
                let next = phase::on_run_state(self.status.phase, s.running);
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
        if let Ok(cpus) = qmp.execute(qapi::qmp::query_cpus_fast {}).await {
            self.status.cpus = cpus.len() as u32;
        }
        if let Ok(mem) = qmp.execute(qapi::qmp::query_memory_size_summary {}).await {
            self.status.memory_bytes = mem.base_memory + mem.plugged_memory.unwrap_or(0);
        }
        self.publish(Reason::Refreshed, "");
    }

    pub(crate) async fn on_event(&mut self, event: qmp::Event) {
        tracing::debug!(event = event.name, data = %event.data, "QMP event");
        match event.name.as_str() {
            "STOP" | "RESUME" => {
                let running = event.name == "RESUME";
                self.status.qemu_status = if running { "running" } else { "paused" }.into();
                let next = phase::on_run_state(self.status.phase, running);
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
                self.publish(Reason::Shutdown, reason);
            }
            "RESET" => self.publish(Reason::Reset, "the guest reset"),
            "GUEST_PANICKED" => {
                if let Some(run) = &mut self.running {
                    run.guest_panicked = true;
                }
                self.publish(Reason::GuestPanicked, &event.data.to_string());
            }
            _ => {}
        }
    }

    pub(crate) fn on_guest_view(&mut self, view: GuestView) {
        let was = std::mem::replace(&mut self.status.guest, view.clone());
        self.status.agent_connected = view.connected;
        if let (true, Some(Some(launched))) =
            (view.connected, self.running.as_ref().map(|r| r.launched))
            && self.status.timings.agent_connected_ms == 0
        {
            self.status.timings.agent_connected_ms = launched.elapsed().as_millis() as u32;
        }
        let reason = match (was.connected, view.connected) {
            (false, true) => Reason::GuestAgentConnected,
            (true, false) => Reason::GuestAgentDisconnected,
            _ => Reason::GuestChanged,
        };
        self.publish(reason, "");
    }
}
