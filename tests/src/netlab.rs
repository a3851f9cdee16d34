//! A node network of a test's own: a bridge with a free private /24 for one agent, and an
//! "outside" network namespace to check NAT against. Nothing touches the machine's own
//! interfaces or addresses; everything made here is removed on drop, iptables rules included.

use std::net::Ipv4Addr;
use std::process::Command;

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A /24 in 10.200.0.0-10.239.255.0 that no address or route of this machine uses yet, picked
/// at random so tests running side by side (and other worktrees' tests) do not collide.
fn free_subnet() -> (u8, u8) {
    let used = sh("ip", &["-4", "route", "show", "table", "all"]).unwrap_or_default()
        + &sh("ip", &["-4", "addr"]).unwrap_or_default();
    let seed = std::process::id() as u64 ^ rand_seed();
    for i in 0..4000u64 {
        let n = (seed.wrapping_add(i.wrapping_mul(7919))) % (40 * 256);
        let (b, c) = (200 + (n / 256) as u8, (n % 256) as u8);
        if !used.contains(&format!("10.{b}.{c}.")) {
            return (b, c);
        }
    }
    panic!("no free 10.200-239.x.0/24 subnet for a test bridge");
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The bridge (made by the agent given [`NodeNetwork::agent_flags`]) and its subnet.
pub struct NodeNetwork {
    pub bridge: String,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    /// With NAT: the namespace standing for the outside world, and its address.
    pub outside: Option<Outside>,
}

pub struct Outside {
    pub netns: String,
    /// The host side of the veth pair into the namespace: the agent's --bridge-uplink.
    pub uplink: String,
    /// The namespace's address, which has no route back to the bridge's subnet: only NAT
    /// makes its answers reach a guest.
    pub address: Ipv4Addr,
}

impl NodeNetwork {
    /// A bridge name and free subnet; without NAT.
    pub fn new() -> NodeNetwork {
        let (b, c) = free_subnet();
        let tag = format!("{:06x}", rand_seed() as u32 & 0xffffff);
        NodeNetwork {
            bridge: format!("hst{tag}"),
            subnet: format!("10.{b}.{c}.0/24"),
            gateway: Ipv4Addr::new(10, b, c, 1),
            outside: None,
        }
    }

    /// With an "outside": a network namespace joined by a veth pair on another free /30, the
    /// agent's uplink, so that NAT can be checked without leaving this machine.
    pub fn with_outside() -> NodeNetwork {
        let mut net = NodeNetwork::new();
        let tag = &net.bridge[3..];
        let (b, c) = free_subnet();
        let netns = format!("hsto{tag}");
        let uplink = format!("hsu{tag}");
        let inner = format!("hsi{tag}");
        let host_ip = format!("10.{b}.{c}.1/30");
        let ns_ip = format!("10.{b}.{c}.2/30");
        sh("ip", &["netns", "add", &netns]).unwrap();
        sh(
            "ip",
            &[
                "link", "add", &uplink, "type", "veth", "peer", "name", &inner,
            ],
        )
        .unwrap();
        sh("ip", &["link", "set", &inner, "netns", &netns]).unwrap();
        sh("ip", &["addr", "add", &host_ip, "dev", &uplink]).unwrap();
        sh("ip", &["link", "set", &uplink, "up"]).unwrap();
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &netns, "ip"];
            all.extend_from_slice(args);
            sh("ip", &all).unwrap();
        };
        in_ns(&["addr", "add", &ns_ip, "dev", &inner]);
        in_ns(&["link", "set", &inner, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        net.outside = Some(Outside {
            netns,
            uplink,
            address: Ipv4Addr::new(10, b, c, 2),
        });
        net
    }

    /// An agent on this network (plus `extra` flags).
    pub async fn agent(&self, name: &str, extra: &[&str]) -> crate::Agent {
        let flags = self.agent_flags();
        let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        flags.extend_from_slice(extra);
        crate::Agent::start_with(name, &flags).await
    }

    /// The IPv4 address on this network of VM `name`'s NIC on network `default`, as its guest
    /// agent reports it in the VM's status; waits up to `limit` for it.
    pub async fn guest_address(
        &self,
        client: &mut crate::Client,
        name: &str,
        limit: std::time::Duration,
    ) -> Ipv4Addr {
        let prefix = self.subnet.rsplit_once('.').unwrap().0.to_string() + ".";
        crate::eventually(limit, &format!("{name}'s address from DHCP"), async || {
            let vm = crate::get(client, name).await;
            let nics = vm.status.unwrap_or_default().interfaces;
            nics.iter()
                .filter(|n| n.network == "default")
                .flat_map(|n| &n.ip_addresses)
                .find(|ip| ip.starts_with(&prefix))
                .and_then(|ip| ip.split('/').next()?.parse::<Ipv4Addr>().ok())
                .ok_or_else(|| format!("interfaces: {nics:?}"))
        })
        .await
    }

    /// The agent flags for this network.
    pub fn agent_flags(&self) -> Vec<String> {
        let mut flags = vec![
            "--bridge".to_string(),
            self.bridge.clone(),
            "--bridge-subnet".into(),
            self.subnet.clone(),
        ];
        match &self.outside {
            Some(o) => flags.extend(["--bridge-uplink".into(), o.uplink.clone()]),
            None => flags.extend(["--bridge-nat".into(), "false".into()]),
        }
        flags
    }
}

impl Default for NodeNetwork {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        let comment = format!("hypersdk:{}", self.bridge);
        for table in ["nat", "filter"] {
            let rules = sh("iptables", &["-w", "-t", table, "-S"]).unwrap_or_default();
            for rule in rules.lines().filter(|r| r.contains(&comment)) {
                let Some(rest) = rule.strip_prefix("-A ") else {
                    continue;
                };
                let mut args = vec!["-w", "-t", table, "-D"];
                // `-S` quotes the comment (which has no spaces): the quotes are not part of it.
                args.extend(rest.split_whitespace().map(|w| w.trim_matches('"')));
                let _ = sh("iptables", &args);
            }
        }
        // The agent's taps (left by VMs not deleted), then the bridge.
        let ports = sh("ip", &["-o", "link", "show", "master", &self.bridge]).unwrap_or_default();
        for line in ports.lines() {
            if let Some(name) = line.split(':').nth(1) {
                let name = name.trim().split('@').next().unwrap_or("");
                let _ = sh("ip", &["link", "del", "dev", name]);
            }
        }
        let _ = sh("ip", &["link", "del", "dev", &self.bridge]);
        if let Some(o) = &self.outside {
            let _ = sh("ip", &["link", "del", "dev", &o.uplink]);
            let _ = sh("ip", &["netns", "del", &o.netns]);
        }
    }
}
