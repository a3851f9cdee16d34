//! Hosts for multi-host tests: each a network namespace of its own with one address on a test
//! bridge (a veth pair per host), so agents listen, migrate and get cut off as on separate
//! machines. The bridge and its subnet are the test's own (10.251.N.0/24, the test process's
//! choice); nothing listens on the real host's addresses. The test process stays in the root
//! namespace, where the bridge's address (.1) is the controller's side.

use std::net::Ipv4Addr;
use std::process::Command;

/// One host: a network namespace and its address.
pub struct Host {
    /// The namespace, also the host's node name.
    pub name: String,
    pub ip: Ipv4Addr,
    /// The root-namespace end of the host's veth pair: down, the host is cut off.
    veth: String,
}

pub struct Hosts {
    pub hosts: Vec<Host>,
    bridge: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A /24 of 10.251.0.0/16 no interface of this machine is in now.
fn free_subnet() -> u8 {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr"])
        .output()
        .unwrap();
    let used = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = (std::process::id() % 250) as u8;
    (0..250u8)
        .map(|k| start.wrapping_add(k) % 250 + 1)
        .find(|n| !used.contains(&format!("10.251.{n}.")))
        .expect("a free subnet in 10.251.0.0/16")
}

impl Hosts {
    /// `names.len()` hosts on a new bridge, each with lo and its address up.
    pub fn new(names: &[&str]) -> Hosts {
        let id = std::process::id();
        let subnet = free_subnet();
        let bridge = format!("hsb{id}");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let mut hosts = Hosts {
            hosts: vec![],
            bridge: bridge.clone(),
        };
        ip(&[
            "addr",
            "add",
            &format!("10.251.{subnet}.1/24"),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{name}-{id}");
            let veth = format!("hsv{id}x{i}");
            let peer = format!("hsp{id}x{i}");
            let addr = Ipv4Addr::new(10, 251, subnet, 10 + i as u8);
            ip(&["netns", "add", &ns]);
            hosts.hosts.push(Host {
                name: ns.clone(),
                ip: addr,
                veth: veth.clone(),
            });
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", &ns]);
            ip(&["link", "set", &veth, "master", &bridge, "up"]);
            let in_ns = |args: &[&str]| ip(&[&["-n", &ns], args].concat());
            in_ns(&["link", "set", &peer, "name", "eth0"]);
            in_ns(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            in_ns(&["link", "set", "eth0", "up"]);
            in_ns(&["link", "set", "lo", "up"]);
        }
        hosts
    }
}

impl Host {
    /// Cuts the host off the bridge: nothing reaches it, it reaches nothing.
    pub fn cut(&self) {
        ip(&["link", "set", &self.veth, "down"]);
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.veth, "up"]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Best effort: a namespace whose processes still run goes once they exit.
        for h in &self.hosts {
            let _ = Command::new("ip").args(["link", "del", &h.veth]).status();
            let _ = Command::new("ip").args(["netns", "del", &h.name]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
