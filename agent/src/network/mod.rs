//! The node network: a Linux bridge with the first address of a private subnet, NAT to the
//! outside, a tap per `bridge` NIC, and an address for each NIC from the agent's DHCP server.
//!
//! This file is the pure part: the subnet, tap names, the lease table and the iptables rules.
//! [`setup`] makes the bridge, rules and taps; [`serve`] answers DHCP (see [`dhcp`]);
//! [`forward`] connects to a guest port for `PortForward`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod dhcp;
pub mod forward;
pub mod plug;
pub mod serve;
pub mod setup;

/// Linux's IFNAMSIZ less the NUL.
const MAX_IFNAME: usize = 15;

/// An IPv4 subnet in CIDR form, e.g. `10.254.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("{0:?} is not an IPv4 subnet in CIDR form (e.g. 10.254.0.0/24)")]
    Syntax(String),
    #[error("{0:?}: the prefix must be between /16 and /29 (room for a gateway and guests)")]
    Prefix(String),
    #[error("{0:?} has host bits set; did you mean {1}?")]
    HostBits(String, Subnet),
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Subnet, SubnetError> {
        let syntax = || SubnetError::Syntax(s.to_string());
        let (ip, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if !(16..=29).contains(&prefix) {
            return Err(SubnetError::Prefix(s.to_string()));
        }
        let subnet = Subnet {
            network: Ipv4Addr::from(u32::from(ip) & mask(prefix)),
            prefix,
        };
        if subnet.network != ip {
            return Err(SubnetError::HostBits(s.to_string(), subnet));
        }
        Ok(subnet)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl Subnet {
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }

    /// The bridge's own address: the first one.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.network)
    }

    /// The addresses guests may get: after the gateway, before the broadcast address.
    fn guest_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.gateway()) + 1..u32::from(self.broadcast())).map(Ipv4Addr::from)
    }
}

/// Checks a bridge or uplink name as Linux takes it, so it is safe in argv and /proc paths.
pub fn check_ifname(flag: &str, name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Flag {
            flag: flag.to_string(),
            why: format!(
                "{name:?} is not an interface name (1-{MAX_IFNAME} letters, digits, '-', '_', '.')"
            ),
        })
    }
}

/// The node network of this agent, from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub bridge: String,
    pub subnet: Subnet,
    /// Masquerade traffic from the subnet to elsewhere, through `uplinks`.
    pub nat: bool,
    /// Interfaces NATed traffic leaves and comes back by (forwarding is turned on for these
    /// and the bridge only); empty: the interfaces of the default routes.
    pub uplinks: Vec<String>,
}

/// Why the node network could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{flag}: {why}")]
    Flag { flag: String, why: String },
    #[error("`{command}` failed: {why}")]
    Command { command: String, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the node network's {0} addresses are all leased")]
    Full(Subnet),
}

/// A tap's name for NIC `nic` of the VM whose files are in `vm_dir`: unique per agent and VM
/// (two agents on one host may both have a VM of that name, e.g. during a migration), stable
/// across agent restarts, and within IFNAMSIZ.
pub fn tap_name(vm_dir: &std::path::Path, nic: usize) -> String {
    // FNV-1a, 64 bits: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in vm_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .chain(&[nic as u8])
    {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100000001b3);
    }
    format!("hs{:012x}", h & 0xffff_ffff_ffff)
}

/// The `bridge` NICs of `spec`: their index (as QEMU numbers NICs) and MAC address.
pub fn bridge_nics(spec: &crate::spec::VmSpec) -> Vec<(usize, String)> {
    spec.networks
        .iter()
        .enumerate()
        .filter(|(_, n)| n.backend == crate::spec::NetworkBackend::Bridge)
        .map(|(i, _)| (i, crate::spec::argv::mac_address(&spec.name, i)))
        .collect()
}

/// Refuses `bridge` NICs on an agent without a node network, naming the first one.
pub fn check_bridge_nics(
    spec: &crate::spec::VmSpec,
    have_network: bool,
) -> Result<(), crate::spec::FieldError> {
    match bridge_nics(spec).first() {
        Some((i, _)) if !have_network => Err(crate::spec::FieldError::new(
            format!("spec.networks[{i}]"),
            "a bridge (pod-network) NIC needs a node network, and this agent has none (flag --bridge)",
        )),
        _ => Ok(()),
    }
}

/// One address given out, to the NIC with this MAC of VM `vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub vm: String,
    pub ip: Ipv4Addr,
}

/// Who has which address. Addresses are reserved per NIC before the VM starts and kept until
/// it is deleted, so a guest gets the same address on every boot and the agent knows it
/// before the guest asks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leases {
    /// By MAC address, lowercase `52:54:00:..`.
    pub by_mac: BTreeMap<String, Lease>,
}

impl Leases {
    /// The address of `mac` (reserved now if it has none): the first free one of `subnet`.
    pub fn reserve(
        &mut self,
        subnet: &Subnet,
        vm: &str,
        mac: &str,
    ) -> Result<Ipv4Addr, NetworkError> {
        if let Some(l) = self.by_mac.get(mac)
            && subnet.contains(l.ip)
            && l.vm == vm
        {
            return Ok(l.ip);
        }
        let taken: std::collections::BTreeSet<_> = self
            .by_mac
            .iter()
            .filter(|(m, _)| *m != mac)
            .map(|(_, l)| l.ip)
            .collect();
        let ip = subnet
            .guest_addresses()
            .find(|ip| !taken.contains(ip))
            .ok_or(NetworkError::Full(*subnet))?;
        self.by_mac.insert(
            mac.to_string(),
            Lease {
                vm: vm.to_string(),
                ip,
            },
        );
        Ok(ip)
    }

    /// Gives back every address of `vm`; whether there were any.
    pub fn release(&mut self, vm: &str) -> bool {
        let before = self.by_mac.len();
        self.by_mac.retain(|_, l| l.vm != vm);
        before != self.by_mac.len()
    }

    pub fn get(&self, mac: &str) -> Option<&Lease> {
        self.by_mac.get(mac)
    }

    /// The first address of `vm` (its first `bridge` NIC's).
    pub fn first_of(&self, vm: &str, macs: &[String]) -> Option<Ipv4Addr> {
        macs.iter()
            .find_map(|m| self.by_mac.get(m).filter(|l| l.vm == vm).map(|l| l.ip))
    }
}

/// The comment every iptables rule of this bridge carries, so rules are found again (and can be
/// removed) by bridge.
pub fn rule_comment(bridge: &str) -> String {
    format!("hypersdk:{bridge}")
}

/// The iptables rules for NAT on `config`'s bridge, as (table, chain, rule) without the
/// action: the masquerade rule, and forwarding from the bridge and back to it for established
/// connections (inserted first, so a FORWARD chain that drops by default lets them through).
pub fn nat_rules(config: &Config) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let subnet = config.subnet.to_string();
    let comment = rule_comment(&config.bridge);
    let tagged = |mut rule: Vec<String>| {
        rule.extend(["-m", "comment", "--comment", &comment].map(String::from));
        rule
    };
    let owned = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        (
            "nat",
            "POSTROUTING",
            tagged(owned(&["-s", &subnet, "!", "-d", &subnet]))
                .into_iter()
                .chain(owned(&["-j", "MASQUERADE"]))
                .collect(),
        ),
        (
            "filter",
            "FORWARD",
            tagged(owned(&["-i", &config.bridge]))
                .into_iter()
                .chain(owned(&["-j", "ACCEPT"]))
                .collect(),
        ),
        (
            "filter",
            "FORWARD",
            tagged(owned(&[
                "-o",
                &config.bridge,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
            ]))
            .into_iter()
            .chain(owned(&["-j", "ACCEPT"]))
            .collect(),
        ),
    ]
}

/// Name servers to hand to guests: the node's, from resolv.conf, except loopback ones (a
/// resolver on the node's 127.0.0.53 is not reachable from a guest).
pub fn name_servers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

/// The interfaces of the default routes in `ip -4 route show default` output.
pub fn default_route_devices(ip_route: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in ip_route.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "dev")
            && let Some(dev) = words.get(i + 1)
            && !out.iter().any(|d| d == dev)
        {
            out.push(dev.to_string());
        }
    }
    out
}

/// An IPv4 or IPv6 address with its prefix, as the guest agent reports them.
pub fn with_prefix(ip: &str, prefix: i64) -> String {
    format!("{ip}/{prefix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_name_their_addresses() {
        let s: Subnet = "10.254.3.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 254, 3, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 254, 3, 255));
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 255, 0));
        assert!(s.contains(Ipv4Addr::new(10, 254, 3, 77)));
        assert!(!s.contains(Ipv4Addr::new(10, 254, 4, 1)));
        assert_eq!(s.to_string(), "10.254.3.0/24");
        assert!(matches!(
            "10.254.3.1/24".parse::<Subnet>(),
            Err(SubnetError::HostBits(..))
        ));
        assert!(matches!(
            "10.0.0.0/8".parse::<Subnet>(),
            Err(SubnetError::Prefix(..))
        ));
        for bad in ["10.0.0.0", "x/24", "10.0.0.0/x", "::1/64"] {
            assert!(
                matches!(bad.parse::<Subnet>(), Err(SubnetError::Syntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn leases_are_stable_per_nic_and_freed_with_the_vm() {
        let s: Subnet = "10.9.0.0/29".parse().unwrap(); // guests: .2 to .6
        let mut l = Leases::default();
        let a = l.reserve(&s, "a", "52:54:00:00:00:01").unwrap();
        let b = l.reserve(&s, "b", "52:54:00:00:00:02").unwrap();
        assert_eq!(
            (a, b),
            ("10.9.0.2".parse().unwrap(), "10.9.0.3".parse().unwrap())
        );
        assert_eq!(l.reserve(&s, "a", "52:54:00:00:00:01").unwrap(), a);
        for (i, mac) in ["03", "04", "05"].iter().enumerate() {
            l.reserve(&s, &format!("c{i}"), &format!("52:54:00:00:00:{mac}"))
                .unwrap();
        }
        assert!(matches!(
            l.reserve(&s, "d", "52:54:00:00:00:09"),
            Err(NetworkError::Full(_))
        ));
        assert!(l.release("a"));
        assert!(!l.release("a"));
        assert_eq!(l.reserve(&s, "d", "52:54:00:00:00:09").unwrap(), a);
        assert_eq!(
            l.first_of("b", &["52:54:00:00:00:02".into()]),
            Some(b),
            "the agent knows the address before the guest asks"
        );
        // A lease from another subnet (the flag changed) is given anew.
        let other: Subnet = "10.8.0.0/24".parse().unwrap();
        assert_eq!(
            l.reserve(&other, "b", "52:54:00:00:00:02").unwrap(),
            "10.8.0.2".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn tap_names_fit_ifnamsiz_and_differ_by_agent_vm_and_nic() {
        let a = tap_name(std::path::Path::new("/var/lib/hypersdk/vms/web"), 0);
        assert!(a.len() <= MAX_IFNAME, "{a}");
        assert!(a.starts_with("hs"));
        assert_eq!(
            a,
            tap_name(std::path::Path::new("/var/lib/hypersdk/vms/web"), 0)
        );
        assert_ne!(
            a,
            tap_name(std::path::Path::new("/var/lib/hypersdk/vms/web"), 1)
        );
        assert_ne!(a, tap_name(std::path::Path::new("/srv/other/vms/web"), 0));
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("--bridge", "hsdk0").is_ok());
        for bad in ["", "a b", "a/b", "sixteen-chars-xx", "..", "x;y"] {
            let e = check_ifname("--bridge", bad).unwrap_err();
            assert!(e.to_string().starts_with("--bridge: "), "{e}");
        }
    }

    #[test]
    fn nat_rules_are_tagged_with_the_bridge() {
        let c = Config {
            bridge: "hsdk0".into(),
            subnet: "10.254.0.0/24".parse().unwrap(),
            nat: true,
            uplinks: vec![],
        };
        let rules = nat_rules(&c);
        assert_eq!(rules.len(), 3);
        let (table, chain, masq) = &rules[0];
        assert_eq!((*table, *chain), ("nat", "POSTROUTING"));
        assert_eq!(
            masq.join(" "),
            "-s 10.254.0.0/24 ! -d 10.254.0.0/24 -m comment --comment hypersdk:hsdk0 -j MASQUERADE"
        );
        assert!(
            rules
                .iter()
                .all(|(_, _, r)| r.contains(&"hypersdk:hsdk0".to_string()))
        );
    }

    #[test]
    fn reads_name_servers_and_default_routes() {
        let conf = "# x\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver ::1\nsearch x\n";
        assert_eq!(name_servers(conf), vec![Ipv4Addr::new(192, 0, 2, 53)]);
        let routes = "default via 192.0.2.1 dev eth0 proto static\ndefault via 10.0.0.1 dev wlan0 metric 600\n";
        assert_eq!(default_route_devices(routes), vec!["eth0", "wlan0"]);
    }
}
