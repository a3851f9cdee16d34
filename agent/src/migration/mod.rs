//! Live migration, the pure parts: options and their defaults, the QMP capabilities and
//! parameters they become, what `query-migrate` says, the machine layout both QEMUs must share,
//! and the port range of incoming migrations. The source side runs in [`crate::migration::source`], the
//! target side in the supervisor ([`crate::vm::actor`]).

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use hypersdk_proto::agent::v1 as pb;
use qapi::qmp;
use qapi::qmp::MigrationCapability;

use crate::hotplug::PlanError;
use crate::qemu::qmp::{QmpError, enum_name};
use crate::spec::FieldError;

pub mod encrypt;
mod layout;
pub mod source;
pub use layout::{check_layout, cpu_to_add, layout, layout_memory};
pub mod target;

/// The agent's defaults, chosen so that a busy guest converges with a short pause (QEMU's own
/// are 128 MiB/s and 300 ms, with which a guest dirtying memory fast never finishes).
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(50);
/// Multifd channels: 4, or one per host CPU on smaller hosts. More sending and receiving
/// threads than CPUs only compete: on a 2-CPU host, 4 channels doubled an idle guest's
/// downtime (131-137 ms against 63-76 ms with 2) for no faster copy.
pub const MAX_DEFAULT_MULTIFD_CHANNELS: u32 = 4;
pub const DEFAULT_COMPLETION_TIMEOUT: Duration = Duration::from_secs(120);
pub const MAX_MULTIFD_CHANNELS: u32 = 64;
/// QEMU's `downtime-limit` maximum is 2000 s; an hour of pause is no live migration.
const MAX_DOWNTIME_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Bytes per second; None: unlimited.
    pub bandwidth: Option<u64>,
    pub max_downtime: Duration,
    pub auto_converge: bool,
    /// 0: multifd off.
    pub multifd_channels: u32,
    pub completion_timeout: Duration,
}

/// See [`MAX_DEFAULT_MULTIFD_CHANNELS`].
pub fn default_multifd_channels(host_cpus: u32) -> u32 {
    host_cpus.clamp(1, MAX_DEFAULT_MULTIFD_CHANNELS)
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bandwidth: None,
            max_downtime: DEFAULT_MAX_DOWNTIME,
            auto_converge: true,
            multifd_channels: default_multifd_channels(
                std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            ),
            completion_timeout: DEFAULT_COMPLETION_TIMEOUT,
        }
    }
}

impl TryFrom<Option<pb::MigrationOptions>> for Options {
    type Error = FieldError;

    fn try_from(o: Option<pb::MigrationOptions>) -> Result<Self, FieldError> {
        let d = Options::default();
        let Some(o) = o else { return Ok(d) };
        let max_downtime = o
            .max_downtime_ms
            .map_or(d.max_downtime, |ms| Duration::from_millis(ms.into()));
        if max_downtime.is_zero() || max_downtime > MAX_DOWNTIME_LIMIT {
            return Err(FieldError::new(
                "options.maxDowntimeMs",
                format!("must be between 1 and {}", MAX_DOWNTIME_LIMIT.as_millis()),
            ));
        }
        let multifd_channels = o.multifd_channels.unwrap_or(d.multifd_channels);
        if multifd_channels > MAX_MULTIFD_CHANNELS {
            return Err(FieldError::new(
                "options.multifdChannels",
                format!("must be at most {MAX_MULTIFD_CHANNELS}"),
            ));
        }
        let completion_timeout = o
            .completion_timeout_seconds
            .map_or(d.completion_timeout, |s| Duration::from_secs(s.into()));
        if completion_timeout.is_zero() {
            return Err(FieldError::new(
                "options.completionTimeoutSeconds",
                "must be at least 1",
            ));
        }
        // QEMU keeps the limit as a byte count per 100 ms slice in a signed 64-bit value.
        let bandwidth = match o.bandwidth_bytes_per_second {
            None | Some(0) => None,
            Some(b) if b > i64::MAX as u64 / 1000 => {
                return Err(FieldError::new(
                    "options.bandwidthBytesPerSecond",
                    "is too large (use 0 for unlimited)",
                ));
            }
            Some(b) => Some(b),
        };
        Ok(Options {
            bandwidth,
            max_downtime,
            auto_converge: o.auto_converge.unwrap_or(d.auto_converge),
            multifd_channels,
            completion_timeout,
        })
    }
}

/// A QEMU that could not be made ready to receive a VM's state (from a source QEMU or a
/// snapshot's memory file), or that did not load it.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("QEMU is gone")]
    NoProcess,
    #[error("no free vCPU slot socket {socket} core {core} thread {thread}")]
    NoFreeSlot { socket: u32, core: u32, thread: u32 },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("no free port in {}-{} on {address}", ports.start(), ports.end())]
    NoFreePort {
        ports: RangeInclusive<u16>,
        address: IpAddr,
    },
    #[error(transparent)]
    Load(#[from] AwaitError),
    #[error(transparent)]
    Encrypt(#[from] encrypt::EncryptError),
}

/// A migration QEMU carries out by itself (into a file, or incoming) that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum AwaitError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU's own words, if it gave any.
    #[error("{}", .0.as_deref().unwrap_or("QEMU gave no detail"))]
    Failed(Option<String>),
    #[error("not done within {0:?}")]
    Timeout(Duration),
}

fn capability(capability: MigrationCapability, state: bool) -> qmp::MigrationCapabilityStatus {
    qmp::MigrationCapabilityStatus { capability, state }
}

/// `migrate-set-capabilities` for the source (`outgoing`) or the target. multifd must match
/// on both sides; auto-converge only matters where the guest runs; `late-block-activate`
/// keeps the target's disks inactive (unlocked) until it is told to run.
pub fn capabilities(o: &Options, outgoing: bool) -> qmp::migrate_set_capabilities {
    let mut capabilities = vec![
        capability(MigrationCapability::events, true),
        capability(MigrationCapability::multifd, o.multifd_channels > 0),
    ];
    capabilities.push(if outgoing {
        capability(MigrationCapability::auto_converge, o.auto_converge)
    } else {
        capability(MigrationCapability::late_block_activate, true)
    });
    qmp::migrate_set_capabilities { capabilities }
}

/// `migrate` to `uri` (another QEMU, or a file).
pub fn migrate(uri: &str) -> qmp::migrate {
    qmp::migrate {
        uri: Some(uri.into()),
        channels: None,
        detach: None,
        resume: None,
    }
}

/// `migrate-incoming` from `uri` (another QEMU, or a file).
pub fn migrate_incoming(uri: &str) -> qmp::migrate_incoming {
    qmp::migrate_incoming {
        uri: Some(uri.into()),
        channels: None,
        exit_on_error: None,
    }
}

/// QEMU's `downtime-limit` for a pause of at most `max_downtime`: half of it. QEMU switches
/// over once what is left to send would take that long at the rate the source sends at, but
/// the guest's pause also covers the target loading what is still in flight, the device state,
/// and starting the guest: with the whole budget given to QEMU, idle 1 GiB guests paused
/// 34 ms (median, up to 50 ms) with 5-16 MiB left at the switch-over; with half, 19 ms, and no
/// slower to converge when busy (2-CPU host, TCG, loopback).
pub fn qemu_downtime_limit(max_downtime: Duration) -> u64 {
    (max_downtime.as_millis() as u64 / 2).max(1)
}

/// `migrate-set-parameters` for the source (`outgoing`) or the target.
pub fn parameters(o: &Options, outgoing: bool) -> qmp::migrate_set_parameters {
    let multifd = (o.multifd_channels > 0).then_some(o.multifd_channels);
    qmp::migrate_set_parameters(qmp::MigrateSetParameters {
        multifd_channels: multifd.map(|n| u8::try_from(n).unwrap_or(u8::MAX)),
        // 0: no rate limit.
        max_bandwidth: outgoing.then(|| o.bandwidth.unwrap_or(0)),
        downtime_limit: outgoing.then(|| qemu_downtime_limit(o.max_downtime)),
        ..Default::default()
    })
}

/// Parameters once the completion timeout has passed: no bandwidth cap, and auto-converge
/// throttling that starts high and climbs fast to 99 %. Throttling before cancelling, because
/// a cancelled migration leaves the node drain or rebalance undone, while a throttled guest
/// still runs; cancelling comes only when even that does not converge.
pub fn escalation() -> qmp::migrate_set_parameters {
    qmp::migrate_set_parameters(qmp::MigrateSetParameters {
        max_bandwidth: Some(0),
        cpu_throttle_initial: Some(50),
        cpu_throttle_increment: Some(25),
        max_cpu_throttle: Some(99),
        cpu_throttle_tailslow: Some(false),
        ..Default::default()
    })
}

/// What the completion timer says to do at `elapsed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    Wait,
    Escalate,
    Cancel,
}

pub fn deadline(elapsed: Duration, timeout: Duration, escalated: bool) -> Deadline {
    if elapsed >= timeout * 2 {
        Deadline::Cancel
    } else if elapsed >= timeout && !escalated {
        Deadline::Escalate
    } else {
        Deadline::Wait
    }
}

/// QEMU's `query-migrate` status, as far as the agent cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuStatus {
    /// none, setup, active, pre-switchover, device…
    Going,
    /// The source has stopped the guest for the last pass.
    Switchover,
    Completed,
    Failed,
    Cancelled,
}

pub fn qemu_status(s: &str) -> QemuStatus {
    match s {
        "completed" => QemuStatus::Completed,
        "failed" => QemuStatus::Failed,
        "cancelled" => QemuStatus::Cancelled,
        "device" | "pre-switchover" => QemuStatus::Switchover,
        _ => QemuStatus::Going,
    }
}

/// The figures of a `query-migrate` reply, written into `p`. Returns QEMU's status and, when
/// it failed, its description.
pub fn read_query_migrate(
    reply: &qmp::MigrationInfo,
    p: &mut pb::MigrationProgress,
) -> (QemuStatus, String) {
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    let ms = |v: Option<i64>| u(v.unwrap_or(0)).min(u32::MAX.into()) as u32;
    if let Some(ram) = &reply.ram {
        p.transferred_bytes = u(ram.transferred);
        p.remaining_bytes = u(ram.remaining);
        p.total_bytes = u(ram.total);
        p.iterations = u(ram.dirty_sync_count);
        let page = u(ram.page_size).max(1);
        p.dirty_rate_bytes_per_second = u(ram.dirty_pages_rate).saturating_mul(page);
        // QEMU reports megabits per second.
        p.throughput_bytes_per_second = (ram.mbps * 1e6 / 8.0) as u64;
    }
    p.expected_downtime_ms = ms(reply.expected_downtime);
    p.cpu_throttle_percent = ms(reply.cpu_throttle_percentage);
    if reply.downtime.is_some() {
        p.qemu_downtime_ms = ms(reply.downtime);
    }
    (
        info_status(reply),
        reply.error_desc.clone().unwrap_or_default(),
    )
}

/// The status of a `query-migrate` reply.
pub fn info_status(reply: &qmp::MigrationInfo) -> QemuStatus {
    qemu_status(&reply.status.as_ref().map(enum_name).unwrap_or_default())
}

pub fn is_final(phase: pb::MigrationPhase) -> bool {
    matches!(
        phase,
        pb::MigrationPhase::Completed | pb::MigrationPhase::Failed | pb::MigrationPhase::Cancelled
    )
}

/// An inclusive TCP port range, "49152-49215".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRange(pub RangeInclusive<u16>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("{0:?} is not a port (1-65535)")]
    NotAPort(String),
    #[error("{0} is above {1}")]
    Reversed(u16, u16),
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, PortRangeError> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let port = |x: &str| {
            x.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| PortRangeError::NotAPort(x.to_string()))
        };
        let (a, b) = (port(a)?, port(b)?);
        if a > b {
            return Err(PortRangeError::Reversed(a, b));
        }
        Ok(PortRange(a..=b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// What QEMU is sent.
    pub(super) fn sent<T: serde::Serialize>(command: &T) -> Value {
        serde_json::to_value(command).unwrap()
    }

    #[test]
    fn defaults_are_the_agents_not_qemus() {
        let o = Options::try_from(None).unwrap();
        assert_eq!(o, Options::default());
        let p = sent(&parameters(&o, true));
        assert_eq!(p["max-bandwidth"], 0);
        assert_eq!(p["downtime-limit"], 25, "half the pause the agent allows");
        assert_eq!(p["multifd-channels"], o.multifd_channels);
        assert_eq!(
            [1, 2, 4, 64].map(default_multifd_channels),
            [1, 2, 4, 4],
            "one channel per CPU, at most 4"
        );
        let caps = sent(&capabilities(&o, true)).to_string();
        assert!(caps.contains(r#"{"capability":"auto-converge","state":true}"#));
        assert!(caps.contains(r#"{"capability":"multifd","state":true}"#));
        // The target gets multifd alike, and keeps its disks inactive until told to run.
        let t = sent(&capabilities(&o, false)).to_string();
        assert!(t.contains(r#"{"capability":"multifd","state":true}"#));
        assert!(t.contains("late-block-activate"));
        assert!(!t.contains("auto-converge"));
        assert!(sent(&parameters(&o, false)).get("max-bandwidth").is_none());
    }

    #[test]
    fn options_are_checked_with_field_names() {
        let o = |f: fn(&mut pb::MigrationOptions)| {
            let mut m = pb::MigrationOptions::default();
            f(&mut m);
            Options::try_from(Some(m))
        };
        let err = |r: Result<Options, FieldError>| r.unwrap_err().to_string();
        assert!(err(o(|m| m.max_downtime_ms = Some(0))).contains("maxDowntimeMs"));
        assert!(err(o(|m| m.max_downtime_ms = Some(3_600_000))).contains("maxDowntimeMs"));
        assert!(err(o(|m| m.multifd_channels = Some(1000))).contains("multifdChannels"));
        assert!(err(o(|m| m.completion_timeout_seconds = Some(0))).contains("completionTimeout"));
        assert!(err(o(|m| m.bandwidth_bytes_per_second = Some(u64::MAX))).contains("bandwidth"));
        let set = o(|m| {
            m.bandwidth_bytes_per_second = Some(32 << 20);
            m.auto_converge = Some(false);
            m.multifd_channels = Some(0);
            m.max_downtime_ms = Some(300);
        })
        .unwrap();
        assert_eq!(set.bandwidth, Some(32 << 20));
        let p = sent(&parameters(&set, true));
        assert_eq!(p["max-bandwidth"], 32 << 20);
        assert_eq!(p["downtime-limit"], 150);
        assert_eq!(qemu_downtime_limit(Duration::from_millis(1)), 1);
        assert!(p.get("multifd-channels").is_none());
        assert!(
            sent(&capabilities(&set, true))
                .to_string()
                .contains(r#""multifd","state":false"#)
        );
    }

    #[test]
    fn the_timeout_escalates_once_then_cancels() {
        let t = Duration::from_secs(10);
        assert_eq!(deadline(Duration::from_secs(9), t, false), Deadline::Wait);
        assert_eq!(
            deadline(Duration::from_secs(10), t, false),
            Deadline::Escalate
        );
        assert_eq!(deadline(Duration::from_secs(15), t, true), Deadline::Wait);
        assert_eq!(deadline(Duration::from_secs(20), t, true), Deadline::Cancel);
        assert_eq!(sent(&escalation())["max-cpu-throttle"], 99);
    }

    #[test]
    fn query_migrate_figures() {
        let reply = serde_json::from_value(json!({
            "status": "active", "expected-downtime": 42, "cpu-throttle-percentage": 30,
            "ram": {"transferred": 1000, "remaining": 500, "total": 2000, "dirty-sync-count": 3,
                    "page-size": 4096, "dirty-pages-rate": 10, "mbps": 800.0,
                    "duplicate": 0, "normal": 0, "normal-bytes": 0, "multifd-bytes": 0,
                    "pages-per-second": 0, "precopy-bytes": 0, "downtime-bytes": 0,
                    "postcopy-bytes": 0, "postcopy-requests": 0,
                    "dirty-sync-missed-zero-copy": 0}
        }))
        .unwrap();
        let mut p = pb::MigrationProgress::default();
        assert_eq!(read_query_migrate(&reply, &mut p).0, QemuStatus::Going);
        assert_eq!(
            (
                p.transferred_bytes,
                p.remaining_bytes,
                p.total_bytes,
                p.iterations
            ),
            (1000, 500, 2000, 3)
        );
        assert_eq!(p.dirty_rate_bytes_per_second, 40960);
        assert_eq!(p.throughput_bytes_per_second, 100_000_000);
        assert_eq!((p.expected_downtime_ms, p.cpu_throttle_percent), (42, 30));
        let failed =
            serde_json::from_value(json!({"status": "failed", "error-desc": "Unable to write"}))
                .unwrap();
        assert_eq!(
            read_query_migrate(&failed, &mut p),
            (QemuStatus::Failed, "Unable to write".into())
        );
        assert_eq!(qemu_status("device"), QemuStatus::Switchover);
        assert_eq!(qemu_status("completed"), QemuStatus::Completed);
    }

    #[test]
    fn port_ranges() {
        assert_eq!("49152-49215".parse(), Ok(PortRange(49152..=49215)));
        assert_eq!("7000".parse(), Ok(PortRange(7000..=7000)));
        assert_eq!(
            "0-10".parse::<PortRange>(),
            Err(PortRangeError::NotAPort("0".into()))
        );
        assert_eq!(
            "20-10".parse::<PortRange>(),
            Err(PortRangeError::Reversed(20, 10))
        );
        assert_eq!(
            "a-b".parse::<PortRange>(),
            Err(PortRangeError::NotAPort("a".into()))
        );
    }
}
