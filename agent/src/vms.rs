//! The registry of this agent's VMs: creation (validation, duplicate names), lookup, deletion.

use std::collections::BTreeMap;
use std::sync::Arc;

use hypersdk_proto::agent::v1 as pb;
use tokio::sync::RwLock;
use tracing::{info, warn};

use crate::context::Context;
use crate::error::AgentError;
use crate::resolve::resolve_spec;
use crate::spec::{FieldError, VmSpec};

/// Longest unix socket path Linux accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
use crate::argv::{self, VmFiles};
use crate::process;
use crate::state::Phase;
use crate::store::SavedState;
use crate::supervisor::{self, Init, Op, VmHandle};

pub struct Vms {
    ctx: Arc<Context>,
    vms: RwLock<BTreeMap<String, VmHandle>>,
}

impl Vms {
    /// Loads every VM from the data dir. VMs whose files cannot be read are reported and skipped;
    /// they never stop the agent.
    pub async fn load(ctx: Arc<Context>) -> std::io::Result<Vms> {
        let mut starting = Vec::new();
        for (name, loaded) in ctx.store.load_all()? {
            match loaded {
                Ok((spec, saved)) => {
                    let init = initial_state(&ctx, &name, saved);
                    let ctx = ctx.clone();
                    // Adoptions talk to QMP: run them side by side.
                    starting.push(async move { (name, supervisor::spawn(ctx, spec, init).await) });
                }
                Err(e) => warn!(vm = %name, "cannot load VM, skipped: {e}"),
            }
        }
        let vms = futures::future::join_all(starting)
            .await
            .into_iter()
            .collect();
        Ok(Vms {
            ctx,
            vms: RwLock::new(vms),
        })
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub async fn create(&self, spec: pb::VmSpec, start: bool) -> Result<pb::Vm, AgentError> {
        let mut spec = VmSpec::try_from(spec)?;
        let resolved = resolve_spec(&spec, &self.ctx.policy)?;
        // Keep the paths as the user wrote them, with the format read from each image.
        for (disk, seen) in spec.disks.iter_mut().zip(&resolved.disks) {
            disk.format = seen.format;
        }
        let sock = self.ctx.store.vm_dir(&spec.name).join("qmp.sock");
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(FieldError::new(
                "spec.name",
                format!(
                    "too long for this agent's data dir: {} exceeds {MAX_SOCKET_PATH} bytes",
                    sock.display()
                ),
            )
            .into());
        }
        let name = spec.name.clone();
        let handle = {
            let mut vms = self.vms.write().await;
            if vms.contains_key(&name) {
                return Err(AgentError::AlreadyExists(name));
            }
            self.ctx.store.create(&spec).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => AgentError::AlreadyExists(name.clone()),
                _ => AgentError::Internal(format!("creating VM directory: {e}")),
            })?;
            let init = Init::Idle {
                phase: Phase::Pending,
                message: String::new(),
            };
            let handle = supervisor::spawn(self.ctx.clone(), spec, init).await;
            vms.insert(name.clone(), handle.clone());
            handle
        };
        info!(vm = %name, "created");
        let _ = self.ctx.events.send(pb::VmEvent {
            r#type: pb::EventType::Added as i32,
            vm: Some(handle.current()),
            reason: "Created".into(),
            message: String::new(),
        });
        if start {
            handle.call(&name, Op::Start).await
        } else {
            Ok(handle.current())
        }
    }

    async fn handle(&self, name: &str) -> Result<VmHandle, AgentError> {
        self.vms
            .read()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(name.to_string()))
    }

    pub async fn get(&self, name: &str) -> Result<pb::Vm, AgentError> {
        Ok(self.handle(name).await?.current())
    }

    pub async fn list(&self) -> Vec<pb::Vm> {
        self.vms
            .read()
            .await
            .values()
            .map(VmHandle::current)
            .collect()
    }

    pub async fn call(&self, name: &str, op: Op) -> Result<pb::Vm, AgentError> {
        self.handle(name).await?.call(name, op).await
    }

    pub async fn delete(&self, name: &str) -> Result<(), AgentError> {
        let handle = self.handle(name).await?;
        handle.call(name, Op::Delete).await?;
        self.vms.write().await.remove(name);
        Ok(())
    }

    /// Sum of configured cpus and memory of all VMs, and their count.
    pub async fn allocated(&self) -> (u32, u64, u32) {
        let vms = self.vms.read().await;
        let mut cpus = 0;
        let mut memory = 0;
        for vm in vms.values().map(VmHandle::current) {
            if let Some(spec) = vm.spec {
                cpus += spec.cpus;
                memory += crate::quantity::parse_bytes(&spec.memory).unwrap_or(0);
            }
        }
        (cpus, memory, vms.len() as u32)
    }
}

/// Where a VM found on disk begins: its live QEMU adopted, or the phase it was left in.
fn initial_state(ctx: &Context, name: &str, saved: Option<SavedState>) -> Init {
    let Some(saved) = saved else {
        return Init::Idle {
            phase: Phase::Pending,
            message: String::new(),
        };
    };
    if !saved.phase.has_process() {
        return Init::Idle {
            phase: saved.phase,
            message: saved.message,
        };
    }
    let files = VmFiles::in_dir(&ctx.store.vm_dir(name));
    match process::adopt(saved.pid, &argv::qmp_arg(&files)) {
        Ok(qemu) => Init::Adopt {
            qemu: Box::new(qemu),
            saved,
        },
        Err(e) => {
            info!(vm = %name, pid = saved.pid, "QEMU not adoptable: {e}");
            // A stop that was under way has finished; anything else ended unexpectedly.
            let (phase, message) = if saved.phase == Phase::Stopping {
                (
                    Phase::Stopped,
                    "stopped while the agent was down".to_string(),
                )
            } else {
                (
                    Phase::Failed,
                    format!("QEMU (pid {}) ended while the agent was down", saved.pid),
                )
            };
            Init::Idle { phase, message }
        }
    }
}
