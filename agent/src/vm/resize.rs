//! Resizing a VM: in place by hotplug while it runs (see [`crate::hotplug`]), in its spec while
//! it is stopped.

use crate::error::AgentError;
use crate::hotplug;
use crate::quantity::format_bytes;
use crate::spec::{FieldError, MIN_MEMORY, MemoryHotplug};
use crate::vm::actor::GUEST_MEMORY_BLOCK;
use crate::vm::actor::GUEST_RESIZE_TIMEOUT;
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;
use crate::vm::reason::Reason;
use hypersdk_proto::agent::v1 as pb;
use tracing::{info, warn};

impl Supervisor {
    /// Resizes in place by hotplug when running, in the spec when stopped. Limits are checked
    /// before anything is touched; a step the guest refuses leaves the VM running at its real
    /// size, which the status shows.
    pub(crate) async fn resize(
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
        let available = crate::host::node::memory().1;
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
                self.publish(Reason::Resized, "new size applies at the next start");
                return Ok(self.snapshot());
            }
            other => {
                return Err(self.conflict(format!("cannot resize a VM that is {}", other.name())));
            }
        }
        let qmp = self.live_qmp()?;
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
                self.publish(Reason::Resized, "");
                Ok(self.snapshot())
            }
            Err(why) => {
                warn!("resize: {why}");
                self.publish(Reason::ResizeFailed, &why);
                Err(self.qemu_error(format!("resize: {why}")))
            }
        }
    }

    /// Waits until the guest agent reports the new vCPU count and memory. The guest counts
    /// memory in blocks (128 MiB on x86), so memory matches to within one block.
    pub(crate) async fn await_guest_size(&mut self, cpus: u32, memory: u64) -> Result<(), String> {
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

    pub(crate) fn save_spec(&self) -> Result<(), AgentError> {
        self.ctx
            .store
            .save_spec(&self.spec)
            .map_err(|e| AgentError::Internal(format!("saving the spec: {e}")))
    }
}
