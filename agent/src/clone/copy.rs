//! Copying a VM's disks for a clone. A running (or paused) source keeps running: one QMP
//! `transaction` starts a `blockdev-backup` of every disk at the same instant, and QEMU's
//! copy-before-write keeps each copy at that instant while the guest writes on. A stopped
//! source is copied with `qemu-img convert`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use qapi::qmp;
use serde_json::json;
use tracing::info;

use crate::clone::{self, CopyError, DiskCopy, How};
use crate::error::AgentError;
use crate::qemu::img;
use crate::qemu::qmp::{Qmp, QmpError};
use crate::snapshot::layers::disk_block;
use crate::spec::VmSpec;
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;

/// A copy that takes longer than this is cancelled.
const COPY_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long a cancelled copy may take to let go of its files.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

impl Supervisor {
    /// Copies the disks into the clone's directory and returns the clone's spec; on any
    /// failure nothing of the clone is left.
    pub(crate) async fn clone_disks(
        &mut self,
        target: &str,
        linked: bool,
        labels: BTreeMap<String, String>,
    ) -> Result<VmSpec, AgentError> {
        let live = match self.status.phase {
            Phase::Running | Phase::Paused => Some(self.live_qmp()?),
            Phase::Stopped | Phase::Pending | Phase::Failed => None,
            other => {
                return Err(self.conflict(format!("cannot be cloned while {}", other.name())));
            }
        };
        let resolved = self.resolved_spec()?;
        let sources: Vec<_> = resolved
            .disks
            .iter()
            .map(|d| {
                let source = clone::Source {
                    path: &d.path,
                    format: d.format.unwrap_or(crate::spec::DiskFormat::Raw),
                    read_only: d.read_only,
                    own_file: !self.layers.active.contains_key(&d.name),
                    backing: crate::host::image::backing(&d.path),
                };
                (d.name.clone(), source)
            })
            .collect();
        let dir = clone::clone_dir(&self.ctx.images_dir, target);
        let copies = clone::plan(&sources, linked, &dir);
        let spec = clone::spec(&self.spec, target, &copies, labels)?;
        if dir.exists() {
            return Err(AgentError::AlreadyExists(format!(
                "{target} (its disk directory {} exists)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| AgentError::Internal(format!("{}: {e}", dir.display())))?;
        let copied = match &live {
            Some(qmp) => self.copy_live(qmp, &copies).await,
            None => self.copy_offline(&copies).await,
        };
        if let Err(why) = copied {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(self.qemu_error(format!("clone {target}: {why}")));
        }
        info!(target, linked, live = live.is_some(), "cloned");
        Ok(spec)
    }

    pub(crate) async fn copy_offline(&self, copies: &[DiskCopy]) -> Result<(), CopyError> {
        for c in copies.iter().filter(|c| c.how != How::Share) {
            let backing = c.how.backing();
            img::convert(&self.ctx.qemu_img, &c.from, c.from_format, &c.to, backing).await?;
        }
        Ok(())
    }

    pub(crate) async fn copy_live(&self, qmp: &Qmp, copies: &[DiskCopy]) -> Result<(), CopyError> {
        let blocks = qmp.execute(qmp::query_block {}).await?;
        let mut actions = Vec::new();
        let mut added = Vec::new();
        let mut result = Ok(());
        for c in copies.iter().filter(|c| c.how != How::Share) {
            let id = format!("clone-{}", c.index);
            let Some(disk) = disk_block(&blocks, c.index) else {
                result = Err(CopyError::NotAttached(c.index));
                break;
            };
            let size = u64::try_from(disk.image.base.virtual_size).unwrap_or(0);
            let created = img::create(&self.ctx.qemu_img, &c.to, c.how.backing(), Some(size));
            if let Err(e) = created.await {
                result = Err(e.into());
                break;
            }
            let target = match copy_target(&id, &c.to) {
                Ok(add) => qmp.execute(add).await.map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = target {
                result = Err(e.into());
                break;
            }
            added.push(id.clone());
            let sync = if c.how == How::Full { "full" } else { "top" };
            actions.push(json!({"type": "blockdev-backup", "data": {
                "job-id": id, "device": disk.node_name, "target": id, "sync": sync,
                "auto-dismiss": false}}));
        }
        if result.is_ok() && !actions.is_empty() {
            let backups = json!({ "actions": actions });
            result = match qmp.execute_json::<qmp::transaction>(backups).await {
                Ok(_) => await_jobs(qmp, &added, COPY_TIMEOUT, true).await,
                Err(e) => Err(e.into()),
            };
        }
        if result.is_err() {
            for id in &added {
                let _ = qmp.execute(qmp::job_cancel { id: id.clone() }).await;
            }
            // A cancelled job lets go of its target node once it has concluded.
            let _ = await_jobs(qmp, &added, CANCEL_TIMEOUT, false).await;
        }
        for id in &added {
            let _ = qmp.execute(qmp::job_dismiss { id: id.clone() }).await;
            let node_name = id.clone();
            let _ = qmp.execute(qmp::blockdev_del { node_name }).await;
        }
        result
    }
}

/// `blockdev-add` of the qcow2 `file` a copy job writes, as node `id`. Only the job writes it:
/// its backing file is not opened (`backing: null`).
fn copy_target(id: &str, file: &Path) -> Result<qmp::blockdev_add, QmpError> {
    let target = json!({"driver": "qcow2", "node-name": id,
        "file": {"driver": "file", "filename": file}});
    let mut add: qmp::blockdev_add = crate::qemu::qmp::command(target)?;
    // Set here: qapi reads `"backing": null` as no member at all, with which QEMU would open
    // the backing file.
    if let qmp::BlockdevOptions::qcow2 { qcow2, .. } = &mut add.0 {
        qcow2.base.backing = Some(qmp::BlockdevRefOrNull::null(()));
    }
    Ok(add)
}

/// Waits until every job in `ids` has concluded; with `fail_fast`, the first error ends the
/// wait.
async fn await_jobs(
    qmp: &Qmp,
    ids: &[String],
    limit: Duration,
    fail_fast: bool,
) -> Result<(), CopyError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let jobs = qmp.execute(qmp::query_jobs {}).await?;
        let ours: Vec<_> = jobs.iter().filter(|j| ids.contains(&j.id)).collect();
        let error = ours.iter().find_map(|j| j.error.clone());
        if let Some(e) = error.clone().filter(|_| fail_fast) {
            return Err(CopyError::Job(e));
        }
        if ours.iter().all(|j| j.status == qmp::JobStatus::concluded) {
            return error.map_or(Ok(()), |e| Err(CopyError::Job(e)));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CopyError::Timeout(limit));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_target_does_not_open_its_backing_file() {
        let add = copy_target("clone-0", Path::new("/images/clones/b/root.qcow2")).unwrap();
        assert_eq!(
            serde_json::to_value(&add).unwrap(),
            json!({"driver": "qcow2", "node-name": "clone-0", "backing": null,
                   "file": {"driver": "file", "filename": "/images/clones/b/root.qcow2"}})
        );
    }
}
