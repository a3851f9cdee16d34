//! The registry of this agent's VMs: creation (validation, duplicate names), lookup, deletion.

use crate::vm::reason::{Reason, event};
use std::collections::BTreeMap;
use std::sync::Arc;

use hypersdk_proto::agent::v1 as pb;
use tokio::sync::RwLock;
use tracing::{info, warn};

use crate::context::Context;
use crate::error::AgentError;
use crate::image::Source;
use crate::quantity::format_bytes;
use crate::spec::resolve::resolve_spec;
use crate::spec::{FieldError, VmSpec};

/// Longest unix socket path Linux accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
use crate::firmware::nvram;
use crate::qemu::process;
use crate::spec::argv::{self, VmFiles};
use crate::store::{LoadError, SavedState};
use crate::vm::actor::{self, Init, Op, VmHandle};
use crate::vm::phase::Phase;

pub struct Vms {
    ctx: Arc<Context>,
    vms: RwLock<BTreeMap<String, VmHandle>>,
    /// VM directories whose spec could not be read: listed as Failed, deletable, nothing else.
    broken: RwLock<BTreeMap<String, LoadError>>,
}

impl Vms {
    /// Loads every VM from the data dir. A VM whose files cannot be read is reported as broken;
    /// it never stops the agent or affects the others.
    pub async fn load(ctx: Arc<Context>) -> std::io::Result<Vms> {
        let mut starting = Vec::new();
        let mut broken = BTreeMap::new();
        for (name, loaded) in ctx.store.load_all()? {
            match loaded {
                Ok(loaded) if loaded.state.as_ref().map(|s| s.phase) == Some(Phase::Incoming) => {
                    // The source gave up on it when this agent stopped answering.
                    discard_incoming(&ctx, &name, loaded.state.map_or(0, |s| s.pid));
                }
                Ok(loaded) => {
                    if let Some(problem) = &loaded.problem {
                        warn!(vm = %name, "state file unreadable: {problem}");
                    }
                    let init = initial_state(&ctx, &name, loaded.state);
                    let ctx = ctx.clone();
                    let spec = loaded.spec;
                    // Adoptions talk to QMP: run them side by side.
                    starting.push(async move { (name, actor::spawn(ctx, spec, init).await) });
                }
                Err(e) => {
                    warn!(vm = %name, "VM cannot be loaded: {e}");
                    broken.insert(name, e);
                }
            }
        }
        let vms = futures::future::join_all(starting)
            .await
            .into_iter()
            .collect();
        Ok(Vms {
            ctx,
            vms: RwLock::new(vms),
            broken: RwLock::new(broken),
        })
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    pub async fn create(&self, spec: pb::VmSpec, start: bool) -> Result<pb::Vm, AgentError> {
        let handle = self.register(spec, Reason::Created).await?;
        let vm = handle.current();
        let name = vm.spec.clone().unwrap_or_default().name;
        let importing = vm
            .spec
            .iter()
            .flat_map(|s| &s.disks)
            .any(|d| d.image.is_some() && !std::path::Path::new(&d.path).exists());
        match start {
            // An import can take long: the caller follows it in the VM's status (Importing,
            // then Running or Failed with the reason).
            true if importing => {
                tokio::spawn(async move {
                    if let Err(e) = handle.call(&name, Op::Start).await {
                        warn!(vm = %name, "not started: {e}");
                    }
                });
                Ok(vm)
            }
            true => handle.call(&name, Op::Start).await,
            false => Ok(vm),
        }
    }

    /// A new VM on this node with `req.name`'s spec and copies of its disks (see
    /// [`crate::clone`]); started when asked.
    pub async fn clone_vm(&self, req: pb::CloneVmRequest) -> Result<pb::Vm, AgentError> {
        // Before anything is copied (the name itself is checked with the clone's spec).
        if self.handle(&req.target_name).await.is_ok() {
            return Err(AgentError::AlreadyExists(req.target_name));
        }
        let (_, spec) = self
            .call_for(&req.name, |spec| Op::CloneDisks {
                target: req.target_name.clone(),
                linked: req.linked,
                labels: req.labels.into_iter().collect(),
                spec,
            })
            .await?;
        match self.register(pb::VmSpec::from(&spec), Reason::Cloned).await {
            Ok(handle) if req.start => handle.call(&spec.name, Op::Start).await,
            Ok(handle) => Ok(handle.current()),
            Err(e) => {
                let dir = crate::clone::clone_dir(&self.ctx.images_dir, &spec.name);
                let _ = std::fs::remove_dir_all(dir);
                Err(e)
            }
        }
    }

    /// Target side of a live migration: the VM as the source runs it, in a QEMU waiting for
    /// its state. Returns where that QEMU listens.
    pub async fn prepare_incoming(
        &self,
        req: pb::PrepareIncomingRequest,
    ) -> Result<(String, pb::Vm), AgentError> {
        let spec = req
            .spec
            .ok_or_else(|| FieldError::new("spec", "is required"))?;
        let layout = req
            .layout
            .ok_or_else(|| FieldError::new("layout", "is required"))?;
        if req.multifd_channels > crate::migration::MAX_MULTIFD_CHANNELS {
            return Err(FieldError::new("multifdChannels", "is too large").into());
        }
        let memory = crate::spec::parse_memory("spec.memory", &spec.memory)?;
        let available = crate::host::node::memory().1;
        if memory > available {
            return Err(FieldError::new(
                "spec.memory",
                format!(
                    "{} does not fit: node {} has {} available",
                    format_bytes(memory),
                    self.ctx.node_name,
                    format_bytes(available)
                ),
            )
            .into());
        }
        let handle = self.register(spec, Reason::Incoming).await?;
        let name = handle.current().spec.unwrap_or_default().name;
        let (uri_tx, uri_rx) = tokio::sync::oneshot::channel();
        let op = Op::Incoming {
            layout,
            multifd_channels: req.multifd_channels,
            source_node: req.source_node,
            uri: uri_tx,
        };
        let vm = handle.call(&name, op).await?;
        let uri = uri_rx
            .await
            .map_err(|_| AgentError::Internal("the incoming VM gave no address".into()))?;
        Ok((uri, vm))
    }

    /// Validates a spec, checks that its files are usable here and that it fits the node's
    /// allocatable memory, and creates the VM (not started).
    async fn register(&self, spec: pb::VmSpec, reason: Reason) -> Result<VmHandle, AgentError> {
        let mut spec = VmSpec::try_from(spec)?;
        crate::network::check_bridge_nics(&spec, self.ctx.network.is_some())?;
        spec.memory_hotplug =
            spec.memory_hotplug
                .resolve(spec.memory, spec.max_memory, self.ctx.virtio_mem)?;
        crate::disks::place(&mut spec, &self.ctx.disk_dir, reason == Reason::Created)?;
        self.check_files(&mut spec)?;
        nvram::resolve(spec.firmware, &self.ctx.ovmf_dir)?;
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
            vms.retain(|_, h| !h.is_gone());
            if vms.contains_key(&name) || self.broken.read().await.contains_key(&name) {
                return Err(AgentError::AlreadyExists(name));
            }
            let allocated: u64 = vms.values().map(|h| configured_memory(&h.current())).sum();
            let room = self.ctx.allocatable_memory.saturating_sub(allocated);
            if spec.memory > room {
                return Err(FieldError::new(
                    "spec.memory",
                    format!(
                        "{} does not fit: node {} has {} allocatable for VMs, {} of it in use",
                        format_bytes(spec.memory),
                        self.ctx.node_name,
                        format_bytes(self.ctx.allocatable_memory),
                        format_bytes(allocated)
                    ),
                )
                .into());
            }
            self.ctx.store.create(&spec).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => AgentError::AlreadyExists(name.clone()),
                _ => AgentError::Internal(format!("creating VM directory: {e}")),
            })?;
            let init = Init::Idle {
                phase: Phase::Pending,
                message: String::new(),
            };
            let handle = actor::spawn(self.ctx.clone(), spec, init).await;
            vms.insert(name.clone(), handle.clone());
            handle
        };
        info!(vm = %name, %reason, "created");
        let added = event(pb::EventType::Added, handle.current(), reason, "");
        let _ = self.ctx.events.send(added);
        Ok(handle)
    }

    /// Checks the files of a new VM: those it is given (their format is read from each image,
    /// the paths kept as written) and the node files its made disks come from. Disks still to
    /// be made are checked when they are.
    fn check_files(&self, spec: &mut VmSpec) -> Result<(), FieldError> {
        let mut given = spec.clone();
        given.disks.retain(|d| d.made.is_none() || d.path.exists());
        let resolved = resolve_spec(&given, &self.ctx.policy)?;
        for disk in spec.disks.iter_mut() {
            if let Some(seen) = resolved.disks.iter().find(|d| d.name == disk.name) {
                disk.format = seen.format;
            }
        }
        for (i, d) in spec.disks.iter().enumerate() {
            if let Some(Source::Path(p)) = d
                .made
                .as_ref()
                .and_then(|m| m.image.as_ref())
                .map(|i| &i.source)
            {
                self.ctx
                    .policy
                    .resolve_file(&format!("spec.disks[{i}].image.source"), p)?;
            }
        }
        Ok(())
    }

    async fn handle(&self, name: &str) -> Result<VmHandle, AgentError> {
        if let Some(why) = self.broken.read().await.get(name) {
            return Err(AgentError::Conflict {
                name: name.to_string(),
                why: format!("its files cannot be read ({why}); it can only be deleted"),
            });
        }
        self.vms
            .read()
            .await
            .get(name)
            .filter(|h| !h.is_gone())
            .cloned()
            .ok_or_else(|| AgentError::NotFound(name.to_string()))
    }

    pub async fn get(&self, name: &str) -> Result<pb::Vm, AgentError> {
        if let Some(why) = self.broken.read().await.get(name) {
            return Ok(broken_vm(&self.ctx, name, why));
        }
        Ok(self.handle(name).await?.current())
    }

    pub async fn list(&self) -> Vec<pb::Vm> {
        let mut all: Vec<_> = self
            .vms
            .read()
            .await
            .values()
            .filter(|h| !h.is_gone())
            .map(VmHandle::current)
            .collect();
        let broken = self.broken.read().await;
        all.extend(
            broken
                .iter()
                .map(|(name, why)| broken_vm(&self.ctx, name, why)),
        );
        all
    }

    pub async fn call(&self, name: &str, op: Op) -> Result<pb::Vm, AgentError> {
        self.handle(name).await?.call(name, op).await
    }

    /// [`Vms::call`] for an op that answers with a value besides the VM (a snapshot, a spec):
    /// `op` makes the op around the sender of that value.
    pub async fn call_for<T>(
        &self,
        name: &str,
        op: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Op,
    ) -> Result<(pb::Vm, T), AgentError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let vm = self.call(name, op(tx)).await?;
        let value = rx
            .await
            .map_err(|_| AgentError::Internal(format!("{name}: the operation gave no answer")))?;
        Ok((vm, value))
    }

    /// Removes VM `name`; its disks too unless `keep_disks` (it runs elsewhere from them).
    pub async fn delete(&self, name: &str, keep_disks: bool) -> Result<(), AgentError> {
        if self.broken.read().await.contains_key(name) {
            self.ctx
                .store
                .remove(name)
                .map_err(|e| AgentError::Internal(format!("removing {name}: {e}")))?;
            self.broken.write().await.remove(name);
            return Ok(());
        }
        let handle = self.handle(name).await?;
        handle.call(name, Op::Delete { keep_disks }).await?;
        // Not `remove(name)`: a create may already have put a new VM under this name.
        self.vms.write().await.retain(|_, h| !h.is_gone());
        Ok(())
    }

    /// Sum of configured cpus and memory of all VMs, and their count.
    pub async fn allocated(&self) -> (u32, u64, u32) {
        let vms = self.vms.read().await;
        let mut cpus = 0;
        let mut memory = 0;
        let mut count = 0;
        for vm in vms.values().filter(|h| !h.is_gone()).map(VmHandle::current) {
            cpus += vm.spec.as_ref().map_or(0, |s| s.cpus);
            memory += configured_memory(&vm);
            count += 1;
        }
        (cpus, memory, count)
    }
}

fn configured_memory(vm: &pb::Vm) -> u64 {
    vm.spec
        .as_ref()
        .and_then(|s| crate::quantity::parse_bytes(&s.memory).ok())
        .unwrap_or(0)
}

/// How a VM whose spec cannot be read is shown: Failed, with the reason.
fn broken_vm(ctx: &Context, name: &str, why: &LoadError) -> pb::Vm {
    pb::Vm {
        spec: Some(pb::VmSpec {
            name: name.to_string(),
            ..Default::default()
        }),
        status: Some(pb::VmStatus {
            phase: pb::VmPhase::Failed as i32,
            message: format!("cannot load the VM: {why}"),
            node_name: ctx.node_name.clone(),
            data_dir: ctx.store.vm_dir(name).to_string_lossy().into(),
            ..Default::default()
        }),
    }
}

/// A VM's QEMU: the saved pid first; if it is 0 (the agent died between launch and the first
/// save) or stale, the command line finds the process.
fn find_qemu(pid: u32, qmp_arg: &str) -> std::io::Result<process::Qemu> {
    process::adopt(pid, qmp_arg).or_else(|e| {
        process::find(qmp_arg)
            .map(|pid| process::adopt(pid, qmp_arg))
            .unwrap_or(Err(e))
    })
}

/// Ends the QEMU of a migration that never finished arriving, and removes its files.
fn discard_incoming(ctx: &Context, name: &str, pid: u32) {
    let qmp_arg = argv::qmp_arg(&VmFiles::in_dir(&ctx.store.vm_dir(name)));
    if let Ok(mut qemu) = find_qemu(pid, &qmp_arg) {
        qemu.kill();
    }
    match ctx.store.remove(name) {
        Ok(()) => info!(vm = %name, "removed an unfinished incoming migration"),
        Err(e) => warn!(vm = %name, "removing an unfinished incoming migration: {e}"),
    }
}

/// Where a VM found on disk begins: its live QEMU adopted, or the phase it was left in.
fn initial_state(ctx: &Context, name: &str, saved: Option<SavedState>) -> Init {
    let files = VmFiles::in_dir(&ctx.store.vm_dir(name));
    let qmp_arg = argv::qmp_arg(&files);
    let Some(saved) = saved else {
        // No readable state: a QEMU of this VM may still run. Find it by its command line.
        return match process::find(&qmp_arg).map(|pid| (pid, process::adopt(pid, &qmp_arg))) {
            Some((pid, Ok(qemu))) => Init::Adopt {
                qemu: Box::new(qemu),
                saved: SavedState {
                    phase: Phase::Running,
                    message: String::new(),
                    pid,
                    started_at_ms: 0,
                    cpu_adds_left: None,
                },
            },
            _ => Init::Idle {
                phase: Phase::Pending,
                message: String::new(),
            },
        };
    };
    if saved.phase == Phase::Importing {
        return Init::Idle {
            phase: Phase::Failed,
            message: "the agent restarted during the image import: start the VM again to finish it"
                .into(),
        };
    }
    if !saved.phase.has_process() {
        return Init::Idle {
            phase: saved.phase,
            message: saved.message,
        };
    }
    match find_qemu(saved.pid, &qmp_arg) {
        Ok(qemu) => Init::Adopt {
            qemu: Box::new(qemu),
            saved,
        },
        Err(e) => {
            info!(vm = %name, pid = saved.pid, "QEMU not adoptable: {e}");
            // A stop that was under way has finished; anything else ended unexpectedly.
            if saved.phase == Phase::Stopping {
                Init::Idle {
                    phase: Phase::Stopped,
                    message: "stopped while the agent was down".into(),
                }
            } else {
                Init::Lost {
                    phase: Phase::Failed,
                    message: format!("QEMU (pid {}) ended while the agent was down", saved.pid),
                }
            }
        }
    }
}
