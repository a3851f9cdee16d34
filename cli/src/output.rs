//! Printing views as a table (for people) or JSON/YAML (for programs).

use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

use crate::view::{EventView, NodeView, VmView};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

pub fn structured<T: Serialize>(format: Format, value: &T) -> anyhow::Result<bool> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        Format::Table => return Ok(false),
    }
    Ok(true)
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    t
}

fn mib(bytes: u64) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        format!("{}Mi", bytes >> 20)
    }
}

pub fn vms(format: Format, vms: &[VmView]) -> anyhow::Result<()> {
    if structured(format, &vms)? {
        return Ok(());
    }
    let mut t = table(&[
        "NAME",
        "PHASE",
        "NODE",
        "CPUS",
        "MEMORY",
        "GUEST-AGENT",
        "PID",
        "MESSAGE",
    ]);
    for vm in vms {
        let s = &vm.status;
        let running = s.pid != 0;
        t.add_row(vec![
            vm.name.clone(),
            s.phase.clone(),
            s.node.clone(),
            if running {
                s.cpus.to_string()
            } else {
                vm.spec.cpus.to_string()
            },
            if running {
                mib(s.memory_bytes)
            } else {
                vm.spec.memory.clone()
            },
            if s.agent_connected { "connected" } else { "-" }.into(),
            if running {
                s.pid.to_string()
            } else {
                "-".into()
            },
            s.message.clone(),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn vm(format: Format, vm: &VmView) -> anyhow::Result<()> {
    if structured(format, vm)? {
        return Ok(());
    }
    let s = &vm.status;
    let mut t = table(&["FIELD", "VALUE"]);
    let rows: Vec<(&str, String)> = vec![
        ("Name", vm.name.clone()),
        ("Phase", s.phase.clone()),
        ("Message", s.message.clone()),
        ("Node", s.node.clone()),
        ("Accelerator", s.accelerator.clone()),
        (
            "CPUs (actual/spec/max)",
            format!("{}/{}/{}", s.cpus, vm.spec.cpus, vm.spec.max_cpus),
        ),
        (
            "Memory (actual/spec/max)",
            format!(
                "{}/{}/{}",
                mib(s.memory_bytes),
                vm.spec.memory,
                vm.spec.max_memory
            ),
        ),
        (
            "Guest sees (cpus/memory)",
            format!("{}/{}", s.guest_cpus, mib(s.guest_memory_bytes)),
        ),
        (
            "Guest agent",
            if s.agent_connected {
                "connected".into()
            } else {
                "not connected".into()
            },
        ),
        ("QEMU status", s.qemu_status.clone()),
        ("PID", s.pid.to_string()),
        ("Kernel", vm.spec.kernel.clone()),
        ("Cmdline", vm.spec.cmdline.clone()),
        (
            "Disks",
            vm.spec
                .disks
                .iter()
                .map(|d| format!("{}={} ({})", d.name, d.path, d.format))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        (
            "Guest interfaces",
            s.interfaces
                .iter()
                .map(|i| format!("{} {} {}", i.name, i.mac, i.ip_addresses.join(" ")))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("Serial log", s.serial_log.clone()),
        (
            "Startup (QMP/running/agent ms)",
            format!(
                "{}/{}/{}",
                s.startup.qmp_ready_ms, s.startup.running_ms, s.startup.agent_connected_ms
            ),
        ),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    Ok(())
}

fn tls_expiry(n: &NodeView) -> String {
    match (n.tls_not_after.as_str(), n.tls_days_left) {
        ("", _) => "none (the agent serves no TLS)".into(),
        (at, left) if left < 0 => format!("EXPIRED at {at}"),
        (at, left) => format!("expires {at} ({left} days left)"),
    }
}

pub fn node(format: Format, n: &NodeView) -> anyhow::Result<()> {
    if structured(format, n)? {
        return Ok(());
    }
    let mut t = table(&["FIELD", "VALUE"]);
    let ext: Vec<_> = n
        .kvm
        .extensions
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let rows: Vec<(&str, String)> = vec![
        ("Node", n.node_name.clone()),
        ("Hostname", n.hostname.clone()),
        ("Agent", n.agent_version.clone()),
        ("CPUs", n.cpus.to_string()),
        (
            "Memory (total/available)",
            format!(
                "{}/{}",
                mib(n.memory_total_bytes),
                mib(n.memory_available_bytes)
            ),
        ),
        (
            "VMs (count/cpus/memory)",
            format!(
                "{}/{}/{}",
                n.vm_count,
                n.allocated_cpus,
                mib(n.allocated_memory_bytes)
            ),
        ),
        ("QEMU", n.qemu_version.clone()),
        (
            "Accelerator",
            format!("{} ({})", n.accelerator, n.accelerator_reason),
        ),
        ("cgroups", n.cgroups.clone()),
        ("Lease", n.lease.describe()),
        ("TLS certificate", tls_expiry(n)),
        ("KVM modules", n.kvm.modules.join(", ")),
        ("KVM usable", n.kvm.usable.to_string()),
        (
            "KVM API / max vCPUs",
            format!("{} / {}", n.kvm.api_version, n.kvm.max_vcpus),
        ),
        ("KVM extensions", ext.join(" ")),
    ];
    for (k, v) in rows {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    Ok(())
}

/// One line per event; with -o json, one JSON object per line (NDJSON).
pub fn event(format: Format, e: &EventView) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string(e)?),
        Format::Yaml => print!("---\n{}", serde_yaml_ng::to_string(e)?),
        Format::Table => println!(
            "{:<9} {:<20} {:<10} {:<22} {}",
            e.kind, e.vm.name, e.vm.status.phase, e.reason, e.message
        ),
    }
    Ok(())
}

/// A duration in milliseconds as kubectl prints ages: 45s, 12m, 3h, 2d.
pub fn age(ms: i64) -> String {
    let s = (ms / 1000).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
