//! Exposing a running VM's disks: copy-before-write into temporary overlays ("image fleecing"),
//! exported by QEMU's NBD server, and taking it all down again (see [`super::expose`]).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::{info, warn};

use super::expose::{
    BITMAP_PREFIX, ExposeError, ExposeRequest, Exposed, ExposedDisk, SETTLE, bitmap_name,
    choose_base, io, qmp_err,
};
use crate::qemu::qmp::{Qmp, QmpError};
use crate::snapshot::layers::top_node;
use crate::vm::actor::Supervisor;

impl Supervisor {
    pub(super) async fn expose_live(
        &mut self,
        qmp: &Qmp,
        req: &ExposeRequest,
        tmp: &Path,
    ) -> Result<Exposed, ExposeError> {
        let blocks = qmp
            .execute(qapi::qmp::query_block {})
            .await
            .map_err(qmp_err("query-block"))?;
        let nodes = qmp
            .execute_value("query-named-block-nodes", json!({"flat": true}))
            .await
            .map_err(qmp_err("query-named-block-nodes"))?;
        let resolved = self.resolved_spec().map_err(|e| ExposeError::Io {
            what: "the VM's disks".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        // Fleecing nodes no backup of this process made: an agent ended mid-backup. Their
        // bitmaps cannot be trusted (the base stopped recording then): read in full.
        let leftovers: Vec<String> = nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["node-name"].as_str())
            .filter(|n| n.starts_with("hsdk-fleece-"))
            .map(String::from)
            .collect();
        let interrupted = !leftovers.is_empty();
        if interrupted {
            warn!(nodes = ?leftovers, "clearing what an interrupted backup left in QEMU");
            clear_leftovers(qmp, &leftovers).await;
        }
        std::fs::create_dir_all(tmp).map_err(io(tmp.display()))?;
        let socket = tmp.join("nbd.sock");
        let _ = std::fs::remove_file(&socket);
        let new = bitmap_name(&req.backup_id);
        let old = req.parent_id.as_deref().map(bitmap_name);
        let mut disks = Vec::new();
        let mut actions = Vec::new();
        for (i, disk) in resolved.disks.iter().enumerate() {
            if disk.read_only {
                continue;
            }
            let node =
                top_node(&blocks, i).ok_or_else(|| ExposeError::DiskNotFound(disk.name.clone()))?;
            let info = nodes
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["node-name"] == node.as_str())
                .cloned()
                .unwrap_or(Value::Null);
            let size = info["image"]["virtual-size"].as_u64().unwrap_or(0);
            let qcow2 = info["drv"] == "qcow2";
            let all: Vec<&Value> = info["dirty-bitmaps"]
                .as_array()
                .into_iter()
                .flatten()
                .collect();
            let named = |b: &&Value| {
                b["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(BITMAP_PREFIX))
            };
            let bitmaps: Vec<String> = all
                .iter()
                .copied()
                .filter(named)
                .map(|b| b["name"].as_str().unwrap_or_default().to_string())
                .collect();
            // An inconsistent bitmap (QEMU ended without saving it) or one that does not
            // record (a backup ended half-way) cannot say what changed.
            let usable: Vec<String> = all
                .iter()
                .copied()
                .filter(named)
                .filter(|b| b["inconsistent"] != true && b["recording"] == true && !interrupted)
                .map(|b| b["name"].as_str().unwrap_or_default().to_string())
                .collect();
            let (bitmap, full_reason) = choose_base(qcow2, &usable, old.as_deref());
            // Bitmaps of backups the repository no longer starts from only cost write time.
            for stale in bitmaps.iter().filter(|b| Some(*b) != bitmap.as_ref()) {
                let _ = qmp
                    .execute_value(
                        "block-dirty-bitmap-remove",
                        json!({"node": node, "name": stale}),
                    )
                    .await;
            }
            let overlay = tmp.join(format!("fleece-{i}.qcow2"));
            let _ = std::fs::remove_file(&overlay);
            crate::qemu::img::create(&self.ctx.qemu_img, &overlay, None, Some(size)).await?;
            let fleece = format!("hsdk-fleece-{i}");
            qmp.execute_value(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": fleece, "discard": "unmap",
                       "file": {"driver": "file", "filename": overlay},
                       "backing": node}),
            )
            .await
            .map_err(qmp_err("adding the fleecing overlay"))?;
            actions.push(json!({"type": "blockdev-backup", "data":
                {"job-id": format!("hsdk-backup-{i}"), "device": node, "target": fleece, "sync": "none"}}));
            if qcow2 {
                actions.push(json!({"type": "block-dirty-bitmap-add", "data":
                    {"node": node, "name": new, "persistent": true}}));
            }
            if let Some(b) = &bitmap {
                actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": b}}));
            }
            disks.push(ExposedDisk {
                name: disk.name.clone(),
                socket: socket.clone(),
                export: format!("disk{i}"),
                bitmap,
                full_reason,
                node,
                path: disk.path.clone(),
                new_bitmap: qcow2.then(|| new.clone()),
                fleece: Some((fleece, overlay)),
            });
        }
        let mut exposed = Exposed {
            disks,
            quiesced: false,
            agent_spec: Value::Null,
            live: true,
            servers: Vec::new(),
            tmp: tmp.to_path_buf(),
        };
        if exposed.disks.is_empty() {
            return Err(ExposeError::NoDisks);
        }
        let started = self.start_fleecing(qmp, req.quiesce, actions).await;
        let started = match started {
            Ok(quiesced) => {
                exposed.quiesced = quiesced;
                export(qmp, &exposed).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = started {
            release_live(qmp, &exposed, false).await;
            return Err(e);
        }
        info!(
            disks = exposed.disks.len(),
            quiesced = exposed.quiesced,
            "disks exposed for backup"
        );
        Ok(exposed)
    }

    /// Runs the transaction that starts copy-before-write on every disk, with the guest's
    /// filesystems frozen around it if asked and possible. Returns whether they were frozen.
    async fn start_fleecing(
        &mut self,
        qmp: &Qmp,
        quiesce: bool,
        actions: Vec<Value>,
    ) -> Result<bool, ExposeError> {
        let frozen = quiesce
            && self.status.agent_connected
            && self.freeze(true).await.map_err(ExposeError::Freeze)?;
        let r = qmp
            .execute_value("transaction", json!({"actions": actions}))
            .await
            .map_err(qmp_err("starting copy-before-write"));
        if frozen && let Err(e) = self.freeze(false).await {
            warn!("thawing the guest's filesystems after the backup point: {e}");
        }
        r.map(|_| frozen)
    }
}

async fn export(qmp: &Qmp, exposed: &Exposed) -> Result<(), ExposeError> {
    let socket = &exposed.disks[0].socket;
    qmp.execute_value(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket}}}),
    )
    .await
    .map_err(qmp_err("starting the NBD server"))?;
    for (i, d) in exposed.disks.iter().enumerate() {
        let (fleece, _) = d.fleece.as_ref().expect("live disks have overlays");
        let mut args = json!({"type": "nbd", "id": format!("hsdk-export-{i}"), "node-name": fleece,
                              "name": d.export, "writable": false});
        if let Some(b) = &d.bitmap {
            args["bitmaps"] = json!([{"node": d.node, "name": b}]);
        }
        qmp.execute_value("block-export-add", args)
            .await
            .map_err(qmp_err("exporting a disk over NBD"))?;
    }
    Ok(())
}

/// Best effort: each step is tried whatever the previous did, so that as much as can be is
/// undone; what fails is logged.
pub(super) async fn release_live(qmp: &Qmp, exposed: &Exposed, success: bool) {
    let step = |what: &'static str, r: Result<Value, QmpError>| {
        if let Err(e) = r {
            warn!("backup clean-up, {what}: {e}");
        }
    };
    for i in 0..exposed.disks.len() {
        let _ = qmp
            .execute_value(
                "block-export-del",
                json!({"id": format!("hsdk-export-{i}"), "mode": "hard"}),
            )
            .await;
    }
    let _ = qmp.execute_value("nbd-server-stop", json!({})).await;
    for (i, d) in exposed.disks.iter().enumerate() {
        cancel_job(qmp, &format!("hsdk-backup-{i}")).await;
        if let Some((fleece, overlay)) = &d.fleece {
            // Exports go away asynchronously; the overlay can be removed once they have.
            let mut tries = 0;
            while let Err(e) = qmp
                .execute_value("blockdev-del", json!({"node-name": fleece}))
                .await
            {
                tries += 1;
                if tries > 50 || !e.to_string().contains("in use") {
                    if !e.to_string().contains("Failed to find") {
                        warn!("backup clean-up, removing the overlay: {e}");
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = std::fs::remove_file(overlay);
        }
        let node = &d.node;
        match (success, &d.bitmap, &d.new_bitmap) {
            (true, Some(old), _) => step(
                "removing the previous bitmap",
                qmp.execute_value(
                    "block-dirty-bitmap-remove",
                    json!({"node": node, "name": old}),
                )
                .await,
            ),
            (false, Some(old), Some(new)) => {
                step(
                    "merging changes into the previous bitmap",
                    qmp.execute_value(
                        "block-dirty-bitmap-merge",
                        json!({"node": node, "target": old, "bitmaps": [new]}),
                    )
                    .await,
                );
                step(
                    "enabling the previous bitmap",
                    qmp.execute_value(
                        "block-dirty-bitmap-enable",
                        json!({"node": node, "name": old}),
                    )
                    .await,
                );
            }
            _ => {}
        }
        if !success && let Some(new) = &d.new_bitmap {
            let _ = qmp
                .execute_value(
                    "block-dirty-bitmap-remove",
                    json!({"node": node, "name": new}),
                )
                .await;
        }
    }
}

/// Removes the exports, jobs and fleecing nodes of a backup that ended without releasing them.
async fn clear_leftovers(qmp: &Qmp, fleece_nodes: &[String]) {
    for node in fleece_nodes {
        let i = node.trim_start_matches("hsdk-fleece-");
        let _ = qmp
            .execute_value(
                "block-export-del",
                json!({"id": format!("hsdk-export-{i}"), "mode": "hard"}),
            )
            .await;
    }
    let _ = qmp.execute_value("nbd-server-stop", json!({})).await;
    for node in fleece_nodes {
        let i = node.trim_start_matches("hsdk-fleece-");
        cancel_job(qmp, &format!("hsdk-backup-{i}")).await;
        if let Err(e) = qmp
            .execute_value("blockdev-del", json!({"node-name": node}))
            .await
        {
            warn!("removing the leftover overlay {node}: {e}");
        }
    }
}

/// Cancels fleecing job `id` and waits until QEMU has dropped it (the overlay is busy until then).
async fn cancel_job(qmp: &Qmp, id: &str) {
    let mut events = qmp.events();
    if qmp
        .execute_value("block-job-cancel", json!({"device": id, "force": true}))
        .await
        .is_err()
    {
        return; // never started, or gone already
    }
    let ended = async {
        while let Ok(e) = events.recv().await {
            if e.name == "JOB_STATUS_CHANGE" && e.data["id"] == id && e.data["status"] == "null" {
                return;
            }
        }
    };
    if tokio::time::timeout(SETTLE, ended).await.is_err() {
        warn!(job = id, "the fleecing job did not end after cancellation");
    }
}
