//! VmSpec → QEMU command line. Pure: the same inputs always give the same argv.
//!
//! No user string is spliced into QEMU's comma-separated option syntax: names are DNS-1123
//! labels (checked in [`crate::spec`]), device ids are generated here, host paths have been
//! checked for `,` and `=`, and disks go through `-blockdev` JSON, where serde does the quoting.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::firmware::Loader;
use crate::host::accel::Accel;
use crate::hotplug::{VMEM_ID, dimm_slots};
use crate::spec::{DiskFormat, MemoryHotplug, NetworkBackend, VmSpec};

/// Files of one VM's QEMU process, all inside the VM's data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFiles {
    pub qmp_socket: PathBuf,
    pub qga_socket: PathBuf,
    pub serial_log: PathBuf,
    /// The serial console's socket (QEMU listens; `Console` connects), beside the log.
    pub console_socket: PathBuf,
    /// The cloud-init NoCloud volume, written before each launch of a VM that has one.
    pub cidata: PathBuf,
    /// The UEFI variable store (NVRAM) of a VM booted with OVMF.
    pub uefi_vars: PathBuf,
    /// Where QEMU reads its credentials for a migration over TLS.
    pub migration_tls: PathBuf,
}

impl VmFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            qmp_socket: dir.join("qmp.sock"),
            qga_socket: dir.join("qga.sock"),
            serial_log: dir.join("serial.log"),
            console_socket: dir.join("console.sock"),
            cidata: dir.join("cidata.img"),
            uefi_vars: dir.join(crate::firmware::NVRAM_FILE),
            migration_tls: dir.join("migration-tls"),
        }
    }

    /// The tap of NIC `nic` of a `bridge` network (named after the VM's directory, so that it is
    /// unique on the host, see [`crate::network::tap_name`]).
    pub fn tap(&self, nic: usize) -> String {
        let dir = self.qmp_socket.parent().unwrap_or(Path::new("/"));
        crate::network::tap_name(dir, nic)
    }
}

/// Memory hotplug slots reserved when maxMemory is above memory (virtio-mem needs none itself).
const MEMORY_SLOTS: u64 = 8;

fn mib(bytes: u64) -> String {
    format!("{}M", bytes >> 20)
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A stable locally administered MAC for a VM's nth NIC, so the guest sees the same address on
/// every start and after a migration.
pub fn mac_address(vm: &str, nic: usize) -> String {
    // FNV-1a: tiny, stable across releases (unlike std's hasher).
    let mut h: u32 = 0x811c9dc5;
    for b in vm.bytes().chain([nic as u8]) {
        h = (h ^ b as u32).wrapping_mul(0x01000193);
    }
    let [_, a, b, c] = h.to_be_bytes();
    format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
}

/// The `-qmp` value; also how an adopted process is recognised as this VM's QEMU.
pub fn qmp_arg(files: &VmFiles) -> String {
    format!("unix:{},server=on,wait=off", path(&files.qmp_socket))
}

/// The full argv (without the QEMU binary) for `spec`, booting through `loader`. Disk formats
/// must already be known.
pub fn build(spec: &VmSpec, files: &VmFiles, accel: Accel, loader: &Loader) -> Vec<String> {
    let mut a = Argv(Vec::with_capacity(64));
    a.machine(spec, accel, loader);
    a.firmware(files, loader);
    a.memory(spec);
    a.channels(files);
    a.boot(spec);
    a.disks(spec);
    if spec.cloud_init.is_some() {
        a.cidata(files);
    }
    a.networks(spec, files);
    a.0
}

/// An argv under construction.
struct Argv(Vec<String>);

impl Argv {
    fn push(&mut self, items: &[&str]) {
        self.0.extend(items.iter().map(|s| s.to_string()));
    }

    fn machine(&mut self, spec: &VmSpec, accel: Accel, loader: &Loader) {
        self.push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
        self.push(&["-no-user-config", "-nodefaults", "-display", "none"]);
        let machine = match loader {
            Loader::SeaBios => "q35",
            Loader::Uefi(_) => "q35,pflash0=fw-code,pflash1=fw-vars",
        };
        self.push(&["-machine", machine, "-accel", accel.as_str(), "-cpu", "max"]);
        // QEMU may not spawn helpers, gain privileges or use obsolete syscalls.
        self.push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        // A guest kernel panic reaches QEMU (pvpanic), which then exits with a failure status:
        // the supervisor sees GUEST_PANICKED and the restart policy decides.
        self.push(&["-device", "pvpanic", "-action", "panic=exit-failure"]);
        self.push(&["-smp", &format!("{},maxcpus={}", spec.cpus, spec.max_cpus)]);
    }

    fn memory(&mut self, spec: &VmSpec) {
        let range = spec.max_memory.saturating_sub(spec.memory);
        let dimms = spec.memory_hotplug == MemoryHotplug::Dimm;
        let memory = match range {
            0 => format!("size={}", mib(spec.memory)),
            _ => format!(
                "size={},slots={},maxmem={}",
                mib(spec.memory),
                if dimms {
                    dimm_slots(range)
                } else {
                    MEMORY_SLOTS
                },
                mib(spec.max_memory)
            ),
        };
        self.push(&["-m", &memory]);
        if range > 0 && !dimms {
            // Hotplug memory: one virtio-mem device spanning maxMemory - memory, empty at boot.
            self.push(&[
                "-object",
                &format!("memory-backend-ram,id={VMEM_ID}-mem,size={}", mib(range)),
                "-device",
                &format!("virtio-mem-pci,id={VMEM_ID},memdev={VMEM_ID}-mem,requested-size=0"),
            ]);
        }
    }

    /// The serial console (a socket for `Console`, which also appends all output to the log,
    /// whether a client is attached or not), QMP and the guest agent's channel.
    fn channels(&mut self, files: &VmFiles) {
        self.push(&[
            "-chardev",
            &format!(
                "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
                path(&files.console_socket),
                path(&files.serial_log)
            ),
            "-serial",
            "chardev:serial0",
        ]);
        self.push(&["-qmp", &qmp_arg(files)]);
        self.push(&[
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            &format!(
                "socket,id=qga0,path={},server=on,wait=off",
                path(&files.qga_socket)
            ),
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
    }

    /// OVMF's code (shared, read-only) and the VM's own variable store, as the two flash chips
    /// of the q35 machine. SeaBIOS is QEMU's default and needs nothing.
    fn firmware(&mut self, files: &VmFiles, loader: &Loader) {
        let Loader::Uefi(ovmf) = loader else {
            return;
        };
        for (node, file, read_only) in [
            ("fw-code", &ovmf.code, true),
            ("fw-vars", &files.uefi_vars, false),
        ] {
            let blockdev = json!({
                "driver": "raw",
                "node-name": node,
                "read-only": read_only,
                "file": {"driver": "file", "filename": path(file), "read-only": read_only},
            });
            self.push(&["-blockdev", &blockdev.to_string()]);
        }
    }

    /// Direct kernel boot; without it the firmware boots the first disk.
    fn boot(&mut self, spec: &VmSpec) {
        let Some(boot) = &spec.boot else {
            return;
        };
        self.push(&["-kernel", &path(&boot.kernel)]);
        if let Some(initrd) = &boot.initrd {
            self.push(&["-initrd", &path(initrd)]);
        }
        if !boot.cmdline.is_empty() {
            self.push(&["-append", &boot.cmdline]);
        }
    }

    fn disks(&mut self, spec: &VmSpec) {
        let boot = crate::disks::boot_indexes(spec);
        for (i, disk) in spec.disks.iter().enumerate() {
            let format = disk.format.unwrap_or(DiskFormat::Raw);
            let blockdev = json!({
                "driver": format.as_str(),
                "node-name": format!("disk{i}"),
                "read-only": disk.read_only,
                "discard": "unmap",
                "file": {
                    "driver": "file",
                    "filename": path(&disk.path),
                    "read-only": disk.read_only,
                },
            });
            self.push(&["-blockdev", &blockdev.to_string()]);
            let bootindex = boot[i].map_or(String::new(), |b| format!(",bootindex={b}"));
            self.push(&[
                "-device",
                &format!("virtio-blk-pci,id=vdisk{i},drive=disk{i}{bootindex}"),
            ]);
        }
    }

    /// The cloud-init volume, read-only, after the VM's own disks (so they keep their names).
    fn cidata(&mut self, files: &VmFiles) {
        let blockdev = json!({
            "driver": "raw",
            "node-name": "cidata",
            "read-only": true,
            "file": {
                "driver": "file",
                "filename": path(&files.cidata),
                "read-only": true,
            },
        });
        self.push(&["-blockdev", &blockdev.to_string()]);
        self.push(&["-device", "virtio-blk-pci,id=vcidata,drive=cidata"]);
    }

    fn networks(&mut self, spec: &VmSpec, files: &VmFiles) {
        for (i, net) in spec.networks.iter().enumerate() {
            match net.backend {
                NetworkBackend::User => self.push(&["-netdev", &format!("user,id=net{i}")]),
                // The agent made the tap and put it on the bridge; QEMU only opens it (and may
                // not run scripts: -sandbox spawn=deny).
                NetworkBackend::Bridge => self.push(&[
                    "-netdev",
                    &format!(
                        "tap,id=net{i},ifname={},script=no,downscript=no",
                        files.tap(i)
                    ),
                ]),
            }
            self.push(&[
                "-device",
                &format!(
                    "virtio-net-pci,id=nic{i},netdev=net{i},mac={}",
                    mac_address(&spec.name, i)
                ),
            ]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::{Firmware, Ovmf};
    use crate::spec::{Boot, Disk, Network};

    /// The argv with SeaBIOS, as every VM had before firmware boot.
    fn build(spec: &VmSpec, files: &VmFiles, accel: Accel) -> Vec<String> {
        super::build(spec, files, accel, &Loader::SeaBios)
    }

    fn spec() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            cpus: 2,
            max_cpus: 4,
            memory: 512 << 20,
            max_memory: 2 << 30,
            boot: Some(Boot {
                kernel: "/img/vmlinuz".into(),
                initrd: Some("/img/initrd.img".into()),
                cmdline: "console=ttyS0,115200 quiet".into(),
            }),
            firmware: Firmware::Bios,
            disks: vec![Disk {
                name: "root".into(),
                path: "/img/disk \"1\".qcow2".into(),
                format: Some(DiskFormat::Qcow2),
                read_only: false,
                made: None,
                boot_order: 0,
            }],
            networks: vec![Network {
                name: "default".into(),
                backend: NetworkBackend::User,
            }],
            labels: Default::default(),
            restart_policy: Default::default(),
            memory_hotplug: MemoryHotplug::VirtioMem,
            high_availability: false,
            cloud_init: None,
        }
    }

    fn value_of<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn sizes_and_accelerator() {
        let files = VmFiles::in_dir(Path::new("/data/vms/web-1"));
        let argv = build(&spec(), &files, Accel::Tcg);
        assert_eq!(value_of(&argv, "-smp"), ["2,maxcpus=4"]);
        assert_eq!(value_of(&argv, "-m"), ["size=512M,slots=8,maxmem=2048M"]);
        assert_eq!(
            value_of(&argv, "-object"),
            ["memory-backend-ram,id=vmem0-mem,size=1536M"]
        );
        assert!(
            value_of(&argv, "-device")
                .contains(&"virtio-mem-pci,id=vmem0,memdev=vmem0-mem,requested-size=0")
        );
        assert_eq!(value_of(&argv, "-accel"), ["tcg"]);
        assert_eq!(value_of(&argv, "-action"), ["panic=exit-failure"]);
        let kvm = build(&spec(), &files, Accel::Kvm);
        assert_eq!(value_of(&kvm, "-accel"), ["kvm"]);
        // Apart from the accelerator, KVM and TCG runs use the same command line.
        let differing: Vec<_> = argv.iter().zip(&kvm).filter(|(a, b)| a != b).collect();
        assert_eq!(differing.len(), 1);
    }

    #[test]
    fn fixed_size_vm_has_no_hotplug_slots() {
        let mut s = spec();
        s.max_memory = s.memory;
        let argv = build(&s, &VmFiles::in_dir(Path::new("/d")), Accel::Tcg);
        assert_eq!(value_of(&argv, "-m"), ["size=512M"]);
        assert!(value_of(&argv, "-object").is_empty());
    }

    #[test]
    fn dimm_hotplug_has_slots_and_no_virtio_mem() {
        let mut s = spec();
        s.memory_hotplug = MemoryHotplug::Dimm;
        let argv = build(&s, &VmFiles::in_dir(Path::new("/d")), Accel::Tcg);
        assert_eq!(value_of(&argv, "-m"), ["size=512M,slots=12,maxmem=2048M"]);
        assert!(value_of(&argv, "-object").is_empty());
        assert!(!argv.iter().any(|a| a.contains("virtio-mem")));
    }

    #[test]
    fn boot_sockets_and_cmdline_passed_whole() {
        let argv = build(&spec(), &VmFiles::in_dir(Path::new("/d")), Accel::Tcg);
        assert_eq!(value_of(&argv, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(value_of(&argv, "-initrd"), ["/img/initrd.img"]);
        assert_eq!(value_of(&argv, "-append"), ["console=ttyS0,115200 quiet"]);
        assert_eq!(
            value_of(&argv, "-qmp"),
            ["unix:/d/qmp.sock,server=on,wait=off"]
        );
        assert!(
            value_of(&argv, "-chardev")
                .contains(&"socket,id=qga0,path=/d/qga.sock,server=on,wait=off")
        );
    }

    #[test]
    fn the_serial_port_is_a_console_socket_that_keeps_the_log() {
        let argv = build(&spec(), &VmFiles::in_dir(Path::new("/d")), Accel::Tcg);
        assert!(value_of(&argv, "-chardev").contains(
            &"socket,id=serial0,path=/d/console.sock,server=on,wait=off,logfile=/d/serial.log,logappend=on"
        ));
        assert_eq!(value_of(&argv, "-serial"), ["chardev:serial0"]);
    }

    #[test]
    fn a_bridge_network_opens_the_vms_own_tap() {
        let mut s = spec();
        s.networks.push(Network {
            name: "node".into(),
            backend: NetworkBackend::Bridge,
        });
        let files = VmFiles::in_dir(Path::new("/d/vms/web-1"));
        let argv = build(&s, &files, Accel::Tcg);
        let tap = files.tap(1);
        assert_eq!(
            value_of(&argv, "-netdev"),
            [
                "user,id=net0".to_string(),
                format!("tap,id=net1,ifname={tap},script=no,downscript=no")
            ]
        );
        assert_ne!(tap, files.tap(0));
        assert!(
            value_of(&argv, "-device").contains(
                &format!(
                    "virtio-net-pci,id=nic1,netdev=net1,mac={}",
                    mac_address("web-1", 1)
                )
                .as_str()
            )
        );
    }

    #[test]
    fn firmware_boot_has_no_kernel_and_boots_the_first_disk() {
        let mut s = spec();
        s.boot = None;
        let argv = build(&s, &VmFiles::in_dir(Path::new("/d")), Accel::Tcg);
        for flag in ["-kernel", "-initrd", "-append", "-bios", "-blockdev"] {
            assert_eq!(
                value_of(&argv, flag).len(),
                usize::from(flag == "-blockdev"),
                "{flag}"
            );
        }
        assert_eq!(value_of(&argv, "-machine"), ["q35"]);
        assert!(
            value_of(&argv, "-device")
                .contains(&"virtio-blk-pci,id=vdisk0,drive=disk0,bootindex=1")
        );
        let kernel_boot = build(&spec(), &VmFiles::in_dir(Path::new("/d")), Accel::Tcg);
        assert!(!kernel_boot.iter().any(|a| a.contains("bootindex")));
    }

    #[test]
    fn uefi_has_ovmf_code_read_only_and_the_vms_own_variables() {
        let mut s = spec();
        s.boot = None;
        s.firmware = Firmware::Uefi;
        let ovmf = Ovmf {
            code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
            vars: "/usr/share/OVMF/OVMF_VARS_4M.fd".into(),
        };
        let files = VmFiles::in_dir(Path::new("/data/vms/web-1"));
        let argv = super::build(&s, &files, Accel::Tcg, &Loader::Uefi(ovmf));
        assert_eq!(
            value_of(&argv, "-machine"),
            ["q35,pflash0=fw-code,pflash1=fw-vars"]
        );
        let flash: Vec<serde_json::Value> = value_of(&argv, "-blockdev")
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .filter(|b: &serde_json::Value| b["node-name"].as_str().unwrap().starts_with("fw-"))
            .collect();
        assert_eq!(flash[0]["node-name"], "fw-code");
        assert_eq!(
            flash[0]["file"]["filename"],
            "/usr/share/OVMF/OVMF_CODE_4M.fd"
        );
        assert_eq!(flash[0]["read-only"], true);
        assert_eq!(flash[1]["node-name"], "fw-vars");
        assert_eq!(flash[1]["file"]["filename"], "/data/vms/web-1/uefi-vars.fd");
        assert_eq!(flash[1]["read-only"], false);
        assert_eq!(
            flash.len(),
            2,
            "the pristine variable store is never opened"
        );
    }

    #[test]
    fn disks_are_json_blockdevs() {
        let argv = build(&spec(), &VmFiles::in_dir(Path::new("/d")), Accel::Tcg);
        let bd: serde_json::Value = serde_json::from_str(value_of(&argv, "-blockdev")[0]).unwrap();
        assert_eq!(bd["driver"], "qcow2");
        assert_eq!(bd["node-name"], "disk0");
        assert_eq!(bd["file"]["filename"], "/img/disk \"1\".qcow2");
        assert!(value_of(&argv, "-device").contains(&"virtio-blk-pci,id=vdisk0,drive=disk0"));
    }

    #[test]
    fn boot_order_and_the_cloud_init_volume() {
        let mut s = spec();
        s.disks[0].boot_order = 3;
        s.cloud_init = Some(
            crate::cloudinit::CloudInit::new(String::new(), String::new(), "", "", "web-1")
                .unwrap(),
        );
        let argv = build(&s, &VmFiles::in_dir(Path::new("/d")), Accel::Tcg);
        let devices = value_of(&argv, "-device");
        assert!(devices.contains(&"virtio-blk-pci,id=vdisk0,drive=disk0,bootindex=1"));
        let disks = value_of(&argv, "-blockdev");
        let cidata: serde_json::Value = serde_json::from_str(disks[1]).unwrap();
        assert_eq!(cidata["read-only"], true);
        assert_eq!(cidata["file"]["filename"], "/d/cidata.img");
        let at = |d: &str| devices.iter().position(|x| x.contains(d)).unwrap();
        assert!(
            at("drive=disk0") < at("drive=cidata"),
            "the VM's disks come first"
        );
    }

    #[test]
    fn user_names_never_become_option_keys() {
        let argv = build(&spec(), &VmFiles::in_dir(Path::new("/d")), Accel::Tcg);
        for (flag, value) in argv.windows(2).map(|w| (&w[0], &w[1])) {
            if flag == "-device" || flag == "-netdev" {
                assert!(
                    !value.contains("root") && !value.contains("default"),
                    "{value}"
                );
            }
        }
    }

    #[test]
    fn mac_is_stable_and_local() {
        assert_eq!(mac_address("web-1", 0), mac_address("web-1", 0));
        assert_ne!(mac_address("web-1", 0), mac_address("web-1", 1));
        assert!(mac_address("x", 0).starts_with("52:54:00:"));
    }
}
