//! What a VM's status says of its network: the guest's interfaces, and NetworkReady, from
//! what the agent runs (the NICs of its spec) and what the guest agent reports.

use hypersdk_proto::agent::v1 as pb;

use crate::crd::Reason;
use crate::crd::vm::Interface;

fn without_prefix(ip: &str) -> String {
    ip.split('/').next().unwrap_or(ip).to_string()
}

/// The guest's interfaces in the VirtualMachine's status.
pub fn interfaces(status: &pb::VmStatus) -> Vec<Interface> {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    status
        .interfaces
        .iter()
        .map(|i| {
            let ips: Vec<String> = i.ip_addresses.iter().map(|a| without_prefix(a)).collect();
            Interface {
                name: some(&i.network),
                interface_name: some(&i.interface_name),
                mac: some(&i.mac),
                ip_address: ips.iter().find(|a| !a.contains(':')).cloned(),
                ip_addresses: ips,
            }
        })
        .collect()
}

/// NetworkReady: true while the VM runs and each NIC works: a user-networking NIC always
/// (QEMU answers its DHCP), a node-network NIC once the guest reports an IPv4 address on it.
pub fn readiness(vm: &pb::Vm, live: bool) -> (bool, Reason, String) {
    let nets = vm
        .spec
        .as_ref()
        .map(|s| s.networks.as_slice())
        .unwrap_or(&[]);
    let status = vm.status.clone().unwrap_or_default();
    if nets.is_empty() {
        return (
            true,
            Reason::Attached,
            "the VM has no network interfaces".into(),
        );
    }
    if !live {
        return (
            false,
            Reason::NotRunning,
            "no NIC is attached while the VM does not run".into(),
        );
    }
    let mut waiting = Vec::new();
    let mut ready = Vec::new();
    for n in nets {
        if !matches!(n.backend, Some(pb::network::Backend::Bridge(_))) {
            ready.push(format!("{}: NAT through QEMU user networking", n.name));
            continue;
        }
        let v4 = status
            .interfaces
            .iter()
            .filter(|i| i.network == n.name)
            .flat_map(|i| i.ip_addresses.iter().map(move |a| (i, a)))
            .find(|(_, a)| !a.contains(':'));
        match v4 {
            Some((i, a)) => ready.push(format!(
                "{}: {a} ({}) on the node network",
                n.name, i.interface_name
            )),
            None if !status.agent_connected => waiting.push(format!(
                "{}: no address known yet (no guest agent answers to report one)",
                n.name
            )),
            None => waiting.push(format!(
                "{}: the guest has no IPv4 address on it yet",
                n.name
            )),
        }
    }
    if !waiting.is_empty() {
        return (false, Reason::WaitingForAddress, waiting.join("; "));
    }
    let all_user = nets
        .iter()
        .all(|n| !matches!(n.backend, Some(pb::network::Backend::Bridge(_))));
    let reason = if all_user {
        Reason::UserNetworking
    } else {
        Reason::AddressAssigned
    };
    (true, reason, ready.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(backend: pb::network::Backend, nics: Vec<pb::GuestInterface>, qga: bool) -> pb::Vm {
        pb::Vm {
            spec: Some(pb::VmSpec {
                networks: vec![pb::Network {
                    name: "default".into(),
                    backend: Some(backend),
                }],
                ..Default::default()
            }),
            status: Some(pb::VmStatus {
                interfaces: nics,
                agent_connected: qga,
                ..Default::default()
            }),
        }
    }

    fn eth0(ips: &[&str]) -> pb::GuestInterface {
        pb::GuestInterface {
            network: "default".into(),
            interface_name: "eth0".into(),
            mac: "52:54:00:01:02:03".into(),
            ip_addresses: ips.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_node_network_nic_is_ready_once_the_guest_has_an_address() {
        let bridge = || pb::network::Backend::Bridge(pb::BridgeNetwork {});
        let (ok, reason, msg) = readiness(&vm(bridge(), vec![], false), true);
        assert_eq!((ok, reason), (false, Reason::WaitingForAddress));
        assert!(msg.contains("no guest agent"), "{msg}");
        let only_v6 = vm(bridge(), vec![eth0(&["fe80::1/64"])], true);
        assert_eq!(readiness(&only_v6, true).1, Reason::WaitingForAddress);
        let up = vm(bridge(), vec![eth0(&["fe80::1/64", "10.254.0.2/24"])], true);
        let (ok, reason, msg) = readiness(&up, true);
        assert_eq!((ok, reason), (true, Reason::AddressAssigned));
        assert!(msg.contains("10.254.0.2/24 (eth0)"), "{msg}");
        assert_eq!(readiness(&up, false).1, Reason::NotRunning);
    }

    #[test]
    fn user_networking_is_ready_while_the_vm_runs() {
        let user = vm(
            pb::network::Backend::User(pb::UserNetwork {}),
            vec![],
            false,
        );
        assert_eq!(
            readiness(&user, true),
            (
                true,
                Reason::UserNetworking,
                "default: NAT through QEMU user networking".into()
            )
        );
    }

    #[test]
    fn interfaces_carry_addresses_without_prefixes() {
        let s = pb::VmStatus {
            interfaces: vec![eth0(&["fe80::1/64", "10.254.0.2/24"])],
            ..Default::default()
        };
        let i = &interfaces(&s)[0];
        assert_eq!(i.name.as_deref(), Some("default"));
        assert_eq!(i.ip_address.as_deref(), Some("10.254.0.2"));
        assert_eq!(i.ip_addresses, ["fe80::1", "10.254.0.2"]);
    }
}
