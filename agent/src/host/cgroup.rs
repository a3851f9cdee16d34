//! Per-VM cgroups (v2): each QEMU gets `<cgroup2 mount>/<parent>/<vm>` with cpu.max and
//! memory.max from its spec, so VMs are accounted and limited apart from the agent (and a
//! service manager stopping the agent's own cgroup does not take the VMs with it).
//!
//! Used only where a writable cgroup v2 hierarchy with the cpu and memory controllers exists;
//! otherwise the agent says why in GetNode and runs VMs without one.

use std::path::{Path, PathBuf};

use crate::spec::VmSpec;

/// cpu.max period, in microseconds.
const PERIOD_US: u64 = 100_000;
/// QEMU's own threads (I/O, the main loop) beyond the vCPUs: half a CPU.
const CPU_OVERHEAD_US: u64 = 50_000;
/// Memory QEMU needs beyond guest RAM (device state, I/O buffers, TCG's code cache).
const MEMORY_OVERHEAD: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// cpu.max: "QUOTA PERIOD".
    pub cpu_max: String,
    /// memory.max in bytes.
    pub memory_max: u64,
}

/// The limits for a VM (pure). Memory allows for hotplug up to maxMemory.
pub fn limits(spec: &VmSpec) -> Limits {
    Limits {
        cpu_max: format!(
            "{} {PERIOD_US}",
            spec.cpus as u64 * PERIOD_US + CPU_OVERHEAD_US
        ),
        memory_max: spec.max_memory + MEMORY_OVERHEAD + spec.max_memory / 50,
    }
}

/// Why VMs run without cgroups on this node.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("disabled with --cgroup-parent \"\"")]
    Disabled,
    #[error("none per VM: QEMU runs in the host cgroup {0} (--host-launch)")]
    HostLaunch(String),
    #[error("/proc/self/mountinfo: {0}")]
    Mountinfo(#[source] std::io::Error),
    #[error("no cgroup2 hierarchy is mounted")]
    NotMounted,
    #[error("the cgroup2 hierarchy at {} has no {controller} controller", mount.display())]
    NoController {
        mount: PathBuf,
        controller: &'static str,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct Cgroups {
    /// `<mount>/<parent>`, with cpu and memory enabled for its children.
    parent: PathBuf,
}

/// The cgroup2 mount point named in /proc/self/mountinfo text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount))
    })
}

impl Cgroups {
    /// Prepares `<mount>/<parent>`; the error says why VMs will run without cgroups.
    pub fn setup(mount: &Path, parent: &str) -> Result<Cgroups, CgroupError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CgroupError::Io { path, source }
        };
        let controllers =
            std::fs::read_to_string(mount.join("cgroup.controllers")).map_err(io(mount))?;
        for controller in ["cpu", "memory"] {
            if !controllers.split_whitespace().any(|c| c == controller) {
                return Err(CgroupError::NoController {
                    mount: mount.to_path_buf(),
                    controller,
                });
            }
        }
        let dir = mount.join(parent);
        let write = |path: PathBuf, value: &str| std::fs::write(&path, value).map_err(io(&path));
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        write(mount.join("cgroup.subtree_control"), "+cpu +memory")?;
        write(dir.join("cgroup.subtree_control"), "+cpu +memory")?;
        Ok(Cgroups { parent: dir })
    }

    /// Finds the cgroup2 hierarchy of this host and prepares `parent` in it.
    pub fn detect(parent: &str) -> Result<Cgroups, CgroupError> {
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
        let mount = cgroup2_mount(&mountinfo).ok_or(CgroupError::NotMounted)?;
        Self::setup(&mount, parent)
    }

    pub fn path(&self, vm: &str) -> PathBuf {
        self.parent.join(vm)
    }

    /// Creates (or updates) the VM's cgroup with its limits and moves `pid` into it.
    pub fn place(&self, vm: &str, pid: u32, limits: &Limits) -> std::io::Result<()> {
        let dir = self.path(vm);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cpu.max"), &limits.cpu_max)?;
        std::fs::write(dir.join("memory.max"), limits.memory_max.to_string())?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
    }

    /// Removes the VM's cgroup once its QEMU is gone.
    pub fn remove(&self, vm: &str) {
        let _ = std::fs::remove_dir(self.path(vm));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            cpus: 2,
            max_cpus: 4,
            memory: 1 << 30,
            max_memory: 2 << 30,
            ..crate::spec::tests::minimal("v")
        }
    }

    #[test]
    fn limits_cover_the_vcpus_and_max_memory_plus_overhead() {
        let l = limits(&spec());
        assert_eq!(l.cpu_max, "250000 100000");
        assert_eq!(l.memory_max, (2 << 30) + (256 << 20) + (2 << 30) / 50);
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        let info = "25 1 0:23 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                    31 1 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("25 1 0:23 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    /// The same file writes the kernel interprets, against a directory laid out like cgroupfs.
    #[test]
    fn sets_up_and_places_in_a_cgroup_tree() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpuset io hugetlb").unwrap();
        let e = Cgroups::setup(root.path(), "hypersdk").unwrap_err();
        assert!(
            matches!(
                e,
                CgroupError::NoController {
                    controller: "cpu",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("no cpu controller"), "{e}");
        let e = Cgroups::setup(&root.path().join("absent"), "hypersdk").unwrap_err();
        assert!(
            matches!(&e, CgroupError::Io { path, .. } if path.ends_with("absent")),
            "{e}"
        );

        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids",
        )
        .unwrap();
        let cg = Cgroups::setup(root.path(), "hypersdk").unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(
            read(root.path().join("cgroup.subtree_control")),
            "+cpu +memory"
        );
        assert_eq!(
            read(root.path().join("hypersdk/cgroup.subtree_control")),
            "+cpu +memory"
        );
        cg.place("v", 4242, &limits(&spec())).unwrap();
        let vm = root.path().join("hypersdk/v");
        assert_eq!(read(vm.join("cpu.max")), "250000 100000");
        assert_eq!(read(vm.join("cgroup.procs")), "4242");
    }
}
