//! `--simulate`: the agent API with no QEMU behind it. VMs are bookkeeping only (specs are checked
//! as the real agent checks them, except that no file is opened), phases move as a real VM's would
//! after `--simulate-boot-ms`, and GetNode reports the capacity given by flags. For scale tests of
//! the controller, as KWOK nodes are for pods.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_server::AgentService;
use tokio::sync::broadcast;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{EventStream, watch_stream};
use crate::error::AgentError;
use crate::spec::{VmSpec, check_name};
use crate::vm::phase::{self, Action, Phase};

/// What a simulated node reports.
#[derive(Debug, Clone)]
pub struct SimNode {
    pub node_name: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// How long a simulated VM takes from Starting to Running.
    pub boot: Duration,
}

struct Inner {
    node: SimNode,
    vms: Mutex<BTreeMap<String, pb::Vm>>,
    events: broadcast::Sender<pb::VmEvent>,
}

#[derive(Clone)]
pub struct Simulator(Arc<Inner>);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Simulator {
    pub fn new(node: SimNode) -> Self {
        Simulator(Arc::new(Inner {
            node,
            vms: Mutex::default(),
            events: broadcast::channel(4096).0,
        }))
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, pb::Vm>> {
        self.0.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` to VM `name` and publishes the result as a MODIFIED event.
    fn update(
        &self,
        name: &str,
        reason: &str,
        change: impl FnOnce(&mut pb::Vm) -> Result<(), Status>,
    ) -> Result<pb::Vm, Status> {
        check_name("name", name)?;
        let mut vms = self.vms();
        let vm = vms
            .get_mut(name)
            .ok_or_else(|| Status::not_found(format!("VM {name:?} does not exist")))?;
        let before = vm.clone();
        change(vm)?;
        if *vm != before {
            let status = vm.status.get_or_insert_default();
            status.revision += 1;
            status.phase_changed_at_ms = now_ms();
            self.publish(pb::EventType::Modified, vm.clone(), reason);
        }
        Ok(vm.clone())
    }

    fn publish(&self, type_: pb::EventType, vm: pb::Vm, reason: &str) {
        let _ = self.0.events.send(pb::VmEvent {
            r#type: type_ as i32,
            vm: Some(vm),
            reason: reason.into(),
            message: String::new(),
        });
    }

    /// Starting now, Running after the simulated boot time (unless something else happened).
    fn boot(&self, name: &str) -> Result<pb::Vm, Status> {
        let vm = self.update(name, "Starting", |vm| set_phase(vm, Phase::Starting))?;
        let sim = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(sim.0.node.boot).await;
            let _ = sim.update(&name, "Started", |vm| {
                if phase(vm) == pb::VmPhase::Starting {
                    set_phase(vm, Phase::Running)?;
                    let spec = vm.spec.clone().unwrap_or_default();
                    let status = vm.status.get_or_insert_default();
                    status.cpus = spec.cpus;
                    status.memory_bytes = crate::quantity::parse_bytes(&spec.memory).unwrap_or(0);
                    status.started_at_ms = now_ms();
                }
                Ok(())
            });
        });
        Ok(vm)
    }

    fn node(&self) -> pb::Node {
        let vms = self.vms();
        let (cpus, memory) =
            vms.values()
                .filter_map(|v| v.spec.as_ref())
                .fold((0, 0), |(c, m), s| {
                    (
                        c + s.cpus,
                        m + crate::quantity::parse_bytes(&s.memory).unwrap_or(0),
                    )
                });
        let n = &self.0.node;
        pb::Node {
            node_name: n.node_name.clone(),
            hostname: n.node_name.clone(),
            cpus: n.cpus,
            memory_total_bytes: n.memory_bytes,
            memory_available_bytes: n.memory_bytes.saturating_sub(memory),
            accelerator: "simulated".into(),
            accelerator_reason: "--simulate: VMs are bookkeeping only".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            allocated_cpus: cpus,
            allocated_memory_bytes: memory,
            vm_count: vms.len() as u32,
            ..Default::default()
        }
    }
}

fn phase(vm: &pb::Vm) -> pb::VmPhase {
    vm.status
        .as_ref()
        .and_then(|s| pb::VmPhase::try_from(s.phase).ok())
        .unwrap_or_default()
}

/// The VM's phase in the agent's state machine (a simulated VM has one from its creation).
fn machine_phase(vm: &pb::Vm) -> Result<Phase, Status> {
    Phase::try_from(phase(vm)).map_err(|p| Status::internal(format!("VM in phase {p:?}")))
}

/// Changes the phase by the real VMs' state machine.
fn set_phase(vm: &mut pb::Vm, to: Phase) -> Result<(), Status> {
    let from = machine_phase(vm)?;
    phase::valid_transition(from, to).map_err(|e| Status::internal(e.to_string()))?;
    let status = vm.status.get_or_insert_default();
    status.phase = pb::VmPhase::from(to) as i32;
    if !matches!(to, Phase::Running | Phase::Paused) {
        status.cpus = 0;
        status.memory_bytes = 0;
    }
    Ok(())
}

/// Refuses `action` where a real VM in the same phase would refuse it, with the same status.
fn allow(vm: &pb::Vm, action: Action) -> Result<(), Status> {
    phase::check(machine_phase(vm)?, action).map_err(|e| {
        AgentError::Conflict {
            name: vm.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
            why: e.to_string(),
        }
        .into()
    })
}

#[tonic::async_trait]
impl AgentService for Simulator {
    async fn get_node(&self, _: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        Ok(Response::new(self.node()))
    }

    /// Granted as asked: simulated VMs are never fenced.
    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let r = req.into_inner();
        Ok(Response::new(pb::Lease {
            token: r.token + 1,
            remaining_ms: r.fence_timeout_ms.into(),
            fenced: false,
        }))
    }

    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let (spec, start) = crate::api::service::unpack_create(req)?;
        // Stored as the real agent stores it: checked, ceilings filled in.
        let spec = pb::VmSpec::from(&VmSpec::try_from(spec)?);
        let name = spec.name.clone();
        let vm = pb::Vm {
            spec: Some(spec),
            status: Some(pb::VmStatus {
                phase: pb::VmPhase::Pending as i32,
                node_name: self.0.node.node_name.clone(),
                accelerator: "simulated".into(),
                phase_changed_at_ms: now_ms(),
                revision: 1,
                ..Default::default()
            }),
        };
        {
            let mut vms = self.vms();
            if vms.contains_key(&name) {
                return Err(Status::already_exists(format!(
                    "VM {name:?} already exists"
                )));
            }
            vms.insert(name.clone(), vm.clone());
        }
        self.publish(pb::EventType::Added, vm.clone(), "Created");
        Ok(Response::new(if start { self.boot(&name)? } else { vm }))
    }

    async fn get_vm(&self, req: Request<pb::GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.update(&req.into_inner().name, "", |_| Ok(()))
            .map(Response::new)
    }

    async fn list_vms(
        &self,
        _: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = self.vms().values().cloned().collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    async fn delete_vm(
        &self,
        req: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let name = req.into_inner().name;
        check_name("name", &name)?;
        let vm = self
            .vms()
            .remove(&name)
            .ok_or_else(|| Status::not_found(format!("VM {name:?} does not exist")))?;
        self.publish(pb::EventType::Deleted, vm, "Deleted");
        Ok(Response::new(pb::DeleteVmResponse {}))
    }

    async fn start_vm(&self, req: Request<pb::StartVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let name = req.into_inner().name;
        self.update(&name, "", |vm| allow(vm, Action::Start))?;
        self.boot(&name).map(Response::new)
    }

    async fn stop_vm(&self, req: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let name = req.into_inner().name;
        self.update(&name, "Stopped", |vm| {
            allow(vm, Action::Stop)?;
            set_phase(vm, Phase::Stopping)?;
            set_phase(vm, Phase::Stopped)
        })
        .map(Response::new)
    }

    async fn restart_vm(
        &self,
        req: Request<pb::RestartVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let name = req.into_inner().name;
        self.update(&name, "Stopped", |vm| {
            allow(vm, Action::Restart)?;
            set_phase(vm, Phase::Stopping)?;
            set_phase(vm, Phase::Stopped)
        })?;
        self.boot(&name).map(Response::new)
    }

    async fn pause_vm(&self, req: Request<pb::PauseVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.update(&req.into_inner().name, "Paused", |vm| {
            allow(vm, Action::Pause)?;
            set_phase(vm, Phase::Paused)
        })
        .map(Response::new)
    }

    async fn resume_vm(
        &self,
        req: Request<pb::ResumeVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.update(&req.into_inner().name, "Resumed", |vm| {
            allow(vm, Action::Resume)?;
            set_phase(vm, Phase::Running)
        })
        .map(Response::new)
    }

    async fn resize_vm(
        &self,
        req: Request<pb::ResizeVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let r = req.into_inner();
        if r.cpus.is_none() && r.memory.is_none() {
            return Err(Status::invalid_argument("cpus, memory: give at least one"));
        }
        self.update(&r.name, "Resized", |vm| {
            let mut spec = vm.spec.clone().unwrap_or_default();
            if let Some(c) = r.cpus {
                spec.cpus = c;
            }
            if let Some(m) = &r.memory {
                spec.memory = m.clone();
            }
            // The same limits as the real agent (maxCpus, maxMemory, whole MiB).
            VmSpec::try_from(spec.clone())?;
            let live = matches!(phase(vm), pb::VmPhase::Running | pb::VmPhase::Paused);
            let status = vm.status.get_or_insert_default();
            if live {
                status.cpus = spec.cpus;
                status.memory_bytes = crate::quantity::parse_bytes(&spec.memory).unwrap_or(0);
            }
            vm.spec = Some(spec);
            Ok(())
        })
        .map(Response::new)
    }

    type WatchVmsStream = EventStream;

    async fn watch_vms(
        &self,
        req: Request<pb::WatchVmsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let filter = req.into_inner().name;
        let changes = self.0.events.subscribe();
        let existing = self.vms().values().cloned().collect();
        Ok(Response::new(watch_stream(changes, existing, filter)))
    }

    type MigrateVmStream =
        Pin<Box<dyn Stream<Item = Result<pb::MigrationProgress, Status>> + Send>>;

    // Simulated VMs have no memory to move: migrations are refused, plainly.
    async fn migrate_vm(
        &self,
        _: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<Self::MigrateVmStream>, Status> {
        Err(no_migration())
    }

    async fn cancel_migration(
        &self,
        _: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        Err(no_migration())
    }

    async fn prepare_incoming(
        &self,
        _: Request<pb::PrepareIncomingRequest>,
    ) -> Result<Response<pb::PrepareIncomingResponse>, Status> {
        Err(no_migration())
    }

    async fn finish_incoming(
        &self,
        _: Request<pb::FinishIncomingRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        Err(no_migration())
    }

    async fn abort_incoming(
        &self,
        _: Request<pb::AbortIncomingRequest>,
    ) -> Result<Response<pb::AbortIncomingResponse>, Status> {
        Err(no_migration())
    }

    // Nor memory or disks to snapshot.
    /// A simulated clone: the source's spec under the new name (there are no disks to copy).
    async fn clone_vm(&self, req: Request<pb::CloneVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let req = req.into_inner();
        check_name("targetName", &req.target_name)?;
        let source = self.update(&req.name, "", |_| Ok(()))?;
        let mut spec = source.spec.unwrap_or_default();
        // As a real clone: the disks the agent made become the clone's own copies.
        for d in spec
            .disks
            .iter_mut()
            .filter(|d| d.image.is_some() || !d.size.is_empty())
        {
            d.path = format!("/simulated/clones/{}/{}.qcow2", req.target_name, d.name);
            (d.image, d.size) = (None, String::new());
        }
        spec.name = req.target_name;
        if !req.labels.is_empty() {
            spec.labels = req.labels;
        }
        let create = pb::CreateVmRequest {
            spec: Some(spec),
            start: req.start,
        };
        self.create_vm(Request::new(create)).await
    }

    async fn create_snapshot(
        &self,
        _: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        Err(no_snapshots())
    }

    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Ok(Response::new(pb::ListSnapshotsResponse::default()))
    }

    async fn restore_snapshot(
        &self,
        _: Request<pb::RestoreSnapshotRequest>,
    ) -> Result<Response<pb::RestoreSnapshotResponse>, Status> {
        Err(no_snapshots())
    }

    async fn delete_snapshot(
        &self,
        _: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        Err(no_snapshots())
    }

    type ConsoleStream = crate::api::pipe::ByteStream<pb::ConsoleOutput>;

    async fn console(
        &self,
        _: Request<tonic::Streaming<pb::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        Err(Status::unimplemented(
            "a simulated agent (--simulate) has no consoles",
        ))
    }

    type PortForwardStream = crate::api::pipe::ByteStream<pb::PortForwardOutput>;

    async fn port_forward(
        &self,
        _: Request<tonic::Streaming<pb::PortForwardInput>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        Err(Status::unimplemented(
            "a simulated agent (--simulate) has no guest network",
        ))
    }
    type BackupVmStream = crate::api::service::BackupStream;

    async fn backup_vm(
        &self,
        _: Request<pb::BackupVmRequest>,
    ) -> Result<Response<Self::BackupVmStream>, Status> {
        Err(no_backups())
    }

    async fn restore_backup(
        &self,
        _: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::RestoreBackupResponse>, Status> {
        Err(no_backups())
    }

    async fn verify_backup(
        &self,
        _: Request<pb::VerifyBackupRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        Err(no_backups())
    }
}

fn no_backups() -> Status {
    Status::unimplemented("a simulated agent (--simulate) has no disks to back up")
}

fn no_snapshots() -> Status {
    Status::unimplemented("a simulated agent (--simulate) does not snapshot VMs")
}

fn no_migration() -> Status {
    Status::unimplemented("a simulated agent (--simulate) does not migrate VMs")
}

#[cfg(test)]
mod tests;
