//! How the agent starts programs that must outlive it (QEMU).
//!
//! On a machine the agent runs on directly, a QEMU is a child in its own process group.
//! In a Kubernetes pod (`--host-launch`), that is not enough: the container runtime kills
//! every process of the container's cgroup when the container ends, and the program would run
//! from the image's filesystem, which goes with the pod. So, between fork and exec, the child
//! moves itself into a host cgroup (`--vm-cgroup`, in every hierarchy the host has mounted) and
//! enters the host's mount namespace, that of a host process (`--host-pid`; by default the
//! agent's parent, which in a pod is the container runtime's shim, on the host; the pod shares
//! the host's PID namespace): QEMU then runs the node's binary, sees the node's files at the
//! paths the agent mounts at the same places, and belongs to no container. A new agent pod
//! finds it by pid and adopts it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("--host-launch: {}: {source} (the agent pod needs hostPID and privileges)", path.display())]
    Host {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--host-launch: the host process has no cgroup hierarchy mounted")]
    NoCgroups,
    #[error("--vm-cgroup {0:?}: must be a relative path without '..'")]
    BadCgroup(String),
}

fn host_error(path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError {
    let path = path.to_path_buf();
    move |source| LaunchError::Host { path, source }
}

/// How programs that outlive the agent are started.
#[derive(Debug, Clone, Default)]
pub enum Launcher {
    /// As children of the agent, from its filesystem.
    #[default]
    Local,
    /// On the host: in its mount namespace and in these host cgroups.
    Host(HostLaunch),
}

#[derive(Debug, Clone)]
pub struct HostLaunch {
    /// The host's root, as the agent sees it (`/proc/PID/root`).
    root: PathBuf,
    /// The host's mount namespace (`/proc/PID/ns/mnt`), opened once: the process it was
    /// found through may end.
    mnt_ns: Arc<OwnedFd>,
    /// `cgroup.procs` of the VM cgroup in each hierarchy, opened for writing.
    procs_files: Vec<Arc<OwnedFd>>,
}

/// The cgroup hierarchies in a mountinfo text: mount point, and whether it is cgroup v1.
pub fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, bool)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount = left.split_whitespace().nth(4)?;
            match fstype {
                "cgroup" => Some((PathBuf::from(mount), true)),
                "cgroup2" => Some((PathBuf::from(mount), false)),
                _ => None,
            }
        })
        .collect()
}

/// Checks a `--vm-cgroup` value: a path under each hierarchy's root.
pub fn check_cgroup(cgroup: &str) -> Result<&Path, LaunchError> {
    let path = Path::new(cgroup);
    let plain = path
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if cgroup.is_empty() || !plain {
        return Err(LaunchError::BadCgroup(cgroup.to_string()));
    }
    Ok(path)
}

impl HostLaunch {
    /// Prepares `vm_cgroup` in every cgroup hierarchy of the host, seen through the host
    /// process `host_pid` (0: the agent's parent).
    pub fn prepare(host_pid: u32, vm_cgroup: &str) -> Result<HostLaunch, LaunchError> {
        let pid = match host_pid {
            0 => nix::unistd::getppid().as_raw() as u32,
            pid => pid,
        };
        Self::prepare_at(Path::new(&format!("/proc/{pid}")), vm_cgroup)
    }

    /// The same for the host process seen at `proc1` (tests use a directory laid out like
    /// one).
    pub fn prepare_at(proc1: &Path, vm_cgroup: &str) -> Result<HostLaunch, LaunchError> {
        let relative = check_cgroup(vm_cgroup)?;
        let root = proc1.join("root");
        let mountinfo_path = proc1.join("mountinfo");
        let mountinfo =
            std::fs::read_to_string(&mountinfo_path).map_err(host_error(&mountinfo_path))?;
        let mounts = cgroup_mounts(&mountinfo);
        if mounts.is_empty() {
            return Err(LaunchError::NoCgroups);
        }
        let mut cgroup_procs = Vec::new();
        for (mount, v1) in mounts {
            let top = root.join(mount.strip_prefix("/").unwrap_or(&mount));
            let mut dir = top.clone();
            for part in relative.components() {
                let parent = dir.clone();
                dir.push(part);
                std::fs::create_dir_all(&dir).map_err(host_error(&dir))?;
                if v1 {
                    inherit_cpuset(&parent, &dir)?;
                }
            }
            cgroup_procs.push(dir.join("cgroup.procs"));
        }
        let open = |path: &Path, write: bool| {
            std::fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .open(path)
                .map(|f| Arc::new(OwnedFd::from(f)))
                .map_err(host_error(path))
        };
        let procs_files = cgroup_procs
            .iter()
            .map(|p| open(p, true))
            .collect::<Result<_, _>>()?;
        Ok(HostLaunch {
            mnt_ns: open(&proc1.join("ns/mnt"), false)?,
            root,
            procs_files,
        })
    }

    /// `path` on the host, as the agent sees it.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }
}

/// A new v1 cpuset takes no process until it has CPUs and memory nodes: its parent's.
fn inherit_cpuset(parent: &Path, dir: &Path) -> Result<(), LaunchError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        let Ok(current) = std::fs::read_to_string(&own) else {
            return Ok(()); // not the cpuset hierarchy
        };
        if current.trim().is_empty() {
            let from = parent.join(file);
            let value = std::fs::read_to_string(&from).map_err(host_error(&from))?;
            std::fs::write(&own, value.trim()).map_err(host_error(&own))?;
        }
    }
    Ok(())
}

impl Launcher {
    /// Where `program` (a path, or a name looked up in PATH) is, as the launched process will
    /// run it; None when it does not exist there.
    pub fn find_program(&self, program: &Path) -> Option<PathBuf> {
        let exists = |p: &Path| match self {
            Launcher::Local => p.is_file(),
            Launcher::Host(h) => h.host_path(p).is_file(),
        };
        if program.components().count() > 1 {
            return exists(program).then(|| program.to_path_buf());
        }
        // The host's PATH is not known here: the usual directories, then the agent's PATH.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = match self {
            Launcher::Local => Vec::new(),
            Launcher::Host(_) => ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
                .iter()
                .map(PathBuf::from)
                .collect(),
        };
        dirs.extend(std::env::split_paths(&path));
        dirs.into_iter()
            .map(|d| d.join(program))
            .find(|c| exists(c))
    }

    /// A command that runs `program` (from [`Launcher::find_program`]) in `dir` where this
    /// launcher puts programs.
    pub fn command(
        &self,
        program: &Path,
        dir: Option<&Path>,
    ) -> std::io::Result<std::process::Command> {
        let mut cmd = std::process::Command::new(program);
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        let Launcher::Host(host) = self else {
            return Ok(cmd);
        };
        // Everything the child needs is opened or allocated before the fork: between fork
        // and exec it makes system calls only.
        let mnt_ns = host.mnt_ns.clone();
        let procs = host.procs_files.clone();
        let dir = dir
            .map(|d| CString::new(d.as_os_str().as_bytes()))
            .transpose()
            .map_err(std::io::Error::other)?;
        // SAFETY: the closure only makes async-signal-safe system calls on descriptors and a
        // string made before the fork, which it owns.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &procs {
                    // "0": the writing process.
                    if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(mnt_ns.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Entering a mount namespace moves the root and working directory to its root.
                if let Some(dir) = &dir
                    && libc::chdir(dir.as_ptr()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_every_cgroup_hierarchy() {
        assert_eq!(
            cgroup_mounts(MOUNTINFO),
            vec![
                (PathBuf::from("/sys/fs/cgroup/cpu"), true),
                (PathBuf::from("/sys/fs/cgroup/cpuset"), true),
                (PathBuf::from("/sys/fs/cgroup/unified"), false),
            ]
        );
    }

    #[test]
    fn vm_cgroups_are_relative_paths() {
        assert!(check_cgroup("hypersdk-vms").is_ok());
        assert!(check_cgroup("cluster/vms").is_ok());
        for bad in ["", "/vms", "../vms", "a/../../b"] {
            let e = check_cgroup(bad).unwrap_err();
            assert!(e.to_string().contains("--vm-cgroup"), "{e}");
        }
    }

    /// Against a directory laid out like a host process's /proc entry and cgroupfs.
    #[test]
    fn prepares_the_cgroup_in_each_hierarchy() {
        let proc1 = tempfile::tempdir().unwrap();
        let missing = HostLaunch::prepare_at(proc1.path(), "vms").unwrap_err();
        assert!(
            missing.to_string().contains("mountinfo") && missing.to_string().contains("hostPID"),
            "{missing}"
        );
        std::fs::write(proc1.path().join("mountinfo"), MOUNTINFO).unwrap();
        let cg = proc1.path().join("root/sys/fs/cgroup");
        for h in ["cpu", "cpuset", "unified"] {
            std::fs::create_dir_all(cg.join(h)).unwrap();
        }
        std::fs::write(cg.join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(cg.join("cpuset/cpuset.mems"), "0\n").unwrap();
        // What the kernel shows in a new cgroup: its files, empty.
        for h in ["cpu", "cpuset", "unified"] {
            std::fs::create_dir_all(cg.join(h).join("cluster/vms")).unwrap();
            std::fs::write(cg.join(h).join("cluster/vms/cgroup.procs"), "").unwrap();
        }
        std::fs::create_dir_all(proc1.path().join("ns")).unwrap();
        std::fs::write(proc1.path().join("ns/mnt"), "").unwrap();
        for dir in ["cpuset/cluster", "cpuset/cluster/vms"] {
            std::fs::write(cg.join(dir).join("cpuset.cpus"), "").unwrap();
            std::fs::write(cg.join(dir).join("cpuset.mems"), "").unwrap();
        }
        let host = HostLaunch::prepare_at(proc1.path(), "cluster/vms").unwrap();
        assert_eq!(host.procs_files.len(), 3);
        let read = |p: &str| std::fs::read_to_string(cg.join(p)).unwrap();
        assert_eq!(read("cpuset/cluster/vms/cpuset.cpus"), "0-1");
        assert_eq!(read("cpuset/cluster/vms/cpuset.mems"), "0");
        assert_eq!(
            host.host_path(Path::new("/usr/bin/qemu")),
            proc1.path().join("root/usr/bin/qemu")
        );
    }

    /// The real thing where the test runs as root: a child started on the "host" (seen
    /// through the test's parent) lands in the VM cgroup of every hierarchy.
    #[test]
    fn a_host_launched_child_is_in_the_vm_cgroup() {
        let name = format!("hypersdk-launch-test-{}", std::process::id());
        let host = match HostLaunch::prepare(0, &name) {
            Ok(host) => host,
            // Not root, or no access to the host process: the unit tests above cover the preparation.
            Err(LaunchError::Host { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let launcher = Launcher::Host(host.clone());
        let sleep = launcher
            .find_program(Path::new("sleep"))
            .expect("sleep on the host");
        let dir = tempfile::tempdir().unwrap();
        let mut child = launcher
            .command(&sleep, Some(dir.path()))
            .unwrap()
            .arg("30")
            .spawn()
            .unwrap();
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        let cwd = std::fs::read_link(format!("/proc/{}/cwd", child.id())).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        for line in cgroups.lines() {
            assert!(line.ends_with(&format!(":/{name}")), "{cgroups}");
        }
        assert_eq!(cwd, dir.path());
        drop(host);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for (mount, _) in cgroup_mounts(&mountinfo) {
            let _ = std::fs::remove_dir(mount.join(&name));
        }
    }
}
