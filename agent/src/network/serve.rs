//! The node network of a running agent: its lease table, kept on disk so addresses survive an
//! agent restart, and the DHCP server on the bridge.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hypersdk_proto::agent::v1 as pb;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use super::dhcp::{self, Server};
use super::{Config, Leases, NetworkError, name_servers, setup};

/// One hour: a guest that moved to another node asks again within half of it.
const LEASE_SECS: u32 = 3600;
const LEASE_FILE: &str = "leases.json";

#[derive(Debug)]
pub struct NodeNet {
    pub config: Config,
    leases: Mutex<Leases>,
    file: PathBuf,
    dns: Vec<Ipv4Addr>,
}

impl NodeNet {
    /// Sets the bridge up (see [`setup::bridge`]) and reads the leases kept in `dir`.
    pub fn open(config: Config, dir: &Path) -> Result<Arc<NodeNet>, NetworkError> {
        setup::bridge(&config)?;
        let io = |what: &Path| {
            let what = what.display().to_string();
            move |source| NetworkError::Io { what, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let file = dir.join(LEASE_FILE);
        let leases = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!("{}: unreadable, starting afresh: {e}", file.display());
                Leases::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Leases::default(),
            Err(e) => return Err(io(&file)(e)),
        };
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        Ok(Arc::new(NodeNet {
            config,
            leases: Mutex::new(leases),
            file,
            dns: name_servers(&resolv),
        }))
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, leases: &Leases) -> Result<(), NetworkError> {
        let tmp = self.file.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(leases).unwrap_or_default();
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &self.file))
            .map_err(|source| NetworkError::Io {
                what: self.file.display().to_string(),
                source,
            })
    }

    /// Reserves an address for each of `macs` (NICs of `vm`), kept on disk before QEMU starts.
    pub fn reserve(&self, vm: &str, macs: &[String]) -> Result<Vec<Ipv4Addr>, NetworkError> {
        let mut leases = self.leases();
        let before = leases.clone();
        let ips = macs
            .iter()
            .map(|mac| leases.reserve(&self.config.subnet, vm, mac))
            .collect::<Result<Vec<_>, _>>()?;
        if *leases != before {
            self.save(&leases)?;
        }
        Ok(ips)
    }

    /// Gives back `vm`'s addresses (the VM was deleted or left this node).
    pub fn release(&self, vm: &str) {
        let mut leases = self.leases();
        if leases.release(vm)
            && let Err(e) = self.save(&leases)
        {
            warn!(vm, "{e}");
        }
    }

    /// The address of `vm`'s first NIC among `macs`, if it has one.
    pub fn address_of(&self, vm: &str, macs: &[String]) -> Option<Ipv4Addr> {
        self.leases().first_of(vm, macs)
    }

    pub fn to_proto(&self) -> pb::NodeNetwork {
        pb::NodeNetwork {
            bridge: self.config.bridge.clone(),
            subnet: self.config.subnet.to_string(),
            gateway: self.config.subnet.gateway().to_string(),
            nat: self.config.nat,
        }
    }

    /// The DHCP socket: port 67 of every address, but bound to the bridge, so it hears the
    /// guests' broadcasts there and nothing from the node's other interfaces. Several agents
    /// (each with its own bridge) can hold one each.
    fn socket(&self) -> Result<tokio::net::UdpSocket, NetworkError> {
        let io = |source| NetworkError::Io {
            what: format!("DHCP socket on {}", self.config.bridge),
            source,
        };
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(io)?;
        s.bind_device(Some(self.config.bridge.as_bytes()))
            .map_err(io)?;
        s.set_reuse_address(true).map_err(io)?;
        s.set_broadcast(true).map_err(io)?;
        s.set_nonblocking(true).map_err(io)?;
        let any = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 67));
        s.bind(&any.into()).map_err(io)?;
        tokio::net::UdpSocket::from_std(s.into()).map_err(io)
    }

    /// Answers DHCP on the bridge for as long as the agent runs.
    pub async fn serve_dhcp(self: Arc<Self>) -> Result<(), NetworkError> {
        let socket = self.socket()?;
        info!(
            bridge = self.config.bridge,
            subnet = %self.config.subnet,
            "DHCP server for guests on the bridge"
        );
        let server = Server {
            subnet: self.config.subnet,
            dns: self.dns.clone(),
            lease_secs: LEASE_SECS,
        };
        let mut buf = vec![0u8; 1500];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    warn!("DHCP receive: {e}");
                    continue;
                }
            };
            let reply = dhcp::decode(&buf[..n]).and_then(|req| {
                let leases = self.leases();
                dhcp::answer(&server, &leases, |vm| vm.to_string(), &req)
            });
            match reply {
                Ok(r) => {
                    let to = SocketAddr::V4(SocketAddrV4::new(r.to, 68));
                    debug!(%from, %to, yiaddr = %r.message.yiaddr(), "DHCP answer");
                    if let Err(e) = socket.send_to(&dhcp::encode(&r.message), to).await {
                        warn!("DHCP answer to {to}: {e}");
                    }
                }
                Err(why) => debug!(%from, "DHCP: {why}"),
            }
        }
    }
}
