//! The Debian cloud image (images/cloud, booted through SeaBIOS, personalised by cloud-init)
//! on the node network: it gets its address from the agent's DHCP server, and the test logs in
//! over SSH from the host to that address with a key of its own, given through cloud-init.

use std::process::Command;
use std::time::{Duration, Instant};

use hypersdk_proto::agent::v1 as pb;
use hypersdk_tests::netlab::NodeNetwork;
use hypersdk_tests::{create, eventually};

/// A cloud-image boot under TCG on a loaded 2-core machine (images/cloud/README.md: ~3 min).
const BOOT: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread")]
async fn cloud_image_gets_its_address_by_dhcp_and_answers_ssh() {
    let net = NodeNetwork::new();
    let agent = net.agent("node-cloud-net", &[]).await;
    let mut client = agent.client().await;

    let key = agent.dir.path().join("id_ed25519");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "hypersdk-test", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let user_data = format!(
        "#cloud-config\nusers:\n  - name: tester\n    shell: /bin/bash\n    ssh_authorized_keys:\n      - {}\n",
        public.trim()
    );
    let mut spec = agent.cloud_spec("cloudy", pb::Firmware::Bios);
    spec.networks = vec![pb::Network {
        name: "default".into(),
        backend: Some(pb::network::Backend::Bridge(pb::BridgeNetwork {})),
    }];
    spec.cloud_init = Some(pb::CloudInit {
        user_data,
        ..Default::default()
    });
    let t0 = Instant::now();
    create(&mut client, spec, true).await;

    let ip = net.guest_address(&mut client, "cloudy", BOOT).await;
    println!(
        "cloud image: {ip} from DHCP {:?} after create",
        t0.elapsed()
    );

    let login = eventually(BOOT, "an SSH login as tester", async || {
        let out = Command::new("ssh")
            .arg("-i")
            .arg(&key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
                &format!("tester@{ip}"),
                "echo $(hostname) $(id -un)",
            ])
            .output()
            .unwrap();
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
            false => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        }
    })
    .await;
    println!("cloud image: SSH login {:?} after create", t0.elapsed());
    assert_eq!(
        login, "cloudy tester",
        "cloud-init named the guest and made the user"
    );
}
