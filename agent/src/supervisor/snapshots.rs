//! Snapshots of this supervisor's VM: create (disks, and memory by a migration to a file),
//! restore (a new QEMU on fresh overlays, loading the memory file), delete. See
//! [`crate::snapshot`] for the model.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use serde_json::{Value, json};
use tracing::{Instrument, info, warn};

use super::{Supervisor, await_migration};
use crate::context::now_ms;
use crate::error::AgentError;
use crate::outgoing;
use crate::qmp::Qmp;
use crate::resolve::{resolve_spec, resolve_with_layers};
use crate::snapshot::{
    FileStamp, Layout, MemoryState, SaveMode, SnapshotMeta, check_snapshot_name,
    overlay_transaction,
};
use crate::snapshot_files::{self, DiskLayers, MEMORY_FILE, META_FILE};
use crate::spec::{DiskFormat, FieldError, VmSpec};
use crate::state::Phase;

/// Writing the memory state: at disk speed, a few seconds per GiB at worst.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);
/// Loading it back.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a restored guest's agent may take to answer the thaw.
const THAW_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub snapshot: String,
    pub memory: bool,
    pub quiesce: bool,
    pub description: String,
}

/// What taking a snapshot captured, before it is recorded as a [`SnapshotMeta`].
struct Captured {
    memory: Option<MemoryState>,
    quiesced: bool,
    layout: Layout,
    /// Disk name → the frozen layer.
    disk_layers: std::collections::BTreeMap<String, PathBuf>,
    pause_ms: u32,
}

impl Supervisor {
    pub(super) async fn create_snapshot(
        &mut self,
        req: SnapshotRequest,
    ) -> Result<pb::Snapshot, AgentError> {
        check_snapshot_name(&req.snapshot)?;
        let started = Instant::now();
        let live = match self.status.phase {
            Phase::Running | Phase::Paused => true,
            Phase::Pending | Phase::Stopped | Phase::Failed if !req.memory => false,
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
        let result = if live {
            self.snapshot_live(&req, &dir).await
        } else {
            self.snapshot_stopped(&req).await
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
                let write = crate::store::write_json(&dir.join(META_FILE), &meta);
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
                self.publish("SnapshotCreated", &req.snapshot);
                let (listed, _) = self.ctx.snapshots.list(Some(&self.spec.name));
                let size = self.ctx.snapshots.usage(&meta, &listed, &self.dir);
                Ok(meta.to_proto(size))
            }
            Err(why) => {
                let _ = std::fs::remove_dir_all(&dir);
                warn!(snapshot = req.snapshot, "snapshot failed: {why}");
                self.publish("SnapshotFailed", &why);
                Err(self.qemu_error(format!("snapshot {:?}: {why}", req.snapshot)))
            }
        }
    }

    /// A running or paused VM: the disks get overlays; with memory the guest is paused while
    /// its state goes to a file.
    async fn snapshot_live(
        &mut self,
        req: &SnapshotRequest,
        dir: &Path,
    ) -> Result<Captured, String> {
        let qmp = self.live_qmp()?;
        let layout = outgoing::read_layout(&qmp)
            .await
            .map(|l| Layout::from(&l))
            .map_err(|e| format!("reading the machine layout: {e}"))?;
        let mode = if req.memory {
            Some(SaveMode::for_capabilities(
                &migrate_capabilities(&qmp).await?,
            ))
        } else {
            None
        };
        let was_running = self.status.phase == Phase::Running;
        let quiesced = req.quiesce && self.freeze(true).await?;
        let paused_at = Instant::now();
        if mode.is_some() && was_running {
            qmp.execute(qapi::qmp::stop {})
                .await
                .map_err(|e| format!("pausing the guest: {e}"))?;
        }
        let frozen = self.add_overlays(&qmp, &req.snapshot).await;
        let memory = match (&frozen, mode) {
            (Ok(_), Some(mode)) => Some(save_memory(&qmp, mode, &dir.join(MEMORY_FILE)).await),
            _ => None,
        };
        if mode.is_some() && was_running {
            // Whatever happened, the guest runs on (on its new overlays if they were made).
            if let Err(e) = qmp.execute(qapi::qmp::cont {}).await {
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
    async fn snapshot_stopped(&mut self, req: &SnapshotRequest) -> Result<Captured, String> {
        let resolved = self.resolved_spec().map_err(|e| e.to_string())?;
        snapshot_files::ensure_layers_dir(&self.dir).map_err(|e| e.to_string())?;
        let mut frozen = std::collections::BTreeMap::new();
        let mut active = self.layers.active.clone();
        for disk in resolved.disks.iter().filter(|d| !d.read_only) {
            let overlay = snapshot_files::new_layer_path(&self.dir, &disk.name, &req.snapshot);
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
    async fn freeze(&mut self, freeze: bool) -> Result<bool, String> {
        let Some(run) = &self.running else {
            return Ok(false);
        };
        if !self.status.agent_connected {
            return Err("quiesce needs the guest agent, which is not connected".into());
        }
        run.guest_commands
            .fsfreeze(freeze)
            .await
            .map(|_| true)
            .map_err(|e| {
                format!(
                    "guest agent {}: {e}",
                    if freeze { "freeze" } else { "thaw" }
                )
            })
    }

    /// Thaws the filesystems of a guest restored from a quiesced memory snapshot, as soon as
    /// its guest agent answers.
    async fn thaw_restored(&mut self) {
        let Some(commands) = self.running.as_ref().map(|r| r.guest_commands.clone()) else {
            return;
        };
        let deadline = Instant::now() + THAW_TIMEOUT;
        loop {
            match commands.fsfreeze(false).await {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    warn!("the restored guest's filesystems may still be frozen: {e}");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Puts a new overlay on every writable disk in one transaction; returns the frozen layer
    /// of each disk. The VM's layer record is updated before this returns.
    async fn add_overlays(
        &mut self,
        qmp: &Qmp,
        snapshot: &str,
    ) -> Result<std::collections::BTreeMap<String, PathBuf>, String> {
        let blocks = qmp
            .execute_value("query-block", json!({}))
            .await
            .map_err(|e| format!("query-block: {e}"))?;
        snapshot_files::ensure_layers_dir(&self.dir).map_err(|e| e.to_string())?;
        let resolved = self.resolved_spec().map_err(|e| e.to_string())?;
        let mut actions = Vec::new();
        let mut frozen = std::collections::BTreeMap::new();
        let mut active = self.layers.active.clone();
        let stamp = now_ms();
        for (i, disk) in resolved.disks.iter().enumerate() {
            if disk.read_only {
                continue;
            }
            let node =
                top_node(&blocks, i).ok_or(format!("disk {:?} not found in QEMU", disk.name))?;
            let overlay = snapshot_files::new_layer_path(&self.dir, &disk.name, snapshot);
            actions.push((node, overlay.clone(), format!("disk{i}-{stamp}")));
            frozen.insert(disk.name.clone(), disk.path.clone());
            active.insert(disk.name.clone(), overlay);
        }
        if actions.is_empty() {
            return Ok(frozen);
        }
        qmp.execute_value("transaction", overlay_transaction(&actions))
            .await
            .map_err(|e| format!("creating the disk overlays: {e}"))?;
        self.set_layers(active, Some(snapshot.to_string()))?;
        Ok(frozen)
    }

    fn set_layers(
        &mut self,
        active: std::collections::BTreeMap<String, PathBuf>,
        current: Option<String>,
    ) -> Result<(), String> {
        self.layers.active = active;
        self.layers.current = current;
        self.layers
            .save(&self.dir)
            .map_err(|e| format!("saving the disk layers: {e}"))
    }

    async fn create_overlay(
        &self,
        backing: &Path,
        format: DiskFormat,
        overlay: &Path,
    ) -> Result<(), String> {
        let (backing, overlay) = (backing.as_os_str(), overlay.as_os_str());
        let fmt = format.as_str().as_ref();
        self.qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            fmt,
            "-b".as_ref(),
            backing,
            overlay,
        ])
        .await
    }

    /// Runs qemu-img with `args` (the subcommand first); Err carries its own words.
    pub(super) async fn qemu_img(&self, args: &[&std::ffi::OsStr]) -> Result<(), String> {
        let out = tokio::process::Command::new(&self.ctx.qemu_img)
            .args(args)
            .output()
            .await
            .map_err(|e| format!("running {}: {e}", self.ctx.qemu_img.display()))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img {}: {}",
                args[0].to_string_lossy(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// The spec with each disk on its current layer, resolved (paths checked, formats read).
    pub(super) fn resolved_spec(&self) -> Result<VmSpec, FieldError> {
        self.resolve_on(&self.spec, &self.layers)
    }

    pub(super) fn resolve_on(
        &self,
        spec: &VmSpec,
        layers: &DiskLayers,
    ) -> Result<VmSpec, FieldError> {
        let layers_dir = snapshot_files::layers_dir(&self.dir);
        resolve_with_layers(spec, layers, &layers_dir, &self.ctx.policy)
    }

    pub(super) fn live_qmp(&self) -> Result<Qmp, String> {
        self.running
            .as_ref()
            .map(|r| r.qmp.clone())
            .ok_or_else(|| "no QEMU process".to_string())
    }

    // ----- restore ---------------------------------------------------------------------------

    /// Returns the VM to `snapshot`. Everything that can be checked is checked before the VM
    /// is touched: the snapshot's files, their digest, the layers, the spec it will run with.
    /// Returns (restore, memory load) in milliseconds.
    pub(super) async fn restore_snapshot(
        &mut self,
        snapshot: &str,
    ) -> Result<(u32, u32), AgentError> {
        check_snapshot_name(snapshot)?;
        let started = Instant::now();
        match self.status.phase {
            Phase::Running | Phase::Paused | Phase::Stopped | Phase::Pending | Phase::Failed => {}
            other => {
                return Err(self.conflict(format!("cannot be restored while {}", other.name())));
            }
        }
        let meta = self.read_snapshot(snapshot)?;
        let dir = self.ctx.snapshots.dir(&self.spec.name, snapshot);
        let was_running = matches!(self.status.phase, Phase::Running | Phase::Paused);
        // The guest's state is about to be replaced: paused, it leaves the CPU to the checks.
        // Should they fail, it runs on.
        let paused_here = self.status.phase == Phase::Running
            && self
                .qmp_call(|q| async move { q.execute(qapi::qmp::stop {}).await })
                .await
                .is_ok();
        let (layers, spec, resolved) = match self.prepare_restore(snapshot, &meta, &dir).await {
            Ok(ready) => ready,
            Err(e) => {
                if paused_here {
                    let _ = self
                        .qmp_call(|q| async move { q.execute(qapi::qmp::cont {}).await })
                        .await;
                }
                self.collect_layers();
                return Err(e);
            }
        };
        // From here on the VM's current state is replaced.
        self.discard_process().await;
        self.spec = spec;
        self.save_spec()?;
        self.set_layers(layers.active, Some(snapshot.to_string()))
            .map_err(AgentError::Internal)?;
        self.collect_layers();
        let loaded = Instant::now();
        let outcome = match &meta.memory {
            Some(m) => {
                self.load_memory(&meta, &resolved, &dir.join(&m.file), m)
                    .await
            }
            None if was_running => {
                self.launch(&resolved, &[], resolved.max_cpus - resolved.cpus)
                    .await
            }
            None => Ok(()),
        };
        let load_ms = match meta.memory {
            Some(_) => loaded.elapsed().as_millis() as u32,
            None => 0,
        };
        if outcome.is_ok() && meta.memory.is_some() && meta.quiesced {
            // The saved guest had its filesystems frozen (the thaw came after the save).
            self.thaw_restored().await;
        }
        match outcome {
            Ok(()) => {
                let phase = if meta.memory.is_some() || was_running {
                    self.status.phase
                } else {
                    Phase::Stopped
                };
                self.set_phase(
                    phase,
                    &format!("restored from snapshot {snapshot}"),
                    "Restored",
                );
                info!(snapshot, load_ms, "restored");
                Ok((started.elapsed().as_millis() as u32, load_ms))
            }
            Err(e) => {
                if self.status.phase != Phase::Failed {
                    self.set_phase(Phase::Failed, &e.to_string(), "RestoreFailed");
                }
                Err(e)
            }
        }
    }

    /// Everything a restore checks and makes before it touches the VM: the memory file checked,
    /// the new layers, the spec the VM will have and the one its QEMU starts with (resolved).
    async fn prepare_restore(
        &self,
        snapshot: &str,
        meta: &SnapshotMeta,
        dir: &Path,
    ) -> Result<(DiskLayers, VmSpec, VmSpec), AgentError> {
        // The memory file is checked while the new layers are made; the caller collects
        // layers left over by a failure.
        let check = async {
            match &meta.memory {
                Some(m) => check_memory_file(&dir.join(&m.file), m).await,
                None => Ok(()),
            }
        };
        let (checked, layers) = tokio::join!(check, self.restore_layers(snapshot, meta));
        checked.map_err(|why| self.conflict(format!("snapshot {snapshot:?} is damaged: {why}")))?;
        let layers = layers?;
        let mut spec = self.spec.clone();
        spec.cpus = meta.spec.cpus;
        spec.memory = meta.spec.memory;
        let mut launch = spec.clone();
        if meta.memory.is_some() {
            crate::migration::check_layout(&(&meta.layout).into(), &spec)?;
            launch.cpus = meta.layout.boot_cpus;
            launch.memory = meta.layout.boot_memory_bytes;
        }
        let resolved = self.resolve_on(&launch, &layers)?;
        Ok((layers, spec, resolved))
    }

    /// New overlays on the snapshot's layers (the snapshot itself is never written): the
    /// layers the VM will run on after the restore.
    async fn restore_layers(
        &self,
        snapshot: &str,
        meta: &SnapshotMeta,
    ) -> Result<DiskLayers, AgentError> {
        let layers_dir = snapshot_files::layers_dir(&self.dir);
        let chains = snapshot_files::ensure_layers_dir(&self.dir)
            .and_then(|()| self.ctx.policy.with(&layers_dir))
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        let mut out = DiskLayers {
            active: self.layers.active.clone(),
            current: Some(snapshot.to_string()),
        };
        for (disk, layer) in &meta.disk_layers {
            let format = crate::image::inspect("layer", layer, None, &chains)
                .map_err(|e| self.conflict(format!("snapshot {snapshot:?}: disk {disk:?}: {e}")))?;
            let tag = format!("{snapshot}-restore");
            let overlay = snapshot_files::new_layer_path(&self.dir, disk, &tag);
            self.create_overlay(layer, format, &overlay)
                .await
                .map_err(|e| self.qemu_error(e))?;
            out.active.insert(disk.clone(), overlay);
        }
        Ok(out)
    }

    /// A QEMU started paused with `-incoming defer`, laid out as at the snapshot, loads the
    /// memory file and runs.
    async fn load_memory(
        &mut self,
        meta: &SnapshotMeta,
        resolved: &VmSpec,
        file: &Path,
        m: &MemoryState,
    ) -> Result<(), AgentError> {
        self.launch(
            resolved,
            &["-S", "-incoming", "defer"],
            resolved.max_cpus - resolved.cpus,
        )
        .await?;
        let qmp = self.live_qmp().map_err(|e| self.qemu_error(e))?;
        let mode = SaveMode::of(m);
        let layout = pb::MachineLayout::from(&meta.layout);
        let load = async {
            self.replay_layout(&layout).await?;
            qmp.execute_value("migrate-set-capabilities", mode.capabilities(true))
                .await
                .map_err(|e| e.to_string())?;
            qmp.execute_value("migrate-set-parameters", mode.parameters())
                .await
                .map_err(|e| e.to_string())?;
            qmp.execute_value("migrate-incoming", json!({"uri": file_uri(file)}))
                .await
                .map_err(|e| e.to_string())?;
            await_migration(&qmp, LOAD_TIMEOUT).await?;
            qmp.execute_value("migrate-set-capabilities", mode.capabilities(false))
                .await
                .map_err(|e| e.to_string())?;
            qmp.execute(qapi::qmp::cont {})
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(why) = load.await {
            self.discard_process().await;
            return Err(self.qemu_error(format!("loading the snapshot's memory: {why}")));
        }
        self.status.qemu_status = "running".into();
        self.status.phase = Phase::Running;
        self.refresh_from_qemu().await;
        if let Some(run) = &self.running {
            run.refresh.now();
        }
        Ok(())
    }

    fn read_snapshot(&self, snapshot: &str) -> Result<SnapshotMeta, AgentError> {
        self.ctx
            .snapshots
            .read(&self.spec.name, snapshot)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => AgentError::Invalid(FieldError::new(
                    "snapshot",
                    format!("VM {:?} has no snapshot {snapshot:?}", self.spec.name),
                )),
                _ => self.conflict(format!("snapshot {snapshot:?} cannot be read: {e}")),
            })
    }

    /// Deletes the disk layers that neither the VM nor any of its snapshots needs.
    fn collect_layers(&self) -> u64 {
        let (snapshots, _) = self.ctx.snapshots.list(Some(&self.spec.name));
        let roots = self.layers.active.values().cloned().chain(
            snapshots
                .into_iter()
                .flat_map(|s| s.disk_layers.into_values()),
        );
        snapshot_files::collect_layers(&self.dir, roots)
    }

    // ----- delete ----------------------------------------------------------------------------

    /// Removes a snapshot. When the VM's last snapshot goes, its disks are merged back into
    /// their own files, so the VM no longer depends on layers in this node's data dir.
    pub(super) async fn delete_snapshot(&mut self, snapshot: &str) -> Result<u64, AgentError> {
        check_snapshot_name(snapshot)?;
        let exists = self.ctx.snapshots.dir(&self.spec.name, snapshot).exists();
        if !exists {
            return Err(FieldError::new(
                "snapshot",
                format!("VM {:?} has no snapshot {snapshot:?}", self.spec.name),
            )
            .into());
        }
        if matches!(
            self.status.phase,
            Phase::Migrating | Phase::Incoming | Phase::Starting
        ) {
            return Err(self.conflict(format!(
                "cannot delete a snapshot while {}",
                self.status.phase.name()
            )));
        }
        let mut freed = self
            .ctx
            .snapshots
            .remove(&self.spec.name, snapshot)
            .map_err(|e| AgentError::Internal(format!("removing snapshot {snapshot:?}: {e}")))?;
        if self.layers.current.as_deref() == Some(snapshot) {
            let active = self.layers.active.clone();
            self.set_layers(active, None)
                .map_err(AgentError::Internal)?;
        }
        let (left, _) = self.ctx.snapshots.list(Some(&self.spec.name));
        if left.is_empty()
            && !self.layers.active.is_empty()
            && let Err(why) = self.merge_layers().await
        {
            // The chain stays valid as it is; only the space is not given back yet.
            warn!("merging the disk layers back: {why}");
        }
        freed += self.collect_layers();
        self.publish("SnapshotDeleted", snapshot);
        Ok(freed)
    }

    /// Writes each disk's layers back into the disk's own file and runs on that file again:
    /// `block-commit` while QEMU runs, `qemu-img commit` while it does not.
    async fn merge_layers(&mut self) -> Result<(), String> {
        let bases = resolve_spec(&self.spec, &self.ctx.policy).map_err(|e| e.to_string())?;
        match self.running.as_ref().map(|r| r.qmp.clone()) {
            Some(qmp) => {
                let blocks = qmp
                    .execute_value("query-block", json!({}))
                    .await
                    .map_err(|e| e.to_string())?;
                for (i, disk) in bases.disks.iter().enumerate() {
                    if !self.layers.active.contains_key(&disk.name) {
                        continue;
                    }
                    let top = top_node(&blocks, i).ok_or("disk not found in QEMU")?;
                    let base = node_of_file(&qmp, &disk.path).await?;
                    active_commit(&qmp, &top, &base, &format!("merge-disk{i}")).await?;
                    // A top opened from the command line (a restored VM's) outlives the commit
                    // as a node of its own, still holding the disk as its backing: let it go.
                    // Overlays made by a snapshot are gone already (the error is expected).
                    let _ = qmp
                        .execute_value("blockdev-del", json!({"node-name": top}))
                        .await;
                }
            }
            None => {
                for disk in bases.disks.iter() {
                    let Some(top) = self.layers.active.get(&disk.name) else {
                        continue;
                    };
                    self.qemu_img(&[
                        "commit".as_ref(),
                        "-q".as_ref(),
                        "-b".as_ref(),
                        disk.path.as_os_str(),
                        top.as_os_str(),
                    ])
                    .await?;
                }
            }
        }
        self.set_layers(Default::default(), None)
    }

    /// Ends the QEMU process (if any) without the exit counting as a crash.
    async fn discard_process(&mut self) {
        self.stopping = None;
        self.status.restart_at = None;
        if let Some(mut run) = self.running.take() {
            run.qemu.kill();
            run.qemu.wait().await;
        }
        self.forget_process();
        self.status.phase = Phase::Stopped;
    }
}

/// The node QEMU writes disk `i` through (the top of its chain), from `query-block`.
fn top_node(blocks: &Value, i: usize) -> Option<String> {
    let qdev = format!("/machine/peripheral/vdisk{i}/");
    blocks.as_array()?.iter().find_map(|b| {
        let q = b["qdev"].as_str()?;
        (q.starts_with(&qdev) || q == format!("vdisk{i}"))
            .then(|| b["inserted"]["node-name"].as_str().map(String::from))
            .flatten()
    })
}

/// The format node QEMU opened `file` as (a disk's own file, deep in its chain).
async fn node_of_file(qmp: &Qmp, file: &Path) -> Result<String, String> {
    let nodes = qmp
        .execute_value("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(|e| format!("query-named-block-nodes: {e}"))?;
    let want = file.to_string_lossy();
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["file"] == *want && n["drv"] != "file")
        .and_then(|n| n["node-name"].as_str().map(String::from))
        .ok_or_else(|| format!("{want} is not open in QEMU"))
}

/// Names of the migration capabilities this QEMU has.
async fn migrate_capabilities(qmp: &Qmp) -> Result<Vec<String>, String> {
    let caps = qmp
        .execute_value("query-migrate-capabilities", json!({}))
        .await
        .map_err(|e| format!("query-migrate-capabilities: {e}"))?;
    Ok(caps
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["capability"].as_str().map(String::from))
        .collect())
}

fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// Writes the paused guest's memory and device state to `file`.
async fn save_memory(qmp: &Qmp, mode: SaveMode, file: &Path) -> Result<(), String> {
    let err = |e: crate::qmp::QmpError| format!("saving memory: {e}");
    qmp.execute_value("migrate-set-capabilities", mode.capabilities(true))
        .await
        .map_err(err)?;
    qmp.execute_value("migrate-set-parameters", mode.parameters())
        .await
        .map_err(err)?;
    qmp.execute_value("migrate", json!({"uri": file_uri(file)}))
        .await
        .map_err(err)?;
    let result = await_migration(qmp, SAVE_TIMEOUT).await;
    if result.is_err() {
        // Ends a save that timed out; nothing to end after a failure.
        let _ = qmp.execute_value("migrate_cancel", json!({})).await;
    }
    let _ = qmp
        .execute_value("migrate-set-capabilities", mode.capabilities(false))
        .await;
    result.map_err(|why| format!("saving memory: {why}"))
}

/// [`snapshot_files::digest`], off the async threads.
async fn digest(file: &Path) -> Result<String, String> {
    let path = file.to_path_buf();
    tokio::task::spawn_blocking(move || snapshot_files::digest(&path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("reading {}: {e}", file.display()))
}

/// The record of a memory file just written. Its digest comes later ([`record_digest`]).
async fn memory_state(dir: &Path, mode: SaveMode, layout: &Layout) -> Result<MemoryState, String> {
    let file = dir.join(MEMORY_FILE);
    let stamp = || {
        std::fs::metadata(&file)
            .map(|m| FileStamp::of(&m))
            .map_err(|e| e.to_string())
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
                Err(e) => return warn!("digest: {e}"),
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

/// Checks a memory file against its record: present, whole, and unchanged.
async fn check_memory_file(file: &Path, m: &MemoryState) -> Result<(), String> {
    let now = std::fs::metadata(file)
        .map(|meta| FileStamp::of(&meta))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let len = now.bytes;
    if len != m.file_bytes {
        return Err(format!(
            "{} has {len} bytes, {} were written (truncated or replaced)",
            file.display(),
            m.file_bytes
        ));
    }
    if !snapshot_files::looks_like_qemu_state(file) {
        return Err(format!("{} is not a QEMU state file", file.display()));
    }
    if Some(now) == m.written {
        return Ok(());
    }
    if m.digest.is_empty() {
        return Err(format!(
            "{} changed since the save, before its digest was recorded: it cannot be checked",
            file.display()
        ));
    }
    if digest(file).await? != m.digest {
        return Err(format!(
            "{} does not match its digest (its content changed)",
            file.display()
        ));
    }
    Ok(())
}

/// Commits the active layer `top` into `base` while the guest runs, then switches to `base`.
async fn active_commit(qmp: &Qmp, top: &str, base: &str, job: &str) -> Result<(), String> {
    let err = |e: crate::qmp::QmpError| format!("block-commit: {e}");
    qmp.execute_value(
        "block-commit",
        json!({"job-id": job, "device": top, "base-node": base}),
    )
    .await
    .map_err(err)?;
    let deadline = Instant::now() + SAVE_TIMEOUT;
    let mut completing = false;
    loop {
        let jobs = qmp
            .execute_value("query-block-jobs", json!({}))
            .await
            .map_err(err)?;
        let this = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == job).cloned());
        match this {
            None if completing => return Ok(()),
            None => return Err("the commit job ended before it was ready".into()),
            Some(j) if j["ready"] == true && !completing => {
                qmp.execute_value("block-job-complete", json!({"device": job}))
                    .await
                    .map_err(err)?;
                completing = true;
            }
            Some(_) if Instant::now() > deadline => {
                let _ = qmp
                    .execute_value("block-job-cancel", json!({"device": job}))
                    .await;
                return Err(format!("the commit took longer than {SAVE_TIMEOUT:?}"));
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
