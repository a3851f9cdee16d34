//! Launching a QEMU process so that it outlives the agent, and reading why it ended.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// QEMU's stderr, kept in the VM directory so failures can be explained.
pub const STDERR_FILE: &str = "qemu.log";

/// Spawns QEMU in its own session: signals to the agent's process group (Ctrl-C, a service
/// manager stopping the agent) do not reach the VM.
pub fn spawn(qemu: &Path, argv: &[String], vm_dir: &Path) -> std::io::Result<Child> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(vm_dir.join(STDERR_FILE))?;
    let mut cmd = Command::new(qemu);
    cmd.args(argv)
        .current_dir(vm_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(false);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
}

/// The last `max` bytes of QEMU's stderr written since `from` (the file length at launch).
pub fn stderr_tail(vm_dir: &Path, from: u64, max: usize) -> String {
    let path: PathBuf = vm_dir.join(STDERR_FILE);
    let Ok(bytes) = std::fs::read(&path) else {
        return String::new();
    };
    let new = &bytes[(from as usize).min(bytes.len())..];
    let start = new.len().saturating_sub(max);
    String::from_utf8_lossy(&new[start..])
        .trim()
        .replace('\n', "; ")
}

pub fn stderr_len(vm_dir: &Path) -> u64 {
    std::fs::metadata(vm_dir.join(STDERR_FILE))
        .map(|m| m.len())
        .unwrap_or(0)
}
