//! Command-line flags of `hypersdk-agent` (each also readable from a `HYPERSDK_*` variable).

use std::path::PathBuf;

use clap::Parser;
use hypersdk_proto::endpoint::Address;

use crate::host::accel::AccelMode;
use crate::migration::PortRange;

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

    /// gRPC listen address: unix:///path, http://127.0.0.1:PORT (loopback only) or
    /// https://HOST:PORT (mutual TLS; needs --tls-*) (repeatable).
    /// Defaults to unix://DATA_DIR/agent.sock.
    #[arg(long, env = "HYPERSDK_LISTEN", value_delimiter = ',')]
    pub listen: Vec<Address>,

    #[command(flatten)]
    pub tls: hypersdk_tls::TlsArgs,

    /// Directories whose files VMs may use as kernel, initrd or disk (repeatable).
    #[arg(long = "image-dir", env = "HYPERSDK_IMAGE_DIR", value_delimiter = ',')]
    pub image_dirs: Vec<PathBuf>,

    /// The node's image cache: images fetched for VMs, one file per digest, shared by the VMs
    /// made from them (default: DATA_DIR/images/cache).
    #[arg(long, env = "HYPERSDK_IMAGE_CACHE")]
    pub image_cache: Option<PathBuf>,

    /// Where the agent makes VMs' disks (overlays on cached images, blank disks), one
    /// directory per VM (default: DATA_DIR/images/disks). Live migration needs it on storage
    /// both nodes see, at the same path.
    #[arg(long, env = "HYPERSDK_DISK_DIR")]
    pub disk_dir: Option<PathBuf>,

    /// Accelerator: auto picks KVM only where a KVM self-test passes.
    #[arg(long, env = "HYPERSDK_ACCEL", value_enum, default_value = "auto")]
    pub accel: AccelMode,

    /// cgroup (under the cgroup2 mount) that holds one child cgroup per VM; empty disables.
    #[arg(long, env = "HYPERSDK_CGROUP_PARENT", default_value = "hypersdk")]
    pub cgroup_parent: String,

    /// Start QEMU on the host: in the host's mount namespace (the node's QEMU binary and files)
    /// and in the host cgroup --vm-cgroup, so that VMs outlive the agent's pod. For an agent
    /// in a Kubernetes pod with hostPID; paths the agent passes to QEMU must be the same on
    /// the node (mount hostPath volumes at their node paths).
    #[arg(long, env = "HYPERSDK_HOST_LAUNCH")]
    pub host_launch: bool,

    /// With --host-launch: a process on the host, whose mount namespace QEMU enters; 0 is the
    /// agent's parent (in a pod: the container runtime's shim, which runs on the host).
    #[arg(long, env = "HYPERSDK_HOST_PID", default_value = "0")]
    pub host_pid: u32,

    /// With --host-launch: the cgroup, under the root of each hierarchy, that holds the VMs'
    /// QEMU processes.
    #[arg(long, env = "HYPERSDK_VM_CGROUP", default_value = "hypersdk-vms")]
    pub vm_cgroup: String,

    /// QEMU binary.
    #[arg(long, env = "HYPERSDK_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,

    /// qemu-img binary (creates the disk overlays that snapshot restores run on).
    #[arg(long, env = "HYPERSDK_QEMU_IMG", default_value = "qemu-img")]
    pub qemu_img: PathBuf,

    /// Where OVMF's images are (Debian's `ovmf` package), for VMs with `firmware: uefi`.
    #[arg(long, env = "HYPERSDK_OVMF_DIR", default_value = crate::firmware::DEFAULT_OVMF_DIR)]
    pub ovmf_dir: PathBuf,

    /// Where snapshots are kept (default: DATA_DIR/snapshots).
    #[arg(long, env = "HYPERSDK_SNAPSHOT_DIR")]
    pub snapshot_dir: Option<PathBuf>,

    /// Address this node receives live migrations on, as other nodes reach it (in a cluster:
    /// the pod IP).
    #[arg(long, env = "HYPERSDK_MIGRATION_ADDRESS", default_value = "127.0.0.1")]
    pub migration_address: std::net::IpAddr,

    /// TCP ports for incoming live migrations, one per migration under way.
    #[arg(long, env = "HYPERSDK_MIGRATION_PORTS", default_value = "49152-49215")]
    pub migration_ports: PortRange,

    /// How an outgoing migration copies memory: `live` (pre-copy while the guest runs),
    /// `pause` (the guest paused for the whole copy), or `auto`: live under KVM, paused under
    /// TCG, where QEMU 10.0's software dirty tracking can miss guest writes during a live copy.
    #[arg(
        long,
        env = "HYPERSDK_MIGRATION_COPY",
        value_enum,
        default_value = "auto"
    )]
    pub migration_copy: MigrationCopy,

    /// Memory this agent may give to VMs in all (e.g. "64Gi"); defaults to the node's total.
    #[arg(long, env = "HYPERSDK_ALLOCATABLE_MEMORY", value_parser = crate::quantity::parse_bytes)]
    pub allocatable_memory: Option<u64>,

    /// The node network's Linux bridge, which `bridge` (pod-network) NICs are attached to; made
    /// if missing. Without it the agent has no node network and refuses such NICs. One agent
    /// per bridge: its DHCP server answers there.
    #[arg(long, env = "HYPERSDK_BRIDGE")]
    pub bridge: Option<String>,

    /// The guests' IPv4 subnet on --bridge (CIDR, /16 to /29); the bridge gets its first
    /// address, guests the others by DHCP.
    #[arg(long, env = "HYPERSDK_BRIDGE_SUBNET", default_value = "10.254.0.0/24")]
    pub bridge_subnet: String,

    /// Masquerade guests' traffic to other networks behind the node's address (iptables rules
    /// tagged `hypersdk:BRIDGE`; forwarding is turned on for the bridge and the uplinks only).
    #[arg(long, env = "HYPERSDK_BRIDGE_NAT", default_value_t = true, action = clap::ArgAction::Set)]
    pub bridge_nat: bool,

    /// Interfaces NATed traffic leaves by (repeatable); default: those of the default routes.
    #[arg(
        long = "bridge-uplink",
        env = "HYPERSDK_BRIDGE_UPLINK",
        value_delimiter = ','
    )]
    pub bridge_uplinks: Vec<String>,

    /// Simulate VMs (no QEMU; bookkeeping only), for scale tests of the controller.
    #[arg(long, env = "HYPERSDK_SIMULATE")]
    pub simulate: bool,

    /// vCPUs a simulated node reports.
    #[arg(
        long,
        env = "HYPERSDK_SIMULATE_CPUS",
        default_value = "64",
        requires = "simulate"
    )]
    pub simulate_cpus: u32,

    /// Memory a simulated node reports (a quantity such as 256Gi).
    #[arg(long, env = "HYPERSDK_SIMULATE_MEMORY", default_value = "256Gi", value_parser = crate::quantity::parse_bytes, requires = "simulate")]
    pub simulate_memory: u64,

    /// Milliseconds a simulated VM takes from Starting to Running.
    #[arg(
        long,
        env = "HYPERSDK_SIMULATE_BOOT_MS",
        default_value = "100",
        requires = "simulate"
    )]
    pub simulate_boot_ms: u64,
}

impl Config {
    /// The node network from --bridge*, checked; None without --bridge.
    pub fn network(&self) -> Result<Option<crate::network::Config>, crate::network::NetworkError> {
        use crate::network::{NetworkError, check_ifname};
        let Some(bridge) = &self.bridge else {
            return Ok(None);
        };
        check_ifname("--bridge", bridge)?;
        for up in &self.bridge_uplinks {
            check_ifname("--bridge-uplink", up)?;
        }
        let subnet = self
            .bridge_subnet
            .parse()
            .map_err(|e: crate::network::SubnetError| NetworkError::Flag {
                flag: "--bridge-subnet".into(),
                why: e.to_string(),
            })?;
        Ok(Some(crate::network::Config {
            bridge: bridge.clone(),
            subnet,
            nat: self.bridge_nat,
            uplinks: self.bridge_uplinks.clone(),
        }))
    }

    /// The simulated node, with --simulate.
    pub fn simulated_node(&self) -> Option<crate::api::simulate::SimNode> {
        self.simulate.then(|| crate::api::simulate::SimNode {
            node_name: self.node_name.clone().unwrap_or_else(|| "simulated".into()),
            cpus: self.simulate_cpus,
            memory_bytes: self.simulate_memory,
            boot: std::time::Duration::from_millis(self.simulate_boot_ms),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MigrationCopy {
    Auto,
    Live,
    Pause,
}

impl MigrationCopy {
    /// Whether the guest is paused for the copy under `accel`.
    pub fn pauses(self, accel: crate::host::accel::Accel) -> bool {
        match self {
            MigrationCopy::Auto => accel == crate::host::accel::Accel::Tcg,
            MigrationCopy::Live => false,
            MigrationCopy::Pause => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::accel::Accel;

    #[test]
    fn migrations_pause_for_the_copy_under_tcg_by_default() {
        assert!(MigrationCopy::Auto.pauses(Accel::Tcg));
        assert!(!MigrationCopy::Auto.pauses(Accel::Kvm));
        assert!(!MigrationCopy::Live.pauses(Accel::Tcg));
        assert!(MigrationCopy::Pause.pauses(Accel::Kvm));
    }
}
