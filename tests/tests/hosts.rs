//! Across hosts: each agent runs in a network namespace of its own with an address on a test
//! bridge, serves gRPC only over mutual TLS on that address and migrates from it
//! (`--migration-address`). The controller (this process, on the bridge's .1) places a VM on a
//! host, hyperctl with an admin certificate reads a host, plaintext from another host is
//! refused, and a VMOperation moves the VM to the other host over a TLS stream while its guest
//! keeps counting.

use std::process::Command;

use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{VMOperation, VMTemplate, VirtualMachine};
use hypersdk_controller::nodes::Agents;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::{self, Address};
use hypersdk_tests::controller::*;
use hypersdk_tests::hosts::Hosts;
use hypersdk_tests::pki::Pki;
use hypersdk_tests::{
    READY_MARKER, bin, count_markers, current_counter, serial, wait_boots, wait_counter_above,
};
use hypersdk_tls::role::Role;
use serde_json::json;

const PORT: u16 = 7443;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_is_placed_on_a_host_and_moves_to_another_over_mutual_tls() {
    let hosts = Hosts::new(&["host-a", "host-b"]);
    let images = images();
    let pki = Pki::new();
    let (nodes, infos) = start_host_nodes(&hosts, &pki, images.path()).await;
    let (a, b) = (&hosts.hosts[0], &hosts.hosts[1]);

    // Plain gRPC from another host (this namespace) finds no plaintext server on the port.
    let plain = Address::Tcp(format!("{}:{PORT}", a.ip));
    let refused = match endpoint::connect(&plain, None).await {
        Err(e) => e.to_string(),
        Ok(mut c) => c
            .get_node(pb::GetNodeRequest {})
            .await
            .expect_err("a plaintext call to a TLS port")
            .to_string(),
    };
    println!("plaintext from another host: {refused}");

    // hyperctl with an admin certificate, from another host.
    let admin = pki.issue("admin", Role::Admin("admin".into()));
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let out = Command::new(bin("hyperctl"))
        .args([
            "--agent",
            &format!("https://{}:{PORT}", a.ip),
            "node",
            "info",
        ])
        .args([
            "--tls-cert",
            &path(&admin.cert),
            "--tls-key",
            &path(&admin.key),
        ])
        .args(["--tls-ca", &path(&admin.ca)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&a.name), "{out:?}");

    let ctl_cert = pki.issue("ctl", Role::Controller("ctl".into()));
    let ctl = Controller::start_with(
        infos,
        settings(),
        Agents::default().with_tls(Some(ctl_cert)),
    );
    ctl.create::<VMTemplate>(guest_template(images.path()))
        .await
        .unwrap();
    ctl.create::<VirtualMachine>(small_vm("roamer", false, Some(&a.name)))
        .await
        .unwrap();
    wait_for(&ctl.vms(), "roamer", BOOT, "Running on host a", |v| {
        phase(v) == Some(VmPhase::Running)
            && v.status.as_ref().unwrap().node_name.as_deref() == Some(&a.name)
    })
    .await;
    let on_a = agent_vm(&nodes[0], "roamer").await.unwrap();
    wait_boots(&on_a, 1, BOOT).await;
    let counter = current_counter(&on_a, BOOT).await;

    // The selector pinned it to host a at placement; the operation names the target.
    let op = json!({"apiVersion": "hypersdk.io/v1alpha1", "kind": "VMOperation",
        "metadata": {"name": "move-roamer"},
        "spec": {"vmRef": {"name": "roamer"}, "operation": "migrate",
                 "migrateSpec": {"targetNode": b.name, "live": true}}});
    ctl.create::<VMOperation>(op).await.unwrap();
    let op = ctl.op_succeeded("move-roamer").await;
    let message = op.status.unwrap().message.unwrap_or_default();
    assert!(message.ends_with(" over TLS"), "{message}");
    let moved = agent_vm(&nodes[1], "roamer").await.unwrap();
    wait_counter_above(&moved, counter, BOOT).await;
    // The target's serial log starts at the hand-over: a boot would print the marker there.
    assert_eq!(
        count_markers(&serial(&moved), READY_MARKER),
        0,
        "the guest rebooted"
    );
    assert_eq!(
        agent_vm(&nodes[0], "roamer").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
}
