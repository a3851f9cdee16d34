//! Cloning a VM, the pure part: which disks are copied and how, where the copies go, and the
//! clone's spec. The copying itself is in `copy.rs` (QMP `blockdev-backup` for a running
//! source, `qemu-img convert` for a stopped one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::qemu::img::QemuImgError;
use crate::qemu::qmp::QmpError;
use crate::spec::{DiskFormat, FieldError, VmSpec, check_name};

mod copy;

/// Why a clone's disks were not copied (nothing of the clone is left).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("disk {0} is not attached")]
    NotAttached(usize),
    #[error(transparent)]
    QemuImg(#[from] QemuImgError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A copy job failed; QEMU's words.
    #[error("{0}")]
    Job(String),
    #[error("the copy took longer than {0:?}")]
    Timeout(std::time::Duration),
}

/// Under the agent's own image dir: `clones/<vm>/<disk>.qcow2`.
pub const CLONES_DIR: &str = "clones";

/// The directory of a clone's disk copies.
pub fn clone_dir(images: &Path, vm: &str) -> PathBuf {
    images.join(CLONES_DIR).join(vm)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// The clone uses the same file (read-only disks of a linked clone).
    Share,
    /// A whole copy, flattened (no backing file).
    Full,
    /// The top layer only, over the same backing file.
    Top { backing: PathBuf, format: String },
}

impl How {
    /// The backing file the copy keeps (its path and format): for [`How::Top`] only.
    pub fn backing(&self) -> Option<(&Path, &str)> {
        match self {
            How::Top { backing, format } => Some((backing.as_path(), format.as_str())),
            How::Share | How::Full => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCopy {
    /// The disk's index in the spec.
    pub index: usize,
    /// What the source runs on now (its snapshot layer, if any), resolved.
    pub from: PathBuf,
    pub from_format: DiskFormat,
    pub to: PathBuf,
    pub how: How,
}

/// One disk of the source as it runs now: its resolved path and format, whether that is the
/// spec's own file (not a snapshot layer), and its backing file with the recorded format.
pub struct Source<'a> {
    pub path: &'a Path,
    pub format: DiskFormat,
    pub read_only: bool,
    pub own_file: bool,
    pub backing: Option<(PathBuf, String)>,
}

/// How each disk is copied into `dir`. A linked clone shares read-only disks and copies the
/// top layer of a writable qcow2 disk with a backing file; the rest is copied whole (a snapshot
/// layer's backing chain lies in the source's own directory, so it is never linked to).
pub fn plan(disks: &[(String, Source)], linked: bool, dir: &Path) -> Vec<DiskCopy> {
    disks
        .iter()
        .enumerate()
        .map(|(index, (name, d))| {
            let how = match (&d.backing, linked) {
                (_, true) if d.read_only => How::Share,
                (Some((backing, format)), true) if d.own_file && !format.is_empty() => How::Top {
                    backing: backing.clone(),
                    format: format.clone(),
                },
                _ => How::Full,
            };
            let to = match how {
                How::Share => d.path.to_path_buf(),
                _ => dir.join(format!("{name}.qcow2")),
            };
            DiskCopy {
                index,
                from: d.path.to_path_buf(),
                from_format: d.format,
                to,
                how,
            }
        })
        .collect()
}

/// The clone's spec: the source's, renamed, on the copies, with `labels` when given.
pub fn spec(
    source: &VmSpec,
    target: &str,
    copies: &[DiskCopy],
    labels: BTreeMap<String, String>,
) -> Result<VmSpec, FieldError> {
    check_name("targetName", target)?;
    if target == source.name {
        return Err(FieldError::new("targetName", "is the source VM's own name"));
    }
    let mut out = source.clone();
    out.name = target.to_string();
    if !labels.is_empty() {
        out.labels = labels;
    }
    // Another instance for cloud-init (it runs its first-boot steps again).
    if let Some(ci) = &mut out.cloud_init {
        if ci.hostname == source.name {
            ci.hostname = target.to_string();
        }
        ci.instance_id = target.to_string();
    }
    for c in copies {
        let disk = &mut out.disks[c.index];
        // Copies are the clone's (removed with its directory); shared disks are not its own.
        disk.made = None;
        if c.how != How::Share {
            disk.path = c.to.clone();
            disk.format = Some(DiskFormat::Qcow2);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source<'a>(path: &'a str, read_only: bool, own: bool, backing: Option<&str>) -> Source<'a> {
        Source {
            path: Path::new(path),
            format: DiskFormat::Qcow2,
            read_only,
            own_file: own,
            backing: backing.map(|b| (PathBuf::from(b), "qcow2".to_string())),
        }
    }

    #[test]
    fn linked_clones_share_read_only_disks_and_copy_top_layers() {
        let disks = [
            (
                "root".to_string(),
                source("/img/base.qcow2", true, true, None),
            ),
            (
                "data".to_string(),
                source("/img/data.qcow2", false, true, Some("/img/b.qcow2")),
            ),
            (
                "flat".to_string(),
                source("/img/flat.qcow2", false, true, None),
            ),
            (
                "layered".to_string(),
                source("/vm/layers/x.qcow2", false, false, Some("/img/l.qcow2")),
            ),
        ];
        let dir = Path::new("/data/images/clones/c");
        let linked = plan(&disks, true, dir);
        let hows: Vec<_> = linked.iter().map(|c| c.how.clone()).collect();
        assert_eq!(
            hows,
            [
                How::Share,
                How::Top {
                    backing: "/img/b.qcow2".into(),
                    format: "qcow2".into()
                },
                How::Full,
                How::Full
            ]
        );
        assert_eq!(linked[0].to, Path::new("/img/base.qcow2"));
        assert_eq!(linked[1].to, dir.join("data.qcow2"));
        let full = plan(&disks, false, dir);
        assert!(full.iter().all(|c| c.how == How::Full));
        assert_eq!(full[0].to, dir.join("root.qcow2"));
    }

    #[test]
    fn the_clone_spec_runs_on_the_copies() {
        let mut src = crate::spec::tests::minimal("web");
        src.disks = vec![
            crate::spec::Disk {
                name: "root".into(),
                path: "/img/base.qcow2".into(),
                format: Some(DiskFormat::Raw),
                read_only: true,
                made: None,
                boot_order: 1,
            },
            crate::spec::Disk {
                name: "data".into(),
                path: "/img/data.raw".into(),
                format: Some(DiskFormat::Raw),
                read_only: false,
                made: Some(crate::spec::Made {
                    image: None,
                    size: Some(1 << 30),
                }),
                boot_order: 0,
            },
        ];
        let disks = [
            (
                "root".to_string(),
                source("/img/base.qcow2", true, true, None),
            ),
            (
                "data".to_string(),
                source("/img/data.raw", false, true, None),
            ),
        ];
        let copies = plan(&disks, true, Path::new("/c"));
        let labels = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let clone = spec(&src, "web-2", &copies, labels.clone()).unwrap();
        assert_eq!(clone.name, "web-2");
        assert_eq!(clone.labels, labels);
        assert_eq!(clone.disks[0].path, Path::new("/img/base.qcow2"));
        assert_eq!(clone.disks[1].path, Path::new("/c/data.qcow2"));
        assert_eq!(clone.disks[1].format, Some(DiskFormat::Qcow2));
        assert_eq!(
            clone.disks[1].made, None,
            "the copy is the clone's, not made for it"
        );
        assert_eq!(clone.disks[0].boot_order, 1);
        assert_eq!(
            spec(&src, "web", &copies, labels.clone())
                .unwrap_err()
                .field,
            "targetName"
        );
        assert_eq!(
            spec(&src, "../x", &copies, labels).unwrap_err().field,
            "targetName"
        );
    }
}
