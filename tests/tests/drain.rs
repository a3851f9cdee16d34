//! Draining, with real agents and real QEMU: two VMs with `evictionStrategy: LiveMigrate` run on
//! a node that is then made unschedulable. Both move to the other node by live migration, each
//! through a VMOperation of its own, and their guests keep counting without a reboot.

use std::time::Duration;

use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{VMTemplate, VirtualMachine};
use hypersdk_controller::nodes::AgentInfo;
use hypersdk_controller::nodes::Agents;
use hypersdk_tests::controller::*;
use hypersdk_tests::{
    READY_MARKER, count_markers, current_counter, serial, wait_boots, wait_counter_above,
};
use serde_json::json;

fn nodes_with(infos: &[AgentInfo], drained: &str) -> Vec<AgentInfo> {
    infos
        .iter()
        .map(|i| AgentInfo {
            unschedulable: i.node == drained,
            ..i.clone()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_live_migrates_its_vms_away() {
    let images = images();
    let nodes = [
        start_node("node-1", images.path(), &[]).await,
        start_node("node-2", images.path(), &[]).await,
    ];
    let infos: Vec<AgentInfo> = nodes.iter().map(info).collect();
    // node-2 takes nothing at first: both VMs land on node-1.
    let ctl = Controller::start_with(nodes_with(&infos, "node-2"), settings(), Agents::default());
    ctl.create::<VMTemplate>(guest_template(images.path()))
        .await
        .unwrap();
    let names = ["web-1", "web-2"];
    let mut counters = Vec::new();
    for name in names {
        let mut vm = small_vm(name, false, None);
        vm["spec"]["highAvailability"]["evictionStrategy"] = json!("LiveMigrate");
        ctl.create::<VirtualMachine>(vm).await.unwrap();
        wait_for(&ctl.vms(), name, BOOT, "Running on node-1", |v| {
            phase(v) == Some(VmPhase::Running)
                && v.status.as_ref().unwrap().node_name.as_deref() == Some("node-1")
        })
        .await;
        let on_agent = agent_vm(&nodes[0], name).await.unwrap();
        wait_boots(&on_agent, 1, BOOT).await;
        counters.push(current_counter(&on_agent, BOOT).await);
    }

    ctl.agents.sync(nodes_with(&infos, "node-1"));
    for (name, counter) in names.into_iter().zip(counters) {
        wait_for(&ctl.vms(), name, BOOT, "Running on node-2", |v| {
            phase(v) == Some(VmPhase::Running)
                && v.status.as_ref().unwrap().node_name.as_deref() == Some("node-2")
        })
        .await;
        let op = ctl.op_succeeded(&format!("evict-{name}-node-1")).await;
        assert!(op.spec.migrate_spec.unwrap().live);
        let moved = agent_vm(&nodes[1], name).await.unwrap();
        wait_counter_above(&moved, counter, Duration::from_secs(60)).await;
        assert_eq!(
            count_markers(&serial(&moved), READY_MARKER),
            0,
            "{name} did not boot on node-2"
        );
        assert_eq!(
            agent_vm(&nodes[0], name).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
