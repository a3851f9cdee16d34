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

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::error::AgentError;
use crate::qemu::img::QemuImgError;
use crate::qemu::qmp::{Qmp, QmpError};
use crate::snapshot::SnapshotError;
use crate::snapshot::layers::top_node;
use crate::spec::DiskFormat;
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;

/// Prefix of the dirty bitmaps backups keep on disks.
pub const BITMAP_PREFIX: &str = "hsdk-backup-";
/// How long a cancelled fleecing job or a starting qemu-nbd may take.
const SETTLE: Duration = Duration::from_secs(20);

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

fn qmp_err(what: &'static str) -> impl FnOnce(QmpError) -> ExposeError {
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
    node: String,
    path: PathBuf,
    new_bitmap: Option<String>,
    fleece: Option<(String, PathBuf)>,
}

#[derive(Debug)]
pub struct Exposed {
    pub disks: Vec<ExposedDisk>,
    pub quiesced: bool,
    /// The VM's spec as this agent runs it.
    pub agent_spec: Value,
    live: bool,
    /// The stopped VM's qemu-nbd processes (ended on drop).
    servers: Vec<Child>,
    tmp: PathBuf,
}

fn bitmap_name(id: &str) -> String {
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

    async fn expose_live(
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

    async fn expose_stopped(
        &mut self,
        req: &ExposeRequest,
        tmp: &Path,
    ) -> Result<Exposed, ExposeError> {
        let resolved = self.resolved_spec().map_err(|e| ExposeError::Io {
            what: "the VM's disks".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        std::fs::create_dir_all(tmp).map_err(io(tmp.display()))?;
        let new = bitmap_name(&req.backup_id);
        let old = req.parent_id.as_deref().map(bitmap_name);
        let mut exposed = Exposed {
            disks: Vec::new(),
            quiesced: false,
            agent_spec: Value::Null,
            live: false,
            servers: Vec::new(),
            tmp: tmp.to_path_buf(),
        };
        for (i, disk) in resolved
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.read_only)
        {
            // A VM never started has not had its disks' formats read yet.
            let (probed, bitmaps, usable) = file_info(&self.ctx.qemu_img, &disk.path).await?;
            let format = disk.format.unwrap_or(probed);
            let qcow2 = format == DiskFormat::Qcow2;
            let (bitmap, full_reason) = choose_base(qcow2, &usable, old.as_deref());
            for stale in bitmaps.iter().filter(|b| Some(*b) != bitmap.as_ref()) {
                if let Err(e) =
                    crate::qemu::img::bitmap(&self.ctx.qemu_img, &disk.path, "--remove", stale)
                        .await
                {
                    warn!(disk = disk.name, "removing stale bitmap {stale}: {e}");
                }
            }
            let socket = tmp.join(format!("disk{i}.sock"));
            let _ = std::fs::remove_file(&socket);
            let export = format!("disk{i}");
            let mut cmd = Command::new("qemu-nbd");
            cmd.arg("--read-only")
                .arg("--persistent")
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--export-name={export}"))
                .arg(format!("--format={}", format.as_str()))
                .arg("--cache=none")
                .arg("--aio=threads");
            if let Some(b) = &bitmap {
                cmd.arg(format!("--bitmap={b}"));
            }
            let child = cmd
                .arg(&disk.path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(io("starting qemu-nbd"))?;
            exposed.servers.push(child);
            wait_for_socket(&socket, exposed.servers.last_mut().unwrap(), &disk.name).await?;
            exposed.disks.push(ExposedDisk {
                name: disk.name.clone(),
                socket,
                export,
                bitmap,
                full_reason,
                node: String::new(),
                path: disk.path.clone(),
                new_bitmap: qcow2.then(|| new.clone()),
                fleece: None,
            });
        }
        if exposed.disks.is_empty() {
            return Err(ExposeError::NoDisks);
        }
        Ok(exposed)
    }

    /// Ends what [`Self::expose_disks`] started. After a successful backup the new bitmaps
    /// become the base of the next one; after a failed one the previous base stays, with what
    /// changed meanwhile added to it.
    pub(crate) async fn release_disks(&mut self, mut exposed: Exposed, success: bool) {
        if exposed.live {
            match self.live_qmp() {
                Ok(qmp) => release_live(&qmp, &exposed, success).await,
                // QEMU is gone: its bitmaps were saved (or lost) with it.
                Err(e) => warn!("releasing the backup's exports: {e}"),
            }
        } else {
            for mut s in exposed.servers.drain(..) {
                let _ = s.kill().await;
            }
            for d in &exposed.disks {
                if let Err(e) = release_file(&self.ctx.qemu_img, d, success).await {
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
async fn release_live(qmp: &Qmp, exposed: &Exposed, success: bool) {
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

async fn release_file(qemu_img: &Path, d: &ExposedDisk, success: bool) -> Result<(), QemuImgError> {
    if !success {
        return Ok(()); // the previous bitmap stays; nothing was written meanwhile
    }
    if let Some(old) = &d.bitmap {
        crate::qemu::img::bitmap(qemu_img, &d.path, "--remove", old).await?;
    }
    if let Some(new) = &d.new_bitmap {
        crate::qemu::img::bitmap(qemu_img, &d.path, "--add", new).await?;
    }
    Ok(())
}

/// A disk file's format, the backup bitmaps in it, and those of them that are consistent (a
/// bitmap still marked in use was not saved when its QEMU ended).
async fn file_info(
    qemu_img: &Path,
    path: &Path,
) -> Result<(DiskFormat, Vec<String>, Vec<String>), ExposeError> {
    let out = Command::new(qemu_img)
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .await
        .map_err(io("running qemu-img info"))?;
    let info: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let format = if info["format"] == "qcow2" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    };
    let ours: Vec<&Value> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| {
            b["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(BITMAP_PREFIX))
        })
        .collect();
    let name = |b: &&Value| b["name"].as_str().unwrap_or_default().to_string();
    let flag = |b: &&&Value, f: &str| {
        b["flags"]
            .as_array()
            .is_some_and(|fs| fs.iter().any(|x| x == f))
    };
    let all = ours.iter().map(name).collect();
    // Usable: saved consistently ("in-use" is cleared when QEMU saves it) and recording
    // ("auto": enabled when opened; a disabled one stopped when a backup ended half-way).
    let usable = ours
        .iter()
        .filter(|b| !flag(b, "in-use") && flag(b, "auto"))
        .map(name)
        .collect();
    Ok((format, all, usable))
}

/// Waits until qemu-nbd listens on `socket`, or fails with what it said if it exited.
async fn wait_for_socket(socket: &Path, child: &mut Child, disk: &str) -> Result<(), ExposeError> {
    let fail = |why: String| ExposeError::QemuNbd {
        disk: disk.to_string(),
        why,
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            return Err(fail(format!("exited ({status}): {}", err.trim())));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(fail("did not listen within 20 s".into()));
        }
        // qemu-nbd has no readiness notification we can wait on besides the socket itself.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ExposeError {
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
