//! Restoring a snapshot: every check before the VM is touched, then a new QEMU on fresh
//! overlays over the snapshot's layers, loading its memory file.

use crate::error::AgentError;
use crate::firmware::nvram;
use crate::migration::target::await_migration;
use crate::migration::{self, IncomingError};
use crate::qemu::qmp::Qmp;
use crate::snapshot::create::{digest, file_uri};
use crate::snapshot::files::{self, DiskLayers};
use crate::snapshot::{FileStamp, MemoryState, SaveMode, SnapshotMeta, check_snapshot_name};
use crate::snapshot::{LOAD_TIMEOUT, MemoryFileError, THAW_TIMEOUT};
use crate::spec::{FieldError, VmSpec};
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;
use crate::vm::reason::Reason;
use hypersdk_proto::agent::v1 as pb;
use qapi::qmp;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::{info, warn};

impl Supervisor {
    /// Returns the VM to `snapshot`. Everything that can be checked is checked before the VM
    /// is touched: the snapshot's files, their digest, the layers, the spec it will run with.
    /// Returns (restore, memory load) in milliseconds.
    pub(crate) async fn restore_snapshot(
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
        let ready = self.checked_restore(snapshot, &meta, &dir).await?;
        match self
            .replace_with(snapshot, &meta, &dir, ready, was_running)
            .await
        {
            Ok(load_ms) => {
                let phase = if meta.memory.is_some() || was_running {
                    self.status.phase
                } else {
                    Phase::Stopped
                };
                self.set_phase(
                    phase,
                    &format!("restored from snapshot {snapshot}"),
                    Reason::Restored,
                );
                info!(snapshot, load_ms, "restored");
                Ok((started.elapsed().as_millis() as u32, load_ms))
            }
            Err(e) => {
                if self.status.phase != Phase::Failed {
                    self.set_phase(Phase::Failed, &e.to_string(), Reason::RestoreFailed);
                }
                Err(e)
            }
        }
    }

    /// Runs the checks of [`Self::prepare_restore`] with a running guest paused (its state is
    /// about to be replaced: paused, it leaves the CPU to the checks). Should they fail, it
    /// runs on.
    async fn checked_restore(
        &mut self,
        snapshot: &str,
        meta: &SnapshotMeta,
        dir: &Path,
    ) -> Result<(DiskLayers, VmSpec, VmSpec), AgentError> {
        let paused_here = self.status.phase == Phase::Running
            && self
                .qmp_call(|q| async move { q.execute(qapi::qmp::stop {}).await })
                .await
                .is_ok();
        let prepared = self.prepare_restore(snapshot, meta, dir).await;
        if prepared.is_err() {
            if paused_here {
                let _ = self
                    .qmp_call(|q| async move { q.execute(qapi::qmp::cont {}).await })
                    .await;
            }
            self.collect_layers();
        }
        prepared
    }

    /// Replaces the VM's state with the snapshot's: the spec, the disk layers and, with
    /// memory, the guest itself. Ok: how long the memory took to load, in milliseconds.
    async fn replace_with(
        &mut self,
        snapshot: &str,
        meta: &SnapshotMeta,
        dir: &Path,
        (layers, spec, resolved): (DiskLayers, VmSpec, VmSpec),
        was_running: bool,
    ) -> Result<u32, AgentError> {
        self.discard_process().await;
        nvram::restore(dir, &self.files.uefi_vars).map_err(|e| {
            AgentError::Internal(format!("restoring the snapshot's UEFI variables: {e}"))
        })?;
        self.spec = spec;
        self.save_spec()?;
        self.set_layers(layers.active, Some(snapshot.to_string()))
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        self.collect_layers();
        let loaded = Instant::now();
        match &meta.memory {
            Some(m) => {
                self.load_memory(meta, &resolved, &dir.join(&m.file), m)
                    .await?;
                if meta.quiesced {
                    // The saved guest had its filesystems frozen (the thaw came after the save).
                    self.thaw_restored().await;
                }
                Ok(loaded.elapsed().as_millis() as u32)
            }
            None if was_running => {
                self.launch(&resolved, &[], resolved.max_cpus - resolved.cpus)
                    .await?;
                Ok(0)
            }
            None => Ok(0),
        }
    }

    /// Everything a restore checks and makes before it touches the VM: the memory file checked,
    /// the new layers, the spec the VM will have and the one its QEMU starts with (resolved).
    pub(crate) async fn prepare_restore(
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
    pub(crate) async fn restore_layers(
        &self,
        snapshot: &str,
        meta: &SnapshotMeta,
    ) -> Result<DiskLayers, AgentError> {
        let layers_dir = files::layers_dir(&self.dir);
        let chains = files::ensure_layers_dir(&self.dir)
            .and_then(|()| self.ctx.policy.with(&layers_dir))
            .map_err(|e| AgentError::Internal(format!("{}: {e}", layers_dir.display())))?;
        let mut out = DiskLayers {
            active: self.layers.active.clone(),
            current: Some(snapshot.to_string()),
        };
        for (disk, layer) in &meta.disk_layers {
            let format = crate::host::image::inspect("layer", layer, None, &chains)
                .map_err(|e| self.conflict(format!("snapshot {snapshot:?}: disk {disk:?}: {e}")))?;
            let tag = format!("{snapshot}-restore");
            let overlay = files::new_layer_path(&self.dir, disk, &tag);
            self.create_overlay(layer, format, &overlay)
                .await
                .map_err(|e| self.qemu_error(e))?;
            out.active.insert(disk.clone(), overlay);
        }
        Ok(out)
    }

    /// A QEMU started paused with `-incoming defer`, laid out as at the snapshot, loads the
    /// memory file and runs.
    pub(crate) async fn load_memory(
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
        let qmp = self.live_qmp()?;
        let layout = pb::MachineLayout::from(&meta.layout);
        let loaded = match self.replay_layout(&layout).await {
            Ok(()) => load_memory_file(&qmp, SaveMode::of(m), file).await,
            Err(e) => Err(e),
        };
        if let Err(why) = loaded {
            self.discard_process().await;
            return Err(self.qemu_error(format!("loading the snapshot's memory: {why}")));
        }
        self.status.qemu_status = "running".into();
        self.enter(Phase::Running);
        self.refresh_from_qemu().await;
        if let Some(run) = &self.running {
            run.refresh.now();
        }
        Ok(())
    }

    pub(crate) fn read_snapshot(&self, snapshot: &str) -> Result<SnapshotMeta, AgentError> {
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

    /// Thaws the filesystems of a guest restored from a quiesced memory snapshot, as soon as
    /// its guest agent answers.
    pub(crate) async fn thaw_restored(&mut self) {
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

    /// Ends the QEMU process (if any) without the exit counting as a crash.
    pub(crate) async fn discard_process(&mut self) {
        // A restore is refused while stopping or migrating: only a scheduled restart can be
        // under way, and the restored VM replaces it.
        self.task.take_restart();
        if let Some(mut run) = self.running.take() {
            run.qemu.kill();
            run.qemu.wait().await;
        }
        self.forget_process();
        self.enter(Phase::Stopped);
    }
}

/// Has the QEMU behind `qmp` (started with `-incoming defer`) load the memory `file` written
/// in `mode`, and run.
async fn load_memory_file(qmp: &Qmp, mode: SaveMode, file: &Path) -> Result<(), IncomingError> {
    qmp.execute_json::<qmp::migrate_set_capabilities>(mode.capabilities(true))
        .await?;
    qmp.execute_json::<qmp::migrate_set_parameters>(mode.parameters())
        .await?;
    qmp.execute(migration::migrate_incoming(&file_uri(file)))
        .await?;
    await_migration(qmp, LOAD_TIMEOUT).await?;
    qmp.execute_json::<qmp::migrate_set_capabilities>(mode.capabilities(false))
        .await?;
    qmp.execute(qmp::cont {}).await?;
    Ok(())
}

/// Checks a memory file against its record: present, whole, and unchanged.
async fn check_memory_file(file: &Path, m: &MemoryState) -> Result<(), MemoryFileError> {
    let unreadable = |source| MemoryFileError::Unreadable {
        path: file.to_path_buf(),
        source,
    };
    let now = std::fs::metadata(file)
        .map(|meta| FileStamp::of(&meta))
        .map_err(unreadable)?;
    if now.bytes != m.file_bytes {
        return Err(MemoryFileError::Length {
            path: file.to_path_buf(),
            len: now.bytes,
            written: m.file_bytes,
        });
    }
    if !files::looks_like_qemu_state(file) {
        return Err(MemoryFileError::NotQemuState(file.to_path_buf()));
    }
    if Some(now) == m.written {
        return Ok(());
    }
    if m.digest.is_empty() {
        return Err(MemoryFileError::Unverifiable(file.to_path_buf()));
    }
    if digest(file).await.map_err(unreadable)? != m.digest {
        return Err(MemoryFileError::DigestMismatch(file.to_path_buf()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(file: &Path, digest: &str) -> MemoryState {
        let stamp = FileStamp::of(&std::fs::metadata(file).unwrap());
        MemoryState {
            file: "memory.bin".into(),
            file_bytes: stamp.bytes,
            digest: digest.into(),
            written: Some(stamp),
            mapped_ram: false,
            multifd_channels: 0,
            guest_bytes: 0,
        }
    }

    #[tokio::test]
    async fn a_memory_file_that_is_not_the_one_saved_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.bin");
        std::fs::write(&file, b"QEVM saved state").unwrap();
        let saved = state(&file, &files::digest(&file).unwrap());
        check_memory_file(&file, &saved).await.unwrap();

        // Another file of the same length, written after the save: read and checked.
        let rewritten = |content: &[u8]| {
            std::fs::remove_file(&file).unwrap();
            std::fs::write(&file, content).unwrap();
        };
        rewritten(b"QEVM other state");
        let e = check_memory_file(&file, &saved).await.unwrap_err();
        assert!(matches!(e, MemoryFileError::DigestMismatch(_)), "{e}");
        assert!(e.to_string().contains("does not match its digest"), "{e}");
        let undigested = MemoryState {
            digest: String::new(),
            ..saved.clone()
        };
        let e = check_memory_file(&file, &undigested).await.unwrap_err();
        assert!(matches!(e, MemoryFileError::Unverifiable(_)), "{e}");
        rewritten(b"QEVM short");
        let e = check_memory_file(&file, &saved).await.unwrap_err();
        assert!(
            matches!(
                e,
                MemoryFileError::Length {
                    len: 10,
                    written: 16,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("truncated"), "{e}");
        rewritten(b"not a QEMU state");
        let e = check_memory_file(&file, &saved).await.unwrap_err();
        assert!(matches!(e, MemoryFileError::NotQemuState(_)), "{e}");
        std::fs::remove_file(&file).unwrap();
        let e = check_memory_file(&file, &saved).await.unwrap_err();
        assert!(matches!(e, MemoryFileError::Unreadable { .. }), "{e}");
    }
}
