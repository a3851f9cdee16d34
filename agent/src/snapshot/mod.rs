//! Snapshots, the pure parts: what a snapshot records, how its memory state is written (the QMP
//! capabilities and parameters of a save), and which disk layers are still needed once
//! snapshots come and go. The files live in [`crate::snapshot::files`]; the QEMU side runs in the
//! VM's supervisor.
//!
//! Disks are snapshotted with external qcow2 overlays: at the snapshot, each writable disk's
//! current file (its *layer*) is frozen and the VM goes on writing into a new overlay on top of
//! it. The frozen layer is the disk as it was at the snapshot; a restore puts a fresh overlay on
//! it, so the snapshot itself is never written and can be restored again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use hypersdk_proto::agent::v1 as pb;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::migration::AwaitError;
use crate::qemu::img::QemuImgError;
use crate::qemu::qmp::QmpError;
use crate::spec::{FieldError, VmSpec, check_name};
use crate::vm::guest::GuestError;

/// Writing the memory state: at disk speed, a few seconds per GiB at worst.
pub const SAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// Loading it back.
pub const LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// How long a restored guest's agent may take to answer the thaw.
pub const THAW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub(crate) mod create;
pub(crate) mod delete;
pub mod files;
pub(crate) mod layers;
pub(crate) mod restore;

/// Parallel channels for the memory file when `mapped-ram` is available.
pub const SAVE_MULTIFD_CHANNELS: u32 = 4;

/// Why a snapshot was not taken, or its layers not merged back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM's disks, resolved on their layers, are not usable.
    #[error(transparent)]
    Spec(#[from] FieldError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("saving the disk layers: {0}")]
    SaveLayers(#[source] std::io::Error),
    #[error("reading the machine layout: {0}")]
    Layout(#[source] QmpError),
    #[error("quiesce needs the guest agent, which is not connected")]
    NoGuestAgent,
    #[error("guest agent {}: {source}", if *freeze { "freeze" } else { "thaw" })]
    Freeze {
        freeze: bool,
        #[source]
        source: GuestError,
    },
    /// A QMP command failed; `step` says what it was for.
    #[error("{step}: {source}")]
    Qmp {
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("disk {0:?} not found in QEMU")]
    DiskNotFound(String),
    #[error("{} is not open in QEMU", .0.display())]
    NotOpen(PathBuf),
    #[error(transparent)]
    QemuImg(#[from] QemuImgError),
    #[error("saving memory: {0}")]
    SaveMemory(#[source] AwaitError),
    #[error("the commit job ended before it was ready")]
    CommitEnded,
    #[error("the commit took longer than {SAVE_TIMEOUT:?}")]
    CommitTimeout,
}

impl SnapshotError {
    /// Wraps a QMP error with what the command was for.
    pub(crate) fn qmp(step: &'static str) -> impl FnOnce(QmpError) -> SnapshotError {
        move |source| SnapshotError::Qmp { step, source }
    }

    /// Wraps an I/O error with the file it is about.
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
        let path = path.to_path_buf();
        move |source| SnapshotError::Io { path, source }
    }
}

/// A snapshot's memory file that is not the one saved: a restore refuses it before it
/// touches the VM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("{}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} has {len} bytes, {written} were written (truncated or replaced)", path.display())]
    Length {
        path: PathBuf,
        len: u64,
        written: u64,
    },
    #[error("{} is not a QEMU state file", .0.display())]
    NotQemuState(PathBuf),
    #[error(
        "{} changed since the save, before its digest was recorded: it cannot be checked",
        .0.display()
    )]
    Unverifiable(PathBuf),
    #[error("{} does not match its digest (its content changed)", .0.display())]
    DigestMismatch(PathBuf),
}

/// What a snapshot is, as kept in its `meta.json`. Written last: a directory without it is a
/// snapshot that never finished, and is not listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMeta {
    pub vm: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub created_at_ms: i64,
    /// The memory state, for snapshots that include it.
    pub memory: Option<MemoryState>,
    pub quiesced: bool,
    /// The snapshot the VM's disks descended from when this one was taken.
    pub parent: Option<String>,
    pub qemu_version: String,
    /// The VM's spec at the snapshot, at the size it had then.
    pub spec: VmSpec,
    /// How the QEMU process was laid out: a restore recreates it before loading the state.
    pub layout: Layout,
    pub pause_ms: u32,
    pub duration_ms: u32,
    /// Disk name → the frozen layer holding that disk at the snapshot (writable disks only;
    /// read-only disks do not change).
    pub disk_layers: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryState {
    /// File name inside the snapshot's directory.
    pub file: String,
    /// Its length, which a truncated file no longer has.
    pub file_bytes: u64,
    /// [`crate::snapshot::files::digest`] of its content, recorded in the background after the
    /// save (empty until then, or if the file changed first): restore refuses a damaged file
    /// before it touches the VM.
    #[serde(default)]
    pub digest: String,
    /// The file as the agent left it after the save. While it is unchanged (same inode, size,
    /// modification and change times: any write moves the change time, which no caller can
    /// set) a restore trusts the digest recorded; a file changed since is read and checked.
    #[serde(default)]
    pub written: Option<FileStamp>,
    pub mapped_ram: bool,
    pub multifd_channels: u32,
    /// Guest memory (boot and plugged).
    pub guest_bytes: u64,
}

/// What `stat` says of a file: enough to tell that nothing has written to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileStamp {
    pub inode: u64,
    pub bytes: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileStamp {
            inode: m.ino(),
            bytes: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether a write after this stamp is sure to move the file's change time: file times
    /// come from a coarse clock (one tick, a few ms), so a write in the same tick as the last
    /// one could leave them as they are.
    pub fn settled(&self, now: std::time::SystemTime) -> bool {
        let now_ns = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        now_ns - self.ctime_ns.max(self.mtime_ns) > 20_000_000
    }
}

/// [`pb::MachineLayout`], kept on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layout {
    pub boot_cpus: u32,
    pub boot_memory_bytes: u64,
    /// Hot-plugged vCPUs as (socket, core, thread).
    pub hotplugged_cpus: Vec<(u32, u32, u32)>,
    pub virtio_mem_requested_bytes: u64,
    /// Plugged DIMMs as (slot, bytes).
    #[serde(default)]
    pub dimms: Vec<(u32, u64)>,
}

impl From<&pb::MachineLayout> for Layout {
    fn from(l: &pb::MachineLayout) -> Self {
        Layout {
            boot_cpus: l.boot_cpus,
            boot_memory_bytes: l.boot_memory_bytes,
            hotplugged_cpus: l
                .hotplugged_cpus
                .iter()
                .map(|c| (c.socket, c.core, c.thread))
                .collect(),
            virtio_mem_requested_bytes: l.virtio_mem_requested_bytes,
            dimms: l.dimms.iter().map(|d| (d.slot, d.size_bytes)).collect(),
        }
    }
}

impl From<&Layout> for pb::MachineLayout {
    fn from(l: &Layout) -> Self {
        pb::MachineLayout {
            boot_cpus: l.boot_cpus,
            boot_memory_bytes: l.boot_memory_bytes,
            hotplugged_cpus: l
                .hotplugged_cpus
                .iter()
                .map(|&(socket, core, thread)| pb::CpuSlot {
                    socket,
                    core,
                    thread,
                })
                .collect(),
            virtio_mem_requested_bytes: l.virtio_mem_requested_bytes,
            dimms: l
                .dimms
                .iter()
                .map(|&(slot, size_bytes)| pb::Dimm { slot, size_bytes })
                .collect(),
        }
    }
}

impl SnapshotMeta {
    /// `size_bytes`: what the snapshot's own files take on disk.
    pub fn to_proto(&self, size_bytes: u64) -> pb::Snapshot {
        pb::Snapshot {
            vm: self.vm.clone(),
            name: self.name.clone(),
            description: self.description.clone(),
            created_at_ms: self.created_at_ms,
            memory: self.memory.is_some(),
            quiesced: self.quiesced,
            parent: self.parent.clone().unwrap_or_default(),
            size_bytes,
            memory_bytes: self.memory.as_ref().map_or(0, |m| m.guest_bytes),
            qemu_version: self.qemu_version.clone(),
            spec: Some(pb::VmSpec::from(&self.spec)),
            pause_ms: self.pause_ms,
            duration_ms: self.duration_ms,
            memory_format: self.memory.as_ref().map_or(String::new(), memory_format),
            memory_digest: self
                .memory
                .as_ref()
                .map_or(String::new(), |m| m.digest.clone()),
            disk_layers: self
                .disk_layers
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string_lossy().into_owned()))
                .collect(),
        }
    }
}

fn memory_format(m: &MemoryState) -> String {
    if m.mapped_ram {
        format!("mapped-ram+multifd({})", m.multifd_channels)
    } else {
        "stream".into()
    }
}

/// A snapshot name: a DNS-1123 label, so it is safe as a directory and file name.
pub fn check_snapshot_name(name: &str) -> Result<(), FieldError> {
    check_name("snapshot", name)
}

/// How the memory state is written, decided from what this QEMU supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveMode {
    /// `mapped-ram`: each page at a fixed offset of a sparse file, written by multifd channels.
    pub mapped_ram: bool,
    pub multifd_channels: u32,
}

impl SaveMode {
    /// From the names `query-migrate-capabilities` lists.
    pub fn for_capabilities(names: &[String]) -> SaveMode {
        let mapped_ram = names.iter().any(|n| n == "mapped-ram");
        SaveMode {
            mapped_ram,
            multifd_channels: if mapped_ram { SAVE_MULTIFD_CHANNELS } else { 0 },
        }
    }

    pub fn of(m: &MemoryState) -> SaveMode {
        SaveMode {
            mapped_ram: m.mapped_ram,
            multifd_channels: m.multifd_channels,
        }
    }

    /// `migrate-set-capabilities` for a save or a restore. Each is set explicitly, so a later
    /// live migration of the same process finds them as it needs them.
    pub fn capabilities(&self, on: bool) -> Value {
        let use_it = on && self.mapped_ram;
        let mut caps = vec![json!({"capability": "multifd", "state": use_it})];
        if self.mapped_ram {
            caps.push(json!({"capability": "mapped-ram", "state": use_it}));
        }
        json!({ "capabilities": caps })
    }

    /// `migrate-set-parameters` for a save: no bandwidth cap (QEMU's default is 128 MiB/s).
    pub fn parameters(&self) -> Value {
        let mut p = serde_json::Map::new();
        p.insert("max-bandwidth".into(), json!(0));
        if self.mapped_ram {
            p.insert("multifd-channels".into(), json!(self.multifd_channels));
        }
        Value::Object(p)
    }
}

/// The layer files still needed: those in `roots` (the VM's current disks and every snapshot's
/// layers) and everything they are backed by. `backing_of` reads a layer's backing file.
pub fn needed_layers(
    roots: impl IntoIterator<Item = PathBuf>,
    backing_of: impl Fn(&Path) -> Option<PathBuf>,
) -> BTreeSet<PathBuf> {
    let mut needed = BTreeSet::new();
    for root in roots {
        let mut next = Some(root);
        // A chain is finite unless a file names itself or a loop: stop at the first repeat.
        while let Some(layer) = next {
            if !needed.insert(layer.clone()) {
                break;
            }
            next = backing_of(&layer);
        }
    }
    needed
}

/// The `transaction` that freezes every writable disk at once: `(top node, new overlay file,
/// new node name)` per disk.
pub fn overlay_transaction(disks: &[(String, PathBuf, String)]) -> Value {
    let actions: Vec<Value> = disks
        .iter()
        .map(|(node, file, new_node)| {
            json!({"type": "blockdev-snapshot-sync", "data": {
                "node-name": node,
                "snapshot-file": file.to_string_lossy(),
                "snapshot-node-name": new_node,
                "format": "qcow2",
            }})
        })
        .collect();
    json!({ "actions": actions })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_labels() {
        assert!(check_snapshot_name("before-upgrade").is_ok());
        for bad in ["", "../x", "a/b", "A", "x,y", "-x"] {
            let e = check_snapshot_name(bad).unwrap_err();
            assert_eq!(e.field, "snapshot", "{bad:?}");
        }
    }

    #[test]
    fn save_mode_follows_qemu() {
        let with = SaveMode::for_capabilities(&["multifd".into(), "mapped-ram".into()]);
        assert_eq!(
            with,
            SaveMode {
                mapped_ram: true,
                multifd_channels: SAVE_MULTIFD_CHANNELS
            }
        );
        let caps = with.capabilities(true).to_string();
        assert!(caps.contains(r#""capability":"mapped-ram","state":true"#));
        assert!(caps.contains(r#""capability":"multifd","state":true"#));
        let off = with.capabilities(false).to_string();
        assert!(!off.contains("true"), "{off}");
        assert_eq!(with.parameters()["multifd-channels"], 4);
        assert_eq!(with.parameters()["max-bandwidth"], 0);

        let old = SaveMode::for_capabilities(&["multifd".into()]);
        assert!(!old.mapped_ram);
        assert_eq!(old.multifd_channels, 0);
        let caps = old.capabilities(true).to_string();
        assert!(
            !caps.contains("mapped-ram") && !caps.contains("true"),
            "{caps}"
        );
        assert!(old.parameters().get("multifd-channels").is_none());
    }

    #[test]
    fn needed_layers_follow_chains_and_survive_loops() {
        let p = |s: &str| PathBuf::from(s);
        let backing: BTreeMap<PathBuf, PathBuf> = [
            (p("/l/c"), p("/l/b")),
            (p("/l/b"), p("/img/base")),
            (p("/l/x"), p("/l/x")), // names itself
        ]
        .into();
        let needed = needed_layers([p("/l/c"), p("/l/x")], |f| backing.get(f).cloned());
        let want: BTreeSet<_> = [p("/l/c"), p("/l/b"), p("/img/base"), p("/l/x")].into();
        assert_eq!(needed, want);
        assert!(!needed.contains(&p("/l/a")));
    }

    #[test]
    fn overlays_are_one_transaction() {
        let t = overlay_transaction(&[
            ("disk0".into(), p("/d/root-1.qcow2"), "disk0-s1".into()),
            ("disk1".into(), p("/d/data-1.qcow2"), "disk1-s1".into()),
        ]);
        let actions = t["actions"].as_array().unwrap();
        assert_eq!(actions.len(), 2);
        assert_eq!(actions[0]["type"], "blockdev-snapshot-sync");
        assert_eq!(actions[1]["data"]["snapshot-file"], "/d/data-1.qcow2");
        assert_eq!(actions[1]["data"]["node-name"], "disk1");
    }

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn a_stamp_is_trusted_once_the_clock_has_moved_on() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m");
        std::fs::write(&f, b"QEVM").unwrap();
        let stamp = FileStamp::of(&std::fs::metadata(&f).unwrap());
        assert_eq!(stamp, FileStamp::of(&std::fs::metadata(&f).unwrap()));
        // Judged from the file's own last change, not from when this test gets to look.
        let ms = std::time::Duration::from_millis;
        let changed = std::time::UNIX_EPOCH
            + std::time::Duration::from_nanos(stamp.ctime_ns.max(stamp.mtime_ns) as u64);
        assert!(!stamp.settled(changed));
        assert!(!stamp.settled(changed + ms(5)), "within a clock tick");
        assert!(stamp.settled(changed + ms(100)));
        // Once it is settled, a write moves the stamp, even one that keeps the length.
        let settled = std::time::Instant::now();
        while !stamp.settled(std::time::SystemTime::now()) {
            assert!(settled.elapsed() < ms(10_000), "the clock stands still");
            std::thread::sleep(ms(1));
        }
        std::fs::write(&f, b"QEVN").unwrap();
        assert_ne!(stamp, FileStamp::of(&std::fs::metadata(&f).unwrap()));
    }

    #[test]
    fn layouts_round_trip() {
        let l = pb::MachineLayout {
            boot_cpus: 1,
            boot_memory_bytes: 256 << 20,
            hotplugged_cpus: vec![pb::CpuSlot {
                socket: 1,
                core: 0,
                thread: 0,
            }],
            virtio_mem_requested_bytes: 128 << 20,
            dimms: vec![pb::Dimm {
                slot: 2,
                size_bytes: 128 << 20,
            }],
        };
        assert_eq!(pb::MachineLayout::from(&Layout::from(&l)), l);
    }
}
