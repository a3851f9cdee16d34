//! The node network (real QEMU, the test guest): two VMs on one agent's bridge get their
//! addresses from the agent's DHCP server, the host reaches each, they reach each other, NAT
//! takes them out (to a namespace standing for the outside), `status.interfaces` comes from the
//! guest agent, and `hyperctl vm port-forward` reaches a guest port from a loopback port.
//!
//! Everything runs on a bridge and subnet of the test's own (see `netlab`), removed after.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::netlab::NodeNetwork;
use hypersdk_tests::{Agent, Client, bin, create, get, serial, wait_boots};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_stream::StreamExt;

const BOOT: Duration = Duration::from_secs(120);
/// DHCP, then the guest agent's next look (every 5 s once connected).
const ADDRESS: Duration = Duration::from_secs(90);
const COMMAND: Duration = Duration::from_secs(60);

fn on_bridge(mut spec: pb::VmSpec) -> pb::VmSpec {
    spec.networks = vec![pb::Network {
        name: "default".into(),
        backend: Some(pb::network::Backend::Bridge(pb::BridgeNetwork {})),
    }];
    spec
}

/// Types `command` into the VM's serial console shell and returns the output up to `expect`.
async fn run_in_guest(client: &mut Client, name: &str, command: &str, expect: &str) -> String {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let line = format!("\n{command}\n").into_bytes();
    tx.send(pb::ConsoleInput {
        name: name.into(),
        data: line,
    })
    .await
    .unwrap();
    let mut out = client
        .console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut seen = String::new();
    let read = async {
        while let Some(msg) = out.next().await {
            seen.push_str(&String::from_utf8_lossy(&msg.unwrap().data));
            if seen.contains(expect) {
                return true;
            }
        }
        false
    };
    let found = tokio::time::timeout(COMMAND, read).await.unwrap_or(false);
    assert!(
        found,
        "{name}: `{command}` did not print {expect:?}; console:\n{seen}"
    );
    drop(tx);
    seen
}

/// `GET /` over HTTP/1.0 to `to`: the whole answer.
async fn http_get(to: std::net::SocketAddr) -> String {
    let get = async {
        let mut conn = tokio::net::TcpStream::connect(to).await?;
        conn.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply).await?;
        std::io::Result::Ok(reply)
    };
    match tokio::time::timeout(COMMAND, get).await {
        Ok(Ok(reply)) => reply,
        other => panic!("GET http://{to}/: {other:?}"),
    }
}

#[tokio::test]
async fn guests_on_the_node_bridge_get_addresses_reach_each_other_and_the_outside() {
    let net = NodeNetwork::with_outside();
    let agent = net.agent("net-1", &[]).await;
    let mut client = agent.client().await;

    let node = client
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    let facts = node.network.expect("the node reports its network");
    assert_eq!(
        (facts.bridge.as_str(), facts.subnet.as_str()),
        (net.bridge.as_str(), net.subnet.as_str())
    );
    assert_eq!(facts.gateway, net.gateway.to_string());

    let t0 = Instant::now();
    let a = create(&mut client, on_bridge(agent.small_spec("a")), true).await;
    let b = create(&mut client, on_bridge(agent.small_spec("b")), true).await;
    wait_boots(&a, 1, BOOT).await;
    wait_boots(&b, 1, BOOT).await;
    let ip_a = net.guest_address(&mut client, "a", ADDRESS).await;
    let ip_b = net.guest_address(&mut client, "b", ADDRESS).await;
    println!("DHCP: a={ip_a} b={ip_b} ({:?} after create)", t0.elapsed());
    assert_ne!(ip_a, ip_b);
    for (vm, ip) in [(&a, ip_a), (&b, ip_b)] {
        let log = serial(vm);
        assert!(
            log.contains(&format!("HYPERSDK-IP eth0 {ip}")),
            "serial:\n{log}"
        );
    }
    // The interface carries the NIC's MAC, and the spec's network name.
    let vm_a = get(&mut client, "a").await;
    let nic = &vm_a.status.unwrap().interfaces[0];
    assert_eq!(
        (nic.network.as_str(), nic.interface_name.as_str()),
        ("default", "eth0")
    );
    assert!(nic.mac.starts_with("52:54:00:"), "{nic:?}");
    // hyperctl shows them too.
    let shown = Command::new(bin("hyperctl"))
        .arg("--agent")
        .arg(agent.address.to_string())
        .args(["-o", "json", "vm", "get", "a"])
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    let nics = &shown["status"]["interfaces"];
    assert_eq!(nics[0]["name"], "eth0", "{shown}");
    assert!(
        nics[0]["ipAddresses"]
            .to_string()
            .contains(&ip_a.to_string()),
        "{shown}"
    );

    // The host reaches both guests: their web servers answer, each with its own name.
    for (name, ip) in [("a", ip_a), ("b", ip_b)] {
        let reply = http_get((ip, 80).into()).await;
        assert!(
            reply.contains(&format!("HYPERSDK-HTTP {name} {ip}")),
            "{reply}"
        );
    }
    // a reaches b: ping, and b's web server, which names b (the DHCP server named it).
    let out = run_in_guest(
        &mut client,
        "a",
        &format!("ping -c 1 -W 5 {ip_b} >/dev/null && wget -q -O - http://{ip_b}/ && echo VM-TO-VM-$((20+1))"),
        "VM-TO-VM-21",
    )
    .await;
    assert!(
        out.contains(&format!("HYPERSDK-HTTP b {ip_b}")),
        "console:\n{out}"
    );
    // NAT: the outside has no route back to the guests' subnet; only masquerading gets the
    // answer back.
    let outside = net.outside.as_ref().unwrap().address;
    run_in_guest(
        &mut client,
        "b",
        &format!("ping -c 1 -W 5 {outside} >/dev/null && echo NAT-OK-$((1+2))"),
        "NAT-OK-3",
    )
    .await;

    // port-forward: a loopback port of the host to a's port 80.
    let mut pf = tokio::process::Command::new(bin("hyperctl"))
        .arg("--agent")
        .arg(agent.address.to_string())
        .args(["vm", "port-forward", "a", "0:80"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(pf.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(COMMAND, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let local: std::net::SocketAddr = first
        .strip_prefix("Forwarding from ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("port-forward said {first:?}"));
    assert!(local.ip().is_loopback(), "{local}");
    for _ in 0..2 {
        let reply = http_get(local).await;
        assert!(
            reply.contains(&format!("HYPERSDK-HTTP a {ip_a}")),
            "reply: {reply}"
        );
    }
    pf.kill().await.unwrap();

    // Deleting a VM removes its tap and gives its address back.
    let tap_dir = std::path::Path::new("/sys/class/net");
    let taps = || -> Vec<String> {
        std::fs::read_dir(tap_dir.join(&net.bridge).join("brif"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(taps().len(), 2, "one tap per VM on the bridge");
    client
        .delete_vm(pb::DeleteVmRequest {
            name: "a".into(),
            keep_disks: false,
        })
        .await
        .unwrap();
    assert_eq!(taps().len(), 1, "a's tap is gone: {:?}", taps());
    let leases = std::fs::read_to_string(agent.data_dir().join("network/leases.json")).unwrap();
    assert!(
        !leases.contains(&format!("\"{ip_a}\"")),
        "a's lease is given back: {leases}"
    );
    assert!(leases.contains(&format!("\"{ip_b}\"")), "{leases}");
}

#[tokio::test]
async fn bridge_nics_and_port_forward_are_refused_with_the_reason() {
    // An agent without a node network refuses bridge NICs, naming the field.
    let agent = Agent::start("net-none").await;
    let mut client = agent.client().await;
    let err = client
        .create_vm(pb::CreateVmRequest {
            spec: Some(on_bridge(agent.small_spec("x"))),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("spec.networks[0]: "),
        "{}",
        err.message()
    );
    assert!(err.message().contains("--bridge"), "{}", err.message());

    // port-forward to a VM that is not running.
    create(&mut client, agent.small_spec("u"), false).await;
    let hello = pb::PortForwardInput {
        name: "u".into(),
        port: 22,
        data: Vec::new(),
    };
    let err = client
        .port_forward(tokio_stream::iter([hello.clone()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("not running"), "{}", err.message());
    let zero = pb::PortForwardInput { port: 0, ..hello };
    let err = client
        .port_forward(tokio_stream::iter([zero]))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("port: "), "{}", err.message());
    let hyperctl = |args: &[&str]| {
        Command::new(bin("hyperctl"))
            .arg("--agent")
            .arg(agent.address.to_string())
            .args(args)
            .output()
            .unwrap()
    };
    let out = hyperctl(&["vm", "port-forward", "u", "22"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOCAL:GUEST"));

    // The bad-agent flags are refused at start with the flag named.
    let out = Command::new(bin("hypersdk-agent"))
        .args(["--bridge", "no such bridge", "--data-dir"])
        .arg(agent.dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--bridge: "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin("hypersdk-agent"))
        .args([
            "--bridge",
            "hstx",
            "--bridge-subnet",
            "10.1.2.3/24",
            "--data-dir",
        ])
        .arg(agent.dir.path().join("other"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--bridge-subnet: ") && stderr.contains("10.1.2.0/24"),
        "{stderr}"
    );
}

/// Through the controller: the seed VirtualMachine (unchanged, `type: pod-network`) on a node
/// with a node network gets a bridge NIC, and its status shows the address the guest got, with
/// NetworkReady true once the guest reports it (and not before it runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_vms_pod_network_is_the_node_network_with_its_address_in_the_status() {
    use hypersdk_controller::crd::Reason;
    use hypersdk_controller::crd::vm::VmPhase;
    use hypersdk_tests::controller::{
        BOOT, Controller, agent_vm, cond, images, phase, settings, start_node, wait_for,
    };

    let net = NodeNetwork::new();
    let images = images();
    let flags = net.agent_flags();
    let mut flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    flags.extend(["--allocatable-memory", "32Gi"]); // the seed VM has 8Gi
    let node = start_node("node-net", images.path(), &flags).await;
    let ctl = Controller::start(&[&node], settings());
    ctl.create_seed_vm(images.path()).await;
    let vm = wait_for(&ctl.vms(), "my-vm", BOOT + ADDRESS, "NetworkReady", |v| {
        cond(v, "NetworkReady").is_some_and(|c| c.status == "True")
    })
    .await;
    assert_eq!(phase(&vm), Some(VmPhase::Running));
    let ready = cond(&vm, "NetworkReady").unwrap().clone();
    assert_eq!(ready.reason, Reason::AddressAssigned.as_str(), "{ready:?}");
    let on_agent = agent_vm(&node, "my-vm").await.unwrap();
    let nets = on_agent.spec.unwrap().networks;
    assert!(
        matches!(nets[0].backend, Some(pb::network::Backend::Bridge(_))),
        "{nets:?}"
    );
    let status = vm.status.clone().unwrap();
    let nic = status
        .interfaces
        .iter()
        .find(|i| i.name.as_deref() == Some(nets[0].name.as_str()))
        .unwrap_or_else(|| panic!("{:?}", status.interfaces));
    let ip = nic.ip_address.clone().unwrap();
    let prefix = net.subnet.rsplit_once('.').unwrap().0;
    assert!(ip.starts_with(prefix), "{ip} in {}", net.subnet);
    assert!(ready.message.contains(&ip), "{ready:?}");
    // The host reaches the guest at the address the status shows.
    let reply = http_get((ip.parse::<Ipv4Addr>().unwrap(), 80).into()).await;
    assert!(reply.contains("HYPERSDK-HTTP"), "{reply}");
}
