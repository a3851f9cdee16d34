//! KVM facts of this node, read with kvm-ioctls, and a self-test that runs a few real
//! instructions in a tiny guest: `/dev/kvm` existing does not mean QEMU can use it.

use std::path::Path;
use std::time::Duration;

use kvm_ioctls::{Cap, Kvm, VcpuExit};

/// Modules that may provide /dev/kvm. Only the hardware ones run standard guest kernels.
const KVM_MODULES: [&str; 3] = ["kvm_intel", "kvm_amd", "kvm_pvm"];
pub const HARDWARE_MODULES: [&str; 2] = ["kvm_intel", "kvm_amd"];

/// /dev/kvm could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("/dev/kvm: {0}")]
pub struct OpenError(#[source] pub kvm_ioctls::Error);

/// Why the self-test guest did not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelfTestError {
    #[error("not run")]
    NotRun,
    #[error("/dev/kvm is not available")]
    NoDevice,
    #[error("no hardware KVM module (kvm_intel/kvm_amd) is loaded")]
    NoHardwareModule,
    /// A KVM ioctl failed; `step` says which.
    #[error("{step}: {source}")]
    Ioctl {
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("mmap failed: {0}")]
    Mmap(#[source] nix::errno::Errno),
    #[error("unexpected exit {0}")]
    UnexpectedExit(String),
    #[error("the test guest did not halt")]
    NoHalt,
    #[error("the test guest did not halt within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    pub present: bool,
    /// Why /dev/kvm could not be opened, when it could not.
    pub open_error: Option<OpenError>,
    pub modules: Vec<String>,
    pub api_version: i32,
    pub max_vcpus: u32,
    pub recommended_vcpus: u32,
    pub extensions: Vec<(&'static str, bool)>,
    /// `Ok` when the self-test guest ran; else why not.
    pub self_test: Result<(), SelfTestError>,
}

impl Default for KvmFacts {
    fn default() -> Self {
        KvmFacts {
            present: false,
            open_error: None,
            modules: vec![],
            api_version: 0,
            max_vcpus: 0,
            recommended_vcpus: 0,
            extensions: vec![],
            self_test: Err(SelfTestError::NotRun),
        }
    }
}

impl KvmFacts {
    pub fn has_hardware_module(&self) -> bool {
        self.modules
            .iter()
            .any(|m| HARDWARE_MODULES.contains(&m.as_str()))
    }
}

const EXTENSIONS: [(&str, Cap); 8] = [
    ("user-memory", Cap::UserMemory),
    ("irqchip", Cap::Irqchip),
    ("ioeventfd", Cap::Ioeventfd),
    ("irqfd", Cap::Irqfd),
    ("tsc-deadline-timer", Cap::TscDeadlineTimer),
    ("xsave", Cap::Xsave),
    ("kvmclock-ctrl", Cap::KvmclockCtrl),
    ("readonly-mem", Cap::ReadonlyMem),
];

/// Reads the facts. The self-test only runs where a hardware KVM module is loaded.
pub fn probe(sys_module: &Path) -> KvmFacts {
    let modules = KVM_MODULES
        .iter()
        .filter(|m| sys_module.join(m).exists())
        .map(|m| m.to_string())
        .collect();
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            return KvmFacts {
                modules,
                open_error: Some(OpenError(e)),
                self_test: Err(SelfTestError::NoDevice),
                ..Default::default()
            };
        }
    };
    let mut facts = KvmFacts {
        present: true,
        open_error: None,
        modules,
        api_version: kvm.get_api_version(),
        max_vcpus: kvm.get_max_vcpus() as u32,
        recommended_vcpus: kvm.get_nr_vcpus() as u32,
        extensions: EXTENSIONS
            .iter()
            .map(|(name, cap)| (*name, kvm.check_extension(*cap)))
            .collect(),
        self_test: Err(SelfTestError::NotRun),
    };
    facts.self_test = if facts.has_hardware_module() {
        run_self_test_with_timeout(Duration::from_secs(2))
    } else {
        Err(SelfTestError::NoHardwareModule)
    };
    facts
}

fn run_self_test_with_timeout(limit: Duration) -> Result<(), SelfTestError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(self_test());
    });
    rx.recv_timeout(limit)
        .unwrap_or(Err(SelfTestError::Timeout(limit)))
}

/// Runs `mov al, 0x42; out 0x10, al; hlt` in real mode and checks both exits.
fn self_test() -> Result<(), SelfTestError> {
    const CODE: [u8; 5] = [0xb0, 0x42, 0xe6, 0x10, 0xf4];
    const GUEST_ADDR: u64 = 0x1000;
    const MEM_SIZE: usize = 0x1000;
    let e = |step, source| SelfTestError::Ioctl { step, source };
    let kvm = Kvm::new().map_err(|err| e("open", err))?;
    let vm = kvm.create_vm().map_err(|err| e("create VM", err))?;
    // SAFETY: a fresh anonymous private mapping, checked for failure, unmapped by `Mapping`.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(SelfTestError::Mmap(nix::errno::Errno::last()));
    }
    struct Mapping(*mut libc::c_void);
    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: the pointer came from the mmap above with MEM_SIZE bytes.
            unsafe { libc::munmap(self.0, MEM_SIZE) };
        }
    }
    let mapping = Mapping(mem);
    // SAFETY: the mapping is MEM_SIZE bytes, writable, and owned by `mapping`.
    unsafe {
        std::slice::from_raw_parts_mut(mem as *mut u8, MEM_SIZE)[..CODE.len()]
            .copy_from_slice(&CODE)
    };
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: GUEST_ADDR,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region is valid for the VM's lifetime (`mapping` outlives `vm` use below).
    unsafe { vm.set_user_memory_region(region) }.map_err(|err| e("set memory", err))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|err| e("create vCPU", err))?;
    let mut sregs = vcpu.get_sregs().map_err(|err| e("get sregs", err))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|err| e("set sregs", err))?;
    let mut regs = vcpu.get_regs().map_err(|err| e("get regs", err))?;
    regs.rip = GUEST_ADDR;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(|err| e("set regs", err))?;
    let mut saw_out = false;
    for _ in 0..16 {
        match vcpu.run().map_err(|err| e("run", err))? {
            VcpuExit::IoOut(0x10, [0x42]) => saw_out = true,
            VcpuExit::Hlt if saw_out => {
                drop(mapping);
                return Ok(());
            }
            other => return Err(SelfTestError::UnexpectedExit(format!("{other:?}"))),
        }
    }
    Err(SelfTestError::NoHalt)
}
