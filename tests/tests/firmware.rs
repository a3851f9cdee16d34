//! Firmware boot on real QEMU (TCG): the Debian cloud image (images/cloud) boots from its disk
//! through SeaBIOS and through UEFI (OVMF), with no kernel given, until its own qemu-guest-agent
//! answers the agent; a UEFI VM keeps its NVRAM in its directory. UEFI without OVMF on the node,
//! and an unknown firmware, are refused.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::*;

/// Boot to the guest agent under TCG on a loaded 2-core machine (see images/cloud/README.md for
/// the measured times).
const BOOT: Duration = Duration::from_secs(600);
/// What GRUB prints on the serial console before it loads the kernel (images/cloud/build.sh).
const GRUB_BANNER: &str = "Booting `Debian GNU/Linux 12";
/// What OVMF's boot manager prints on the serial console; SeaBIOS prints nothing there.
const OVMF_BANNER: &str = "BdsDxe: ";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

#[tokio::test(flavor = "multi_thread")]
async fn cloud_image_boots_through_seabios_and_uefi() {
    let agent = Agent::start("node-fw").await;
    let mut c = agent.client().await;
    let t0 = Instant::now();
    // Both at once: the two boots share the machine's two cores.
    for (name, firmware) in [("bios", pb::Firmware::Bios), ("uefi", pb::Firmware::Uefi)] {
        let vm = create(&mut c, agent.cloud_spec(name, firmware), true).await;
        assert_eq!(phase(&vm), pb::VmPhase::Running, "{:?}", vm.status);
        assert_eq!(vm.spec.as_ref().unwrap().boot, None, "no kernel given");
    }
    let mut booted = Vec::new();
    for name in ["bios", "uefi"] {
        let vm = wait_vm(&mut c, name, BOOT, "its guest agent", |s| s.agent_connected).await;
        println!(
            "{name}: guest agent answered {:?} after create",
            t0.elapsed()
        );
        booted.push(vm);
    }
    let [bios, uefi] = &booted[..] else {
        unreachable!()
    };

    let (bios_serial, uefi_serial) = (serial(bios), serial(uefi));
    for (name, log) in [("bios", &bios_serial), ("uefi", &uefi_serial)] {
        assert!(
            log.contains(GRUB_BANNER),
            "{name}: the disk's own GRUB loaded the kernel: {log}"
        );
    }
    assert!(
        !bios_serial.contains(OVMF_BANNER),
        "bios booted through SeaBIOS"
    );
    assert!(
        uefi_serial.contains(OVMF_BANNER),
        "uefi booted through OVMF"
    );

    // The UEFI VM's own variable store, in its directory: OVMF wrote its boot entries there.
    let dir = |vm: &pb::Vm| vm.status.as_ref().unwrap().data_dir.clone();
    let vars = Path::new(&dir(uefi)).join("uefi-vars.fd");
    let pristine = std::fs::read(OVMF_VARS).unwrap();
    let written = std::fs::read(&vars).expect("the UEFI VM has its NVRAM file");
    assert_eq!(written.len(), pristine.len());
    assert_ne!(
        written, pristine,
        "OVMF keeps its variables in the VM's file"
    );
    assert!(
        !Path::new(&dir(bios)).join("uefi-vars.fd").exists(),
        "a BIOS VM has no NVRAM file"
    );

    // A restart keeps the NVRAM: the same file, not one made afresh.
    stop(&mut c, "uefi", true).await;
    let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let before = inode(&vars);
    c.start_vm(pb::StartVmRequest {
        name: "uefi".into(),
    })
    .await
    .unwrap();
    let from = serial(uefi).len();
    eventually(BOOT, "the restarted UEFI VM reaches GRUB", async || {
        let log = serial(uefi);
        match log[from..].contains(GRUB_BANNER) {
            true => Ok(()),
            false => Err(log[from..].to_string()),
        }
    })
    .await;
    assert_eq!(inode(&vars), before, "the NVRAM file was kept");
    stop(&mut c, "uefi", true).await;
    stop(&mut c, "bios", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uefi_without_ovmf_and_unknown_firmware_are_refused() {
    let empty = tempfile::tempdir().unwrap();
    let ovmf_dir = empty.path().to_str().unwrap();
    let agent = Agent::start_with("node-no-ovmf", &["--ovmf-dir", ovmf_dir]).await;
    let mut c = agent.client().await;

    let refused = |spec: pb::VmSpec| {
        let mut c = c.clone();
        async move {
            // Not started: the check is the create's own, not the first start's.
            c.create_vm(pb::CreateVmRequest {
                spec: Some(spec),
                start: false,
            })
            .await
            .expect_err("refused")
        }
    };
    let e = refused(agent.cloud_spec("uefi", pb::Firmware::Uefi)).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("spec.firmware: uefi needs OVMF")
            && e.message().contains(ovmf_dir)
            && e.message().contains("ovmf package"),
        "{}",
        e.message()
    );
    let mut unknown = agent.cloud_spec("odd", pb::Firmware::Bios);
    unknown.firmware = 9;
    let e = refused(unknown).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("spec.firmware: unknown firmware 9"),
        "{}",
        e.message()
    );
    let mut nothing = agent.cloud_spec("none", pb::Firmware::Bios);
    nothing.disks.clear();
    let e = refused(nothing).await;
    assert!(
        e.message().starts_with("spec.disks: nothing to boot"),
        "{}",
        e.message()
    );

    // Nothing was created, and BIOS firmware boot needs no OVMF.
    assert!(list(&mut c).await.is_empty());
    let vm = create(&mut c, agent.cloud_spec("bios", pb::Firmware::Bios), false).await;
    assert_ne!(phase(&vm), pb::VmPhase::Failed, "{:?}", vm.status);
}
