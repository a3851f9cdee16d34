//! QEMU processes: launched so that they outlive the agent, or adopted after an agent restart.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

use crate::host::launch::Launcher;

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

/// Spawns QEMU in a process group of its own: signals to the agent's (Ctrl-C in a terminal)
/// do not reach the VM. It stays in the agent's session, which the kernel's autogroup feature
/// schedules as one unit where VMs have no cpu cgroup: QEMU threads then share the CPU thread
/// by thread, so a VM's share grows with its vCPUs, and priorities between QEMUs count (a
/// session per QEMU gave every VM an equal share whatever its size).
/// `launcher` says where: as the agent's child, or on the host (see [`Launcher`]).
pub fn spawn(
    launcher: &Launcher,
    qemu: &Path,
    argv: &[String],
    vm_dir: &Path,
) -> std::io::Result<Qemu> {
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(vm_dir.join(STDERR_FILE))?;
    let mut cmd = Command::from(launcher.command(qemu, Some(vm_dir))?);
    cmd.args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(false);
    cmd.process_group(0);
    cmd.spawn().map(Qemu::Child)
}

/// The nice value of a QEMU's main thread while it receives a live migration. The threads
/// that receive and load the state must keep up with the sender: data they fall behind on
/// waits in socket buffers and is loaded only after the source has paused the guest, which
/// lengthens the pause. Only the main thread is raised: it loads the state and starts the
/// receiving threads, which inherit its priority (with every thread of QEMU raised, the pause
/// was as long as at normal priority). Measured with both ends on one 2-CPU host: a median
/// pause of 50 ms at normal priority, 20 ms raised.
pub const LOADING_NICE: i32 = -10;

/// Raises the priority of the main thread of process `pid` to [`LOADING_NICE`], for the
/// threads it starts from now on too. Needs CAP_SYS_NICE.
pub fn prioritize_loading(pid: u32) -> std::io::Result<()> {
    // SAFETY: a plain syscall; a process's main thread has the process's id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, pid, LOADING_NICE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's nice value: the agent's own.
pub fn own_priority() -> i32 {
    // SAFETY: a plain syscall. It cannot fail for the calling thread, so its result (which
    // may be -1) is the priority.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Gives every thread of process `pid` the agent's own priority again. Linux keeps a nice
/// value per thread, and a new thread inherits its creator's: a second pass catches threads
/// started during the first.
pub fn reset_priority(pid: u32) -> std::io::Result<()> {
    let own = own_priority();
    for _ in 0..2 {
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let Some(tid) = entry?.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // SAFETY: a plain syscall on a thread id.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, own) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The nice value of the main thread of process `pid`.
pub fn priority(pid: u32) -> std::io::Result<i32> {
    read_nice(Path::new(&format!("/proc/{pid}/stat")))
}

/// The nice value of each thread of process `pid`.
pub fn thread_priorities(pid: u32) -> std::io::Result<Vec<i32>> {
    std::fs::read_dir(format!("/proc/{pid}/task"))?
        .map(|entry| read_nice(&entry?.path().join("stat")))
        .collect()
}

/// The nice value in a `stat` file.
fn read_nice(stat_file: &Path) -> std::io::Result<i32> {
    let stat = std::fs::read_to_string(stat_file)?;
    stat_nice(&stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: no nice field", stat_file.display()),
        )
    })
}

/// The nice field of a `stat` line: the 17th after the command name, which may hold spaces
/// and parentheses and so is skipped to its last `)`.
fn stat_nice(stat: &str) -> Option<i32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(16)?
        .parse()
        .ok()
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

    #[test]
    fn nice_is_read_past_the_command_name() {
        let stat = "42 (qemu (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 5 3 0 0 30 -10 7 0 123";
        assert_eq!(stat_nice(stat), Some(-10));
        assert_eq!(stat_nice("42 (short) S 1"), None);
    }

    /// capget(2)/capset(2) arguments, version 3 (two sets of 32 capability bits).
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    const CAPS_V3: u32 = 0x2008_0522;
    const CAP_SYS_NICE: u32 = 1 << 23;

    /// The calling thread's capabilities, or with `set`, sets them first.
    fn thread_caps(set: Option<[CapData; 2]>) -> [CapData; 2] {
        let mut header = CapHeader {
            version: CAPS_V3,
            pid: 0,
        };
        let mut data = set.unwrap_or_default();
        let call = if set.is_some() {
            libc::SYS_capset
        } else {
            libc::SYS_capget
        };
        // SAFETY: a header and two data structs, as the v3 ABI has them, that outlive the call.
        let rc = unsafe { libc::syscall(call, &mut header, data.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        data
    }

    #[tokio::test]
    async fn a_process_priority_is_raised_and_reset() {
        let argv = ["30".to_string()];
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn(&Launcher::Local, Path::new("sleep"), &argv, dir.path()).unwrap();
        let pid = child.pid();
        let own = own_priority();
        assert_eq!(thread_priorities(pid).unwrap(), vec![own]);
        // Without CAP_SYS_NICE (an agent that is not root) the raise is refused and changes
        // nothing. Capabilities belong to a thread: dropping it there leaves the others theirs.
        let refused = std::thread::spawn(move || {
            let mut caps = thread_caps(None);
            caps[0].effective &= !CAP_SYS_NICE;
            thread_caps(Some(caps));
            prioritize_loading(pid)
        })
        .join()
        .unwrap();
        assert_eq!(
            refused.unwrap_err().kind(),
            std::io::ErrorKind::PermissionDenied
        );
        assert_eq!(thread_priorities(pid).unwrap(), vec![own]);
        // With it (root, the agent's usual user), the main thread is raised; without, as above.
        let may_raise = thread_caps(None)[0].effective & CAP_SYS_NICE != 0;
        match (may_raise, prioritize_loading(pid)) {
            (true, Ok(())) => {
                assert_eq!(priority(pid).unwrap(), LOADING_NICE);
                assert_eq!(thread_priorities(pid).unwrap(), vec![LOADING_NICE]);
            }
            (false, Err(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
                assert_eq!(thread_priorities(pid).unwrap(), vec![own]);
            }
            (may_raise, result) => panic!("CAP_SYS_NICE: {may_raise}, raised: {result:?}"),
        }
        reset_priority(pid).unwrap();
        assert_eq!(thread_priorities(pid).unwrap(), vec![own]);
        // Its own process group, in the agent's session.
        let id = nix::unistd::Pid::from_raw(pid as i32);
        assert_eq!(nix::unistd::getpgid(Some(id)).unwrap(), id);
        assert_eq!(
            nix::unistd::getsid(Some(id)).unwrap(),
            nix::unistd::getsid(None).unwrap()
        );
        child.kill();
        child.wait().await;
    }

    #[tokio::test]
    async fn adopts_only_the_expected_process_and_sees_it_end() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Until exec completes, /proc shows the forked test binary's command line.
        let exec = async {
            while !std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"sleep"))
            {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), exec)
            .await
            .expect("sleep runs");
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
