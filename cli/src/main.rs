//! hyperctl: the HyperSDK debug client. Talks gRPC to one node agent.

mod backup;
mod certs;
mod console;
mod forward;
mod manifest;
mod migrate;
mod output;
mod snapshot;
mod view;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::{self, Address};
use tokio_stream::StreamExt;

use hypersdk_proto::agent::v1::agent_service_client::AgentServiceClient;
use output::Format;

type Client = AgentServiceClient<tonic::transport::Channel>;
use view::{EventView, NodeView, VmView};

#[derive(Parser)]
#[command(
    name = "hyperctl",
    version,
    about = "HyperSDK debug client for node agents"
)]
struct Cli {
    /// Agent address: unix:///path/agent.sock, http://127.0.0.1:PORT or https://HOST:PORT
    /// (with --tls-cert, --tls-key and --tls-ca, e.g. an admin certificate).
    #[arg(
        long,
        global = true,
        env = "HYPERSDK_AGENT",
        default_value = "unix:///var/lib/hypersdk/agent.sock"
    )]
    agent: Address,
    #[command(flatten)]
    tls: hypersdk_tls::TlsArgs,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Node facts.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        command: Box<VmCommand>,
    },
    /// Backups of VMs to S3-compatible object storage, through the VM's node agent.
    Backup {
        #[command(subcommand)]
        command: backup::BackupCommand,
    },
    /// A cluster CA and role certificates (no agent involved).
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Capacity, QEMU version, accelerator and KVM facts.
    Info,
}

#[derive(Subcommand)]
enum VmCommand {
    List,
    Get {
        name: String,
    },
    Create(CreateArgs),
    Start {
        name: String,
    },
    Stop(StopArgs),
    Restart(StopArgs),
    /// Change vCPUs and/or memory (in place while running, up to maxCpus/maxMemory).
    Resize {
        name: String,
        #[arg(long, required_unless_present = "memory")]
        cpus: Option<u32>,
        #[arg(long)]
        memory: Option<String>,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    Delete {
        name: String,
    },
    /// A new VM on the same node with NAME's spec and copies of its disks, taken at one
    /// instant (a running NAME keeps running).
    Clone {
        name: String,
        target: String,
        /// Share read-only disks and copy only the top layer of disks with a backing file.
        #[arg(long)]
        linked: bool,
        /// Start the clone.
        #[arg(long)]
        start: bool,
    },
    /// Live-migrate a running VM to another node's agent.
    Migrate(migrate::MigrateArgs),
    /// Stop a migration under way; the VM keeps running where it is.
    CancelMigration {
        name: String,
    },
    /// Snapshots of a VM: create, list, restore, delete.
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// Stream VM changes (all VMs, or one).
    Watch {
        name: Option<String>,
    },
    /// Attach this terminal to the VM's serial console (Ctrl-] detaches). One client at a
    /// time; the serial log keeps being written.
    Console {
        name: String,
    },
    /// Forward a loopback port of this machine to a port of the guest on the node network
    /// (LOCAL 0: any free port, printed).
    PortForward {
        name: String,
        /// LOCAL:GUEST, e.g. 2222:22.
        ports: forward::Ports,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// VM name (a DNS-1123 label); not used with -f.
    #[arg(required_unless_present = "file")]
    name: Option<String>,
    /// A VirtualMachine manifest (YAML); `-` reads standard input.
    #[arg(short, long, conflicts_with_all = ["name", "cpus", "memory"])]
    file: Option<PathBuf>,
    #[arg(long, required_unless_present = "file")]
    cpus: Option<u32>,
    #[arg(long, required_unless_present = "file")]
    memory: Option<String>,
    #[arg(long, default_value_t = 0)]
    max_cpus: u32,
    #[arg(long, default_value = "")]
    max_memory: String,
    /// Kernel for direct boot; without it the firmware boots the first disk.
    #[arg(long, default_value = "")]
    kernel: String,
    #[arg(long, default_value = "")]
    initrd: String,
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Disk image path; repeatable. Named disk0, disk1, ... in order.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Without a NIC.
    #[arg(long, conflicts_with = "networks")]
    no_network: bool,
    /// A NIC: `user` (QEMU's NAT) or `bridge` (the node network: needs an agent with
    /// --bridge); repeatable. Default: one `user` NIC.
    #[arg(long = "network", value_enum)]
    networks: Vec<NetworkKind>,
    /// Start the VM once created.
    #[arg(long)]
    start: bool,
    /// What the agent does when QEMU ends on its own.
    #[arg(long, value_enum, default_value = "never")]
    restart_policy: manifest::RestartPolicy,
    /// How memory up to --max-memory is plugged: virtio-mem where QEMU has it (auto), or
    /// ACPI pc-dimm for guests without a virtio-mem driver (dimm).
    #[arg(long, value_enum, default_value = "auto")]
    memory_hotplug: manifest::MemoryHotplug,
    /// The firmware: SeaBIOS (bios) or OVMF (uefi, with the VM's own NVRAM).
    #[arg(long, value_enum, default_value = "bios")]
    firmware: manifest::Firmware,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum NetworkKind {
    User,
    Bridge,
}

#[derive(Args)]
struct StopArgs {
    name: String,
    /// Seconds to wait for the guest to power off before QEMU is ended.
    #[arg(long, default_value_t = 30)]
    timeout: u32,
    /// End QEMU at once, without asking the guest.
    #[arg(long)]
    force: bool,
}

fn spec_from_flags(a: CreateArgs) -> pb::VmSpec {
    pb::VmSpec {
        name: a.name.unwrap_or_default(),
        cpus: a.cpus.unwrap_or_default(),
        max_cpus: a.max_cpus,
        memory: a.memory.unwrap_or_default(),
        max_memory: a.max_memory,
        boot: Some(pb::Boot {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
        }),
        disks: a
            .disks
            .into_iter()
            .enumerate()
            .map(|(i, path)| pb::Disk {
                name: format!("disk{i}"),
                path,
                ..Default::default()
            })
            .collect(),
        networks: networks(a.no_network, &a.networks),
        labels: Default::default(),
        restart_policy: a.restart_policy.to_proto() as i32,
        memory_hotplug: a.memory_hotplug.to_proto() as i32,
        // Only the controller moves VMs between nodes, and fences them for it.
        high_availability: false,
        cloud_init: None,
        firmware: a.firmware.to_proto() as i32,
    }
}

/// The NICs of `vm create`: `default`, `net1`, `net2`, ...
fn networks(none: bool, kinds: &[NetworkKind]) -> Vec<pb::Network> {
    let kinds = match (none, kinds) {
        (true, _) => &[][..],
        (false, []) => &[NetworkKind::User][..],
        (false, k) => k,
    };
    kinds
        .iter()
        .enumerate()
        .map(|(i, k)| pb::Network {
            name: if i == 0 {
                "default".into()
            } else {
                format!("net{i}")
            },
            backend: Some(match k {
                NetworkKind::User => pb::network::Backend::User(pb::UserNetwork {}),
                NetworkKind::Bridge => pb::network::Backend::Bridge(pb::BridgeNetwork {}),
            }),
        })
        .collect()
}

fn read_manifest(path: &PathBuf) -> anyhow::Result<(pb::VmSpec, bool)> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    manifest::parse(&text).with_context(|| format!("{}", path.display()))
}

#[tokio::main]
async fn main() {
    // Like other Unix tools, end quietly when the reader of our output goes away (`| head`).
    // SAFETY: signal(2) only resets the disposition to the default; no handler code is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        // gRPC errors carry the agent's message (which names the field); print that alone.
        match e.downcast_ref::<tonic::Status>() {
            Some(s) => eprintln!("error: {} ({:?})", s.message(), s.code()),
            None => eprintln!("error: {e:#}"),
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let connect = async || {
        endpoint::connect(&cli.agent, cli.tls.files().as_ref())
            .await
            .with_context(|| format!("cannot reach the agent at {}", cli.agent))
    };
    match cli.command {
        Command::Certs { command } => certs::run(command),
        Command::Node {
            command: NodeCommand::Info,
        } => {
            let node = connect().await?.get_node(pb::GetNodeRequest {}).await?;
            output::node(cli.output, &NodeView::from(node.into_inner()))
        }
        Command::Vm { command } => vm(&mut connect().await?, cli.output, *command).await,
        Command::Backup { command } => {
            backup::run(&mut connect().await?, cli.output, command).await
        }
    }
}

/// Runs a `vm` command; most answer with the VM as the call left it.
async fn vm(client: &mut Client, out: Format, command: VmCommand) -> anyhow::Result<()> {
    let vm = match command {
        VmCommand::List => {
            let vms = client.list_vms(pb::ListVmsRequest {}).await?.into_inner();
            let views: Vec<_> = vms.vms.iter().map(VmView::from).collect();
            return output::vms(out, &views);
        }
        VmCommand::Delete { name } => return delete(client, out, name).await,
        VmCommand::Migrate(args) => {
            let stream = client.migrate_vm(args.request()).await?.into_inner();
            if !migrate::follow(out, stream, args.wait()).await? {
                std::process::exit(1);
            }
            return Ok(());
        }
        VmCommand::Snapshot { command } => return snapshot::run(client, out, command).await,
        VmCommand::Watch { name } => return watch(client, out, name).await,
        VmCommand::Console { name } => return console::run(client, name).await,
        VmCommand::PortForward { name, ports } => {
            return forward::run(client, name, ports).await;
        }
        VmCommand::Get { name } => client.get_vm(pb::GetVmRequest { name }).await?,
        VmCommand::Create(args) => client.create_vm(create_request(args)?).await?,
        VmCommand::Start { name } => client.start_vm(pb::StartVmRequest { name }).await?,
        VmCommand::Stop(a) => {
            let req = pb::StopVmRequest {
                name: a.name,
                timeout_seconds: a.timeout,
                force: a.force,
            };
            client.stop_vm(req).await?
        }
        VmCommand::Restart(a) => {
            let req = pb::RestartVmRequest {
                name: a.name,
                timeout_seconds: a.timeout,
                force: a.force,
            };
            client.restart_vm(req).await?
        }
        VmCommand::Resize { name, cpus, memory } => {
            client
                .resize_vm(pb::ResizeVmRequest { name, cpus, memory })
                .await?
        }
        VmCommand::Clone {
            name,
            target,
            linked,
            start,
        } => {
            let req = pb::CloneVmRequest {
                name,
                target_name: target,
                linked,
                start,
                labels: Default::default(),
            };
            client.clone_vm(req).await?
        }
        VmCommand::Pause { name } => client.pause_vm(pb::PauseVmRequest { name }).await?,
        VmCommand::Resume { name } => client.resume_vm(pb::ResumeVmRequest { name }).await?,
        VmCommand::CancelMigration { name } => {
            client
                .cancel_migration(pb::CancelMigrationRequest { name })
                .await?
        }
    };
    output::vm(out, &VmView::from(&vm.into_inner()))
}

/// The CreateVm request of `vm create`: from a manifest (`-f`), or from flags.
fn create_request(args: CreateArgs) -> anyhow::Result<pb::CreateVmRequest> {
    let (spec, start) = match &args.file {
        Some(path) => read_manifest(path)?,
        None => {
            let start = args.start;
            (spec_from_flags(args), start)
        }
    };
    Ok(pb::CreateVmRequest {
        spec: Some(spec),
        start,
    })
}

async fn delete(client: &mut Client, out: Format, name: String) -> anyhow::Result<()> {
    client
        .delete_vm(pb::DeleteVmRequest {
            name: name.clone(),
            keep_disks: false,
        })
        .await?;
    if !output::structured(out, &serde_json::json!({"deleted": name}))? {
        println!("vm {name} deleted");
    }
    Ok(())
}

async fn watch(client: &mut Client, out: Format, name: Option<String>) -> anyhow::Result<()> {
    let req = pb::WatchVmsRequest {
        name: name.unwrap_or_default(),
    };
    let mut stream = client.watch_vms(req).await?.into_inner();
    while let Some(event) = stream.next().await {
        output::event(out, &EventView::from(&event?))?;
    }
    Ok(())
}
