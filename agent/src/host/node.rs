//! Facts about this node for GetNode: capacity, QEMU version, accelerator, KVM.

use std::path::Path;

use hypersdk_proto::agent::v1 as pb;

use crate::host::accel::Selection;
use crate::host::kvm::KvmFacts;
use crate::host::launch::Launcher;

/// Facts that do not change while the agent runs, read once at start.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node_name: String,
    pub hostname: String,
    pub cpus: u32,
    pub qemu_version: String,
    pub accel: Selection,
    pub kvm: KvmFacts,
    /// Per-VM cgroups: where, or why none.
    pub cgroups: String,
}

/// This node's `MemTotal` and `MemAvailable` now, in bytes (0 if /proc/meminfo is unreadable).
pub fn memory() -> (u64, u64) {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

/// `MemTotal` and `MemAvailable` from /proc/meminfo text, in bytes.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// First line of `qemu --version`, e.g. "QEMU emulator version 10.0.2 (Debian ...)".
pub fn qemu_version(launcher: &Launcher, qemu: &Path) -> std::io::Result<String> {
    let out = launcher.command(qemu, None)?.arg("--version").output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{} --version failed: {}",
            qemu.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

/// Whether `qemu` has the device `driver`, from `-device help` (which exits 0 either way).
pub fn has_device(launcher: &Launcher, qemu: &Path, driver: &str) -> bool {
    let listed = format!("name \"{driver}\",");
    let Ok(mut cmd) = launcher.command(qemu, None) else {
        return false;
    };
    cmd.args(["-nodefaults", "-device", "help"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with(&listed))
        })
}

impl NodeFacts {
    pub fn to_proto(
        &self,
        meminfo: &str,
        allocated: (u32, u64, u32),
        lease: pb::Lease,
    ) -> pb::Node {
        let (total, available) = parse_meminfo(meminfo);
        let k = &self.kvm;
        pb::Node {
            node_name: self.node_name.clone(),
            hostname: self.hostname.clone(),
            cpus: self.cpus,
            memory_total_bytes: total,
            memory_available_bytes: available,
            qemu_version: self.qemu_version.clone(),
            accelerator: self.accel.accel.as_str().into(),
            accelerator_reason: self.accel.reason.clone(),
            kvm: Some(pb::KvmInfo {
                present: k.present,
                modules: k.modules.clone(),
                api_version: k.api_version,
                max_vcpus: k.max_vcpus,
                recommended_vcpus: k.recommended_vcpus,
                extensions: k
                    .extensions
                    .iter()
                    .map(|(n, v)| (n.to_string(), *v))
                    .collect(),
                usable: k.self_test.is_ok(),
            }),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            allocated_cpus: allocated.0,
            allocated_memory_bytes: allocated.1,
            vm_count: allocated.2,
            cgroups: self.cgroups.clone(),
            lease: Some(lease),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo() {
        let text = "MemTotal:       24576000 kB\nMemFree:  1 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(text), (24576000 * 1024, 20000000 * 1024));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }
}
