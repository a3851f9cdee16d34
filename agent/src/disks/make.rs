//! Making a VM's disks before it first starts: its image fetched into the node's cache (phase
//! Importing, with progress), then the overlay or blank disk created; and removing them with
//! the VM.

use std::path::{Path, PathBuf};

use hypersdk_proto::agent::v1 as pb;
use tracing::{info, warn};

use super::{overlay_size, virtual_size};
use crate::error::AgentError;
use crate::image::cache::follow;
use crate::image::{ImageRef, Source};
use crate::qemu::img;
use crate::spec::{DiskFormat, FieldError, VmSpec};
use crate::vm::actor::Supervisor;
use crate::vm::phase::Phase;
use crate::vm::reason::Reason;

impl Supervisor {
    /// Makes this VM's disks that do not exist yet. On failure the VM is Failed with the
    /// reason, and none of the disks begun here is left.
    pub(crate) async fn make_disks(&mut self) -> Result<(), AgentError> {
        let todo: Vec<usize> = (0..self.spec.disks.len())
            .filter(|&i| self.spec.disks[i].made.is_some() && !self.spec.disks[i].path.exists())
            .collect();
        let mut made = Vec::new();
        for i in todo {
            match self.make_disk(i).await {
                Ok(path) => made.push(path),
                Err(e) => {
                    made.iter().for_each(|p| remove_disk(p));
                    self.set_phase(Phase::Failed, &e.to_string(), Reason::DiskFailed);
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }

    async fn make_disk(&mut self, i: usize) -> Result<PathBuf, FieldError> {
        let disk = self.spec.disks[i].clone();
        let made = disk
            .made
            .clone()
            .unwrap_or_else(|| unreachable!("only made disks"));
        let size_field = format!("spec.disks[{i}].size");
        let (base, size) = match &made.image {
            Some(image) => {
                let (base, format) = self.base_image(i, image).await?;
                let size = overlay_size(&size_field, made.size, image_size(&base)?)?;
                (Some((base, format)), size)
            }
            // The spec's checks give a disk without an image a size.
            None => (None, made.size.unwrap_or_default()),
        };
        let base = base.as_ref().map(|(p, f)| (p.as_path(), f.as_str()));
        create(&self.ctx.qemu_img, &disk.path, base, size)
            .await
            .map_err(|e| FieldError::new(format!("spec.disks[{i}]"), e))?;
        info!(
            disk = disk.name,
            size,
            "disk made at {}",
            disk.path.display()
        );
        Ok(disk.path)
    }

    /// The image under disk `i`: a node file without a checksum is used in place; anything
    /// else comes from the cache, imported first if need be.
    async fn base_image(
        &mut self,
        i: usize,
        image: &ImageRef,
    ) -> Result<(PathBuf, DiskFormat), FieldError> {
        let field = format!("spec.disks[{i}].image");
        let source_field = format!("{field}.source");
        let source = match &image.source {
            Source::Path(p) => {
                let real = self.ctx.policy.resolve_file(&source_field, p)?;
                if image.checksum.is_none() {
                    let format =
                        crate::host::image::inspect(&source_field, &real, None, &self.ctx.policy)?;
                    return Ok((real, format));
                }
                Source::Path(real)
            }
            url => url.clone(),
        };
        let Some(checksum) = &image.checksum else {
            return Err(FieldError::new(format!("{field}.checksum"), "is required"));
        };
        let rx = self.ctx.images.get(&source, checksum);
        let path = follow(&source, rx, |p| self.import_progress(p))
            .await
            .map_err(|e| FieldError::new(&field, e.to_string()))?;
        Ok((path, DiskFormat::Qcow2))
    }

    /// Shows an import's progress in the VM's status (phase Importing).
    fn import_progress(&mut self, p: pb::ImportProgress) {
        let message = match p.total_bytes {
            0 => format!("importing {}: {} bytes", p.source, p.done_bytes),
            _ => format!("importing {}: {}%", p.source, p.percent),
        };
        self.status.import = Some(p);
        if self.status.phase == Phase::Importing {
            self.status.message = message.clone();
            self.publish(Reason::ImportProgress, &message);
        } else {
            self.set_phase(Phase::Importing, &message, Reason::Importing);
        }
    }
}

/// The virtual size of the image at `path`.
fn image_size(path: &Path) -> Result<u64, FieldError> {
    let unreadable =
        |e: std::io::Error| FieldError::new("image", format!("{}: {e}", path.display()));
    let mut head = [0u8; 32];
    let mut f = std::fs::File::open(path).map_err(unreadable)?;
    let n = std::io::Read::read(&mut f, &mut head).map_err(unreadable)?;
    let len = f.metadata().map_err(unreadable)?.len();
    Ok(virtual_size(&head[..n], len))
}

/// A qcow2 disk at `path` of `size` bytes, over `base` if given; it appears whole or not at all.
async fn create(
    qemu_img: &Path,
    path: &Path,
    base: Option<(&Path, &str)>,
    size: u64,
) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = path.with_extension("qcow2.part");
    let made = img::create(qemu_img, &tmp, base, Some(size))
        .await
        .map_err(|e| e.to_string())
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display())));
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

/// Removes a disk the agent made, and its VM's directory once empty.
fn remove_disk(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("removing {}: {e}", path.display());
    }
    if let Some(dir) = path.parent() {
        // Fails while other disks of the VM are there: they go next.
        let _ = std::fs::remove_dir(dir);
    }
}

/// Removes every disk the agent made for `spec` (not the images under them).
pub fn remove_made(spec: &VmSpec) {
    for d in spec.disks.iter().filter(|d| d.made.is_some()) {
        remove_disk(&d.path);
    }
}
