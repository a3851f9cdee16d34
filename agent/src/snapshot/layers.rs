//! The disk layers of a VM's snapshots: overlays added in one transaction, the layer record,
//! and collecting layers nothing needs any more. See
//! [`crate::snapshot`] for the model.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::context::now_ms;
use crate::qemu::qmp::Qmp;
use crate::snapshot::files::{self};
use crate::snapshot::overlay_transaction;
use crate::spec::DiskFormat;
use crate::vm::actor::Supervisor;

impl Supervisor {
    /// Puts a new overlay on every writable disk in one transaction; returns the frozen layer
    /// of each disk. The VM's layer record is updated before this returns.
    pub(crate) async fn add_overlays(
        &mut self,
        qmp: &Qmp,
        snapshot: &str,
    ) -> Result<std::collections::BTreeMap<String, PathBuf>, String> {
        let blocks = qmp
            .execute_value("query-block", json!({}))
            .await
            .map_err(|e| format!("query-block: {e}"))?;
        files::ensure_layers_dir(&self.dir).map_err(|e| e.to_string())?;
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
            let overlay = files::new_layer_path(&self.dir, &disk.name, snapshot);
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

    pub(crate) fn set_layers(
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

    pub(crate) async fn create_overlay(
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
pub(crate) fn top_node(blocks: &Value, i: usize) -> Option<String> {
    let qdev = format!("/machine/peripheral/vdisk{i}/");
    blocks.as_array()?.iter().find_map(|b| {
        let q = b["qdev"].as_str()?;
        (q.starts_with(&qdev) || q == format!("vdisk{i}"))
            .then(|| b["inserted"]["node-name"].as_str().map(String::from))
            .flatten()
    })
}

/// The format node QEMU opened `file` as (a disk's own file, deep in its chain).
pub(crate) async fn node_of_file(qmp: &Qmp, file: &Path) -> Result<String, String> {
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
