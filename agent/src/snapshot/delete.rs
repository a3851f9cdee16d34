//! Deleting a snapshot, and merging the layers back into the disks' own files when the last
//! one goes.

use crate::error::AgentError;
use crate::qemu::img;
use crate::qemu::qmp::Qmp;
use crate::snapshot::check_snapshot_name;
use crate::snapshot::layers::{node_of_file, top_node};
use crate::snapshot::{SAVE_TIMEOUT, SnapshotError};
use crate::spec::FieldError;
use crate::spec::resolve::resolve_spec;
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;
use crate::vm::reason::Reason;
use qapi::qmp;
use serde_json::json;
use std::time::{Duration, Instant};
use tracing::warn;

impl Supervisor {
    /// Removes a snapshot. When the VM's last snapshot goes, its disks are merged back into
    /// their own files, so the VM no longer depends on layers in this node's data dir.
    pub(crate) async fn delete_snapshot(&mut self, snapshot: &str) -> Result<u64, AgentError> {
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
                .map_err(|e| AgentError::Internal(e.to_string()))?;
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
        self.publish(Reason::SnapshotDeleted, snapshot);
        Ok(freed)
    }

    /// Writes each disk's layers back into the disk's own file and runs on that file again:
    /// `block-commit` while QEMU runs, `qemu-img commit` while it does not.
    pub(crate) async fn merge_layers(&mut self) -> Result<(), SnapshotError> {
        let bases = resolve_spec(&self.spec, &self.ctx.policy)?;
        match self.running.as_ref().map(|r| r.qmp.clone()) {
            Some(qmp) => {
                let blocks = qmp
                    .execute(qmp::query_block {})
                    .await
                    .map_err(SnapshotError::qmp("query-block"))?;
                for (i, disk) in bases.disks.iter().enumerate() {
                    if !self.layers.active.contains_key(&disk.name) {
                        continue;
                    }
                    let top = top_node(&blocks, i)
                        .ok_or_else(|| SnapshotError::DiskNotFound(disk.name.clone()))?;
                    let base = node_of_file(&qmp, &disk.path).await?;
                    active_commit(&qmp, &top, &base, &format!("merge-disk{i}")).await?;
                    // A top opened from the command line (a restored VM's) outlives the commit
                    // as a node of its own, still holding the disk as its backing: let it go.
                    // Overlays made by a snapshot are gone already (the error is expected).
                    let _ = qmp.execute(qmp::blockdev_del { node_name: top }).await;
                }
            }
            None => {
                for disk in bases.disks.iter() {
                    if let Some(top) = self.layers.active.get(&disk.name) {
                        img::commit(&self.ctx.qemu_img, &disk.path, top).await?;
                    }
                }
            }
        }
        self.set_layers(Default::default(), None)
    }
}

/// Commits the active layer `top` into `base` while the guest runs, then switches to `base`.
async fn active_commit(qmp: &Qmp, top: &str, base: &str, job: &str) -> Result<(), SnapshotError> {
    let err = SnapshotError::qmp;
    let commit = json!({"job-id": job, "device": top, "base-node": base});
    qmp.execute_json::<qmp::block_commit>(commit)
        .await
        .map_err(err("block-commit"))?;
    let deadline = Instant::now() + SAVE_TIMEOUT;
    let mut completing = false;
    loop {
        let jobs = qmp
            .execute(qmp::query_block_jobs {})
            .await
            .map_err(err("block-commit"))?;
        let this = jobs.iter().find_map(|j| match j {
            qmp::BlockJobInfo::commit(j) if j.device == job => Some(j.ready),
            _ => None,
        });
        match this {
            None if completing => return Ok(()),
            None => return Err(SnapshotError::CommitEnded),
            Some(true) if !completing => {
                let complete = qmp::block_job_complete { device: job.into() };
                qmp.execute(complete).await.map_err(err("block-commit"))?;
                completing = true;
            }
            Some(_) if Instant::now() > deadline => {
                let cancel = qmp::block_job_cancel {
                    device: job.into(),
                    force: None,
                };
                let _ = qmp.execute(cancel).await;
                return Err(SnapshotError::CommitTimeout);
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
