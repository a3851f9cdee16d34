//! Agent start-up: checks the configuration, probes the node, loads VMs, serves gRPC.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hypersdk_proto::agent::v1::agent_service_server::{AgentService, AgentServiceServer};
use hypersdk_proto::endpoint::Address;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tracing::info;

use hypersdk_tls::authorize::AuthorizeLayer;
use hypersdk_tls::server::{ServerTls, ServerTlsError};

use crate::api::service::Service;
use crate::api::simulate::Simulator;
use crate::config::Config;
use crate::context::Context;
use crate::fence::hold::Hold;
use crate::host::accel;
use crate::host::cgroup::{CgroupError, Cgroups};
use crate::host::kvm;
use crate::host::launch::{HostLaunch, LaunchError, Launcher};
use crate::host::node::{self, NodeFacts};
use crate::host::paths::PathPolicy;
use crate::image::cache::ImageCache;
use crate::snapshot::files::SnapshotDirs;
use crate::store::Store;
use crate::vm::registry::Vms;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("--data-dir {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The directory's path appears inside QEMU options, which take ',' as a separator.
    #[error("--data-dir {}: must not contain ','", .0.display())]
    Comma(PathBuf),
    #[error("--image-dir: {0}")]
    ImageDir(std::io::Error),
    #[error("--qemu {0}: {1}")]
    Qemu(PathBuf, std::io::Error),
    #[error(transparent)]
    Accel(#[from] accel::AccelError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("--listen {addr}: {source}")]
    Listen {
        addr: Address,
        #[source]
        source: std::io::Error,
    },
    #[error("--listen {addr}: {} exists and is not a socket", path.display())]
    NotASocket { addr: Address, path: PathBuf },
    /// Without TLS, anyone who reaches the port controls the VMs.
    #[error(
        "--listen {0}: plain gRPC is only served on loopback addresses; use https:// with --tls-cert, --tls-key and --tls-ca"
    )]
    NotLoopback(Address),
    /// The stream carries the guest's memory: readable and forgeable by anyone on the path.
    #[error(
        "--migration-address {0}: QEMU's migration stream runs without TLS only on loopback addresses; give --tls-cert, --tls-key and --tls-ca"
    )]
    PlainMigration(std::net::IpAddr),
    #[error("gRPC server task: {0}")]
    ServerTask(#[from] tokio::task::JoinError),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("--listen {0}: https:// needs --tls-cert, --tls-key and --tls-ca")]
    NoTlsFiles(Address),
    #[error(transparent)]
    Tls(#[from] ServerTlsError),
    #[error("node network: {0}")]
    Network(#[from] crate::network::NetworkError),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

fn data_dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> StartupError {
    let path = path.to_path_buf();
    move |source| StartupError::DataDir { path, source }
}

fn prepare_data_dir(dir: &Path) -> Result<PathBuf, StartupError> {
    std::fs::create_dir_all(dir).map_err(data_dir_error(dir))?;
    let dir = dir.canonicalize().map_err(data_dir_error(dir))?;
    // The data dir appears inside QEMU options (-qmp unix:PATH,server=on): no commas.
    if dir.to_string_lossy().contains(',') {
        return Err(StartupError::Comma(dir));
    }
    Ok(dir)
}

/// Runs the agent until `shutdown` resolves. VMs keep running after it returns.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let data_dir = prepare_data_dir(&config.data_dir)?;
    let tls = config.tls.files().map(ServerTls::load).transpose()?;
    if tls.is_none() && !config.migration_address.is_loopback() {
        return Err(StartupError::PlainMigration(config.migration_address));
    }
    if let Some(node) = config.simulated_node() {
        info!(
            node = node.node_name,
            "agent starting with simulated VMs (--simulate)"
        );
        let service = AgentServiceServer::new(Simulator::new(node));
        return serve(&config, &data_dir, tls, service, shutdown).await;
    }
    let (ctx, facts) = context(&config, &data_dir)?;
    let fence = ctx.fence.clone();
    let vms = Arc::new(Vms::load(ctx).await.map_err(data_dir_error(&data_dir))?);
    tokio::spawn(crate::fence::hold::watch(fence, vms.clone()));
    let service = AgentServiceServer::new(Service::new(vms, facts, tls.clone()))
        .max_decoding_message_size(16 << 20);
    serve(&config, &data_dir, tls, service, shutdown).await
}

/// What every VM of this agent shares, and the node's facts for GetNode.
fn context(config: &Config, data_dir: &Path) -> Result<(Arc<Context>, NodeFacts), StartupError> {
    let store = Store::open(data_dir).map_err(data_dir_error(data_dir))?;
    // VMs may use files under <data-dir>/images, never the agent's own state under vms/.
    let own_images = data_dir.join("images");
    std::fs::create_dir_all(&own_images).map_err(data_dir_error(data_dir))?;
    // The cache and the VMs' disks are files VMs use too: allowed wherever they are.
    let image_cache = prepare_data_dir(
        &config
            .image_cache
            .clone()
            .unwrap_or_else(|| own_images.join("cache")),
    )?;
    let disk_dir = prepare_data_dir(
        &config
            .disk_dir
            .clone()
            .unwrap_or_else(|| own_images.join("disks")),
    )?;
    let policy = PathPolicy::new(
        [own_images.clone(), image_cache.clone(), disk_dir.clone()]
            .into_iter()
            .chain(config.image_dirs.iter().cloned()),
    )
    .map_err(StartupError::ImageDir)?;
    let launcher = match config.host_launch {
        false => Launcher::Local,
        true => Launcher::Host(HostLaunch::prepare(config.host_pid, &config.vm_cgroup)?),
    };
    let qemu = QemuFacts::find(&launcher, &config.qemu)?;
    let kvm = kvm::probe(Path::new("/sys/module"));
    let selection = accel::select(config.accel, &kvm)?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let node_name = config.node_name.clone().unwrap_or_else(|| hostname.clone());
    info!(
        node = node_name,
        qemu = %qemu.path.display(),
        version = qemu.version,
        memory_hotplug = if qemu.virtio_mem { "virtio-mem" } else { "pc-dimm (no virtio-mem-pci)" },
        accel = selection.accel.as_str(),
        reason = selection.reason,
        "agent starting"
    );
    let (cgroups, cgroups_facts) = match config.host_launch {
        false => cgroups(&config.cgroup_parent),
        true => {
            let why = CgroupError::HostLaunch(config.vm_cgroup.clone());
            let facts = format!("none: {why}");
            (Err(why), facts)
        }
    };
    let facts = NodeFacts {
        node_name: node_name.clone(),
        hostname,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        qemu_version: qemu.version.clone(),
        accel: selection.clone(),
        kvm,
        cgroups: cgroups_facts,
    };
    // Also no commas: the memory file goes to QEMU as a `file:PATH` migration URI.
    let snapshot_dir = prepare_data_dir(
        &config
            .snapshot_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("snapshots")),
    )?;
    let snapshots = SnapshotDirs::new(snapshot_dir);
    snapshots.remove_unfinished();
    let qemu_img = Launcher::Local
        .find_program(&config.qemu_img)
        .unwrap_or_else(|| config.qemu_img.clone());
    let images = ImageCache::open(&image_cache, &qemu_img).map_err(data_dir_error(&image_cache))?;
    let ctx = Context {
        node_name,
        images: Arc::new(images),
        disk_dir,
        qemu_img,
        pause_for_copy: config.migration_copy.pauses(selection.accel),
        qemu: qemu.path,
        launcher,
        qemu_version: qemu.version,
        accel: selection,
        policy,
        images_dir: own_images,
        store,
        snapshots,
        cgroups,
        events: tokio::sync::broadcast::channel(1024).0,
        tls: config.tls.files(),
        migration_address: config.migration_address,
        migration_ports: config.migration_ports.clone(),
        allocatable_memory: config.allocatable_memory.unwrap_or(node::memory().0),
        virtio_mem: qemu.virtio_mem,
        fence: Arc::new(Hold::load(data_dir)),
        ovmf_dir: config.ovmf_dir.clone(),
        network: network(config, data_dir)?,
        consoles: Default::default(),
    };
    Ok((Arc::new(ctx), facts))
}

/// The node network (--bridge): the bridge set up and its DHCP server running.
fn network(
    config: &Config,
    data_dir: &Path,
) -> Result<Option<Arc<crate::network::serve::NodeNet>>, StartupError> {
    let Some(net) = config.network()? else {
        info!("no node network (--bridge): VMs' bridge networks are refused");
        return Ok(None);
    };
    let net = crate::network::serve::NodeNet::open(net, &data_dir.join("network"))?;
    let dhcp = net.clone();
    tokio::spawn(async move {
        if let Err(e) = dhcp.serve_dhcp().await {
            tracing::error!("DHCP server for the node network: {e}");
        }
    });
    Ok(Some(net))
}

/// The node's QEMU: where it is, its version, and whether it has virtio-mem.
struct QemuFacts {
    path: PathBuf,
    version: String,
    virtio_mem: bool,
}

impl QemuFacts {
    fn find(launcher: &Launcher, program: &Path) -> Result<QemuFacts, StartupError> {
        let path = launcher.find_program(program).ok_or_else(|| {
            StartupError::Qemu(
                program.to_path_buf(),
                std::io::Error::new(std::io::ErrorKind::NotFound, "not found"),
            )
        })?;
        let version =
            node::qemu_version(launcher, &path).map_err(|e| StartupError::Qemu(path.clone(), e))?;
        let virtio_mem = node::has_device(launcher, &path, "virtio-mem-pci");
        Ok(QemuFacts {
            path,
            version,
            virtio_mem,
        })
    }
}

/// Per-VM cgroups under `parent` ("" turns them off), and what `node info` says of them.
fn cgroups(parent: &str) -> (Result<Cgroups, CgroupError>, String) {
    let cgroups = match parent {
        "" => Err(CgroupError::Disabled),
        parent => Cgroups::detect(parent),
    };
    let facts = match &cgroups {
        Ok(cg) => format!("per VM, under {}", cg.path("").display()),
        Err(why) => format!("none: {why}"),
    };
    info!(cgroups = facts);
    (cgroups, facts)
}

/// Serves `service` (with gRPC health and reflection, each call authorized by the role of the
/// client's certificate on TLS connections) on every --listen address until `shutdown`.
async fn serve<S: AgentService>(
    config: &Config,
    data_dir: &Path,
    tls: Option<Arc<ServerTls>>,
    service: AgentServiceServer<S>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let listen = if config.listen.is_empty() {
        vec![Address::Unix(data_dir.join("agent.sock"))]
    } else {
        config.listen.clone()
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServiceServer<S>>().await;
    // Both reflection versions: some clients (grpcio-reflection, older grpcurl) speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hypersdk_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let router = tonic::transport::Server::builder()
        .layer(AuthorizeLayer)
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(service);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut servers = tokio::task::JoinSet::new();
    for addr in listen {
        let router = router.clone();
        let mut stop = stop_rx.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match &addr {
            Address::Unix(path) => {
                remove_stale_socket(&addr, path)?;
                let listener = UnixListener::bind(path).map_err(listen_error(&addr))?;
                use std::os::unix::fs::PermissionsExt;
                // Local debugging socket, unauthenticated: the agent's user only.
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
                info!(%addr, "listening");
                servers.spawn(
                    router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped),
                );
            }
            Address::Tcp(hostport) => {
                // Refused before binding where the address says it all; names after.
                if hostport
                    .rsplit_once(':')
                    .and_then(|(h, _)| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
                    .is_some_and(|ip| !ip.is_loopback())
                {
                    return Err(StartupError::NotLoopback(addr));
                }
                let listener = TcpListener::bind(hostport)
                    .await
                    .map_err(listen_error(&addr))?;
                let local = listener.local_addr().map_err(listen_error(&addr))?;
                if !local.ip().is_loopback() {
                    return Err(StartupError::NotLoopback(addr));
                }
                info!(%addr, %local, "listening");
                servers.spawn(
                    router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped),
                );
            }
            Address::Tls(hostport) => {
                let tls = tls
                    .clone()
                    .ok_or_else(|| StartupError::NoTlsFiles(addr.clone()))?;
                let listener = TcpListener::bind(hostport)
                    .await
                    .map_err(listen_error(&addr))?;
                let local = listener.local_addr().map_err(listen_error(&addr))?;
                info!(%addr, %local, "listening (mutual TLS)");
                servers.spawn(router.serve_with_incoming_shutdown(tls.incoming(listener), stopped));
            }
        }
    }
    while let Some(result) = servers.join_next().await {
        result??;
    }
    info!("agent stopped; VMs keep running");
    Ok(())
}

fn listen_error(addr: &Address) -> impl FnOnce(std::io::Error) -> StartupError {
    let addr = addr.clone();
    move |source| StartupError::Listen { addr, source }
}

/// A socket file left by an earlier agent is removed; any other file is an error.
fn remove_stale_socket(addr: &Address, path: &Path) -> Result<(), StartupError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(listen_error(addr))
        }
        Ok(_) => Err(StartupError::NotASocket {
            addr: addr.clone(),
            path: path.to_path_buf(),
        }),
        Err(_) => match path.parent() {
            Some(parent) => std::fs::create_dir_all(parent).map_err(listen_error(addr)),
            None => Ok(()),
        },
    }
}
