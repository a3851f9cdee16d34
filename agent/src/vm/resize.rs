//! Resizing a VM: in place by hotplug while it runs (see [`crate::hotplug`]), in its spec while
//! it is stopped.

use crate::error::AgentError;
use crate::hotplug;
use crate::quantity::format_bytes;
use crate::spec::{FieldError, MIN_MEMORY, MemoryHotplug, VmSpec};
use crate::vm::actor::GUEST_MEMORY_BLOCK;
use crate::vm::actor::GUEST_RESIZE_TIMEOUT;
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;
use crate::vm::reason::Reason;
use hypersdk_proto::agent::v1 as pb;
use tracing::{info, warn};

/// Why a running VM did not reach the size asked for.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ResizeError {
    #[error(transparent)]
    Hotplug(#[from] hotplug::HotplugError),
    /// QEMU has the new size, the guest has not taken it (yet).
    #[error(
        "after {GUEST_RESIZE_TIMEOUT:?} the guest reports {cpus} vCPUs and {}",
        format_bytes(*memory)
    )]
    GuestSize { cpus: u32, memory: u64 },
}

impl Supervisor {
    /// Resizes in place by hotplug when running, in the spec when stopped. Limits are checked
    /// before anything is touched; a step the guest refuses leaves the VM running at its real
    /// size, which the status shows.
    pub(crate) async fn resize(
        &mut self,
        cpus: Option<u32>,
        memory: Option<u64>,
    ) -> Result<pb::Vm, AgentError> {
        let (want_cpus, want_memory) =
            check_size(&self.spec, cpus, memory, crate::host::node::memory().1)?;
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
            result = hotplug::set_cpus(&qmp, want_cpus, &mut adds_left)
                .await
                .map_err(ResizeError::from);
            if let Some(run) = &mut self.running {
                run.cpu_adds_left = adds_left;
            }
            if result.is_ok() {
                self.spec.cpus = want_cpus;
            }
        }
        if result.is_ok() && want_memory != self.spec.memory {
            let (mode, max) = (self.spec.memory_hotplug, self.spec.max_memory);
            result = hotplug::set_memory(&qmp, mode, max, want_memory)
                .await
                .map_err(ResizeError::from);
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
                self.publish(Reason::ResizeFailed, &why.to_string());
                Err(self.qemu_error(format!("resize: {why}")))
            }
        }
    }

    /// Waits until the guest agent reports the new vCPU count and memory. The guest counts
    /// memory in blocks (128 MiB on x86), so memory matches to within one block.
    pub(crate) async fn await_guest_size(
        &mut self,
        cpus: u32,
        memory: u64,
    ) -> Result<(), ResizeError> {
        if let Some(run) = &self.running {
            run.refresh.closely();
        }
        let deadline = tokio::time::Instant::now() + GUEST_RESIZE_TIMEOUT;
        loop {
            let g = self.status.guest.clone();
            if g.cpus == cpus && g.memory_bytes.abs_diff(memory) < GUEST_MEMORY_BLOCK {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.qga_rx.recv()).await {
                Ok(Some(view)) => self.on_guest_view(view),
                _ => {
                    return Err(ResizeError::GuestSize {
                        cpus: g.cpus,
                        memory: g.memory_bytes,
                    });
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

/// The size a resize asks for (what it leaves out stays), checked against the spec's limits
/// and the node's `available` memory before anything is touched.
fn check_size(
    spec: &VmSpec,
    cpus: Option<u32>,
    memory: Option<u64>,
    available: u64,
) -> Result<(u32, u64), FieldError> {
    let want_cpus = cpus.unwrap_or(spec.cpus);
    let want_memory = memory.unwrap_or(spec.memory);
    if want_cpus == 0 {
        return Err(FieldError::new("cpus", "must be at least 1"));
    }
    if want_cpus > spec.max_cpus {
        let msg = format!("{want_cpus} is above maxCpus ({})", spec.max_cpus);
        return Err(FieldError::new("cpus", msg));
    }
    let memory_error = |msg: String| Err(FieldError::new("memory", msg));
    if want_memory > spec.max_memory {
        return memory_error(format!(
            "{} is above maxMemory ({})",
            format_bytes(want_memory),
            format_bytes(spec.max_memory)
        ));
    }
    if want_memory < MIN_MEMORY {
        return memory_error(format!(
            "{} is below the minimum of {}",
            format_bytes(want_memory),
            format_bytes(MIN_MEMORY)
        ));
    }
    if want_memory.saturating_sub(spec.memory) > available {
        return memory_error(format!(
            "the node has only {} of memory available",
            format_bytes(available)
        ));
    }
    Ok((want_cpus, want_memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_against_limits_and_the_node() {
        let mut spec = crate::spec::tests::minimal("a");
        spec.max_cpus = 4;
        spec.max_memory = 1 << 30;
        let gib = 1 << 30;
        assert_eq!(check_size(&spec, Some(4), None, gib), Ok((4, 64 << 20)));
        assert_eq!(check_size(&spec, None, Some(gib), gib), Ok((1, gib)));
        let field = |r: Result<(u32, u64), FieldError>| r.unwrap_err().to_string();
        assert_eq!(
            field(check_size(&spec, Some(0), None, gib)),
            "cpus: must be at least 1"
        );
        assert_eq!(
            field(check_size(&spec, Some(5), None, gib)),
            "cpus: 5 is above maxCpus (4)"
        );
        assert_eq!(
            field(check_size(&spec, None, Some(2 * gib), 4 * gib)),
            "memory: 2Gi is above maxMemory (1Gi)"
        );
        assert_eq!(
            field(check_size(&spec, None, Some(8 << 20), gib)),
            "memory: 8Mi is below the minimum of 16Mi"
        );
        assert_eq!(
            field(check_size(&spec, None, Some(gib), 256 << 20)),
            "memory: the node has only 256Mi of memory available"
        );
    }
}
