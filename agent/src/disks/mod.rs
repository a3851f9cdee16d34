//! The disks the agent makes for a VM: a writable qcow2 overlay on an image (the VM's root
//! disk over the shared cached image), or a blank qcow2 disk. They live in
//! `DISK_DIR/<vm>/<disk>.qcow2` and are deleted with the VM, never the image under them.
//!
//! Pure: where they go, and their sizes. [`make`] creates and removes them.

use std::path::{Path, PathBuf};

use crate::quantity::format_bytes;
use crate::spec::{DiskFormat, FieldError, VmSpec};

pub mod make;

/// Where the agent puts disk `disk` of VM `vm`.
pub fn disk_path(disk_dir: &Path, vm: &str, disk: &str) -> PathBuf {
    disk_dir.join(vm).join(format!("{disk}.qcow2"))
}

/// Gives each disk the agent makes for a new VM its place. A request may not choose it
/// (`fresh`: a CreateVm); a migration's target or a clone keeps the path it is given.
pub fn place(spec: &mut VmSpec, disk_dir: &Path, fresh: bool) -> Result<(), FieldError> {
    for (i, d) in spec.disks.iter_mut().enumerate() {
        if d.made.is_none() {
            continue;
        }
        if d.path.as_os_str().is_empty() {
            d.path = disk_path(disk_dir, &spec.name, &d.name);
            d.format = Some(DiskFormat::Qcow2);
        } else if fresh {
            return Err(FieldError::new(
                format!("spec.disks[{i}].path"),
                "must be empty on a disk with an image or a size: the agent makes it and chooses where",
            ));
        }
    }
    Ok(())
}

/// The virtual size of a disk over an image of `image_size` bytes: `requested`, which may not
/// be smaller (the guest would lose the end of its disk), or the image's own.
pub fn overlay_size(
    field: &str,
    requested: Option<u64>,
    image_size: u64,
) -> Result<u64, FieldError> {
    match requested {
        Some(size) if size < image_size => Err(FieldError::new(
            field,
            format!(
                "{} is smaller than the image ({}): the disk must hold the whole image",
                format_bytes(size),
                format_bytes(image_size)
            ),
        )),
        Some(size) => Ok(size),
        None => Ok(image_size),
    }
}

/// An image's virtual size from its first 32 bytes and its file length: qcow2 records it in
/// its header; a raw image is its file.
pub fn virtual_size(head: &[u8], file_len: u64) -> u64 {
    match head.get(24..32) {
        Some(size) if head.starts_with(b"QFI\xfb") => {
            u64::from_be_bytes(size.try_into().expect("8 bytes"))
        }
        _ => file_len,
    }
}

/// QEMU's `bootindex` of each disk, by position: disks with a boot order, in that order; with
/// none and no kernel to boot directly, the firmware boots the first disk.
pub fn boot_indexes(spec: &VmSpec) -> Vec<Option<u32>> {
    let mut ordered: Vec<(u32, usize)> = spec
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.boot_order > 0)
        .map(|(i, d)| (d.boot_order, i))
        .collect();
    ordered.sort();
    let mut out = vec![None; spec.disks.len()];
    for (rank, (_, i)) in ordered.into_iter().enumerate() {
        out[i] = Some(rank as u32 + 1);
    }
    if spec.boot.is_none()
        && out.iter().all(Option::is_none)
        && let Some(first) = out.first_mut()
    {
        *first = Some(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Disk, Made};

    fn disk(name: &str, path: &str, made: bool, boot_order: u32) -> Disk {
        Disk {
            name: name.into(),
            path: path.into(),
            format: None,
            read_only: false,
            made: made.then_some(Made {
                image: None,
                size: Some(1 << 30),
            }),
            boot_order,
        }
    }

    #[test]
    fn made_disks_go_to_the_vms_directory() {
        let mut spec = crate::spec::tests::minimal("web");
        spec.disks = vec![
            disk("root", "", true, 0),
            disk("data", "/img/d.raw", false, 0),
        ];
        place(&mut spec, Path::new("/dd"), true).unwrap();
        assert_eq!(spec.disks[0].path, Path::new("/dd/web/root.qcow2"));
        assert_eq!(spec.disks[0].format, Some(DiskFormat::Qcow2));
        assert_eq!(spec.disks[1].path, Path::new("/img/d.raw"));
        // A migration target keeps the source's place; a new VM may not choose one.
        let mut moved = spec.clone();
        place(&mut moved, Path::new("/other"), false).unwrap();
        assert_eq!(moved.disks[0].path, Path::new("/dd/web/root.qcow2"));
        let e = place(&mut spec, Path::new("/dd"), true).unwrap_err();
        assert_eq!(e.field, "spec.disks[0].path");
    }

    #[test]
    fn sizes_hold_the_whole_image() {
        assert_eq!(overlay_size("f", None, 64 << 20), Ok(64 << 20));
        assert_eq!(overlay_size("f", Some(1 << 30), 64 << 20), Ok(1 << 30));
        let e = overlay_size("spec.disks[0].size", Some(16 << 20), 64 << 20).unwrap_err();
        assert_eq!(e.field, "spec.disks[0].size");
        assert!(
            e.message.contains("16Mi is smaller than the image (64Mi)"),
            "{e}"
        );
        let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
        qcow2.resize(24, 0);
        qcow2.extend_from_slice(&(64u64 << 20).to_be_bytes());
        assert_eq!(virtual_size(&qcow2, 700 << 10), 64 << 20);
        assert_eq!(virtual_size(&[0; 32], 1 << 20), 1 << 20);
    }

    #[test]
    fn boot_order_ranks_disks() {
        let mut spec = crate::spec::tests::minimal("web");
        spec.disks = vec![
            disk("a", "/a", false, 0),
            disk("b", "/b", false, 5),
            disk("c", "/c", false, 2),
        ];
        assert_eq!(boot_indexes(&spec), [None, Some(2), Some(1)]);
    }
}
