//! Exposing a VM's disks as they were at one instant, for a backup to read over NBD.
//!
//! Running VM ("image fleecing"): each disk gets a temporary qcow2 overlay whose backing is the
//! disk itself, and a `blockdev-backup` job with `sync: none` from the disk to it, which copies
//! every cluster the guest is about to overwrite into the overlay first (copy-before-write).
//! Read through the overlay, the disk stays as it was when the job started while the guest runs
//! on. The overlays are exported by QEMU's own NBD server on a unix socket. All disks' jobs
//! start in one transaction (one instant for all), with the guest's filesystems frozen around
//! it when its agent is connected and quiescing was asked for.
//!
//! Incremental: a persistent dirty bitmap `hsdk-backup-<id>` is added to each qcow2 disk in that
//! same transaction; it records what the guest changes from then on, so the next backup reads
//! only those clusters (the bitmap is exported with the overlay and read with NBD block
//! status). The previous backup's bitmap is disabled in the transaction, so it says exactly
//! what changed between the two. A backup that fails gives its changes back to the previous
//! bitmap, which stays the base.
//!
//! Stopped VM: `qemu-nbd` exports each disk file read-only (with the bitmap), and the bitmaps
//! are updated with `qemu-img bitmap` afterwards.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Child;
use tracing::warn;

use crate::error::AgentError;
use crate::qemu::img::QemuImgError;
use crate::qemu::qmp::QmpError;
use crate::snapshot::SnapshotError;
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;

/// Prefix of the dirty bitmaps backups keep on disks.
pub const BITMAP_PREFIX: &str = "hsdk-backup-";
/// How long a cancelled fleecing job or a starting qemu-nbd may take.
pub(super) const SETTLE: Duration = Duration::from_secs(20);

/// The VMs whose disks this agent process has exposed for a backup: one backup per VM at a
/// time (a second would take the first's node names, socket and bitmaps).
static ACTIVE: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn active() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<String>> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, thiserror::Error)]
pub enum ExposeError {
    #[error("{what}: {source}")]
    Qmp {
        what: &'static str,
        #[source]
        source: QmpError,
    },
    #[error(transparent)]
    Img(#[from] QemuImgError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("freezing the guest's filesystems: {0}")]
    Freeze(#[source] SnapshotError),
    #[error("disk {0} is not open in QEMU")]
    DiskNotFound(String),
    #[error("qemu-nbd for disk {disk}: {why}")]
    QemuNbd { disk: String, why: String },
    #[error("no writable disk to back up")]
    NoDisks,
}

pub(super) fn qmp_err(what: &'static str) -> impl FnOnce(QmpError) -> ExposeError {
    move |source| ExposeError::Qmp { what, source }
}

/// What the backup asks for.
#[derive(Debug, Clone)]
pub struct ExposeRequest {
    pub backup_id: String,
    /// The newest backup of this VM in the repository: its bitmap, if the disk has it, says
    /// what changed since.
    pub parent_id: Option<String>,
    pub quiesce: bool,
}

/// One disk, readable at `socket` as export `export`.
#[derive(Debug)]
pub struct ExposedDisk {
    pub name: String,
    pub socket: PathBuf,
    pub export: String,
    /// The previous backup's bitmap, exported: only its dirty clusters need reading.
    pub bitmap: Option<String>,
    /// Why the disk is read in full (empty when incremental).
    pub full_reason: String,
    /// QEMU's node (running) or the file (stopped) the bitmaps are on.
    pub(super) node: String,
    pub(super) path: PathBuf,
    pub(super) new_bitmap: Option<String>,
    pub(super) fleece: Option<(String, PathBuf)>,
}

#[derive(Debug)]
pub struct Exposed {
    pub disks: Vec<ExposedDisk>,
    pub quiesced: bool,
    /// The VM's spec as this agent runs it.
    pub agent_spec: Value,
    pub(super) live: bool,
    /// The stopped VM's qemu-nbd processes (ended on drop).
    pub(super) servers: Vec<Child>,
    pub(super) tmp: PathBuf,
}

pub(super) fn bitmap_name(id: &str) -> String {
    format!("{BITMAP_PREFIX}{id}")
}

impl Supervisor {
    pub(crate) async fn expose_disks(&mut self, req: ExposeRequest) -> Result<Exposed, AgentError> {
        let live = match self.status.phase {
            Phase::Running | Phase::Paused => Some(self.live_qmp()?),
            Phase::Pending | Phase::Stopped | Phase::Failed => None,
            other => {
                return Err(self.conflict(format!("cannot be backed up while {}", other.name())));
            }
        };
        if !active().insert(self.spec.name.clone()) {
            return Err(self.conflict("has a backup running already".into()));
        }
        let tmp = self.dir.join("backup");
        let result = match &live {
            Some(qmp) => self.expose_live(qmp, &req, &tmp).await,
            None => self.expose_stopped(&req, &tmp).await,
        };
        if result.is_err() {
            active().remove(&self.spec.name);
        }
        let agent_spec = serde_json::to_value(&self.spec).unwrap_or(Value::Null);
        result
            .map(|mut x| {
                x.agent_spec = agent_spec;
                x
            })
            .map_err(|e| match e {
                ExposeError::Qmp {
                    source: QmpError::Command { ref desc, .. },
                    ..
                } if desc.contains("already running") || desc.contains("in use") => {
                    self.conflict(format!("has a backup running already ({e})"))
                }
                e => self.qemu_error(format!("exposing the disks for a backup: {e}")),
            })
    }

    /// Ends what [`Self::expose_disks`] started. After a successful backup the new bitmaps
    /// become the base of the next one; after a failed one the previous base stays, with what
    /// changed meanwhile added to it.
    pub(crate) async fn release_disks(&mut self, mut exposed: Exposed, success: bool) {
        if exposed.live {
            match self.live_qmp() {
                Ok(qmp) => super::fleece::release_live(&qmp, &exposed, success).await,
                // QEMU is gone: its bitmaps were saved (or lost) with it.
                Err(e) => warn!("releasing the backup's exports: {e}"),
            }
        } else {
            for mut s in exposed.servers.drain(..) {
                let _ = s.kill().await;
            }
            for d in &exposed.disks {
                if let Err(e) = super::serve::release_file(&self.ctx.qemu_img, d, success).await {
                    warn!(disk = d.name, "updating the backup bitmaps: {e}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&exposed.tmp);
        active().remove(&self.spec.name);
    }
}

/// Which bitmap an incremental read may start from, or why the disk is read in full.
pub fn choose_base(
    qcow2: bool,
    bitmaps: &[String],
    parent: Option<&str>,
) -> (Option<String>, String) {
    if !qcow2 {
        return (None, "not a qcow2 disk: no persistent dirty bitmap".into());
    }
    let Some(parent) = parent else {
        return (
            None,
            "no earlier backup of this VM in the repository".into(),
        );
    };
    if bitmaps.iter().any(|b| b == parent) {
        (Some(parent.to_string()), String::new())
    } else {
        (
            None,
            "the disk has no bitmap of the last backup (first backup here, or the VM was restored, migrated or its disk replaced)".into(),
        )
    }
}

pub(super) fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ExposeError {
    let what = what.to_string();
    move |source| ExposeError::Io { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_only_from_the_last_backups_bitmap() {
        let b = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (base, why) = choose_base(true, &b(&["hsdk-backup-a"]), Some("hsdk-backup-a"));
        assert_eq!((base.as_deref(), why.as_str()), (Some("hsdk-backup-a"), ""));
        let (base, why) = choose_base(true, &b(&["hsdk-backup-a"]), Some("hsdk-backup-b"));
        assert!(base.is_none() && why.contains("no bitmap of the last backup"));
        let (base, why) = choose_base(false, &b(&["hsdk-backup-a"]), Some("hsdk-backup-a"));
        assert!(base.is_none() && why.contains("not a qcow2"));
        let (base, why) = choose_base(true, &[], None);
        assert!(base.is_none() && why.contains("no earlier backup"));
    }
}
