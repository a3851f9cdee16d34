//! What every VM supervisor of this agent shares.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use hypersdk_proto::agent::v1 as pb;
use tokio::sync::broadcast;

use crate::host::accel::Selection;
use crate::host::cgroup::{CgroupError, Cgroups};
use crate::host::paths::PathPolicy;
use crate::image::cache::ImageCache;
use crate::migration::PortRange;
use crate::snapshot::files::SnapshotDirs;
use crate::store::Store;

#[derive(Debug)]
pub struct Context {
    pub node_name: String,
    pub qemu: PathBuf,
    /// How QEMU is started (as a child, or on the host from a pod).
    pub launcher: crate::host::launch::Launcher,
    pub qemu_version: String,
    pub qemu_img: PathBuf,
    pub accel: Selection,
    pub policy: PathPolicy,
    /// The agent's own image dir (DATA/images), where clones' disks go.
    pub images_dir: PathBuf,
    /// The node's image cache (see `--image-cache`).
    pub images: Arc<ImageCache>,
    /// Where the disks the agent makes for VMs go, one directory per VM (`--disk-dir`).
    pub disk_dir: PathBuf,
    pub store: Store,
    pub snapshots: SnapshotDirs,
    /// Per-VM cgroups, or why there are none on this node.
    pub cgroups: Result<Cgroups, CgroupError>,
    /// Every VM status change, for WatchVms.
    pub events: broadcast::Sender<pb::VmEvent>,
    /// The agent's certificate and the cluster CA (--tls-*), also for calls to other agents.
    pub tls: Option<hypersdk_tls::TlsFiles>,
    /// Where incoming migrations listen.
    pub migration_address: IpAddr,
    pub migration_ports: PortRange,
    /// Outgoing migrations pause the guest for the copy (see `--migration-copy`).
    pub pause_for_copy: bool,
    /// Memory VMs may have in all on this node.
    pub allocatable_memory: u64,
    /// Whether this node's QEMU has virtio-mem-pci (else memory hotplug uses pc-dimm).
    pub virtio_mem: bool,
    /// The controller's lease on this node.
    pub fence: std::sync::Arc<crate::fence::hold::Hold>,
    /// Where OVMF is looked for when a VM asks for UEFI (`--ovmf-dir`).
    pub ovmf_dir: PathBuf,
    /// The node network `bridge` NICs attach to (`--bridge`), if this agent has one.
    pub network: Option<Arc<crate::network::serve::NodeNet>>,
    /// Which VMs' serial consoles have a client.
    pub consoles: crate::console::Attachments,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
