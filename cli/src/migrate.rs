//! `hyperctl vm migrate`: the request from flags, and the progress stream shown as a bar on a
//! terminal or as final figures in JSON/YAML.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::endpoint::Address;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tonic::Streaming;

use crate::output::{self, Format};

#[derive(Args)]
pub struct MigrateArgs {
    name: String,
    /// The target node's agent: unix:///path or http://host:port.
    #[arg(long)]
    to: Address,
    /// Bandwidth cap per second as a quantity, e.g. 500Mi (0 = unlimited, the default).
    #[arg(long, value_parser = hypersdk_proto::quantity::parse_bytes)]
    bandwidth: Option<u64>,
    /// Longest acceptable guest pause at the switch-over, e.g. 50ms (the default).
    #[arg(long, value_parser = parse_duration)]
    max_downtime: Option<Duration>,
    /// Throttle a guest that dirties memory faster than it is sent (default true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    auto_converge: Option<bool>,
    /// Parallel connections for memory; 0 turns multifd off (default 4, or one per host CPU
    /// on hosts with fewer).
    #[arg(long)]
    multifd: Option<u32>,
    /// After this long the agent throttles hard; after twice as long it cancels (default 2m).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Follow the migration to its end (a progress bar on a terminal).
    #[arg(long)]
    wait: bool,
}

impl MigrateArgs {
    pub fn request(&self) -> pb::MigrateVmRequest {
        pb::MigrateVmRequest {
            name: self.name.clone(),
            target: self.to.to_string(),
            options: Some(pb::MigrationOptions {
                bandwidth_bytes_per_second: self.bandwidth,
                max_downtime_ms: self.max_downtime.map(|d| d.as_millis() as u32),
                auto_converge: self.auto_converge,
                multifd_channels: self.multifd,
                completion_timeout_seconds: self.timeout.map(|d| d.as_secs().max(1) as u32),
            }),
        }
    }

    pub fn wait(&self) -> bool {
        self.wait
    }
}

/// The stable JSON/YAML view of a migration's progress.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationView {
    pub vm: String,
    pub phase: String,
    pub message: String,
    pub source_node: String,
    pub target_node: String,
    pub total_time_ms: u64,
    pub downtime_ms: u32,
    pub qemu_downtime_ms: u32,
    pub transferred_bytes: u64,
    pub remaining_bytes: u64,
    pub total_bytes: u64,
    pub throughput_bytes_per_second: u64,
    pub dirty_rate_bytes_per_second: u64,
    pub iterations: u64,
    pub expected_downtime_ms: u32,
    pub cpu_throttle_percent: u32,
}

impl From<&pb::MigrationProgress> for MigrationView {
    fn from(p: &pb::MigrationProgress) -> Self {
        MigrationView {
            vm: p.vm.clone(),
            phase: phase_name(p.phase()),
            message: p.message.clone(),
            source_node: p.source_node.clone(),
            target_node: p.target_node.clone(),
            total_time_ms: p.elapsed_ms,
            downtime_ms: p.downtime_ms,
            qemu_downtime_ms: p.qemu_downtime_ms,
            transferred_bytes: p.transferred_bytes,
            remaining_bytes: p.remaining_bytes,
            total_bytes: p.total_bytes,
            throughput_bytes_per_second: p.throughput_bytes_per_second,
            dirty_rate_bytes_per_second: p.dirty_rate_bytes_per_second,
            iterations: p.iterations,
            expected_downtime_ms: p.expected_downtime_ms,
            cpu_throttle_percent: p.cpu_throttle_percent,
        }
    }
}

/// "Completed" for MIGRATION_PHASE_COMPLETED.
pub fn phase_name(phase: pb::MigrationPhase) -> String {
    let name = phase.as_str_name().trim_start_matches("MIGRATION_PHASE_");
    name[..1].to_string() + &name[1..].to_lowercase()
}

/// Follows the stream (to its end with `wait`, else its first message) and prints the last
/// figures. Ok(false) when the migration did not complete.
pub async fn follow(
    format: Format,
    mut stream: Streaming<pb::MigrationProgress>,
    wait: bool,
) -> anyhow::Result<bool> {
    let bar = (wait && format == Format::Table && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:12} [{bar:30}] {bytes}/{total_bytes} {wide_msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let mut last = None;
    while let Some(p) = stream.message().await? {
        if let Some(bar) = &bar {
            bar.set_length(p.total_bytes.max(1));
            bar.set_position(p.transferred_bytes.min(p.total_bytes));
            bar.set_message(phase_name(p.phase()));
        }
        last = Some(p);
        if !wait {
            break;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let last = last.ok_or_else(|| anyhow::anyhow!("the agent sent no progress"))?;
    let view = MigrationView::from(&last);
    if !output::structured(format, &view)? {
        print_summary(&view, wait);
    }
    Ok(!wait || last.phase() == pb::MigrationPhase::Completed)
}

fn print_summary(v: &MigrationView, waited: bool) {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    if !waited {
        println!(
            "migration of {} started ({}); follow it with `hyperctl vm get {}`",
            v.vm, v.phase, v.vm
        );
        return;
    }
    println!(
        "{} {} -> {}: {} in {} ms, guest paused {} ms (QEMU: {} ms), {:.0} MiB sent, {} passes",
        v.vm,
        v.source_node,
        v.target_node,
        v.phase,
        v.total_time_ms,
        v.downtime_ms,
        v.qemu_downtime_ms,
        mib(v.transferred_bytes),
        v.iterations
    );
    if !v.message.is_empty() {
        println!("{}", v.message);
    }
}

/// A duration flag the parser does not read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration")]
    NotANumber(String),
    #[error("{0:?}: give a unit, e.g. 50ms, 2s or 5m")]
    NoUnit(String),
}

/// "50ms", "2s", "5m".
fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| DurationError::NotANumber(s.into()))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(DurationError::NoUnit(s.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        let parse_bytes = hypersdk_proto::quantity::parse_bytes;
        assert_eq!(parse_bytes("500Mi"), Ok(500 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert!(parse_bytes("5XB").is_err());
        assert!(parse_bytes("99999999999Gi").is_err());
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(
            parse_duration("50"),
            Err(DurationError::NoUnit("50".into()))
        );
        let fast = parse_duration("fast");
        assert_eq!(fast, Err(DurationError::NotANumber("fast".into())));
    }

    #[test]
    fn phase_names_read_well() {
        assert_eq!(phase_name(pb::MigrationPhase::Completed), "Completed");
        assert_eq!(phase_name(pb::MigrationPhase::Switchover), "Switchover");
    }
}
