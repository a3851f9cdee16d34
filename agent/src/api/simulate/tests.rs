//! The simulator against the rules of real VMs.

use super::*;
use tokio_stream::StreamExt;

fn sim() -> Simulator {
    Simulator::new(SimNode {
        node_name: "sim".into(),
        cpus: 8,
        memory_bytes: 16 << 30,
        boot: Duration::from_millis(10),
    })
}

fn spec(name: &str) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        cpus: 2,
        memory: "1Gi".into(),
        boot: Some(pb::Boot {
            kernel: "/k".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn lifecycle_is_plausible() {
    let s = sim();
    let mut watch = s
        .watch_vms(Request::new(pb::WatchVmsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let req = pb::CreateVmRequest {
        spec: Some(spec("a")),
        start: true,
    };
    let vm = s
        .create_vm(Request::new(req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phase(&vm), pb::VmPhase::Starting);
    assert_eq!(
        s.create_vm(Request::new(req)).await.unwrap_err().code(),
        tonic::Code::AlreadyExists
    );
    let mut seen = Vec::new();
    while seen.last() != Some(&pb::VmPhase::Running) {
        let ev = watch.next().await.unwrap().unwrap();
        seen.push(phase(ev.vm.as_ref().unwrap()));
    }
    assert_eq!(
        seen,
        [
            pb::VmPhase::Pending,
            pb::VmPhase::Starting,
            pb::VmPhase::Running
        ]
    );
    let node = s
        .get_node(Request::new(pb::GetNodeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            node.allocated_cpus,
            node.allocated_memory_bytes,
            node.vm_count
        ),
        (2, 1 << 30, 1)
    );
    let resized = s
        .resize_vm(Request::new(pb::ResizeVmRequest {
            name: "a".into(),
            cpus: Some(4),
            memory: None,
        }))
        .await
        .unwrap_err();
    assert_eq!(
        resized.code(),
        tonic::Code::InvalidArgument,
        "above maxCpus: {resized}"
    );
    let stopped = s
        .stop_vm(Request::new(pb::StopVmRequest {
            name: "a".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(phase(stopped.get_ref()), pb::VmPhase::Stopped);
    assert_eq!(
        s.pause_vm(Request::new(pb::PauseVmRequest { name: "a".into() }))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::FailedPrecondition
    );
    s.delete_vm(Request::new(pb::DeleteVmRequest {
        keep_disks: false,
        name: "a".into(),
    }))
    .await
    .unwrap();
    assert_eq!(
        s.get_vm(Request::new(pb::GetVmRequest { name: "a".into() }))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    let bad = pb::CreateVmRequest {
        spec: Some(spec("Bad_Name")),
        start: false,
    };
    assert_eq!(
        s.create_vm(Request::new(bad)).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
}

/// A simulated VM refuses what a real one refuses, with the same words.
#[tokio::test]
async fn refuses_what_a_real_vm_refuses() {
    let s = sim();
    let name = || "a".to_string();
    let req = pb::CreateVmRequest {
        spec: Some(spec("a")),
        start: false,
    };
    s.create_vm(Request::new(req)).await.unwrap();
    let mut watch = s
        .watch_vms(Request::new(pb::WatchVmsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let refused = s
        .pause_vm(Request::new(pb::PauseVmRequest { name: name() }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        refused.message(),
        "VM \"a\": cannot pause a VM that is Pending"
    );
    s.start_vm(Request::new(pb::StartVmRequest { name: name() }))
        .await
        .unwrap();
    let again = s
        .start_vm(Request::new(pb::StartVmRequest { name: name() }))
        .await
        .unwrap_err();
    assert_eq!(
        again.message(),
        "VM \"a\": cannot start a VM that is Starting"
    );
    let booted = |ev: &pb::VmEvent| phase(ev.vm.as_ref().unwrap()) == pb::VmPhase::Running;
    while !booted(&watch.next().await.unwrap().unwrap()) {}
    s.pause_vm(Request::new(pb::PauseVmRequest { name: name() }))
        .await
        .unwrap();
    let twice = s
        .pause_vm(Request::new(pb::PauseVmRequest { name: name() }))
        .await
        .unwrap_err();
    assert_eq!(
        twice.message(),
        "VM \"a\": cannot pause a VM that is Paused"
    );
    let resume = pb::ResumeVmRequest { name: name() };
    s.resume_vm(Request::new(resume.clone())).await.unwrap();
    assert_eq!(
        s.resume_vm(Request::new(resume)).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
}
