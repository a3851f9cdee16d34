//! Command-line flags of `hypersdk-agent` (each also readable from a `HYPERSDK_*` variable).

use std::path::PathBuf;

use clap::Parser;
use hypersdk_proto::endpoint::Address;

use crate::accel::AccelMode;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "hypersdk-agent",
    version,
    about = "HyperSDK node agent: runs QEMU VMs on this node"
)]
pub struct Config {
    /// Name of this node (defaults to the hostname).
    #[arg(long, env = "HYPERSDK_NODE_NAME")]
    pub node_name: Option<String>,

    /// Where VM specs, state, sockets and logs live.
    #[arg(long, env = "HYPERSDK_DATA_DIR", default_value = "/var/lib/hypersdk")]
    pub data_dir: PathBuf,

    /// gRPC listen address: unix:///path or http://127.0.0.1:PORT (repeatable).
    /// Defaults to unix://DATA_DIR/agent.sock.
    #[arg(long, env = "HYPERSDK_LISTEN", value_delimiter = ',')]
    pub listen: Vec<Address>,

    /// Directories whose files VMs may use as kernel, initrd or disk (repeatable).
    #[arg(long = "image-dir", env = "HYPERSDK_IMAGE_DIR", value_delimiter = ',')]
    pub image_dirs: Vec<PathBuf>,

    /// Accelerator: auto picks KVM only where a KVM self-test passes.
    #[arg(long, env = "HYPERSDK_ACCEL", value_enum, default_value = "auto")]
    pub accel: AccelMode,

    /// cgroup (under the cgroup2 mount) that holds one child cgroup per VM; empty disables.
    #[arg(long, env = "HYPERSDK_CGROUP_PARENT", default_value = "hypersdk")]
    pub cgroup_parent: String,

    /// QEMU binary.
    #[arg(long, env = "HYPERSDK_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
}
