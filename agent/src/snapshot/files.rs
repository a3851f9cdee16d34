//! Snapshots on disk: one directory per snapshot under `<snapshot-dir>/<vm>/<snapshot>/`
//! holding `meta.json` (written last) and the memory state, plus each VM's disk layers (see
//! [`crate::snapshot`]) under `<vm dir>/layers/`, with `layers.json` naming the layer each disk
//! runs on now.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::snapshot::{SnapshotMeta, needed_layers};
use crate::store::{read_json, write_json};

pub const META_FILE: &str = "meta.json";
pub const MEMORY_FILE: &str = "memory.bin";
const LAYERS_FILE: &str = "layers.json";
const LAYERS_DIR: &str = "layers";

/// Where a VM's disks stand: the layer each disk runs on, and the snapshot they descend from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskLayers {
    /// Disk name → the file QEMU writes that disk to. A disk not named here runs on the file
    /// its spec names.
    pub active: BTreeMap<String, PathBuf>,
    /// The snapshot last taken or restored.
    pub current: Option<String>,
}

impl DiskLayers {
    pub fn load(vm_dir: &Path) -> std::io::Result<DiskLayers> {
        match read_json(&vm_dir.join(LAYERS_FILE)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DiskLayers::default()),
            other => other,
        }
    }

    pub fn save(&self, vm_dir: &Path) -> std::io::Result<()> {
        write_json(&vm_dir.join(LAYERS_FILE), self)
    }
}

/// Where a VM's disk layers live.
pub fn layers_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join(LAYERS_DIR)
}

/// A new overlay file name in the VM's layer directory, unique per disk and moment.
pub fn new_layer_path(vm_dir: &Path, disk: &str, tag: &str) -> PathBuf {
    layers_dir(vm_dir).join(format!("{disk}-{tag}-{}.qcow2", crate::context::now_ms()))
}

pub fn ensure_layers_dir(vm_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(layers_dir(vm_dir))
}

/// Deletes the files of `vm_dir/layers` that neither `roots` (the VM's active layers and every
/// snapshot's layers) nor their backing chains need. Returns the bytes freed.
pub fn collect_layers(vm_dir: &Path, roots: impl IntoIterator<Item = PathBuf>) -> u64 {
    let needed = needed_layers(roots, crate::host::image::backing_file);
    let Ok(entries) = std::fs::read_dir(layers_dir(vm_dir)) else {
        return 0;
    };
    let mut freed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if !needed.contains(&path) {
            let size = disk_usage(&path);
            if std::fs::remove_file(&path).is_ok() {
                freed += size;
            }
        }
    }
    freed
}

/// A VM's snapshots, by name, as read from their `meta.json`.
#[derive(Debug, Clone)]
pub struct SnapshotDirs {
    root: PathBuf,
}

impl SnapshotDirs {
    pub fn new(root: PathBuf) -> SnapshotDirs {
        SnapshotDirs { root }
    }

    pub fn dir(&self, vm: &str, snapshot: &str) -> PathBuf {
        self.root.join(vm).join(snapshot)
    }

    /// Makes the directory for a new snapshot. A directory left by a snapshot that never
    /// finished (no `meta.json`) is cleared first.
    pub fn create(&self, vm: &str, snapshot: &str) -> std::io::Result<PathBuf> {
        let dir = self.dir(vm, snapshot);
        if dir.join(META_FILE).exists() {
            return Err(std::io::ErrorKind::AlreadyExists.into());
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    pub fn read(&self, vm: &str, snapshot: &str) -> std::io::Result<SnapshotMeta> {
        read_json(&self.dir(vm, snapshot).join(META_FILE))
    }

    /// Every finished snapshot of `vm` (or of every VM), oldest first. Unreadable ones are
    /// left out; the second list says why (naming their files).
    pub fn list(&self, vm: Option<&str>) -> (Vec<SnapshotMeta>, Vec<std::io::Error>) {
        let vms: Vec<PathBuf> = match vm {
            Some(vm) => vec![self.root.join(vm)],
            None => subdirs(&self.root),
        };
        let mut found = Vec::new();
        let mut broken = Vec::new();
        for snap in vms.iter().flat_map(|d| subdirs(d)) {
            let meta = snap.join(META_FILE);
            if !meta.exists() {
                continue;
            }
            match read_json::<SnapshotMeta>(&meta) {
                Ok(m) => found.push(m),
                Err(e) => broken.push(e),
            }
        }
        found.sort_by(|a, b| (a.created_at_ms, &a.name).cmp(&(b.created_at_ms, &b.name)));
        (found, broken)
    }

    /// Removes the directories of snapshots that never finished (no `meta.json`: the agent
    /// or QEMU ended during the save). Run at agent start, before any snapshot can be under way.
    pub fn remove_unfinished(&self) {
        for snap in subdirs(&self.root).iter().flat_map(|vm| subdirs(vm)) {
            if !snap.join(META_FILE).exists() {
                tracing::warn!(dir = %snap.display(), "removing an unfinished snapshot");
                let _ = std::fs::remove_dir_all(&snap);
            }
        }
    }

    /// Removes one snapshot's directory; returns the bytes freed.
    pub fn remove(&self, vm: &str, snapshot: &str) -> std::io::Result<u64> {
        let dir = self.dir(vm, snapshot);
        let size = dir_usage(&dir);
        std::fs::remove_dir_all(&dir)?;
        Ok(size)
    }

    /// Removes every snapshot of a VM (the VM is being deleted).
    pub fn remove_vm(&self, vm: &str) {
        let _ = std::fs::remove_dir_all(self.root.join(vm));
    }

    /// Space the snapshot's directory takes on disk.
    /// Space only `meta` keeps: its directory, and the layers in its VM's layer directory
    /// (`vm_dir/layers`) that neither the VM now nor its other snapshots need. `listed` holds
    /// the snapshots as listed (those of other VMs are passed over).
    pub fn usage(&self, meta: &SnapshotMeta, listed: &[SnapshotMeta], vm_dir: &Path) -> u64 {
        let active = DiskLayers::load(vm_dir).unwrap_or_default();
        let others = needed_layers(
            active.active.into_values().chain(
                listed
                    .iter()
                    .filter(|s| s.vm == meta.vm && s.name != meta.name)
                    .flat_map(|s| s.disk_layers.values().cloned()),
            ),
            crate::host::image::backing_file,
        );
        let own = needed_layers(
            meta.disk_layers.values().cloned(),
            crate::host::image::backing_file,
        );
        let layers = layers_dir(vm_dir);
        let exclusive: u64 = own
            .difference(&others)
            .filter(|p| p.starts_with(&layers))
            .map(|p| disk_usage(p))
            .sum();
        dir_usage(&self.dir(&meta.vm, &meta.name)) + exclusive
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Blocks a file really takes (memory files are sparse).
pub fn disk_usage(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn dir_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| disk_usage(&e.path())).sum())
        .unwrap_or(0)
}

/// The file is hashed in this many parts, side by side; fixed, so that the digest does not
/// depend on the machine.
const DIGEST_PARTS: u64 = 4;
const PAGE: u64 = 4096;

/// XXH3-128 of a file's content: its length and every page that is not all zeros, with its
/// offset. Zero pages count as absent, so the digest is the same however the file's holes are
/// laid out (a copy may fill them in); only extents with data are read (`SEEK_DATA`), so the
/// holes of a sparse memory file cost nothing. The file is read in [`DIGEST_PARTS`] parts by
/// as many threads; the digest is that of the parts' digests.
pub fn digest(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let part = (len / DIGEST_PARTS).div_ceil(PAGE) * PAGE;
    let parts: Vec<std::io::Result<u128>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..DIGEST_PARTS)
            .map(|i| {
                let (from, to) = ((i * part).min(len), ((i + 1) * part).min(len));
                let file = &file;
                scope.spawn(move || digest_range(file, from, to))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("digest thread panicked"))
            .collect()
    });
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&len.to_le_bytes());
    for p in parts {
        hasher.update(&p?.to_le_bytes());
    }
    Ok(format!("{:032x}", hasher.digest128()))
}

/// The non-zero pages of `file` in `[from, to)` (page-aligned `from`), with their offsets.
fn digest_range(file: &std::fs::File, from: u64, to: u64) -> std::io::Result<u128> {
    use nix::unistd::{Whence, lseek};
    use std::os::unix::fs::FileExt;
    static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = from;
    while at < to {
        let start = match lseek(file.as_fd(), at as i64, Whence::SeekData) {
            // Page-aligned, so pages are the same whatever the extents are.
            Ok(s) => (s as u64 - s as u64 % PAGE).max(at),
            // ENXIO: no data after `at`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= to {
            break;
        }
        let end = (lseek(file.as_fd(), start as i64, Whence::SeekHole)? as u64).min(to);
        let mut pos = start;
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            let n = file.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                break;
            }
            for (i, page) in buf[..n].chunks(PAGE as usize).enumerate() {
                // Slice equality is a memcmp: fast in any build profile.
                if page != &ZERO[..page.len()] {
                    hasher.update(&(pos + i as u64 * PAGE).to_le_bytes());
                    hasher.update(page);
                }
            }
            pos += n as u64;
        }
        // Round up, so the next extent starts on a page not yet read.
        at = end.div_ceil(PAGE) * PAGE;
    }
    Ok(hasher.digest128())
}

/// The first bytes of a memory file: enough to see that it is a QEMU migration stream.
pub fn looks_like_qemu_state(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"QEVM"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn digest_sees_content_not_holes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let mut f = std::fs::File::create(&a).unwrap();
        f.write_all(b"QEVM head").unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(b"page").unwrap();
        drop(f);
        let d1 = digest(&a).unwrap();
        assert_eq!(d1, digest(&a).unwrap());
        assert!(looks_like_qemu_state(&a));

        // One byte changed in the middle.
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, b"P", 64 << 20).unwrap();
        assert_ne!(d1, digest(&a).unwrap());
        // Written back with its holes filled in: the same content, the same digest.
        std::os::unix::fs::FileExt::write_at(&f, b"p", 64 << 20).unwrap();
        let copy = dir.path().join("copy");
        std::fs::write(&copy, std::fs::read(&a).unwrap()).unwrap();
        assert_eq!(d1, digest(&copy).unwrap());
        // Truncated.
        f.set_len(1 << 20).unwrap();
        assert_ne!(d1, digest(&a).unwrap());
    }

    #[test]
    fn unfinished_snapshots_are_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = SnapshotDirs::new(dir.path().to_path_buf());
        let half = dirs.create("vm", "half").unwrap();
        std::fs::write(half.join(MEMORY_FILE), b"partial").unwrap();
        let (found, broken) = dirs.list(Some("vm"));
        assert!(found.is_empty() && broken.is_empty());
        // Creating it again clears the leftover.
        let again = dirs.create("vm", "half").unwrap();
        assert!(!again.join(MEMORY_FILE).exists());
    }

    #[test]
    fn usage_counts_the_layers_only_that_snapshot_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = SnapshotDirs::new(dir.path().join("snapshots"));
        let vm_dir = dir.path().join("vm");
        ensure_layers_dir(&vm_dir).unwrap();
        let layer = |name: &str, kib: usize| {
            let p = layers_dir(&vm_dir).join(name);
            std::fs::write(&p, vec![1u8; kib << 10]).unwrap();
            p
        };
        let (own, shared, active) = (layer("own", 64), layer("shared", 32), layer("active", 16));
        let disk_outside = dir.path().join("disk.raw");
        std::fs::write(&disk_outside, vec![1u8; 128 << 10]).unwrap();
        let meta = |name: &str, layers: &[&Path]| SnapshotMeta {
            vm: "vm".into(),
            name: name.into(),
            disk_layers: layers
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("d{i}"), p.to_path_buf()))
                .collect(),
            description: String::new(),
            created_at_ms: 0,
            memory: None,
            quiesced: false,
            parent: None,
            qemu_version: String::new(),
            spec: crate::spec::tests::minimal("vm"),
            layout: Default::default(),
            pause_ms: 0,
            duration_ms: 0,
        };
        let (s1, s2) = (meta("s1", &[&own, &disk_outside]), meta("s2", &[&shared]));
        for m in [&s1, &s2] {
            let d = dirs.create("vm", &m.name).unwrap();
            write_json(&d.join(META_FILE), m).unwrap();
        }
        let with_active = |layers: &[&Path]| {
            DiskLayers {
                active: layers
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (format!("d{i}"), p.to_path_buf()))
                    .collect(),
                current: None,
            }
            .save(&vm_dir)
            .unwrap()
        };
        with_active(&[&active, &shared]);
        let base = |m: &SnapshotMeta| dir_usage(&dirs.dir("vm", &m.name));
        // s1 alone keeps `own`; the disk's own file is not a layer of the agent's.
        let listed = dirs.list(Some("vm")).0;
        assert_eq!(
            dirs.usage(&s1, &listed, &vm_dir) - base(&s1),
            disk_usage(&own)
        );
        // s2's layer is the VM's too.
        assert_eq!(dirs.usage(&s2, &listed, &vm_dir), base(&s2));
        with_active(&[&active]);
        assert_eq!(
            dirs.usage(&s2, &listed, &vm_dir) - base(&s2),
            disk_usage(&shared)
        );
    }
}
