//! Raw QEMU for the benchmarks' baselines: the agent's own command line, driven over QMP by
//! the benchmark itself.

use std::path::Path;
use std::time::Duration;

use hypersdk_agent::firmware::Loader;
use hypersdk_agent::host::accel::Accel;
use hypersdk_agent::migration::{self, Options};
use hypersdk_agent::qemu::qmp::Qmp;
use hypersdk_agent::spec::VmSpec;
use hypersdk_agent::spec::argv::{self, VmFiles};
use serde_json::{Value, json};

/// One raw QEMU process, started with the agent's argv for `spec` (plus `extra`), and a QMP
/// connection to it: the baseline of the benchmarks.
pub struct RawQemu {
    pub child: tokio::process::Child,
    pub qmp: Qmp,
}

impl RawQemu {
    pub async fn spawn(spec: &VmSpec, dir: &Path, accel: Accel, extra: &[&str]) -> RawQemu {
        std::fs::create_dir_all(dir).unwrap();
        let files = VmFiles::in_dir(dir);
        // The directory is reused when the guest comes back: no stale socket to connect to.
        for sock in [&files.qmp_socket, &files.qga_socket] {
            let _ = std::fs::remove_file(sock);
        }
        let mut child = tokio::process::Command::new("qemu-system-x86_64")
            .args(argv::build(spec, &files, accel, &Loader::SeaBios))
            .args(extra)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        loop {
            if let Ok(qmp) = Qmp::connect(&files.qmp_socket).await {
                return RawQemu { child, qmp };
            }
            if let Ok(Some(status)) = child.try_wait() {
                let err = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                panic!("raw QEMU exited ({status}): {err}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn query_migrate(&self) -> Value {
        self.qmp
            .execute_value("query-migrate", json!({}))
            .await
            .unwrap()
    }

    /// Waits until this QEMU's migration (incoming, or to a file) has completed; polls every
    /// 2 ms, as the agent does.
    pub async fn wait_migration(&self) {
        loop {
            let reply = self.query_migrate().await;
            match migration::qemu_status(reply["status"].as_str().unwrap_or_default()) {
                migration::QemuStatus::Completed => return,
                migration::QemuStatus::Failed | migration::QemuStatus::Cancelled => {
                    panic!("raw QEMU migration failed: {reply}")
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    /// Sets the migration capabilities and parameters exactly as the agent does.
    pub async fn configure(&self, o: &Options, outgoing: bool) {
        let caps = migration::capabilities(o, outgoing);
        let params = migration::parameters(o, outgoing);
        self.qmp.execute(caps).await.unwrap();
        self.qmp.execute(params).await.unwrap();
    }

    pub async fn quit(mut self) {
        let _ = self.qmp.execute(qapi::qmp::quit {}).await;
        let _ = self.child.wait().await;
    }
}
