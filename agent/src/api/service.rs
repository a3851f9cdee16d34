//! The gRPC service: a thin layer mapping requests onto the VM registry.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_server::AgentService;
use hypersdk_proto::endpoint::Address;
use hypersdk_tls::server::ServerTls;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pipe::ByteStream;
use super::{EventStream, watch_stream};
use crate::host::node::NodeFacts;
use crate::migration::encrypt;
use crate::migration::{Options, is_final};
use crate::spec::check_name;
use crate::vm::actor::{DEFAULT_STOP_TIMEOUT, Op, SnapshotRequest};
use crate::vm::registry::Vms;

pub struct Service {
    vms: Arc<Vms>,
    node: NodeFacts,
    /// The TLS identity served, whose expiry GetNode reports.
    tls: Option<Arc<ServerTls>>,
}

impl Service {
    pub fn new(vms: Arc<Vms>, node: NodeFacts, tls: Option<Arc<ServerTls>>) -> Self {
        Self { vms, node, tls }
    }

    async fn call(&self, name: &str, op: Op) -> Result<Response<pb::Vm>, Status> {
        check_name("name", name)?;
        Ok(Response::new(self.vms.call(name, op).await?))
    }

    /// [`Service::call`] for an op that answers with a value besides the VM.
    async fn call_for<T>(
        &self,
        name: &str,
        op: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Op,
    ) -> Result<(pb::Vm, T), Status> {
        check_name("name", name)?;
        Ok(self.vms.call_for(name, op).await?)
    }
}

fn stop_timeout(seconds: u32) -> Duration {
    match seconds {
        0 => DEFAULT_STOP_TIMEOUT,
        s => Duration::from_secs(s.into()),
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::MigrationProgress, Status>> + Send>>;
pub type BackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupProgress, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Service {
    async fn get_node(&self, _: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let allocated = self.vms.allocated().await;
        let lease = self.vms.context().fence.view();
        let mut node = self.node.to_proto(&meminfo, allocated, lease);
        node.network = self.vms.context().network.as_ref().map(|n| n.to_proto());
        if let Some(facts) = self.tls.as_ref().map(|t| t.facts()) {
            node.tls_not_after = facts
                .not_after
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            node.tls_days_left = facts.days_left();
        }
        Ok(Response::new(node))
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let r = req.into_inner();
        let timeout = std::time::Duration::from_millis(r.fence_timeout_ms.into());
        let lease = self.vms.context().fence.renew(r.token, timeout);
        Ok(Response::new(
            lease.map_err(|e| Status::invalid_argument(e.to_string()))?,
        ))
    }

    async fn create_vm(
        &self,
        req: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let (spec, start) = unpack_create(req)?;
        Ok(Response::new(self.vms.create(spec, start).await?))
    }

    async fn get_vm(&self, req: Request<pb::GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let name = req.into_inner().name;
        check_name("name", &name)?;
        Ok(Response::new(self.vms.get(&name).await?))
    }

    async fn list_vms(
        &self,
        _: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        Ok(Response::new(pb::ListVmsResponse {
            vms: self.vms.list().await,
        }))
    }

    async fn delete_vm(
        &self,
        req: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let r = req.into_inner();
        check_name("name", &r.name)?;
        self.vms.delete(&r.name, r.keep_disks).await?;
        Ok(Response::new(pb::DeleteVmResponse {}))
    }

    async fn start_vm(&self, req: Request<pb::StartVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.call(&req.into_inner().name, Op::Start).await
    }

    async fn stop_vm(&self, req: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let r = req.into_inner();
        let op = Op::Stop {
            timeout: stop_timeout(r.timeout_seconds),
            force: r.force,
        };
        self.call(&r.name, op).await
    }

    async fn restart_vm(
        &self,
        req: Request<pb::RestartVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let r = req.into_inner();
        let op = Op::Restart {
            timeout: stop_timeout(r.timeout_seconds),
            force: r.force,
        };
        self.call(&r.name, op).await
    }

    async fn pause_vm(&self, req: Request<pb::PauseVmRequest>) -> Result<Response<pb::Vm>, Status> {
        self.call(&req.into_inner().name, Op::Pause).await
    }

    async fn resume_vm(
        &self,
        req: Request<pb::ResumeVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.call(&req.into_inner().name, Op::Resume).await
    }

    async fn resize_vm(
        &self,
        req: Request<pb::ResizeVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let r = req.into_inner();
        let memory = match r.memory.as_deref() {
            None => None,
            Some(q) => Some(crate::spec::parse_memory("memory", q)?),
        };
        if r.cpus.is_none() && memory.is_none() {
            return Err(Status::invalid_argument("cpus, memory: give at least one"));
        }
        self.call(
            &r.name,
            Op::Resize {
                cpus: r.cpus,
                memory,
            },
        )
        .await
    }

    type WatchVmsStream = EventStream;

    async fn watch_vms(
        &self,
        req: Request<pb::WatchVmsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let filter = req.into_inner().name;
        if !filter.is_empty() {
            check_name("name", &filter)?;
        }
        let changes = self.vms.context().events.subscribe();
        let existing = self.vms.list().await;
        Ok(Response::new(watch_stream(changes, existing, filter)))
    }

    type MigrateVmStream = ProgressStream;

    async fn migrate_vm(
        &self,
        req: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let r = req.into_inner();
        check_name("name", &r.name)?;
        let target: Address = r
            .target
            .parse()
            .map_err(|e| Status::invalid_argument(format!("target: {e}")))?;
        let options = Options::try_from(r.options)?;
        let (progress_tx, progress_rx) = tokio::sync::oneshot::channel();
        let op = Op::Migrate {
            target,
            options,
            progress: progress_tx,
        };
        self.vms.call(&r.name, op).await?;
        let progress = progress_rx
            .await
            .map_err(|_| Status::internal("the migration gave no progress"))?;
        // Every change until (and including) the final figures.
        let stream = futures::stream::unfold(Some(progress), |rx| async move {
            let mut rx = rx?;
            let p = rx.borrow_and_update().clone();
            if is_final(p.phase()) {
                return Some((Ok(p), None));
            }
            if rx.changed().await.is_err() {
                // The task ended without a final word (the agent is shutting down).
                let p = rx.borrow().clone();
                return Some((Ok(p), None));
            }
            Some((Ok(p), Some(rx)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_migration(
        &self,
        req: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.call(&req.into_inner().name, Op::CancelMigration).await
    }

    async fn prepare_incoming(
        &self,
        req: Request<pb::PrepareIncomingRequest>,
    ) -> Result<Response<pb::PrepareIncomingResponse>, Status> {
        let (uri, vm) = self.vms.prepare_incoming(req.into_inner()).await?;
        // With --tls-* the target QEMU takes the stream only over TLS (open_incoming_port).
        let tls_hostname = match &self.vms.context().tls {
            Some(_) => encrypt::uri_host(&uri).unwrap_or_default().to_string(),
            None => String::new(),
        };
        Ok(Response::new(pb::PrepareIncomingResponse {
            uri,
            vm: Some(vm),
            node_name: self.node.node_name.clone(),
            tls_hostname,
        }))
    }

    async fn finish_incoming(
        &self,
        req: Request<pb::FinishIncomingRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.call(&req.into_inner().name, Op::FinishIncoming).await
    }

    async fn abort_incoming(
        &self,
        req: Request<pb::AbortIncomingRequest>,
    ) -> Result<Response<pb::AbortIncomingResponse>, Status> {
        self.call(&req.into_inner().name, Op::AbortIncoming).await?;
        Ok(Response::new(pb::AbortIncomingResponse {}))
    }

    async fn clone_vm(&self, req: Request<pb::CloneVmRequest>) -> Result<Response<pb::Vm>, Status> {
        Ok(Response::new(self.vms.clone_vm(req.into_inner()).await?))
    }

    type BackupVmStream = BackupStream;

    async fn backup_vm(
        &self,
        req: Request<pb::BackupVmRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        let r = req.into_inner();
        check_name("name", &r.name)?;
        let span = tracing::info_span!("backup", vm = r.name);
        let (tx, rx) = tokio::sync::watch::channel(pb::BackupProgress::default());
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
        let vms = self.vms.clone();
        let run = async move {
            // Progress goes out as it changes; the result (or the error) last.
            let forward = tokio::spawn({
                let mut rx = rx;
                let out = out_tx.clone();
                async move {
                    while rx.changed().await.is_ok() {
                        let p = rx.borrow_and_update().clone();
                        if p.done || out.send(Ok(p)).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let result = crate::backup::upload::backup(&vms, r, &tx).await;
            drop(tx);
            let _ = forward.await;
            let _ = match result {
                Ok(done) => out_tx.send(Ok(done)).await,
                Err(e) => {
                    tracing::warn!("backup failed: {e}");
                    out_tx.send(Err(backup_status(&e))).await
                }
            };
        };
        tokio::spawn(tracing::Instrument::instrument(run, span));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }

    async fn restore_backup(
        &self,
        req: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<pb::RestoreBackupResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("restore", vm = r.name);
        let ctx = self.vms.context().clone();
        tracing::Instrument::instrument(crate::backup::restore::restore(&ctx, r), span)
            .await
            .map(Response::new)
            .map_err(|e| backup_status(&e))
    }

    async fn verify_backup(
        &self,
        req: Request<pb::VerifyBackupRequest>,
    ) -> Result<Response<pb::VerifyBackupResponse>, Status> {
        crate::backup::restore::verify(req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| backup_status(&e))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let r = req.into_inner();
        if r.description.len() > 1024 {
            return Err(Status::invalid_argument(
                "description: must be at most 1024 bytes",
            ));
        }
        let request = SnapshotRequest {
            snapshot: r.snapshot,
            memory: r.memory,
            quiesce: r.quiesce,
            description: r.description,
        };
        let (_, snapshot) = self
            .call_for(&r.name, |done| Op::Snapshot { request, done })
            .await?;
        Ok(Response::new(snapshot))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let name = req.into_inner().name;
        if !name.is_empty() {
            self.vms.get(&name).await?;
        }
        let ctx = self.vms.context();
        let (found, broken) = ctx
            .snapshots
            .list((!name.is_empty()).then_some(name.as_str()));
        for why in broken {
            tracing::warn!("unreadable snapshot left out of the list: {why}");
        }
        let snapshots = found
            .iter()
            .map(|m| m.to_proto(ctx.snapshots.usage(m, &found, &ctx.store.vm_dir(&m.vm))))
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn restore_snapshot(
        &self,
        req: Request<pb::RestoreSnapshotRequest>,
    ) -> Result<Response<pb::RestoreSnapshotResponse>, Status> {
        let r = req.into_inner();
        let snapshot = r.snapshot;
        let (vm, (restore_ms, load_ms)) = self
            .call_for(&r.name, |done| Op::Restore { snapshot, done })
            .await?;
        Ok(Response::new(pb::RestoreSnapshotResponse {
            vm: Some(vm),
            restore_ms,
            load_ms,
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        let snapshot = r.snapshot;
        let (_, freed_bytes) = self
            .call_for(&r.name, |freed| Op::DeleteSnapshot { snapshot, freed })
            .await?;
        Ok(Response::new(pb::DeleteSnapshotResponse { freed_bytes }))
    }

    type ConsoleStream = ByteStream<pb::ConsoleOutput>;

    async fn console(
        &self,
        req: Request<tonic::Streaming<pb::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        Ok(Response::new(super::attach::console(&self.vms, req).await?))
    }

    type PortForwardStream = ByteStream<pb::PortForwardOutput>;

    async fn port_forward(
        &self,
        req: Request<tonic::Streaming<pb::PortForwardInput>>,
    ) -> Result<Response<Self::PortForwardStream>, Status> {
        Ok(Response::new(
            super::attach::port_forward(&self.vms, req).await?,
        ))
    }
}

/// A CreateVm request's spec (required) and whether to start the VM.
pub fn unpack_create(req: Request<pb::CreateVmRequest>) -> Result<(pb::VmSpec, bool), Status> {
    let req = req.into_inner();
    let spec = req
        .spec
        .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
    Ok((spec, req.start))
}

/// The gRPC status of a failed backup, restore or verification.
fn backup_status(e: &crate::backup::BackupError) -> Status {
    use crate::backup::BackupError as E;
    let msg = e.to_string();
    match e {
        E::BadRequest { .. } | E::Key(_) => Status::invalid_argument(msg),
        E::Store {
            source:
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. },
            ..
        } => Status::permission_denied(msg),
        E::Store { .. } => Status::unavailable(msg),
        E::Chunk { .. } | E::Manifest { .. } => Status::data_loss(msg),
        E::Expose(_) => Status::failed_precondition(msg),
        E::Read { .. } | E::Io { .. } | E::QemuImg(_) => Status::aborted(msg),
    }
}
