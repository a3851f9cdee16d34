//! Exposing a stopped VM's disks: `qemu-nbd` serves each file read-only (with the previous
//! backup's bitmap), and the bitmaps are moved on with `qemu-img bitmap` (see [`super::expose`]).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};
use tracing::warn;

use super::expose::{
    BITMAP_PREFIX, ExposeError, ExposeRequest, Exposed, ExposedDisk, SETTLE, bitmap_name,
    choose_base, io,
};
use crate::qemu::img::QemuImgError;
use crate::spec::DiskFormat;
use crate::vm::actor::Supervisor;

impl Supervisor {
    pub(super) async fn expose_stopped(
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
}

pub(super) async fn release_file(
    qemu_img: &Path,
    d: &ExposedDisk,
    success: bool,
) -> Result<(), QemuImgError> {
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
