//! A simulated node agent: the agent crate's `Simulator` (lifecycle, resize and clone under the
//! real VM state machine) with, on top, what the simulator refuses: snapshots (bookkeeping
//! only) and live migration to another simulated agent (the VM is handed over and boots there).
//! A node can be taken down (every call answers Unavailable, watches end) and brought back.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use hypersdk_agent::api::simulate::{SimNode, Simulator};
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_server::AgentService;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Every fake agent of a test, by the address the controller knows it by.
pub type Peers = Arc<Mutex<HashMap<String, FakeAgent>>>;

#[derive(Clone)]
pub struct FakeAgent {
    pub node: String,
    sim: Simulator,
    /// Snapshots by agent VM name.
    snapshots: Arc<Mutex<BTreeMap<String, Vec<pb::Snapshot>>>>,
    peers: Peers,
    down: watch::Sender<bool>,
}

impl FakeAgent {
    pub fn new(node: &str, peers: Peers) -> Self {
        let sim = Simulator::new(SimNode {
            node_name: node.into(),
            cpus: 8,
            memory_bytes: 16 << 30,
            boot: Duration::from_millis(50),
        });
        FakeAgent {
            node: node.into(),
            sim,
            snapshots: Arc::default(),
            peers,
            down: watch::channel(false).0,
        }
    }

    /// Takes the node down (true) or brings it back (false).
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    fn check(&self) -> Result<(), Status> {
        match *self.down.borrow() {
            true => Err(Status::unavailable(format!("node {} is down", self.node))),
            false => Ok(()),
        }
    }

    /// The VM `name` as this agent has it.
    pub async fn vm(&self, name: &str) -> Option<pb::Vm> {
        let req = Request::new(pb::GetVmRequest { name: name.into() });
        self.sim.get_vm(req).await.ok().map(Response::into_inner)
    }

    pub async fn phase(&self, name: &str) -> Option<pb::VmPhase> {
        let vm = self.vm(name).await?;
        Some(vm.status?.phase())
    }

    /// Resumes VM `name` behind the controller's back.
    pub async fn resume(&self, name: &str) {
        let req = Request::new(pb::ResumeVmRequest { name: name.into() });
        self.sim.resume_vm(req).await.unwrap();
    }

    /// Names of the snapshots of VM `name` on this agent.
    pub fn snapshot_names(&self, name: &str) -> Vec<String> {
        let snapshots = self.snapshots.lock().unwrap();
        let of_vm = snapshots.get(name).into_iter().flatten();
        of_vm.map(|s| s.name.clone()).collect()
    }

    /// Deletes a snapshot behind the controller's back (as `hyperctl` on the node would).
    pub fn forget_snapshot(&self, name: &str, snapshot: &str) {
        let mut snapshots = self.snapshots.lock().unwrap();
        snapshots
            .entry(name.into())
            .or_default()
            .retain(|s| s.name != snapshot);
    }

    async fn exists(&self, name: &str) -> Result<pb::Vm, Status> {
        let req = Request::new(pb::GetVmRequest { name: name.into() });
        self.sim.get_vm(req).await.map(Response::into_inner)
    }

    fn snapshot_missing(name: &str, snapshot: &str) -> Status {
        Status::invalid_argument(format!("VM {name} has no snapshot {snapshot:?}"))
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for FakeAgent {
    async fn get_node(&self, r: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        self.check()?;
        self.sim.get_node(r).await
    }

    async fn renew_lease(
        &self,
        r: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        self.check()?;
        self.sim.renew_lease(r).await
    }

    async fn create_vm(&self, r: Request<pb::CreateVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.check()?;
        self.sim.create_vm(r).await
    }

    async fn get_vm(&self, r: Request<pb::GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.check()?;
        self.sim.get_vm(r).await
    }

    async fn list_vms(
        &self,
        r: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        self.check()?;
        self.sim.list_vms(r).await
    }

    async fn delete_vm(
        &self,
        r: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        self.check()?;
        let name = r.get_ref().name.clone();
        let reply = self.sim.delete_vm(r).await?;
        // Its snapshots go with it, as on a real node.
        self.snapshots.lock().unwrap().remove(&name);
        Ok(reply)
    }

    async fn start_vm(&self, r: Request<pb::StartVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.check()?;
        self.sim.start_vm(r).await
    }

    async fn stop_vm(&self, r: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.check()?;
        self.sim.stop_vm(r).await
    }

    async fn restart_vm(
        &self,
        r: Request<pb::RestartVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.check()?;
        self.sim.restart_vm(r).await
    }

    async fn pause_vm(&self, r: Request<pb::PauseVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.check()?;
        self.sim.pause_vm(r).await
    }

    async fn resume_vm(&self, r: Request<pb::ResumeVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.check()?;
        self.sim.resume_vm(r).await
    }

    async fn resize_vm(&self, r: Request<pb::ResizeVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.check()?;
        self.sim.resize_vm(r).await
    }

    type WatchVmsStream = Stream_<pb::VmEvent>;

    /// The simulator's watch, ended when the node goes down.
    async fn watch_vms(
        &self,
        r: Request<pb::WatchVmsRequest>,
    ) -> Result<Response<Self::WatchVmsStream>, Status> {
        self.check()?;
        let events = self.sim.watch_vms(r).await?.into_inner();
        let mut down = self.down.subscribe();
        let gone = async move {
            let _ = down.wait_for(|d| *d).await;
        };
        Ok(Response::new(Box::pin(events.take_until(gone))))
    }

    type MigrateVmStream = Stream_<pb::MigrationProgress>;

    /// Hands the VM over to the agent at `target`, where it boots; one progress message, the
    /// last. A VM with snapshots is refused, as the real agent refuses it.
    async fn migrate_vm(
        &self,
        r: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<Self::MigrateVmStream>, Status> {
        self.check()?;
        let r = r.into_inner();
        let vm = self.exists(&r.name).await?;
        if !self.snapshot_names(&r.name).is_empty() {
            return Err(Status::failed_precondition("delete its snapshots first"));
        }
        let target = self.peers.lock().unwrap().get(&r.target).cloned();
        let target =
            target.ok_or_else(|| Status::unavailable(format!("no agent at {}", r.target)))?;
        target.check()?;
        let create = pb::CreateVmRequest {
            spec: vm.spec,
            start: true,
        };
        target.sim.create_vm(Request::new(create)).await?;
        let delete = pb::DeleteVmRequest {
            keep_disks: false,
            name: r.name.clone(),
        };
        self.sim.delete_vm(Request::new(delete)).await?;
        let done = pb::MigrationProgress {
            vm: r.name,
            phase: pb::MigrationPhase::Completed as i32,
            source_node: self.node.clone(),
            target_node: target.node.clone(),
            transferred_bytes: 64 << 20,
            total_bytes: 64 << 20,
            elapsed_ms: 120,
            downtime_ms: 8,
            ..Default::default()
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(done)]))))
    }

    async fn cancel_migration(
        &self,
        r: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.sim.cancel_migration(r).await
    }

    async fn prepare_incoming(
        &self,
        r: Request<pb::PrepareIncomingRequest>,
    ) -> Result<Response<pb::PrepareIncomingResponse>, Status> {
        self.sim.prepare_incoming(r).await
    }

    async fn finish_incoming(
        &self,
        r: Request<pb::FinishIncomingRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.sim.finish_incoming(r).await
    }

    async fn abort_incoming(
        &self,
        r: Request<pb::AbortIncomingRequest>,
    ) -> Result<Response<pb::AbortIncomingResponse>, Status> {
        self.sim.abort_incoming(r).await
    }

    async fn clone_vm(&self, r: Request<pb::CloneVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.check()?;
        self.sim.clone_vm(r).await
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        self.check()?;
        let r = r.into_inner();
        self.exists(&r.name).await?;
        let snapshot = pb::Snapshot {
            vm: r.name.clone(),
            name: r.snapshot,
            description: r.description,
            memory: r.memory,
            quiesced: r.quiesce,
            size_bytes: 3 << 20,
            ..Default::default()
        };
        let mut snapshots = self.snapshots.lock().unwrap();
        let of_vm = snapshots.entry(r.name).or_default();
        if of_vm.iter().any(|s| s.name == snapshot.name) {
            return Err(Status::already_exists(snapshot.name));
        }
        of_vm.push(snapshot.clone());
        Ok(Response::new(snapshot))
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        self.check()?;
        let name = r.into_inner().name;
        self.exists(&name).await?;
        let snapshots = self.snapshots.lock().unwrap();
        let snapshots = snapshots.get(&name).cloned().unwrap_or_default();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn restore_snapshot(
        &self,
        r: Request<pb::RestoreSnapshotRequest>,
    ) -> Result<Response<pb::RestoreSnapshotResponse>, Status> {
        self.check()?;
        let r = r.into_inner();
        let vm = self.exists(&r.name).await?;
        if !self.snapshot_names(&r.name).contains(&r.snapshot) {
            return Err(Self::snapshot_missing(&r.name, &r.snapshot));
        }
        Ok(Response::new(pb::RestoreSnapshotResponse {
            vm: Some(vm),
            restore_ms: 5,
            load_ms: 3,
        }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        self.check()?;
        let r = r.into_inner();
        self.exists(&r.name).await?;
        if !self.snapshot_names(&r.name).contains(&r.snapshot) {
            return Err(Self::snapshot_missing(&r.name, &r.snapshot));
        }
        self.forget_snapshot(&r.name, &r.snapshot);
        Ok(Response::new(pb::DeleteSnapshotResponse {
            freed_bytes: 3 << 20,
        }))
    }

    type BackupVmStream = Stream_<pb::BackupProgress>;

    async fn backup_vm(
        &self,
        _: Request<pb::BackupVmRequest>,
    ) -> Result<Response<Self::BackupVmStream>, Status> {
        Err(Status::unimplemented("backups are tested with real agents"))
    }

    async fn restore_backup(
        &self,
        _: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::RestoreBackupResponse>, Status> {
        Err(Status::unimplemented("backups are tested with real agents"))
    }

    async fn verify_backup(
        &self,
        _: Request<pb::VerifyBackupRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        Err(Status::unimplemented("backups are tested with real agents"))
    }

    type ConsoleStream = Stream_<pb::ConsoleOutput>;

    async fn console(
        &self,
        _: Request<tonic::Streaming<pb::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        Err(Status::unimplemented("the fake agent has no consoles"))
    }

    type PortForwardStream = Stream_<pb::PortForwardOutput>;

    async fn port_forward(
        &self,
        _: Request<tonic::Streaming<pb::PortForwardInput>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        Err(Status::unimplemented("the fake agent has no guest network"))
    }
}
