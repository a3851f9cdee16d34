//! The disk layers of a VM's snapshots: overlays added in one transaction, the layer record,
//! and collecting layers nothing needs any more. See
//! [`crate::snapshot`] for the model.

use std::path::{Path, PathBuf};

use qapi::qmp;

use crate::context::now_ms;
use crate::qemu::img::{self, QemuImgError};
use crate::qemu::qmp::Qmp;
use crate::snapshot::files::{self};
use crate::snapshot::{SnapshotError, overlay_transaction};
use crate::spec::DiskFormat;
use crate::vm::actor::Supervisor;

impl Supervisor {
    /// Puts a new overlay on every writable disk in one transaction; returns the frozen layer
    /// of each disk. The VM's layer record is updated before this returns.
    pub(crate) async fn add_overlays(
        &mut self,
        qmp: &Qmp,
        snapshot: &str,
    ) -> Result<std::collections::BTreeMap<String, PathBuf>, SnapshotError> {
        let blocks = qmp
            .execute(qmp::query_block {})
            .await
            .map_err(SnapshotError::qmp("query-block"))?;
        self.ensure_layers_dir()?;
        let resolved = self.resolved_spec()?;
        let mut actions = Vec::new();
        let mut frozen = std::collections::BTreeMap::new();
        let mut active = self.layers.active.clone();
        let stamp = now_ms();
        for (i, disk) in resolved.disks.iter().enumerate() {
            if disk.read_only {
                continue;
            }
            let node = top_node(&blocks, i)
                .ok_or_else(|| SnapshotError::DiskNotFound(disk.name.clone()))?;
            let overlay = files::new_layer_path(&self.dir, &disk.name, snapshot);
            actions.push((node, overlay.clone(), format!("disk{i}-{stamp}")));
            frozen.insert(disk.name.clone(), disk.path.clone());
            active.insert(disk.name.clone(), overlay);
        }
        if actions.is_empty() {
            return Ok(frozen);
        }
        qmp.execute_json::<qmp::transaction>(overlay_transaction(&actions))
            .await
            .map_err(SnapshotError::qmp("creating the disk overlays"))?;
        self.set_layers(active, Some(snapshot.to_string()))?;
        Ok(frozen)
    }

    /// Makes the VM's layer directory.
    pub(crate) fn ensure_layers_dir(&self) -> Result<(), SnapshotError> {
        files::ensure_layers_dir(&self.dir)
            .map_err(SnapshotError::io(&files::layers_dir(&self.dir)))
    }

    pub(crate) fn set_layers(
        &mut self,
        active: std::collections::BTreeMap<String, PathBuf>,
        current: Option<String>,
    ) -> Result<(), SnapshotError> {
        self.layers.active = active;
        self.layers.current = current;
        self.layers
            .save(&self.dir)
            .map_err(SnapshotError::SaveLayers)
    }

    /// A new overlay over `backing` (opened as `format`).
    pub(crate) async fn create_overlay(
        &self,
        backing: &Path,
        format: DiskFormat,
        overlay: &Path,
    ) -> Result<(), QemuImgError> {
        let backing = Some((backing, format.as_str()));
        img::create(&self.ctx.qemu_img, overlay, backing, None).await
    }

    // ----- restore ---------------------------------------------------------------------------

    /// Deletes the disk layers that neither the VM nor any of its snapshots needs.
    pub(crate) fn collect_layers(&self) -> u64 {
        let (snapshots, _) = self.ctx.snapshots.list(Some(&self.spec.name));
        let roots = self.layers.active.values().cloned().chain(
            snapshots
                .into_iter()
                .flat_map(|s| s.disk_layers.into_values()),
        );
        files::collect_layers(&self.dir, roots)
    }

    // ----- delete ----------------------------------------------------------------------------
}

/// The node QEMU writes disk `i` through (the top of its chain), from `query-block`.
pub(crate) fn top_node(blocks: &[qmp::BlockInfo], i: usize) -> Option<String> {
    disk_block(blocks, i)?.node_name.clone()
}

/// What `query-block` says of disk `i` (device `vdisk<i>`), when it has a medium.
pub(crate) fn disk_block(blocks: &[qmp::BlockInfo], i: usize) -> Option<&qmp::BlockDeviceInfo> {
    let qdev = format!("/machine/peripheral/vdisk{i}/");
    blocks.iter().find_map(|b| {
        let q = b.qdev.as_deref()?;
        (q.starts_with(&qdev) || q == format!("vdisk{i}"))
            .then_some(b.inserted.as_ref())
            .flatten()
    })
}

/// The format node QEMU opened `file` as (a disk's own file, deep in its chain).
pub(crate) async fn node_of_file(qmp: &Qmp, file: &Path) -> Result<String, SnapshotError> {
    let nodes = qmp
        .execute(qmp::query_named_block_nodes { flat: Some(true) })
        .await
        .map_err(SnapshotError::qmp("query-named-block-nodes"))?;
    let want = file.to_string_lossy();
    nodes
        .into_iter()
        .find(|n| n.file == want && n.drv != "file")
        .and_then(|n| n.node_name)
        .ok_or_else(|| SnapshotError::NotOpen(file.to_path_buf()))
}
