//! The VM actor against a scripted QMP peer: the real registry, actor, store and process
//! handling, with a shell script standing in for QEMU and this file answering its monitor.
//! Checks the lifecycle's decisions in well under a second per case, without a guest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;

use crate::context::Context;
use crate::error::AgentError;
use crate::host::accel::{Accel, Selection};
use crate::host::cgroup::CgroupError;
use crate::host::paths::PathPolicy;
use crate::snapshot::files::SnapshotDirs;
use crate::spec::RestartPolicy;
use crate::store::Store;
use crate::vm::actor::Op;
use crate::vm::registry::Vms;

/// Stands in for QEMU: runs until the peer writes an exit code to `exit` in the VM's directory
/// (QEMU's working directory), as QEMU ends when its guest powers off. It also ends once that
/// directory is gone (the test is over), since VMs outlive whoever started them.
const FAKE_QEMU: &str = "#!/bin/sh\nwhile [ ! -e exit ]; do\n  [ -d \"$PWD\" ] || exit 0\n  sleep 0.01\ndone\nread code < exit\nrm -f exit\nexit \"$code\"\n";

/// How the scripted QEMU behaves.
#[derive(Clone, Copy)]
struct Script {
    /// The guest powers off when the ACPI button is pressed.
    obeys_power_button: bool,
}

struct Node {
    vms: Vms,
    events: broadcast::Receiver<pb::VmEvent>,
    _dir: tempfile::TempDir,
}

async fn node(script: Script) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("kernel"), b"").unwrap();
    let qemu = root.join("qemu");
    std::fs::write(&qemu, FAKE_QEMU).unwrap();
    let exec = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
    std::fs::set_permissions(&qemu, exec).unwrap();
    let store = Store::open(&root.join("data")).unwrap();
    let (events, rx) = broadcast::channel(256);
    let ctx = Arc::new(Context {
        node_name: "node-t".into(),
        qemu,
        qemu_version: "10.0.0".into(),
        qemu_img: "qemu-img".into(),
        launcher: Default::default(),
        accel: Selection {
            accel: Accel::Tcg,
            reason: "test".into(),
        },
        policy: PathPolicy::new([images.clone()]).unwrap(),
        images: Arc::new(
            crate::image::cache::ImageCache::open(&images.join("cache"), "qemu-img".as_ref())
                .unwrap(),
        ),
        disk_dir: images.join("disks"),
        images_dir: images,
        store,
        snapshots: SnapshotDirs::new(root.join("snapshots")),
        cgroups: Err(CgroupError::Disabled),
        events,
        tls: None,
        migration_address: std::net::Ipv4Addr::LOCALHOST.into(),
        migration_ports: "49152-49153".parse().unwrap(),
        pause_for_copy: true,
        allocatable_memory: 1 << 30,
        virtio_mem: true,
        fence: Arc::new(crate::fence::hold::Hold::load(root)),
        ovmf_dir: root.join("ovmf"),
        network: None,
        consoles: Default::default(),
    });
    let vm_dir = ctx.store.vm_dir("vm1");
    tokio::spawn(serve(vm_dir.join("qmp.sock"), vm_dir, script));
    Node {
        vms: Vms::load(ctx).await.unwrap(),
        events: rx,
        _dir: dir,
    }
}

/// A node with one VM running under the scripted QEMU.
async fn running(obeys_power_button: bool, policy: RestartPolicy) -> Node {
    let mut n = node(Script { obeys_power_button }).await;
    n.vms.create(spec(&n.kernel(), policy), true).await.unwrap();
    n.event("Running").await;
    n
}

fn spec(kernel: &Path, policy: RestartPolicy) -> pb::VmSpec {
    let mut s = crate::spec::tests::minimal("vm1");
    s.boot.as_mut().unwrap().kernel = kernel.to_path_buf();
    s.restart_policy = policy;
    pb::VmSpec::from(&s)
}

impl Node {
    fn kernel(&self) -> PathBuf {
        self.vms.context().images_dir.join("kernel")
    }

    /// Waits for an event about the VM with this reason; returns it.
    async fn event(&mut self, reason: &str) -> pb::VmEvent {
        let wait = async {
            loop {
                let ev = self.events.recv().await.unwrap();
                if ev.reason == reason {
                    return ev;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("no {reason} event"))
    }

    async fn call(&self, op: Op) -> Result<pb::Vm, AgentError> {
        self.vms.call("vm1", op).await
    }

    /// Makes the stand-in QEMU exit with `code`.
    fn exit_qemu(&self, code: i32) {
        let dir = self.vms.context().store.vm_dir("vm1");
        std::fs::write(dir.join("exit"), format!("{code}\n")).unwrap();
    }
}

fn status(vm: &pb::Vm) -> (pb::VmPhase, String) {
    let s = vm.status.clone().unwrap();
    (s.phase(), s.message)
}

fn stop(timeout_ms: u64) -> Op {
    Op::Stop {
        timeout: Duration::from_millis(timeout_ms),
        force: false,
    }
}

#[tokio::test]
async fn pause_and_resume_follow_the_state_machine() {
    let n = running(true, RestartPolicy::Never).await;
    let paused = n.call(Op::Pause).await.unwrap();
    assert_eq!(status(&paused).0, pb::VmPhase::Paused);
    let again = n.call(Op::Pause).await.unwrap_err();
    assert_eq!(
        again.to_string(),
        "VM \"vm1\": cannot pause a VM that is Paused"
    );
    assert!(matches!(again, AgentError::Conflict { .. }));
    let running = n.call(Op::Resume).await.unwrap();
    assert_eq!(status(&running).0, pb::VmPhase::Running);
    assert!(n.call(Op::Resume).await.is_err(), "resume a running VM");
    let err = n.call(Op::Start).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "VM \"vm1\": cannot start a VM that is Running"
    );
}

#[tokio::test]
async fn a_guest_that_powers_off_is_stopped() {
    let n = running(true, RestartPolicy::Always).await;
    let stopped = n.call(stop(20_000)).await.unwrap();
    assert_eq!(
        status(&stopped),
        (pb::VmPhase::Stopped, "stopped".to_string())
    );
    let vm = n.vms.get("vm1").await.unwrap();
    assert_eq!(
        vm.status.unwrap().next_restart_at_ms,
        0,
        "a stop is no crash"
    );
}

#[tokio::test]
async fn a_guest_that_ignores_the_power_button_is_ended_at_the_timeout() {
    let n = running(false, RestartPolicy::Never).await;
    let stopped = n.call(stop(300)).await.unwrap();
    assert_eq!(
        status(&stopped),
        (
            pb::VmPhase::Stopped,
            "guest did not power off in time; QEMU ended".to_string()
        )
    );
}

#[tokio::test]
async fn a_forced_stop_ends_qemu_without_a_timeout() {
    let n = running(false, RestartPolicy::Never).await;
    let forced = Op::Stop {
        timeout: Duration::from_secs(30),
        force: true,
    };
    let stopped = n.call(forced).await.unwrap();
    assert_eq!(
        status(&stopped),
        (pb::VmPhase::Stopped, "stopped".to_string())
    );
}

#[tokio::test]
async fn a_crash_is_restarted_by_policy_with_its_cause_shown() {
    let mut n = running(true, RestartPolicy::Always).await;
    n.exit_qemu(3);
    let failed = n.event("ProcessExited").await;
    assert_eq!(
        status(failed.vm.as_ref().unwrap()),
        (pb::VmPhase::Failed, "QEMU exited with status 3".to_string())
    );
    let scheduled = n.event("RestartScheduled").await;
    let s = scheduled.vm.unwrap().status.unwrap();
    assert_eq!(
        s.message,
        "QEMU exited with status 3; restarting in 0ns (restart policy Always)"
    );
    assert!(s.next_restart_at_ms > 0);
    // The second crash backs off (1 s), and its note replaces the first one's.
    n.event("Running").await;
    n.exit_qemu(4);
    let again = n
        .event("RestartScheduled")
        .await
        .vm
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        again.message,
        "QEMU exited with status 4; restarting in 1s (restart policy Always)"
    );
    assert_eq!(again.restart_count, 1);
    // A stop cancels the scheduled restart.
    let stopped = n.call(stop(1000)).await.unwrap();
    assert_eq!(
        status(&stopped),
        (
            pb::VmPhase::Stopped,
            "restart cancelled by a stop request".to_string()
        )
    );
}

#[tokio::test]
async fn delete_removes_the_vm_with_its_reason() {
    let mut n = running(true, RestartPolicy::Always).await;
    n.vms.delete("vm1", false).await.unwrap();
    let deleted = n.event("Deleted").await;
    assert_eq!(deleted.r#type(), pb::EventType::Deleted);
    assert!(!n.vms.context().store.vm_dir("vm1").exists());
}

// ----- the scripted QMP peer ------------------------------------------------------------------

/// Serves QMP at `path` for every QEMU the agent starts: the agent removes the socket before
/// each launch, so the peer binds again whenever the file is gone.
async fn serve(path: PathBuf, vm_dir: PathBuf, script: Script) {
    loop {
        while path.exists() || !vm_dir.exists() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let Ok(listener) = UnixListener::bind(&path) else {
            continue;
        };
        loop {
            tokio::select! {
                conn = listener.accept() => {
                    if let Ok((stream, _)) = conn {
                        tokio::spawn(session(stream, vm_dir.clone(), script));
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(2)) => {
                    if !path.exists() {
                        break;
                    }
                }
            }
        }
    }
}

/// One QMP connection: the greeting, then an answer to each command.
async fn session(stream: UnixStream, vm_dir: PathBuf, script: Script) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut out = vec![json!({"QMP": {"version": {}, "capabilities": []}})];
    let mut running = true;
    loop {
        for v in out.drain(..) {
            if w.write_all(format!("{v}\n").as_bytes()).await.is_err() {
                return;
            }
        }
        let Ok(Some(line)) = lines.next_line().await else {
            return;
        };
        let cmd: Value = serde_json::from_str(&line).unwrap();
        let name = cmd["execute"].as_str().unwrap_or_default();
        let (ret, event) = answer(name, &mut running);
        out.push(json!({"return": ret, "id": cmd["id"]}));
        out.extend(event.map(|e| json!({"event": e, "data": {}, "timestamp": {}})));
        if name == "system_powerdown" && script.obeys_power_button {
            out.push(json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}, "timestamp": {}}));
            std::fs::write(vm_dir.join("exit"), "0\n").unwrap();
        }
    }
}

/// What the scripted QEMU answers to `command`, and the event it sends after.
fn answer(command: &str, running: &mut bool) -> (Value, Option<&'static str>) {
    match command {
        "query-status" => {
            let status = if *running { "running" } else { "paused" };
            (
                json!({"status": status, "running": *running, "singlestep": false}),
                None,
            )
        }
        "query-cpus-fast" => (
            json!([{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]",
                    "thread-id": 1, "target": "x86_64",
                    "props": {"core-id": 0, "socket-id": 0, "thread-id": 0}}]),
            None,
        ),
        "query-memory-size-summary" => (json!({"base-memory": 64 << 20}), None),
        "stop" => {
            *running = false;
            (json!({}), Some("STOP"))
        }
        "cont" => {
            *running = true;
            (json!({}), Some("RESUME"))
        }
        _ => (json!({}), None),
    }
}
