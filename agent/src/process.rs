//! QEMU processes: launched so that they outlive the agent, or adopted after an agent restart.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

/// QEMU's stderr, kept in the VM directory so failures can be explained.
pub const STDERR_FILE: &str = "qemu.log";

/// How a QEMU process ended, as far as the agent can know (an adopted process is not our child,
/// so its exit status is not ours to read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// A live QEMU process the agent supervises.
#[derive(Debug)]
pub enum Qemu {
    /// Launched by this agent process.
    Child(Child),
    /// Launched by an earlier agent; watched through a pidfd.
    Adopted { pid: u32, pidfd: AsyncFd<OwnedFd> },
}

impl Qemu {
    pub fn pid(&self) -> u32 {
        match self {
            Qemu::Child(c) => c.id().unwrap_or(0),
            Qemu::Adopted { pid, .. } => *pid,
        }
    }

    /// Waits for the process to end.
    pub async fn wait(&mut self) -> ExitInfo {
        match self {
            Qemu::Child(c) => {
                use std::os::unix::process::ExitStatusExt;
                match c.wait().await {
                    Ok(s) => ExitInfo {
                        code: s.code(),
                        signal: s.signal(),
                    },
                    Err(_) => ExitInfo::default(),
                }
            }
            Qemu::Adopted { pidfd, .. } => {
                // A pidfd becomes readable when its process exits.
                let _ = pidfd.readable().await;
                ExitInfo::default()
            }
        }
    }

    /// True once the process has ended.
    pub fn has_exited(&mut self) -> bool {
        match self {
            Qemu::Child(c) => !matches!(c.try_wait(), Ok(None)),
            Qemu::Adopted { pid, .. } => !pid_alive(*pid),
        }
    }

    /// Sends SIGKILL; `wait` reports the end.
    pub fn kill(&mut self) {
        match self {
            Qemu::Child(c) => {
                let _ = c.start_kill();
            }
            Qemu::Adopted { pidfd, .. } => {
                // pidfd_send_signal cannot hit a recycled pid, unlike kill(2).
                // SAFETY: a plain syscall on a pidfd we own; null siginfo is allowed.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        pidfd.get_ref().as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
            }
        }
    }
}

/// Spawns QEMU in its own session: signals to the agent's process group (Ctrl-C, a service
/// manager stopping the agent) do not reach the VM.
pub fn spawn(qemu: &Path, argv: &[String], vm_dir: &Path) -> std::io::Result<Qemu> {
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
    cmd.spawn().map(Qemu::Child)
}

/// Adopts a running QEMU if `pid` is alive and its command line holds `expected_arg` (the VM's
/// own QMP socket option), so a recycled pid is never mistaken for the VM.
pub fn adopt(pid: u32, expected_arg: &str) -> std::io::Result<Qemu> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    if !cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == expected_arg.as_bytes())
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("pid {pid} is not this VM's QEMU"),
        ));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the fd is ours alone and stays open for as long as the AsyncFd holds it.
    let pidfd = unsafe { AsyncFd::register(fd)? };
    Ok(Qemu::Adopted { pid, pidfd })
}

/// The pid of a live process whose command line holds `expected_arg`, found by scanning /proc:
/// how a VM's QEMU is found when its state file was lost.
pub fn find(expected_arg: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == expected_arg.as_bytes())
                .then_some(pid)
        })
}

fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// The last `max` bytes of QEMU's stderr written since `from` (the file length at launch).
pub fn stderr_tail(vm_dir: &Path, from: u64, max: usize) -> String {
    let Ok(bytes) = std::fs::read(vm_dir.join(STDERR_FILE)) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn adopts_only_the_expected_process_and_sees_it_end() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until exec completes, /proc shows the forked test binary's command line.
        while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep"))
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(adopt(pid, "unix:/nowhere/qmp.sock,server=on,wait=off").is_err());
        let mut adopted = adopt(pid, "30").unwrap();
        assert_eq!(adopted.pid(), pid);
        assert!(!adopted.has_exited());
        adopted.kill();
        // Reap it as its parent would; the pidfd reports the exit either way.
        child.wait().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), adopted.wait())
            .await
            .expect("pidfd signals the exit");
    }
}
