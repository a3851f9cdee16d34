//! Test support: the test guest, agents started as real processes, and waiting helpers.
//!
//! Everything here drives real binaries: `hypersdk-agent` and `hyperctl` from this workspace's
//! target directory, QEMU from the system, the guest built by `images/guest/build.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_client::AgentServiceClient;
use hypersdk_proto::endpoint::{self, Address};
use tonic::transport::Channel;

pub mod browser;
pub mod controller;
pub mod hosts;
mod http;
pub mod link;
pub mod netlab;
pub mod pki;
mod raw;
pub mod s3;
pub use http::ImageServer;
pub use raw::RawQemu;

pub type Client = AgentServiceClient<Channel>;

/// Agent flags of benchmarks: see [`Agent::for_bench`].
pub const BENCH_FLAGS: &[&str] = &["--cgroup-parent", ""];

/// Printed by the test guest once userspace runs.
pub const READY_MARKER: &str = "HYPERSDK-GUEST-READY";
/// Printed by the test guest once a second: `HYPERSDK-COUNTER <n>`.
pub const COUNTER_MARKER: &str = "HYPERSDK-COUNTER ";
/// Kernel command line the test guest boots with.
/// `tsc=reliable` keeps the TSC clock under TCG with several vCPUs (HPET is far slower);
/// `no_timer_check` skips the boot-time IO-APIC timer check, which a TCG guest starved of CPU
/// fails ("IO-APIC + timer doesn't work", a panic); `cryptomgr.notests` skips crypto self-tests.
/// `nohz=off highres=off`: each vCPU's local APIC timer ticks periodically instead of being
/// re-armed one shot at a time. Under TCG on a loaded host, a guest's idle vCPU once stopped
/// getting timer interrupts for good (RCU stalls naming one CPU with a single timer softirq since
/// boot, the guest agent never starting); a periodic timer re-raises a missed interrupt.
/// `pti=on`: under TCG, QEMU 10's migration dirty tracking misses guest writes made through a
/// TLB entry that outlives a bitmap sync, and a migrated guest came out with stale kernel
/// memory (oopses, list corruption) in a fair share of runs on a loaded machine. Page-table
/// isolation reloads CR3 on every return to user space, which flushes QEMU's TLB and narrows
/// that window (1 failure in 14 agent migrations remained: an idle vCPU stays in the kernel),
/// so the agent now pauses TCG guests for the copy; raw QEMU in the migration benchmark still
/// migrates live. KVM tracks dirty pages in the host and needs none of it.
pub const GUEST_CMDLINE: &str = "console=ttyS0 quiet memhp_default_state=online_movable tsc=reliable no_timer_check nohz=off highres=off pti=on cryptomgr.notests";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The workspace's binary `name`, built by `cargo build --bins` (the README's test command).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> or target/<profile>/<bench>
    let candidates = exe.ancestors().skip(1).take(2).map(|d| d.join(name));
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!("{name} not built: run `cargo build --workspace --bins` first");
}

/// The test guest: kernel, initrd and a pristine disk image.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

/// Runs the image build `script` for `out` (the script caches its result), one test process at a
/// time.
fn build_image(script: &str, out: &Path) {
    std::fs::create_dir_all(repo_root().join("target")).unwrap();
    let lock = std::fs::File::create(out.with_extension("lock")).unwrap();
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map(|guard| {
            let status = Command::new(repo_root().join(script))
                .arg(out)
                .stdout(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("running {script}: {e}"));
            assert!(status.success(), "{script} failed");
            drop(guard);
        })
        .map_err(|(_, e)| e)
        .expect("locking the image build");
}

/// Builds the guest if needed (cached by the build script; serialised across test processes).
pub fn guest() -> Guest {
    let out = repo_root().join("target/guest");
    build_image("images/guest/build.sh", &out);
    Guest {
        kernel: out.join("vmlinuz"),
        initrd: out.join("initrd.img"),
        disk: out.join("disk.qcow2"),
    }
}

/// The Debian cloud image (images/cloud), built if needed.
pub fn cloud_image() -> PathBuf {
    let out = repo_root().join("target/cloud");
    build_image("images/cloud/build.sh", &out);
    out.join("disk.qcow2")
}

/// A `hypersdk-agent` process with its own data and image directories. On drop, the agent and
/// every QEMU it started are ended, so a failing test leaks nothing.
pub struct Agent {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub address: Address,
    pub guest: Guest,
    /// Flags beyond the harness's own, kept for respawns.
    extra_args: Vec<String>,
    /// The network namespace it runs in (a [`hosts::Host`]); None: this machine's.
    netns: Option<String>,
    process: Option<Child>,
}

impl Agent {
    pub async fn start(name: &str) -> Agent {
        Agent::start_with(name, &[]).await
    }

    /// An agent for a benchmark against raw QEMU: without per-VM cgroups, since the raw QEMU
    /// it is compared with runs unconfined (the cgroup's `cpu.max` of vCPUs + ½ CPU slows a
    /// TCG guest's boot by ~7 %, measured: +366..426 ms of 5 s).
    pub async fn for_bench(name: &str) -> Agent {
        println!("agent {name}: per-VM cgroups off, like the raw QEMU it is compared with");
        Agent::start_with(name, BENCH_FLAGS).await
    }

    /// A second node for migrations: it may use `peer`'s images (the shared storage that live
    /// migration needs), plus `extra` flags.
    pub async fn peer_of(peer: &Agent, name: &str, extra: &[&str]) -> Agent {
        let images = peer.dir.path().join("images");
        let mut args = vec!["--image-dir", images.to_str().unwrap()];
        args.extend_from_slice(extra);
        Agent::start_with(name, &args).await
    }

    pub async fn start_with(name: &str, extra: &[&str]) -> Agent {
        Agent::start_in(name, None, extra).await
    }

    /// An agent inside network namespace `netns` (see [`hosts`]); its unix socket, on the
    /// shared file system, stays reachable from the test.
    pub async fn start_in(name: &str, netns: Option<&str>, extra: &[&str]) -> Agent {
        let guest = guest();
        let dir = tempfile::Builder::new()
            .prefix("hs-")
            .tempdir_in("/tmp")
            .unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        // The guest files are read-only inputs; each agent gets its own copies to keep tests apart.
        let local = Guest {
            kernel: images.join("vmlinuz"),
            initrd: images.join("initrd.img"),
            disk: images.join("disk.qcow2"),
        };
        for (from, to) in [
            (&guest.kernel, &local.kernel),
            (&guest.initrd, &local.initrd),
            (&guest.disk, &local.disk),
        ] {
            std::fs::copy(from, to).unwrap();
        }
        let mut agent = Agent {
            name: name.to_string(),
            address: Address::Unix(dir.path().join("agent.sock")),
            dir,
            guest: local,
            extra_args: extra.iter().map(|a| a.to_string()).collect(),
            netns: netns.map(str::to_string),
            process: None,
        };
        agent.spawn().await;
        let node = agent
            .client()
            .await
            .get_node(pb::GetNodeRequest {})
            .await
            .unwrap()
            .into_inner();
        println!(
            "agent {name}: accelerator {} ({})",
            node.accelerator, node.accelerator_reason
        );
        agent
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn spawn(&mut self) {
        let accel = std::env::var("HYPERSDK_TEST_ACCEL").unwrap_or_else(|_| "auto".into());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("hypersdk-agent"));
                c
            }
            None => Command::new(bin("hypersdk-agent")),
        };
        let child = cmd
            .args(["--node-name", &self.name, "--accel", &accel])
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.address.to_string())
            .arg("--image-dir")
            .arg(self.dir.path().join("images"))
            .args(&self.extra_args)
            .env("HYPERSDK_LOG", "info,hypersdk_agent=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning hypersdk-agent");
        self.process = Some(child);
        let Address::Unix(sock) = &self.address else {
            unreachable!()
        };
        // A restarted agent replaces the old socket file: wait until it answers.
        eventually(AGENT_UP, "the agent's socket", async || {
            tokio::net::UnixStream::connect(sock).await
        })
        .await;
    }

    pub async fn client(&self) -> Client {
        let address = self.address.clone();
        eventually(AGENT_UP, "a connection to the agent", async move || {
            endpoint::connect(&address, None).await
        })
        .await
    }

    /// A fixed-size 128 MiB guest, for tests that run several at once.
    pub fn small_spec(&self, name: &str) -> pb::VmSpec {
        let mut spec = self.guest_spec(name);
        spec.memory = "128Mi".into();
        spec.max_memory = "128Mi".into();
        spec
    }

    /// A spec for the test guest with a private copy of its disk (made on first use).
    pub fn guest_spec(&self, name: &str) -> pb::VmSpec {
        let disk = self.dir.path().join("images").join(format!("{name}.qcow2"));
        // Once per name: a VM created again (or still running) keeps its disk.
        if !disk.exists() {
            std::fs::copy(&self.guest.disk, &disk).unwrap();
        }
        pb::VmSpec {
            name: name.into(),
            cpus: 1,
            max_cpus: 2,
            memory: "256Mi".into(),
            max_memory: "512Mi".into(),
            boot: Some(pb::Boot {
                kernel: self.guest.kernel.to_string_lossy().into(),
                initrd: self.guest.initrd.to_string_lossy().into(),
                cmdline: GUEST_CMDLINE.into(),
            }),
            disks: vec![root_disk(&disk)],
            networks: vec![user_nic()],
            labels: Default::default(),
            restart_policy: pb::RestartPolicy::Never as i32,
            memory_hotplug: pb::MemoryHotplug::Auto as i32,
            high_availability: false,
            cloud_init: None,
            firmware: pb::Firmware::Unspecified as i32,
        }
    }

    /// A spec booting the Debian cloud image through `firmware`, on a writable overlay of its
    /// own (made on first use) over one copy of the image in the agent's image dir.
    pub fn cloud_spec(&self, name: &str, firmware: pb::Firmware) -> pb::VmSpec {
        let images = self.dir.path().join("images");
        let base = images.join("debian-12.qcow2");
        if !base.exists() {
            std::fs::copy(cloud_image(), &base).unwrap();
        }
        let disk = images.join(format!("{name}.qcow2"));
        if !disk.exists() {
            let status = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .args([&base, &disk])
                .status()
                .unwrap();
            assert!(status.success(), "qemu-img create {}", disk.display());
        }
        pb::VmSpec {
            name: name.into(),
            cpus: 1,
            memory: "512Mi".into(),
            firmware: firmware as i32,
            disks: vec![root_disk(&disk)],
            networks: vec![user_nic()],
            restart_policy: pb::RestartPolicy::Never as i32,
            ..Default::default()
        }
    }

    /// Ends the agent process with `signal` (its VMs are left alone) and waits for it.
    pub fn kill_agent(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut p) = self.process.take() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.id() as i32), signal).unwrap();
            p.wait().unwrap();
        }
    }

    /// Starts a new agent process on the same data directory.
    pub async fn respawn(&mut self) {
        assert!(self.process.is_none(), "the agent is still running");
        self.spawn().await;
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, Child::id)
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Agent {
    /// The whole node dies: the agent and every QEMU it started, found by their command lines
    /// (state files may be exactly what a test damaged).
    pub fn kill_node(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        for pid in qemu_pids_under(self.dir.path()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill_node();
        if std::thread::panicking() {
            eprintln!("--- agent {} log ---\n{}", self.name, self.agent_log());
            print_serial_tails(&self.name, &self.data_dir());
        }
    }
}

/// The last lines each guest of the agent `node` (data in `data_dir`) printed: what a failed
/// test needs to see beside the agent's log.
pub fn print_serial_tails(node: &str, data_dir: &Path) {
    let Ok(dirs) = std::fs::read_dir(data_dir.join("vms")) else {
        return;
    };
    for dir in dirs.flatten() {
        let log = std::fs::read(dir.path().join("serial.log")).unwrap_or_default();
        let log = String::from_utf8_lossy(&log);
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        eprintln!(
            "--- {node} serial of {:?} (tail) ---\n{tail}",
            dir.file_name()
        );
    }
}

/// A guest's root disk at `path`.
fn root_disk(path: &Path) -> pb::Disk {
    pb::Disk {
        name: "root".into(),
        path: path.to_string_lossy().into(),
        ..Default::default()
    }
}

/// One NIC on QEMU's user networking.
fn user_nic() -> pb::Network {
    pb::Network {
        name: "default".into(),
        backend: Some(pb::network::Backend::User(pb::UserNetwork {})),
    }
}

/// A loopback TCP port nobody listens on now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Live QEMU processes whose command line points into `dir`.
pub fn qemu_pids_under(dir: &Path) -> std::collections::BTreeSet<u32> {
    qemu_pids_with(&dir.to_string_lossy())
}

/// Live QEMU processes whose command line contains `needle`.
pub fn qemu_pids_with(needle: &str) -> std::collections::BTreeSet<u32> {
    pids_naming(needle)
        .into_iter()
        .filter(|pid| is_qemu(*pid as i32))
        .collect()
}

/// Processes whose command line contains `needle`.
pub fn pids_naming(needle: &str) -> std::collections::BTreeSet<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// True while `pid` is a live QEMU process (not a zombie, not a recycled pid).
pub fn is_qemu(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    state != Some('Z') && comm.starts_with("qemu-system")
}

/// For synchronous code (benchmark set-up): polls `f` until it holds, for at most `limit`.
/// Tests wait with [`eventually`].
pub fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How long an agent process may take to answer once started.
const AGENT_UP: Duration = Duration::from_secs(30);

/// How often [`eventually`] checks.
const POLL: Duration = Duration::from_millis(20);

/// What a check of [`eventually`] returns: the value waited for, or what it saw instead.
pub trait Outcome {
    type Value;
    fn outcome(self) -> Result<Self::Value, String>;
}

impl Outcome for bool {
    type Value = ();
    fn outcome(self) -> Result<(), String> {
        self.then_some(()).ok_or_else(|| "not yet".into())
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn outcome(self) -> Result<T, String> {
        self.ok_or_else(|| "nothing yet".into())
    }
}

impl<T, E: std::fmt::Display> Outcome for Result<T, E> {
    type Value = T;
    fn outcome(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Runs `check` until it succeeds (`true`, `Some`, `Ok`) and returns its value. Fails the test
/// once `bound` has passed, naming `what` and the last thing `check` saw. Bounds are generous:
/// they only keep a broken run from hanging, and a slow machine must not fail a test.
pub async fn eventually<C: Outcome>(
    bound: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> C,
) -> C::Value {
    let deadline = Instant::now() + bound;
    loop {
        match check().await.outcome() {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {bound:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Benchmark rounds: `BENCH_N` from the environment, else `default`.
pub fn bench_rounds(default: usize) -> usize {
    std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The accelerator the agent runs VMs with, so a baseline QEMU can use the same.
pub async fn agent_accel(c: &mut Client) -> (hypersdk_agent::host::accel::Accel, pb::Node) {
    let node = c
        .get_node(pb::GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    let accel = match node.accelerator.as_str() {
        "kvm" => hypersdk_agent::host::accel::Accel::Kvm,
        _ => hypersdk_agent::host::accel::Accel::Tcg,
    };
    (accel, node)
}

/// Creates a VM (and starts it, with `start`); panics on an error.
pub async fn create(client: &mut Client, spec: pb::VmSpec, start: bool) -> pb::Vm {
    let name = spec.name.clone();
    client
        .create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            start,
        })
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {e}"))
        .into_inner()
}

/// GetVm; panics on an error.
pub async fn get(client: &mut Client, name: &str) -> pb::Vm {
    client
        .get_vm(pb::GetVmRequest { name: name.into() })
        .await
        .unwrap_or_else(|e| panic!("getting {name}: {e}"))
        .into_inner()
}

/// ListVms; panics on an error.
pub async fn list(client: &mut Client) -> Vec<pb::Vm> {
    client
        .list_vms(pb::ListVmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .vms
}

/// StopVm with a 30 s grace period (or none, with `force`); panics on an error.
pub async fn stop(client: &mut Client, name: &str, force: bool) -> pb::Vm {
    let req = pb::StopVmRequest {
        name: name.into(),
        timeout_seconds: 30,
        force,
    };
    client
        .stop_vm(req)
        .await
        .unwrap_or_else(|e| panic!("stopping {name}: {e}"))
        .into_inner()
}

/// Polls GetVm until `pred` holds; returns that VM.
pub async fn wait_vm(
    client: &mut Client,
    name: &str,
    limit: Duration,
    what: &str,
    pred: impl Fn(&pb::VmStatus) -> bool,
) -> pb::Vm {
    eventually(limit, &format!("{name}: {what}"), async || {
        let vm = get(client, name).await;
        match &vm.status {
            Some(s) if pred(s) => Ok(vm),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// What a VM is and how it runs, without the figures that move on their own (guest reports,
/// revisions): the same before and after means nothing was done to it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmState {
    pub spec: pb::VmSpec,
    pub phase: pb::VmPhase,
    pub pid: u32,
    pub started_at_ms: i64,
    pub phase_changed_at_ms: i64,
    pub restart_count: u32,
    pub cpus: u32,
    pub memory_bytes: u64,
}

impl From<&pb::Vm> for VmState {
    fn from(vm: &pb::Vm) -> VmState {
        let s = vm.status.as_ref().unwrap();
        VmState {
            spec: vm.spec.clone().unwrap(),
            phase: s.phase(),
            pid: s.pid,
            started_at_ms: s.started_at_ms,
            phase_changed_at_ms: s.phase_changed_at_ms,
            restart_count: s.restart_count,
            cpus: s.cpus,
            memory_bytes: s.memory_bytes,
        }
    }
}

pub fn phase(vm: &pb::Vm) -> pb::VmPhase {
    pb::VmPhase::try_from(vm.status.as_ref().unwrap().phase).unwrap()
}

/// The serial console log of a VM so far.
pub fn serial(vm: &pb::Vm) -> String {
    let path = &vm.status.as_ref().unwrap().serial_log;
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

pub fn count_markers(serial: &str, marker: &str) -> usize {
    serial.matches(marker).count()
}

/// The last counter value the guest printed.
pub fn last_counter(serial: &str) -> Option<u64> {
    all_counters(serial).last().copied()
}

/// The numbers after `marker` in the serial log, in order. A marker may follow the console
/// shell's prompt on its line.
fn numbers_after(serial: &str, marker: &str) -> Vec<u64> {
    serial
        .lines()
        .filter_map(|l| l.split_once(marker).map(|(_, n)| n))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Every counter value the guest printed, in order.
pub fn all_counters(serial: &str) -> Vec<u64> {
    numbers_after(serial, COUNTER_MARKER)
}

/// Waits until the guest's counter passes `n`.
pub async fn wait_counter_above(vm: &pb::Vm, n: u64, limit: Duration) {
    eventually(
        limit,
        &format!("the counter to pass {n}"),
        async || match last_counter(&serial(vm)) {
            Some(c) if c > n => Ok(()),
            last => Err(format!("counter at {last:?}")),
        },
    )
    .await
}

/// Waits until the guest has printed a counter; returns the last one.
pub async fn current_counter(vm: &pb::Vm, limit: Duration) -> u64 {
    eventually(limit, "a counter", async || last_counter(&serial(vm))).await
}

/// Waits until the guest prints a counter above the one it printed last (any, if none yet).
pub async fn wait_counting(vm: &pb::Vm, limit: Duration) {
    let from = last_counter(&serial(vm));
    eventually(
        limit,
        &format!("the counter to move on from {from:?}"),
        async || last_counter(&serial(vm)) > from,
    )
    .await
}

/// How long a paused guest is watched: a running one prints its counter once a second.
const PAUSED_WINDOW: Duration = Duration::from_secs(5);

/// A paused guest prints no counter for [`PAUSED_WINDOW`]. (The absence of an event needs a
/// window; it is five of the guest's ticks.)
pub async fn assert_holds_still(vm: &pb::Vm) {
    let from = serial(vm).len();
    tokio::time::sleep(PAUSED_WINDOW).await;
    let printed = all_counters(&serial(vm)[from..]);
    assert!(printed.is_empty(), "a paused guest counted: {printed:?}");
}

/// Waits until the serial log has `n` ready markers (one per boot).
pub async fn wait_boots(vm: &pb::Vm, n: usize, limit: Duration) {
    eventually(limit, &format!("boot #{n}"), async || {
        let log = serial(vm);
        if count_markers(&log, READY_MARKER) >= n {
            Ok(())
        } else {
            Err(format!("serial:\n{log}"))
        }
    })
    .await
}

/// The disk counter each boot found (`HYPERSDK-DISK <n>` lines), in order.
pub fn disk_counters_in(serial: &str) -> Vec<u64> {
    disk_counters(serial)
}

fn disk_counters(serial: &str) -> Vec<u64> {
    numbers_after(serial, "HYPERSDK-DISK ")
}

/// Waits for the first boot after byte `from` of the serial log; returns the counter it found
/// on the disk.
pub async fn disk_counter_at_boot(vm: &pb::Vm, from: usize, limit: Duration) -> u64 {
    eventually(limit, "a boot with the disk mounted", async || {
        let log = serial(vm);
        disk_counters(&log[from..])
            .first()
            .copied()
            .ok_or_else(|| format!("serial:\n{}", &log[from..]))
    })
    .await
}

/// The first counter a guest restored to a memory snapshot printed after byte `restored` of
/// its serial log: the log's length once the restore had returned, so that what follows is
/// the restored guest's alone (the guest it replaced may print up to the restore, and its last
/// line may be cut short). Fails the test if the guest booted instead of resuming: a boot
/// prints its ready marker before its first counter, so once the guest has counted, any boot
/// since byte `from` (the length before the restore began) is in the log.
pub async fn resumed_counter(vm: &pb::Vm, from: usize, restored: usize, limit: Duration) -> u64 {
    let (first, log) = eventually(limit, "a counter from the restored guest", async || {
        let log = serial(vm);
        match all_counters(&log[restored..]).first() {
            Some(&first) => Ok((first, log)),
            None => Err(format!("serial after the restore:\n{}", &log[restored..])),
        }
    })
    .await;
    assert_eq!(
        count_markers(&log[from..], READY_MARKER),
        0,
        "the restored guest booted instead of resuming:\n{}",
        &log[from..]
    );
    first
}

pub fn pid_alive(pid: u32) -> bool {
    is_qemu(pid as i32)
}

/// Migrates `name` to the agent at `target` and follows the progress stream to its end.
/// Returns every progress message; the last one is final (COMPLETED, FAILED or CANCELLED).
pub async fn migrate(
    client: &mut Client,
    name: &str,
    target: &Address,
    options: pb::MigrationOptions,
) -> Result<Vec<pb::MigrationProgress>, tonic::Status> {
    let mut stream = client
        .migrate_vm(pb::MigrateVmRequest {
            name: name.into(),
            target: target.to_string(),
            options: Some(options),
        })
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(p) = stream.message().await? {
        all.push(p);
    }
    Ok(all)
}

/// The least a migration of the test guest sends: its kernel and its root file system (the
/// initramfs, unpacked in RAM) are well above this.
const LEAST_SENT: u64 = 16 << 20;

/// The figures of a completed migration make sense for a guest of `memory_bytes` moved by a
/// call that took `wall` as the caller measured it: QEMU counted all of the guest's RAM and
/// sent between [`LEAST_SENT`] and a few copies of it; the guest's pause lies within the whole
/// migration, which lies within the call.
pub fn assert_plausible_migration(p: &pb::MigrationProgress, memory_bytes: u64, wall: Duration) {
    assert_eq!(p.phase(), pb::MigrationPhase::Completed, "{p:?}");
    assert!(
        p.total_bytes >= memory_bytes,
        "RAM of {memory_bytes} bytes: {p:?}"
    );
    assert!(
        (LEAST_SENT..=3 * p.total_bytes).contains(&p.transferred_bytes),
        "sent {} bytes of {}: {p:?}",
        p.transferred_bytes,
        p.total_bytes
    );
    assert!(
        0 < p.downtime_ms
            && u64::from(p.downtime_ms) <= p.elapsed_ms
            && u64::from(p.qemu_downtime_ms) <= p.elapsed_ms
            && u128::from(p.elapsed_ms) <= wall.as_millis(),
        "paused {} ms (QEMU: {} ms) of {} ms, in a call of {wall:?}: {p:?}",
        p.downtime_ms,
        p.qemu_downtime_ms,
        p.elapsed_ms
    );
}

/// The final message of a migration's progress.
pub fn final_phase(progress: &[pb::MigrationProgress]) -> (pb::MigrationPhase, String) {
    let last = progress.last().expect("no progress at all");
    (last.phase(), last.message.clone())
}
