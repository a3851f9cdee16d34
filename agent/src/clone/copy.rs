//! Copying a VM's disks for a clone. A running (or paused) source keeps running: one QMP
//! `transaction` starts a `blockdev-backup` of every disk at the same instant, and QEMU's
//! copy-before-write keeps each copy at that instant while the guest writes on. A stopped
//! source is copied with `qemu-img convert`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::info;

use crate::clone::{self, DiskCopy, How};
use crate::error::AgentError;
use crate::qemu::qmp::Qmp;
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
            Phase::Running | Phase::Paused => true,
            Phase::Stopped | Phase::Pending | Phase::Failed => false,
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
        let copied = if live {
            self.copy_live(&copies).await
        } else {
            self.copy_offline(&copies).await
        };
        if let Err(why) = copied {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(self.qemu_error(format!("clone {target}: {why}")));
        }
        info!(target, linked, live, "cloned");
        Ok(spec)
    }

    pub(crate) async fn copy_offline(&self, copies: &[DiskCopy]) -> Result<(), String> {
        for c in copies {
            let from_format = c.from_format.as_str();
            let mut args: Vec<&OsStr> = ["convert", "-q", "-f", from_format, "-O", "qcow2"]
                .map(OsStr::new)
                .to_vec();
            match &c.how {
                How::Share => continue,
                How::Full => {}
                How::Top { backing, format } => {
                    args.extend([OsStr::new("-B"), backing.as_os_str()]);
                    args.extend([OsStr::new("-F"), OsStr::new(format)]);
                }
            }
            args.extend([c.from.as_os_str(), c.to.as_os_str()]);
            self.qemu_img(&args).await?;
        }
        Ok(())
    }

    pub(crate) async fn copy_live(&self, copies: &[DiskCopy]) -> Result<(), String> {
        let qmp = self.live_qmp().map_err(|e| e.to_string())?;
        let blocks = qmp
            .execute_value("query-block", json!({}))
            .await
            .map_err(|e| e.to_string())?;
        let mut actions = Vec::new();
        let mut added = Vec::new();
        let mut result = Ok(());
        for c in copies.iter().filter(|c| c.how != How::Share) {
            let id = format!("clone-{}", c.index);
            let (node, size) = match inserted(&blocks, c.index) {
                Some(found) => found,
                None => {
                    result = Err(format!("disk {} is not attached", c.index));
                    break;
                }
            };
            let (sync, size) = (
                if c.how == How::Full { "full" } else { "top" },
                size.to_string(),
            );
            let mut args: Vec<&OsStr> = ["create", "-q", "-f", "qcow2"].map(OsStr::new).to_vec();
            if let How::Top { backing, format } = &c.how {
                args.extend([OsStr::new("-b"), backing.as_os_str()]);
                args.extend([OsStr::new("-F"), OsStr::new(format)]);
            }
            args.extend([c.to.as_os_str(), OsStr::new(&size)]);
            if let Err(e) = self.qemu_img(&args).await {
                result = Err(e);
                break;
            }
            // The target is written only by the job; its backing file is not opened.
            let add = json!({"driver": "qcow2", "node-name": id, "backing": null,
                "file": {"driver": "file", "filename": c.to}});
            if let Err(e) = qmp.execute_value("blockdev-add", add).await {
                result = Err(e.to_string());
                break;
            }
            added.push(id.clone());
            actions.push(json!({"type": "blockdev-backup", "data": {
                "job-id": id, "device": node, "target": id, "sync": sync,
                "auto-dismiss": false}}));
        }
        if result.is_ok() && !actions.is_empty() {
            result = match qmp
                .execute_value("transaction", json!({ "actions": actions }))
                .await
            {
                Ok(_) => await_jobs(&qmp, &added, COPY_TIMEOUT, true).await,
                Err(e) => Err(e.to_string()),
            };
        }
        if result.is_err() {
            for id in &added {
                let _ = qmp.execute_value("job-cancel", json!({ "id": id })).await;
            }
            // A cancelled job lets go of its target node once it has concluded.
            let _ = await_jobs(&qmp, &added, CANCEL_TIMEOUT, false).await;
        }
        for id in &added {
            let _ = qmp.execute_value("job-dismiss", json!({ "id": id })).await;
            let _ = qmp
                .execute_value("blockdev-del", json!({ "node-name": id }))
                .await;
        }
        result
    }
}

/// The node QEMU's disk `index` (device `vdisk<index>`) reads from now, and its virtual size.
fn inserted(blocks: &Value, index: usize) -> Option<(String, u64)> {
    let qdev = format!("/machine/peripheral/vdisk{index}/");
    blocks.as_array()?.iter().find_map(|b| {
        let matches = b["qdev"]
            .as_str()
            .is_some_and(|q| q.starts_with(&qdev) || q == format!("vdisk{index}"));
        let inserted = &b["inserted"];
        matches.then(|| {
            (
                inserted["node-name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                inserted["image"]["virtual-size"].as_u64().unwrap_or(0),
            )
        })
    })
}

/// Waits until every job in `ids` has concluded; with `fail_fast`, the first error ends the
/// wait.
async fn await_jobs(
    qmp: &Qmp,
    ids: &[String],
    limit: Duration,
    fail_fast: bool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let jobs = qmp
            .execute_value("query-jobs", json!({}))
            .await
            .map_err(|e| e.to_string())?;
        let ours: Vec<&Value> = jobs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| ids.iter().any(|id| j["id"] == id.as_str()))
            .collect();
        let error = ours.iter().find_map(|j| j["error"].as_str());
        if let Some(e) = error.filter(|_| fail_fast) {
            return Err(e.to_string());
        }
        if ours.iter().all(|j| j["status"] == "concluded") {
            return error.map_or(Ok(()), |e| Err(e.to_string()));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the copy took longer than {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
