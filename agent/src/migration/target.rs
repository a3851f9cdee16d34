//! The target side of a live migration: a QEMU with the source's machine layout, paused and
//! listening on a port of this agent's range, run once the source has sent everything.

use crate::error::AgentError;
use crate::hotplug;
use crate::migration::{self, AwaitError, IncomingError, Options, QemuStatus, encrypt};
use crate::qemu::process;
use crate::qemu::qmp::Qmp;
pub use crate::snapshot::create::SnapshotRequest;
use crate::snapshot::files::DiskLayers;
use crate::vm::actor::INCOMING_LOAD_TIMEOUT;
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;
use crate::vm::reason::Reason;
use hypersdk_proto::agent::v1 as pb;
use qapi::qmp;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{info, warn};

impl Supervisor {
    /// Target side: a QEMU with the source's machine layout, paused (`-S`) and listening for
    /// the state on a port of this agent's range.
    pub(crate) async fn incoming(
        &mut self,
        layout: &pb::MachineLayout,
        multifd_channels: u32,
        source_node: &str,
        uri_tx: oneshot::Sender<String>,
    ) -> Result<pb::Vm, AgentError> {
        if self.status.phase != Phase::Pending {
            return Err(self.conflict("already exists on this node".into()));
        }
        migration::check_layout(layout, &self.spec)?;
        let mut launch = self.spec.clone();
        launch.cpus = layout.boot_cpus;
        launch.memory = layout.boot_memory_bytes;
        let resolved = self.resolve_on(&launch, &DiskLayers::default())?;
        self.launch(
            &resolved,
            &["-S", "-incoming", "defer"],
            resolved.max_cpus - resolved.cpus,
        )
        .await?;
        if let Some(run) = &self.running
            && let Err(e) = process::prioritize_loading(run.pid)
        {
            warn!("the incoming QEMU runs at normal priority: {e}");
        }
        self.set_phase(
            Phase::Incoming,
            &format!("arriving by live migration from {source_node}"),
            Reason::Incoming,
        );
        let options = Options {
            multifd_channels,
            ..Options::default()
        };
        match self.listen_incoming(layout, &options).await {
            Ok(uri) => {
                info!(uri, source = source_node, "waiting for the migration");
                let _ = uri_tx.send(uri);
                Ok(self.snapshot())
            }
            Err(why) => {
                let _ = self.remove(Reason::IncomingAborted).await;
                Err(self.qemu_error(format!("preparing for the migration: {why}")))
            }
        }
    }

    /// Recreates hot-plugged vCPUs and memory, sets the migration capabilities and opens the
    /// first free port of the range.
    pub(crate) async fn listen_incoming(
        &mut self,
        layout: &pb::MachineLayout,
        options: &Options,
    ) -> Result<String, IncomingError> {
        self.replay_layout(layout).await?;
        self.open_incoming_port(options).await
    }

    /// Plugs what the source QEMU had plugged since its start: the state loads only into the
    /// same devices.
    pub(crate) async fn replay_layout(
        &mut self,
        layout: &pb::MachineLayout,
    ) -> Result<(), IncomingError> {
        let run = self.running.as_mut().ok_or(IncomingError::NoProcess)?;
        let qmp = run.qmp.clone();
        if !layout.hotplugged_cpus.is_empty() {
            let slots = qmp.execute(qmp::query_hotpluggable_cpus {}).await?;
            for cpu in &layout.hotplugged_cpus {
                let args = migration::cpu_to_add(&slots, cpu)?;
                hotplug::check_adds(1, run.cpu_adds_left)?;
                qmp.execute(args).await?;
                if let Some(left) = &mut run.cpu_adds_left {
                    *left -= 1;
                }
            }
        }
        for dimm in &layout.dimms {
            hotplug::plug_dimm(&qmp, dimm).await?;
        }
        if layout.virtio_mem_requested_bytes > 0 {
            hotplug::request_virtio_mem(&qmp, layout.virtio_mem_requested_bytes).await?;
        }
        Ok(())
    }

    /// Sets the incoming-migration capabilities and opens the first free port of the range.
    pub(crate) async fn open_incoming_port(
        &self,
        options: &Options,
    ) -> Result<String, IncomingError> {
        let qmp = &self.running.as_ref().ok_or(IncomingError::NoProcess)?.qmp;
        qmp.execute(migration::capabilities(options, false)).await?;
        qmp.execute(migration::parameters(options, false)).await?;
        let address = self.ctx.migration_address;
        let host = match address {
            std::net::IpAddr::V4(a) => a.to_string(),
            std::net::IpAddr::V6(a) => format!("[{a}]"),
        };
        // QEMU takes one migrate-incoming per process (a failed one leaves it unusable), so
        // the port is found free first: the first one that binds, as QEMU will bind it.
        let ports = &self.ctx.migration_ports.0;
        let port = ports
            .clone()
            .find(|p| std::net::TcpListener::bind((address, *p)).is_ok())
            .ok_or_else(|| IncomingError::NoFreePort {
                ports: ports.clone(),
                address,
            })?;
        let uri = format!("tcp:{host}:{port}");
        if let Some(files) = &self.ctx.tls {
            let dir = &self.files.migration_tls;
            encrypt::enable(qmp, files, dir, encrypt::End::Target, None).await?;
        }
        qmp.execute(migration::migrate_incoming(&uri)).await?;
        Ok(uri)
    }

    /// Target side: waits for the state to be loaded, then runs the guest.
    pub(crate) async fn finish_incoming(&mut self) -> Result<pb::Vm, AgentError> {
        if self.status.phase != Phase::Incoming {
            return Err(self.conflict(format!(
                "is {} here, not waiting for a migration",
                self.status.phase.name()
            )));
        }
        let qmp = self.live_qmp()?;
        await_migration(&qmp, INCOMING_LOAD_TIMEOUT)
            .await
            .map_err(|why| self.qemu_error(format!("loading the migrated state: {why}")))?;
        self.qmp_call(|q| async move { q.execute(qapi::qmp::cont {}).await })
            .await?;
        if let Some(run) = &self.running {
            if let Err(e) = process::reset_priority(run.pid) {
                warn!("QEMU keeps the raised priority of loading a migration: {e}");
            }
            run.refresh.now();
        }
        self.status.qemu_status = "running".into();
        self.set_phase(
            Phase::Running,
            "arrived by live migration",
            Reason::Migrated,
        );
        Ok(self.snapshot())
    }
}

/// Waits until QEMU's migration has completed: an incoming one (from a source QEMU or a file)
/// loaded, or one to a file written. Err: QEMU's reason, or the time limit.
pub(crate) async fn await_migration(qmp: &Qmp, limit: Duration) -> Result<(), AwaitError> {
    let deadline = Instant::now() + limit;
    // A live migration's end is announced (its "events" capability is on) and answered at
    // once; saves and restores, which have no events, are polled.
    let mut events = qmp.events();
    loop {
        let reply = qmp.execute(qmp::query_migrate {}).await?;
        match migration::info_status(&reply) {
            QemuStatus::Completed => return Ok(()),
            QemuStatus::Failed | QemuStatus::Cancelled => {
                return Err(AwaitError::Failed(reply.error_desc));
            }
            _ if Instant::now() > deadline => return Err(AwaitError::Timeout(limit)),
            _ => {
                let _ = tokio::time::timeout(Duration::from_millis(2), events.recv()).await;
            }
        }
    }
}
