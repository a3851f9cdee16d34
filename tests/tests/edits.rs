//! Editing a VirtualMachine's spec, with a real agent and real QEMU: `spec.cpus` within maxCpus
//! is applied to the running VM (same QEMU, the guest sees the vCPU); adding a disk sets
//! RestartRequired naming `spec.disks` and changes nothing until the next start, which makes the
//! VM again on its node with the disk.

use hypersdk_controller::crd::vm::VmPhase;
use hypersdk_controller::crd::{VMTemplate, VirtualMachine};
use hypersdk_tests::controller::*;
use hypersdk_tests::eventually;
use kube::api::{Patch, PatchParams};
use serde_json::json;

async fn patch(ctl: &Controller, spec: serde_json::Value) {
    ctl.vms()
        .patch(
            "edited",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpus_are_resized_live_and_a_disk_waits_for_the_next_start() {
    let images = images();
    let node = start_node("node-1", images.path(), &[]).await;
    let ctl = Controller::start(&[&node], settings());
    ctl.create::<VMTemplate>(guest_template(images.path()))
        .await
        .unwrap();
    let mut vm = small_vm("edited", false, None);
    vm["spec"]["maxCpus"] = json!(2);
    ctl.create::<VirtualMachine>(vm).await.unwrap();
    wait_for(&ctl.vms(), "edited", BOOT, "Running", |v| {
        phase(v) == Some(VmPhase::Running)
    })
    .await;
    let pid = agent_vm(&node, "edited").await.unwrap().status.unwrap().pid;

    patch(&ctl, json!({"cpus": 2})).await;
    let resized = eventually(BOOT, "the guest sees 2 vCPUs", async || {
        let vm = agent_vm(&node, "edited").await.map_err(|e| e.to_string())?;
        let s = vm.status.clone().unwrap();
        match s.cpus == 2 && s.guest_cpus == 2 {
            true => Ok(s),
            false => Err(format!("{s:?}")),
        }
    })
    .await;
    assert_eq!(resized.pid, pid, "resized live, not restarted");
    let v = wait_for(&ctl.vms(), "edited", BOOT, "no restart needed", |v| {
        cond(v, "RestartRequired").is_some_and(|c| c.status == "False")
    })
    .await;
    assert_eq!(phase(&v), Some(VmPhase::Running));

    let disks = json!([{"name": "root"}, {"name": "scratch", "size": "64Mi"}]);
    patch(&ctl, json!({"disks": disks})).await;
    let v = wait_for(&ctl.vms(), "edited", BOOT, "RestartRequired", |v| {
        cond(v, "RestartRequired").is_some_and(|c| c.status == "True")
    })
    .await;
    let message = cond(&v, "RestartRequired").unwrap().message.clone();
    assert!(message.contains("spec.disks"), "{message}");
    let same = agent_vm(&node, "edited").await.unwrap();
    assert_eq!(
        same.status.unwrap().pid,
        pid,
        "a disk edit does not restart the VM"
    );
    assert_eq!(same.spec.unwrap().disks.len(), 1);

    patch(&ctl, json!({"running": false})).await;
    wait_for(&ctl.vms(), "edited", BOOT, "Stopped", |v| {
        phase(v) == Some(VmPhase::Stopped)
    })
    .await;
    patch(&ctl, json!({"running": true})).await;
    let v = wait_for(&ctl.vms(), "edited", BOOT, "Running with the edit", |v| {
        phase(v) == Some(VmPhase::Running)
            && cond(v, "RestartRequired").is_some_and(|c| c.status == "False")
    })
    .await;
    assert_eq!(phase(&v), Some(VmPhase::Running));
    let again = agent_vm(&node, "edited").await.unwrap();
    let names: Vec<String> = again
        .spec
        .unwrap()
        .disks
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["root", "scratch"]);
    assert_ne!(again.status.unwrap().pid, pid);
}
