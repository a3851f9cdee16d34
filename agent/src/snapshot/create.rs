//! Taking a snapshot: overlays on every writable disk in one transaction and, with memory, the
//! guest's state written to a file while it is paused.

use crate::context::now_ms;
use crate::error::AgentError;
use crate::firmware::nvram;
use crate::migration::target::await_migration;
use crate::migration::{self, source};
use crate::qemu::qmp::{Qmp, enum_name};
use crate::snapshot::SAVE_TIMEOUT;
use crate::snapshot::files::{self, MEMORY_FILE, META_FILE};
use crate::snapshot::{
    FileStamp, Layout, MemoryState, SaveMode, SnapshotError, SnapshotMeta, check_snapshot_name,
};
use crate::spec::DiskFormat;
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;
use crate::vm::reason::Reason;
use hypersdk_proto::agent::v1 as pb;
use qapi::qmp;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{Instrument, info, warn};

impl Supervisor {
    pub(crate) async fn create_snapshot(
        &mut self,
        req: SnapshotRequest,
    ) -> Result<pb::Snapshot, AgentError> {
        check_snapshot_name(&req.snapshot)?;
        let started = Instant::now();
        let live = match self.status.phase {
            Phase::Running | Phase::Paused => Some(self.live_qmp()?),
            Phase::Pending | Phase::Stopped | Phase::Failed if !req.memory => None,
            Phase::Pending | Phase::Stopped | Phase::Failed => {
                return Err(self.conflict(
                    "is not running: it has no memory to snapshot (leave out memory for a disk snapshot)".into(),
                ));
            }
            other => {
                return Err(self.conflict(format!("cannot be snapshotted while {}", other.name())));
            }
        };
        let dir = match self.ctx.snapshots.create(&self.spec.name, &req.snapshot) {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(self.conflict(format!("snapshot {:?} already exists", req.snapshot)));
            }
            Err(e) => return Err(AgentError::Internal(format!("snapshot directory: {e}"))),
        };
        // The snapshot the disks descend from now (taking this one moves that on).
        let parent = self.layers.current.clone();
        let result = match live {
            Some(qmp) => self.snapshot_live(&qmp, &req, &dir).await,
            None => self.snapshot_stopped(&req).await,
        }
        .map(|c| SnapshotMeta {
            vm: self.spec.name.clone(),
            name: req.snapshot.clone(),
            description: req.description.clone(),
            created_at_ms: now_ms(),
            memory: c.memory,
            quiesced: c.quiesced,
            parent,
            qemu_version: self.ctx.qemu_version.clone(),
            spec: self.spec.clone(),
            layout: c.layout,
            pause_ms: c.pause_ms,
            duration_ms: started.elapsed().as_millis() as u32,
            disk_layers: c.disk_layers,
        });
        match result {
            Ok(meta) => {
                let write = nvram::save(&self.files.uefi_vars, &dir)
                    .and_then(|()| crate::store::write_json(&dir.join(META_FILE), &meta));
                if let Err(e) = write {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(AgentError::Internal(format!("writing the snapshot: {e}")));
                }
                if let Some(stamp) = meta.memory.as_ref().and_then(|m| m.written) {
                    record_digest(dir.clone(), stamp);
                }
                info!(
                    snapshot = meta.name,
                    memory = req.memory,
                    pause_ms = meta.pause_ms,
                    "snapshot ready"
                );
                self.publish(Reason::SnapshotCreated, &req.snapshot);
                let (listed, _) = self.ctx.snapshots.list(Some(&self.spec.name));
                let size = self.ctx.snapshots.usage(&meta, &listed, &self.dir);
                Ok(meta.to_proto(size))
            }
            Err(why) => {
                let _ = std::fs::remove_dir_all(&dir);
                warn!(snapshot = req.snapshot, "snapshot failed: {why}");
                self.publish(Reason::SnapshotFailed, &why.to_string());
                Err(self.qemu_error(format!("snapshot {:?}: {why}", req.snapshot)))
            }
        }
    }

    /// A running or paused VM: the disks get overlays; with memory the guest is paused while
    /// its state goes to a file.
    pub(crate) async fn snapshot_live(
        &mut self,
        qmp: &Qmp,
        req: &SnapshotRequest,
        dir: &Path,
    ) -> Result<Captured, SnapshotError> {
        let layout = source::read_layout(qmp)
            .await
            .map(|l| Layout::from(&l))
            .map_err(SnapshotError::Layout)?;
        let mode = if req.memory {
            Some(SaveMode::for_capabilities(
                &migrate_capabilities(qmp).await?,
            ))
        } else {
            None
        };
        let was_running = self.status.phase == Phase::Running;
        let quiesced = req.quiesce && self.freeze(true).await?;
        let paused_at = Instant::now();
        if mode.is_some() && was_running {
            qmp.execute(qmp::stop {})
                .await
                .map_err(SnapshotError::qmp("pausing the guest"))?;
        }
        let frozen = self.add_overlays(qmp, &req.snapshot).await;
        let memory = match (&frozen, mode) {
            (Ok(_), Some(mode)) => Some(save_memory(qmp, mode, &dir.join(MEMORY_FILE)).await),
            _ => None,
        };
        if mode.is_some() && was_running {
            // Whatever happened, the guest runs on (on its new overlays if they were made).
            if let Err(e) = qmp.execute(qmp::cont {}).await {
                warn!("resuming after the snapshot: {e}");
            }
        }
        // A disk-only snapshot does not pause the guest (a quiesced one freezes its
        // filesystems, which the guest keeps running through).
        let pause_ms = match mode {
            Some(_) if was_running => paused_at.elapsed().as_millis() as u32,
            _ => 0,
        };
        if quiesced {
            self.freeze(false).await?;
        }
        let disk_layers = frozen?;
        let memory = match memory {
            Some(Ok(())) => Some(memory_state(dir, mode.unwrap(), &layout).await?),
            Some(Err(e)) => return Err(e),
            None => None,
        };
        Ok(Captured {
            memory,
            quiesced,
            layout,
            disk_layers,
            pause_ms,
        })
    }

    /// A stopped VM: each writable disk's current file is frozen and gets a new overlay.
    pub(crate) async fn snapshot_stopped(
        &mut self,
        req: &SnapshotRequest,
    ) -> Result<Captured, SnapshotError> {
        let resolved = self.resolved_spec()?;
        self.ensure_layers_dir()?;
        let mut frozen = std::collections::BTreeMap::new();
        let mut active = self.layers.active.clone();
        for disk in resolved.disks.iter().filter(|d| !d.read_only) {
            let overlay = files::new_layer_path(&self.dir, &disk.name, &req.snapshot);
            let format = disk.format.unwrap_or(DiskFormat::Raw);
            self.create_overlay(&disk.path, format, &overlay).await?;
            frozen.insert(disk.name.clone(), disk.path.clone());
            active.insert(disk.name.clone(), overlay);
        }
        self.set_layers(active, Some(req.snapshot.clone()))?;
        let layout = Layout {
            boot_cpus: self.spec.cpus,
            boot_memory_bytes: self.spec.memory,
            ..Layout::default()
        };
        Ok(Captured {
            memory: None,
            quiesced: false,
            layout,
            disk_layers: frozen,
            pause_ms: 0,
        })
    }

    /// Freezes (or thaws) the guest's filesystems through its agent. Returns whether it froze.
    pub(crate) async fn freeze(&mut self, freeze: bool) -> Result<bool, SnapshotError> {
        let Some(run) = &self.running else {
            return Ok(false);
        };
        if !self.status.agent_connected {
            return Err(SnapshotError::NoGuestAgent);
        }
        run.guest_commands
            .fsfreeze(freeze)
            .await
            .map(|()| true)
            .map_err(|source| SnapshotError::Freeze { freeze, source })
    }
}

#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub snapshot: String,
    pub memory: bool,
    pub quiesce: bool,
    pub description: String,
}

/// What taking a snapshot captured, before it is recorded as a [`SnapshotMeta`].
pub(crate) struct Captured {
    pub(crate) memory: Option<MemoryState>,
    pub(crate) quiesced: bool,
    pub(crate) layout: Layout,
    /// Disk name → the frozen layer.
    pub(crate) disk_layers: std::collections::BTreeMap<String, PathBuf>,
    pub(crate) pause_ms: u32,
}

/// Names of the migration capabilities this QEMU has.
async fn migrate_capabilities(qmp: &Qmp) -> Result<Vec<String>, SnapshotError> {
    let caps = qmp
        .execute(qmp::query_migrate_capabilities {})
        .await
        .map_err(SnapshotError::qmp("query-migrate-capabilities"))?;
    Ok(caps.iter().map(|c| enum_name(&c.capability)).collect())
}

pub(crate) fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// Writes the paused guest's memory and device state to `file`.
async fn save_memory(qmp: &Qmp, mode: SaveMode, file: &Path) -> Result<(), SnapshotError> {
    let err = SnapshotError::qmp("saving memory");
    let setup = async {
        qmp.execute_json::<qmp::migrate_set_capabilities>(mode.capabilities(true))
            .await?;
        qmp.execute_json::<qmp::migrate_set_parameters>(mode.parameters())
            .await?;
        qmp.execute(migration::migrate(&file_uri(file))).await
    };
    setup.await.map_err(err)?;
    let result = await_migration(qmp, SAVE_TIMEOUT).await;
    if result.is_err() {
        // Ends a save that timed out; nothing to end after a failure.
        let _ = qmp.execute(qmp::migrate_cancel {}).await;
    }
    let _ = qmp
        .execute_json::<qmp::migrate_set_capabilities>(mode.capabilities(false))
        .await;
    result.map_err(SnapshotError::SaveMemory)
}

/// [`files::digest`], off the async threads.
pub(crate) async fn digest(file: &Path) -> std::io::Result<String> {
    let path = file.to_path_buf();
    tokio::task::spawn_blocking(move || files::digest(&path))
        .await
        .map_err(std::io::Error::other)?
}

/// The record of a memory file just written. Its digest comes later ([`record_digest`]).
async fn memory_state(
    dir: &Path,
    mode: SaveMode,
    layout: &Layout,
) -> Result<MemoryState, SnapshotError> {
    let file = dir.join(MEMORY_FILE);
    let stamp = || {
        std::fs::metadata(&file)
            .map(|m| FileStamp::of(&m))
            .map_err(SnapshotError::io(&file))
    };
    // Past the clock tick of the last write, any later write shows in the stamp.
    let mut written = stamp()?;
    while !written.settled(std::time::SystemTime::now()) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        written = stamp()?;
    }
    Ok(MemoryState {
        file: MEMORY_FILE.into(),
        file_bytes: written.bytes,
        digest: String::new(),
        written: Some(written),
        mapped_ram: mode.mapped_ram,
        multifd_channels: mode.multifd_channels,
        guest_bytes: crate::migration::layout_memory(&layout.into()).unwrap_or(0),
    })
}

/// Reads the memory file of the snapshot in `dir` and records its digest in `meta.json`, in
/// the background: the save does not wait for it. Given up if the file is not the one saved
/// (`stamp`) before or after it is read: a digest of changed content would vouch for it.
fn record_digest(dir: PathBuf, stamp: FileStamp) {
    let span = tracing::Span::current();
    tokio::spawn(
        async move {
            let file = dir.join(MEMORY_FILE);
            let same = || std::fs::metadata(&file).is_ok_and(|m| FileStamp::of(&m) == stamp);
            if !same() {
                return warn!("{} changed before its digest was taken", file.display());
            }
            let digest = match digest(&file).await {
                Ok(d) if same() => d,
                Ok(_) => return warn!("{} changed while its digest was taken", file.display()),
                Err(e) => return warn!("digest of {}: {e}", file.display()),
            };
            let path = dir.join(META_FILE);
            let Ok(mut meta) = crate::store::read_json::<SnapshotMeta>(&path) else {
                return; // deleted meanwhile
            };
            match &mut meta.memory {
                Some(m) if m.written == Some(stamp) => m.digest = digest,
                _ => return,
            }
            if let Err(e) = crate::store::write_json(&path, &meta) {
                warn!("recording the digest in {}: {e}", path.display());
            }
        }
        .instrument(span),
    );
}
