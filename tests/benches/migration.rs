//! Live-migration benchmark: the same 1 GiB, 1 vCPU test guest moved back and forth between two
//! places, N times each, in the same run:
//! - by raw QEMU: two `qemu-system-x86_64` processes with the agent's very argv (the target with
//!   `-S -incoming defer` and the raised priority of its loading threads, as the agent starts
//!   it), driven over QMP by this bench;
//! - by the agent: two real `hypersdk-agent` processes sharing the image directory.
//!
//! Cases: (a) raw QEMU with the agent's migration settings against the agent, for an idle guest
//! and one rewriting 256 MiB over and over; (b) raw QEMU with QEMU's own defaults on the
//! rewriting guest, cancelled if it has not finished within 30 s. Prints medians and ratios.
//!
//! The agents run with `--migration-copy live`, so that under TCG they migrate live like raw
//! QEMU (their default there pauses the guest for the copy).
//!
//! Run with `scripts/bench.sh migration` (release build). `BENCH_N` sets N (default 3).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hypersdk_agent::firmware::Loader;
use hypersdk_agent::host::accel::Accel;
use hypersdk_agent::host::paths::PathPolicy;
use hypersdk_agent::migration::{self, Options, QemuStatus};
use hypersdk_agent::qemu::process;
use hypersdk_agent::qemu::qga::Qga;
use hypersdk_agent::qemu::qmp::Qmp;
use hypersdk_agent::spec::VmSpec;
use hypersdk_agent::spec::argv::{self, VmFiles};
use hypersdk_agent::spec::resolve::resolve_spec;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::Address;
use hypersdk_tests::*;
use serde_json::{Value, json};

const MIB: f64 = (1 << 20) as f64;
/// MiB the busy guest rewrites continuously (its `hypersdk.dirty_mib`).
const DIRTY_MIB: u32 = 256;
/// A raw migration still running after this long is cancelled (the agent's own limit is its
/// completion timeout, 120 s, after which it throttles the guest harder).
const RAW_LIMIT: Duration = Duration::from_secs(30);
/// Between resuming a guest and migrating it: the dirtier is back at full rate and the exit of
/// the previous migration's source QEMU no longer competes for the two cores.
const SETTLE: Duration = Duration::from_secs(2);
/// Before the first round of a busy guest: its dirtier has built its file (doubling it up
/// from 1 MiB) and rewrites all of it, whatever the boot order of the guests.
const WARMUP: Duration = Duration::from_secs(15);
const BOOT_LIMIT: Duration = Duration::from_secs(300);
const SOURCE_POLL: Duration = Duration::from_millis(5);

/// One migration. Pause figures are None when it did not complete.
#[derive(Debug, Clone, Default)]
struct Sample {
    done: bool,
    /// Start to the guest running on the target (the agent: its `elapsed_ms`, which includes
    /// preparing the target; raw: from spawning the target QEMU).
    total: Duration,
    /// The same as the caller saw it (the agent: the MigrateVm call until its stream ended).
    call: Duration,
    /// Start until QEMU's `migrate` was issued: target QEMU started and listening, both sides
    /// configured (the agent: its first ACTIVE progress, within one 100 ms poll of it).
    prepare: Option<Duration>,
    /// STOP on the source to the target running.
    downtime: Option<Duration>,
    /// QEMU's `downtime`: source paused until the last byte was sent.
    qemu_downtime: Option<Duration>,
    /// QEMU's `total-time` (raw only: the agent does not report it).
    qemu_total: Option<Duration>,
    sent_bytes: u64,
    /// The highest guest dirty rate QEMU reported during the migration, bytes per second: the
    /// busy guest's load differs between runs, and with it what must be sent.
    dirty_rate: u64,
    /// The highest auto-converge throttle of the guest's vCPU, percent.
    throttle: u32,
    passes: u64,
}

/// Table columns, in the order of [`Sample::columns`]; the summary picks them by these indices.
const COLUMNS: [&str; 10] = [
    "total ms",
    "call ms",
    "prep ms",
    "down ms",
    "QEMU down",
    "QEMU total",
    "sent MiB",
    "dirty MiB/s",
    "throttle %",
    "passes",
];
const TOTAL: usize = 0;
const DOWN: usize = 3;
const QEMU_DOWN: usize = 4;
const SENT: usize = 6;

type Row = [Option<f64>; COLUMNS.len()];

impl Sample {
    fn columns(&self) -> Row {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        [
            Some(ms(self.total)),
            Some(ms(self.call)),
            self.prepare.map(ms),
            self.downtime.map(ms),
            self.qemu_downtime.map(ms),
            self.qemu_total.map(ms),
            Some(self.sent_bytes as f64 / MIB),
            Some(self.dirty_rate as f64 / MIB),
            Some(self.throttle.into()),
            Some(self.passes as f64),
        ]
    }

    fn line(&self) -> String {
        let figures = COLUMNS
            .iter()
            .zip(self.columns())
            .filter_map(|(name, v)| v.map(|v| format!("{name} {v:.0}")));
        let done = if self.done {
            "completed"
        } else {
            "NOT completed"
        };
        format!("{done}: {}", figures.collect::<Vec<_>>().join(", "))
    }
}

/// The highest guest dirty rate and vCPU throttle seen in a migration's progress.
#[derive(Debug, Default)]
struct Peaks {
    dirty_rate: u64,
    throttle: u32,
}

impl Peaks {
    fn add(&mut self, p: &pb::MigrationProgress) {
        self.dirty_rate = self.dirty_rate.max(p.dirty_rate_bytes_per_second);
        self.throttle = self.throttle.max(p.cpu_throttle_percent);
    }
}

/// The status and figures of a query-migrate reply, read as the agent reads them.
fn read_reply(reply: &Value) -> (QemuStatus, pb::MigrationProgress) {
    let mut p = pb::MigrationProgress::default();
    let reply = serde_json::from_value(reply.clone()).expect("a query-migrate reply");
    let (status, _) = migration::read_query_migrate(&reply, &mut p);
    (status, p)
}

fn from_ms(ms: impl Into<u64>) -> Duration {
    Duration::from_millis(ms.into())
}

/// The instant the STOP event arrives: the source has paused the guest for the switch-over.
/// Subscribes now, so call it before `migrate`.
fn watch_stop(qmp: &Qmp) -> tokio::task::JoinHandle<Instant> {
    let mut events = qmp.events();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) if ev.name == "STOP" => return Instant::now(),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    panic!("source QMP closed")
                }
                _ => {}
            }
        }
    })
}

/// The test guest under raw QEMU, moving between two directories standing for two nodes.
struct RawVm {
    spec: VmSpec,
    accel: Accel,
    dirs: [PathBuf; 2],
    at: usize,
    qemu: RawQemu,
    /// None: QEMU's own defaults, nothing set.
    settings: Option<Options>,
}

impl RawVm {
    async fn boot(spec: VmSpec, base: &Path, accel: Accel, settings: Option<Options>) -> RawVm {
        let dirs = [base.join("a"), base.join("b")];
        let qemu = RawQemu::spawn(&spec, &dirs[0], accel, &[]).await;
        RawVm {
            spec,
            accel,
            dirs,
            at: 0,
            qemu,
            settings,
        }
    }

    fn label(&self) -> &'static str {
        match self.settings {
            Some(_) => "raw, agent's settings",
            None => "raw, QEMU's defaults",
        }
    }

    /// The argv the guest's QEMU runs with now.
    fn argv(&self) -> Vec<String> {
        argv::build(
            &self.spec,
            &VmFiles::in_dir(&self.dirs[self.at]),
            self.accel,
            &Loader::SeaBios,
        )
    }

    async fn wait_guest_agent(&self) {
        let sock = VmFiles::in_dir(&self.dirs[self.at]).qga_socket;
        let deadline = Instant::now() + BOOT_LIMIT;
        let mut qga = None;
        loop {
            assert!(Instant::now() < deadline, "raw guest agent never answered");
            match &mut qga {
                None => {
                    qga = Qga::connect(&sock).await.ok();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Some(q) => {
                    if q.sync(Duration::from_millis(300)).await.is_ok() {
                        return;
                    }
                }
            }
        }
    }

    async fn set_running(&self, run: bool) {
        let r = if run {
            self.qemu.qmp.execute(qapi::qmp::cont {}).await
        } else {
            self.qemu.qmp.execute(qapi::qmp::stop {}).await
        };
        r.unwrap();
    }

    /// QEMU's defaults as this process has them (nothing has been set on it yet).
    async fn describe_parameters(&self) -> String {
        let p = self
            .qemu
            .qmp
            .execute_value("query-migrate-parameters", json!({}))
            .await
            .unwrap();
        format!(
            "max-bandwidth {} MiB/s, downtime-limit {} ms, multifd off, auto-converge off",
            p["max-bandwidth"].as_f64().unwrap_or(0.0) / MIB,
            p["downtime-limit"]
        )
    }

    /// Migrates to a new QEMU in the other directory, as the agent would: start the target
    /// paused and listening, configure both sides, migrate, wait for the target to have loaded
    /// everything, run it there. A migration still going at [`RAW_LIMIT`] is cancelled.
    async fn migrate(&mut self) -> Sample {
        let t0 = Instant::now();
        let to = 1 - self.at;
        let incoming = ["-S", "-incoming", "defer"];
        let target = RawQemu::spawn(&self.spec, &self.dirs[to], self.accel, &incoming).await;
        process::prioritize_loading(target.child.id().unwrap()).unwrap();
        let uri = format!("tcp:127.0.0.1:{}", free_port());
        if let Some(o) = &self.settings {
            target.configure(o, false).await;
            self.qemu.configure(o, true).await;
        }
        target
            .qmp
            .execute_value("migrate-incoming", json!({ "uri": uri }))
            .await
            .unwrap();
        let stopped = watch_stop(&self.qemu.qmp);
        self.qemu
            .qmp
            .execute_value("migrate", json!({ "uri": uri }))
            .await
            .unwrap();
        let prepare = t0.elapsed();
        let (reply, peak) = self.follow().await;
        let (status, p) = read_reply(&reply);
        let mut sample = Sample {
            prepare: Some(prepare),
            sent_bytes: p.transferred_bytes,
            dirty_rate: peak.dirty_rate,
            throttle: peak.throttle,
            passes: p.iterations,
            ..Default::default()
        };
        if status != QemuStatus::Completed {
            stopped.abort();
            target.quit().await;
            sample.total = t0.elapsed();
            sample.call = sample.total;
            return sample;
        }
        target.wait_migration().await;
        target.qmp.execute(qapi::qmp::cont {}).await.unwrap();
        let running = Instant::now();
        process::reset_priority(target.child.id().unwrap()).unwrap();
        let stopped_at = stopped.await.unwrap();
        std::mem::replace(&mut self.qemu, target).quit().await;
        self.at = to;
        Sample {
            done: true,
            total: running - t0,
            call: running - t0,
            downtime: Some(running - stopped_at),
            qemu_downtime: Some(from_ms(p.qemu_downtime_ms)),
            qemu_total: reply["total-time"].as_u64().map(from_ms),
            ..sample
        }
    }

    /// Polls the source until its migration ends (cancelling it at [`RAW_LIMIT`]); returns
    /// the last reply, with the RAM figures of the last one that had them (a cancelled
    /// migration's reply has none), and the peaks of the progress figures that a completed
    /// one's reply no longer has.
    async fn follow(&self) -> (Value, Peaks) {
        let t0 = Instant::now();
        let mut cancelled = false;
        let (mut ram, mut peak) = (Value::Null, Peaks::default());
        loop {
            let mut reply = self.qemu.query_migrate().await;
            if reply["ram"].is_object() {
                ram = reply["ram"].clone();
            }
            let (status, p) = read_reply(&reply);
            peak.add(&p);
            if matches!(
                status,
                QemuStatus::Completed | QemuStatus::Failed | QemuStatus::Cancelled
            ) {
                reply["ram"] = ram;
                return (reply, peak);
            }
            if !cancelled && t0.elapsed() > RAW_LIMIT {
                cancelled = true;
                self.qemu
                    .qmp
                    .execute_value("migrate_cancel", json!({}))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(SOURCE_POLL).await;
        }
    }
}

/// The test guest under the agents, moving between the two.
struct AgentVm {
    name: String,
    nodes: [(Client, Address); 2],
    at: usize,
}

impl AgentVm {
    fn client(&mut self) -> &mut Client {
        &mut self.nodes[self.at].0
    }

    async fn set_running(&mut self, run: bool) {
        let name = self.name.clone();
        let c = self.client();
        if run {
            c.resume_vm(pb::ResumeVmRequest { name }).await.unwrap();
        } else {
            c.pause_vm(pb::PauseVmRequest { name }).await.unwrap();
        }
    }

    /// MigrateVm with the agent's defaults, to the other agent.
    async fn migrate(&mut self) -> Sample {
        let (name, to) = (self.name.clone(), self.nodes[1 - self.at].1.clone());
        let t0 = Instant::now();
        let progress = migrate(self.client(), &name, &to, Default::default())
            .await
            .unwrap();
        let call = t0.elapsed();
        // The first poll after `migrate` stamps the first elapsed time of an ACTIVE migration.
        let prepare = progress
            .iter()
            .filter(|p| p.phase() == pb::MigrationPhase::Active && p.elapsed_ms > 0)
            .map(|p| from_ms(p.elapsed_ms))
            .min();
        let mut peak = Peaks::default();
        progress.iter().for_each(|p| peak.add(p));
        let p = progress.last().unwrap();
        let done = p.phase() == pb::MigrationPhase::Completed;
        if done {
            self.at = 1 - self.at;
        } else {
            println!("  agent migration ended {:?}: {}", p.phase(), p.message);
        }
        Sample {
            done,
            total: from_ms(p.elapsed_ms),
            call,
            downtime: done.then(|| from_ms(p.downtime_ms)),
            qemu_downtime: done.then(|| from_ms(p.qemu_downtime_ms)),
            qemu_total: None,
            prepare,
            sent_bytes: p.transferred_bytes,
            dirty_rate: peak.dirty_rate,
            throttle: peak.throttle,
            passes: p.iterations,
        }
    }

    async fn delete(mut self) {
        let name = self.name.clone();
        stop(self.client(), &name, true).await;
        let req = pb::DeleteVmRequest {
            keep_disks: false,
            name,
        };
        self.client().delete_vm(req).await.unwrap();
    }
}

/// Something that moves the guest: raw QEMU or the agents.
enum Mover {
    Raw(Box<RawVm>),
    Agent(Box<AgentVm>),
}

impl Mover {
    fn label(&self) -> &'static str {
        match self {
            Mover::Raw(r) => r.label(),
            Mover::Agent(_) => "agent",
        }
    }

    async fn set_running(&mut self, run: bool) {
        match self {
            Mover::Raw(r) => r.set_running(run).await,
            Mover::Agent(a) => a.set_running(run).await,
        }
    }

    async fn migrate(&mut self) -> Sample {
        match self {
            Mover::Raw(r) => r.migrate().await,
            Mover::Agent(a) => a.migrate().await,
        }
    }

    async fn remove(self) {
        match self {
            Mover::Raw(r) => r.qemu.quit().await,
            Mover::Agent(a) => a.delete().await,
        }
    }
}

/// N rounds in which each mover migrates its guest once while the others' guests are paused,
/// so that no other guest competes for the two cores. The first mover rotates by round, so
/// that drift on a shared machine hits all alike.
async fn rounds(movers: &mut [Mover], n: usize) -> Vec<Vec<Sample>> {
    for m in movers.iter_mut() {
        m.set_running(false).await;
    }
    let mut samples = vec![vec![]; movers.len()];
    for round in 0..n {
        for k in 0..movers.len() {
            let i = (round + k) % movers.len();
            let m = &mut movers[i];
            m.set_running(true).await;
            tokio::time::sleep(SETTLE).await;
            let s = m.migrate().await;
            m.set_running(false).await;
            println!("  round {}, {}: {}", round + 1, m.label(), s.line());
            samples[i].push(s);
        }
    }
    samples
}

/// The test guest at 1 GiB and 1 vCPU, rewriting `dirty_mib` MiB (0: idle), with its own disk
/// `disk`.qcow2.
fn guest(agent: &Agent, disk: &str, dirty_mib: u32) -> pb::VmSpec {
    let mut s = agent.guest_spec(disk);
    s.cpus = 1;
    s.memory = "1Gi".into();
    s.max_memory = "1Gi".into();
    if dirty_mib > 0 {
        s.boot.as_mut().unwrap().cmdline += &format!(" hypersdk.dirty_mib={dirty_mib}");
    }
    s
}

/// A spec resolved the way the agent resolves it (canonical paths, probed disk format).
fn resolved(spec: pb::VmSpec, images: &Path) -> VmSpec {
    let policy = PathPolicy::new([images.to_path_buf()]).unwrap();
    resolve_spec(&VmSpec::try_from(spec).unwrap(), &policy).unwrap()
}

/// The agent's QEMU command line for `name`, with its VM directory and disk swapped for the
/// raw guest's: equal to the raw guest's argv when raw QEMU runs exactly what the agent runs.
fn agent_argv_for(vm: &pb::Vm, agent_dir: &Path, raw: &RawVm) -> Vec<String> {
    let pid = vm.status.as_ref().unwrap().pid;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let swaps = [
        (
            agent_dir.to_string_lossy(),
            raw.dirs[raw.at].to_string_lossy(),
        ),
        (
            vm.spec.as_ref().unwrap().disks[0].path.as_str().into(),
            raw.spec.disks[0].path.to_string_lossy(),
        ),
    ];
    cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .skip(1)
        .map(|a| {
            let a = String::from_utf8_lossy(a).into_owned();
            swaps.iter().fold(a, |a, (from, to)| a.replace(&**from, to))
        })
        .collect()
}

/// One guest kind's results: a label and the samples of each mover, the agent's last.
struct Case {
    title: String,
    labels: Vec<&'static str>,
    samples: Vec<Vec<Sample>>,
}

/// Boots the agent's VM and one raw guest per entry of `raw_settings` side by side, runs the
/// [`rounds`], and removes the guests: one case's guests at a time, as they are 1 GiB each and
/// the two cores are for the migrations.
async fn run_case(
    (src, dst): (&Agent, &Agent),
    accel: Accel,
    (name, dirty_mib): (&str, u32),
    raw_settings: &[Option<Options>],
    n: usize,
) -> Case {
    let title = match dirty_mib {
        0 => "idle guest".to_string(),
        m => format!("guest rewriting {m} MiB"),
    };
    println!("\n{title}:");
    let images = src.dir.path().join("images");
    let mut a = src.client().await;
    let vm = create(&mut a, guest(src, name, dirty_mib), true).await;
    let mut movers = vec![];
    for (i, settings) in raw_settings.iter().enumerate() {
        let disk = format!("raw-{name}-{i}");
        let mut spec = guest(src, &disk, dirty_mib);
        // The agent's VM name, so that -name and the MAC address match too.
        spec.name = name.into();
        let base = src.dir.path().join(&disk);
        let raw = RawVm::boot(resolved(spec, &images), &base, accel, *settings).await;
        movers.push(Mover::Raw(Box::new(raw)));
    }
    wait_vm(&mut a, name, BOOT_LIMIT, "guest agent", |s| {
        s.agent_connected
    })
    .await;
    let agent_dir = src.data_dir().join("vms").join(name);
    for m in &movers {
        let Mover::Raw(raw) = m else { continue };
        raw.wait_guest_agent().await;
        let same = agent_argv_for(&vm, &agent_dir, raw) == raw.argv();
        println!(
            "  {}: argv is the agent's QEMU's (paths aside): {same}",
            raw.label()
        );
        if raw.settings.is_none() {
            println!("  QEMU's defaults: {}", raw.describe_parameters().await);
        }
    }
    movers.push(Mover::Agent(Box::new(AgentVm {
        name: name.into(),
        nodes: [
            (a, src.address.clone()),
            (dst.client().await, dst.address.clone()),
        ],
        at: 0,
    })));
    if dirty_mib > 0 {
        tokio::time::sleep(WARMUP).await;
    }
    let samples = rounds(&mut movers, n).await;
    let labels = movers.iter().map(Mover::label).collect();
    for m in movers {
        m.remove().await;
    }
    Case {
        title,
        labels,
        samples,
    }
}

impl Case {
    /// "completed/all" for mover `i`.
    fn done(&self, i: usize) -> String {
        let s = &self.samples[i];
        format!("{}/{}", s.iter().filter(|s| s.done).count(), s.len())
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// Per-column medians over the samples that have the figure.
fn medians(samples: &[Sample]) -> Row {
    let cols: Vec<_> = samples.iter().map(Sample::columns).collect();
    std::array::from_fn(|i| median(cols.iter().filter_map(|c| c[i]).collect()))
}

fn print_row(label: &str, done: &str, cells: [String; COLUMNS.len()]) {
    let cells: String = cells.iter().map(|c| format!(" {c:>11}")).collect();
    println!("{label:<30} {done:>5}{cells}");
}

fn print_values(label: &str, done: &str, row: &Row, decimals: usize) {
    let cell = |v: &Option<f64>| v.map_or("-".into(), |v| format!("{v:.decimals$}"));
    print_row(label, done, std::array::from_fn(|i| cell(&row[i])));
}

/// The medians of each mover of a case, then the agent's against each raw mover's. Returns
/// the medians, the agent's last.
fn print_case(case: &Case) -> Vec<Row> {
    println!("{}", case.title);
    let rows: Vec<Row> = case.samples.iter().map(|s| medians(s)).collect();
    for (i, (label, row)) in case.labels.iter().zip(&rows).enumerate() {
        print_values(&format!("  {label}"), &case.done(i), row, 0);
    }
    let (agent, raws) = rows.split_last().unwrap();
    for (label, raw) in case.labels.iter().zip(raws) {
        let ratio = std::array::from_fn(|i| Some(agent[i]? / raw[i]?).filter(|r| r.is_finite()));
        print_values(&format!("  agent / {label}"), "", &ratio, 2);
    }
    rows
}

/// A median for the summary: "1234 ms" or "-".
fn shown(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.0} {unit}"))
}

#[tokio::main]
async fn main() {
    let n = bench_rounds(3);
    // Live on both sides, as raw QEMU migrates: under TCG the agent's default pauses the guest
    // for the copy (`--migration-copy auto`), which would compare two different things.
    let flags = [BENCH_FLAGS, &["--migration-copy", "live"]].concat();
    println!("agents: {}", flags.join(" "));
    let src = Agent::start_with("bench-mig-a", &flags).await;
    let dst = Agent::peer_of(&src, "bench-mig-b", &flags).await;
    let (accel, node) = agent_accel(&mut src.client().await).await;
    println!(
        "migration benchmark: N={n}, accelerator {} ({}), 1 GiB guest, 1 vCPU, loopback TCP",
        node.accelerator, node.accelerator_reason
    );
    let nodes = (&src, &dst);
    let agents = Some(Options::default());
    let idle = run_case(nodes, accel, ("idle", 0), &[agents], n).await;
    let busy = run_case(nodes, accel, ("busy", DIRTY_MIB), &[agents, None], n).await;

    println!("\nmedians over N={n}; ratios are agent / raw; -: none, or never completed");
    print_row("", "done", COLUMNS.map(String::from));
    let (idle_rows, busy_rows) = (print_case(&idle), print_case(&busy));
    // Rows: the raw movers in the order given to run_case, the agent last.
    let (idle_agent, busy_agent) = (idle_rows.last().unwrap(), busy_rows.last().unwrap());
    println!("\n(a) total time, agent / raw QEMU with the agent's settings (target <= 1.2):");
    for (what, agent, raw) in [
        ("idle", idle_agent, &idle_rows[0]),
        ("busy", busy_agent, &busy_rows[0]),
    ] {
        let ratio = agent[TOTAL].zip(raw[TOTAL]).map(|(a, r)| a / r);
        println!(
            "    {what}: {}",
            ratio.map_or("-".into(), |r| format!("{r:.2}"))
        );
    }
    println!(
        "(b) busy guest, raw QEMU with QEMU's defaults: {} completed within {RAW_LIMIT:?} \
         (median {}, {} sent); with the agent's defaults: {} completed (median {})",
        busy.done(1),
        shown(busy_rows[1][TOTAL], "ms"),
        shown(busy_rows[1][SENT], "MiB"),
        busy.done(2),
        shown(busy_agent[TOTAL], "ms"),
    );
    println!(
        "    idle guest downtime with the agent's defaults: {} (QEMU's figure {}; target <= 50 ms)",
        shown(idle_agent[DOWN], "ms"),
        shown(idle_agent[QEMU_DOWN], "ms"),
    );
}
