//! Makes the node network with iproute2 and iptables: the bridge and its address, forwarding
//! and NAT, and the VMs' taps. Every step is idempotent: an agent restarted over a live network
//! finds it as it left it and changes nothing.

use std::process::Command;

use tracing::info;

use super::{Config, NetworkError, default_route_devices, nat_rules};

fn run(program: &str, args: &[&str]) -> Result<String, NetworkError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| NetworkError::Command {
            command: command.clone(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            command,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn set_forwarding(dev: &str) -> Result<(), NetworkError> {
    let path = format!("/proc/sys/net/ipv4/conf/{dev}/forwarding");
    std::fs::write(&path, "1").map_err(|source| NetworkError::Io { what: path, source })
}

/// The bridge with the subnet's first address, up; forwarding on it; with NAT, forwarding on
/// the uplinks and the masquerade and forward rules. Forwarding is turned on per interface
/// (never `net.ipv4.ip_forward`, which would route between all of the node's interfaces).
pub fn bridge(config: &Config) -> Result<(), NetworkError> {
    let br = config.bridge.as_str();
    if !link_exists(br) {
        run("ip", &["link", "add", "name", br, "type", "bridge"])?;
        info!(bridge = br, "bridge created");
    }
    let address = format!("{}/{}", config.subnet.gateway(), config.subnet.prefix);
    run("ip", &["addr", "replace", &address, "dev", br])?;
    run("ip", &["link", "set", "dev", br, "up"])?;
    set_forwarding(br)?;
    if !config.nat {
        return Ok(());
    }
    let uplinks = if config.uplinks.is_empty() {
        default_route_devices(&run("ip", &["-4", "route", "show", "default"])?)
    } else {
        config.uplinks.clone()
    };
    for dev in &uplinks {
        set_forwarding(dev)?;
    }
    for (table, chain, rule) in nat_rules(config) {
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        let mut check = vec!["-w", "-t", table, "-C", chain];
        check.extend(&rule);
        if run("iptables", &check).is_ok() {
            continue;
        }
        let mut add = vec!["-w", "-t", table];
        // Forward rules go first, before whatever a DROP policy's chain holds.
        if chain == "FORWARD" {
            add.extend(["-I", chain, "1"]);
        } else {
            add.extend(["-A", chain]);
        }
        add.extend(&rule);
        run("iptables", &add)?;
    }
    info!(
        bridge = br,
        subnet = %config.subnet,
        uplinks = uplinks.join(","),
        "NAT to the outside"
    );
    Ok(())
}

/// The VM NIC's tap, on the bridge and up. QEMU opens it by name; the tap is persistent, so it
/// outlives a QEMU process and an agent restart, and is removed with the VM.
pub fn tap(bridge: &str, tap: &str) -> Result<(), NetworkError> {
    if !link_exists(tap) {
        run("ip", &["tuntap", "add", "dev", tap, "mode", "tap"])?;
    }
    run("ip", &["link", "set", "dev", tap, "master", bridge, "up"])?;
    Ok(())
}

pub fn remove_tap(tap: &str) -> Result<(), NetworkError> {
    if link_exists(tap) {
        run("ip", &["link", "del", "dev", tap])?;
    }
    Ok(())
}
