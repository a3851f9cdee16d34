//! `hyperctl vm snapshot create|list|restore|delete`.

use clap::{Args, Subcommand};
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_client::AgentServiceClient;
use serde::Serialize;
use tonic::transport::Channel;

use crate::output::{self, Format};
use crate::view::VmView;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of the VM's disks, and with --memory of its running state.
    Create(CreateArgs),
    /// The VM's snapshots (every VM's without a name).
    List { name: Option<String> },
    /// Return the VM to a snapshot (memory and disks); the snapshot is kept.
    Restore { name: String, snapshot: String },
    /// Delete a snapshot and free its space.
    Delete { name: String, snapshot: String },
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    snapshot: String,
    /// Include memory and device state (the guest pauses while it is written).
    #[arg(long)]
    memory: bool,
    /// Freeze the guest's filesystems around the snapshot (needs the guest agent).
    #[arg(long)]
    quiesce: bool,
    #[arg(long, default_value = "")]
    description: String,
}

/// A snapshot as hyperctl prints it (`-o json` is stable).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotView {
    vm: String,
    name: String,
    description: String,
    created_at_ms: i64,
    memory: bool,
    quiesced: bool,
    parent: String,
    size_bytes: u64,
    memory_bytes: u64,
    memory_format: String,
    pause_ms: u32,
    duration_ms: u32,
    qemu_version: String,
    disk_layers: std::collections::BTreeMap<String, String>,
}

impl From<&pb::Snapshot> for SnapshotView {
    fn from(s: &pb::Snapshot) -> Self {
        SnapshotView {
            vm: s.vm.clone(),
            name: s.name.clone(),
            description: s.description.clone(),
            created_at_ms: s.created_at_ms,
            memory: s.memory,
            quiesced: s.quiesced,
            parent: s.parent.clone(),
            size_bytes: s.size_bytes,
            memory_bytes: s.memory_bytes,
            memory_format: s.memory_format.clone(),
            pause_ms: s.pause_ms,
            duration_ms: s.duration_ms,
            qemu_version: s.qemu_version.clone(),
            disk_layers: s.disk_layers.clone().into_iter().collect(),
        }
    }
}

fn print(out: Format, snapshots: &[SnapshotView]) -> anyhow::Result<()> {
    if output::structured(out, &snapshots)? {
        return Ok(());
    }
    let mut t = output::table(&[
        "VM", "NAME", "MEMORY", "SIZE", "PAUSE", "TOOK", "PARENT", "AGE",
    ]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for s in snapshots {
        t.add_row(vec![
            s.vm.clone(),
            s.name.clone(),
            if s.memory {
                format!("{}Mi ({})", s.memory_bytes >> 20, s.memory_format)
            } else if s.quiesced {
                "no (quiesced)".into()
            } else {
                "no".into()
            },
            format!("{:.1}Mi", s.size_bytes as f64 / (1 << 20) as f64),
            if s.memory {
                format!("{}ms", s.pause_ms)
            } else {
                "-".into()
            },
            format!("{}ms", s.duration_ms),
            if s.parent.is_empty() {
                "-".into()
            } else {
                s.parent.clone()
            },
            output::age(now - s.created_at_ms),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub async fn run(
    client: &mut AgentServiceClient<Channel>,
    out: Format,
    command: SnapshotCommand,
) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Create(a) => {
            let s = client
                .create_snapshot(pb::CreateSnapshotRequest {
                    name: a.name,
                    snapshot: a.snapshot,
                    memory: a.memory,
                    quiesce: a.quiesce,
                    description: a.description,
                })
                .await?
                .into_inner();
            print(out, &[SnapshotView::from(&s)])
        }
        SnapshotCommand::List { name } => {
            let list = client
                .list_snapshots(pb::ListSnapshotsRequest {
                    name: name.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .snapshots;
            print(
                out,
                &list.iter().map(SnapshotView::from).collect::<Vec<_>>(),
            )
        }
        SnapshotCommand::Restore { name, snapshot } => restore(client, out, name, snapshot).await,
        SnapshotCommand::Delete { name, snapshot } => {
            let r = client
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    name: name.clone(),
                    snapshot: snapshot.clone(),
                })
                .await?
                .into_inner();
            let done =
                serde_json::json!({"vm": name, "deleted": snapshot, "freedBytes": r.freed_bytes});
            if !output::structured(out, &done)? {
                println!(
                    "snapshot {snapshot} of vm {name} deleted ({:.1} MiB freed)",
                    r.freed_bytes as f64 / (1 << 20) as f64
                );
            }
            Ok(())
        }
    }
}

async fn restore(
    client: &mut AgentServiceClient<Channel>,
    out: Format,
    name: String,
    snapshot: String,
) -> anyhow::Result<()> {
    let r = client
        .restore_snapshot(pb::RestoreSnapshotRequest {
            name,
            snapshot: snapshot.clone(),
        })
        .await?
        .into_inner();
    let vm = VmView::from(&r.vm.unwrap_or_default());
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Restored<'a> {
        snapshot: &'a str,
        restore_ms: u32,
        load_ms: u32,
        vm: &'a VmView,
    }
    let restored = Restored {
        snapshot: &snapshot,
        restore_ms: r.restore_ms,
        load_ms: r.load_ms,
        vm: &vm,
    };
    if !output::structured(out, &restored)? {
        println!(
            "vm {} restored from {snapshot} in {} ms (memory load {} ms): {}",
            vm.name, r.restore_ms, r.load_ms, vm.status.phase
        );
    }
    Ok(())
}
