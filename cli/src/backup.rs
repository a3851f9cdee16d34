//! `hyperctl backup create|restore|verify`: a VM's disks to an S3-compatible repository through
//! its node's agent, restored as new disks there, or re-read and checked. Credentials come from
//! the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), the encryption key from a
//! file, so that neither appears in the process list.

use anyhow::Context;
use clap::{Args, Subcommand};
use hypersdk_proto::agent::v1 as pb;
use hypersdk_proto::agent::v1::agent_service_client::AgentServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::output::{self, Format};

#[derive(Subcommand)]
pub enum BackupCommand {
    /// Back up a VM (running or stopped) to the repository; prints the manifest's location.
    Create(CreateArgs),
    /// Write a backup's disks as new qcow2 files on the agent's node.
    Restore {
        /// Object key of the manifest (`<prefix>/backups/<vm>/<id>.json`).
        manifest: String,
        /// Name of the VM the disks are for.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
    /// Re-read every chunk of a backup and check it; fails if any is missing or altered.
    Verify {
        manifest: String,
        #[command(flatten)]
        repo: RepoArgs,
    },
}

#[derive(Args)]
pub struct RepoArgs {
    #[arg(long)]
    bucket: String,
    /// S3-compatible endpoint (http://127.0.0.1:9000); AWS S3 when unset.
    #[arg(long, default_value = "")]
    endpoint: String,
    #[arg(long, default_value = "")]
    region: String,
    #[arg(
        long,
        env = "AWS_ACCESS_KEY_ID",
        default_value = "",
        hide_env_values = true
    )]
    access_key_id: String,
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        default_value = "",
        hide_env_values = true
    )]
    secret_access_key: String,
    /// File holding the encryption key (32 bytes, or 64 hex digits).
    #[arg(long)]
    key_file: Option<std::path::PathBuf>,
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    #[command(flatten)]
    repo: RepoArgs,
    #[arg(long, default_value = "")]
    prefix: String,
    /// The backup's id (made from the time when unset).
    #[arg(long, default_value = "")]
    id: String,
    /// Keep only the newest N backups of this VM (and collect unreferenced chunks).
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Do not zstd-compress chunks.
    #[arg(long)]
    no_compress: bool,
}

impl RepoArgs {
    fn location(&self, prefix: &str) -> pb::S3Location {
        pb::S3Location {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            bucket: self.bucket.clone(),
            prefix: prefix.into(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            storage_class: String::new(),
        }
    }

    fn key(&self) -> anyhow::Result<Vec<u8>> {
        match &self.key_file {
            Some(f) => std::fs::read(f).with_context(|| format!("--key-file {}", f.display())),
            None => Ok(Vec::new()),
        }
    }
}

pub async fn run(
    client: &mut AgentServiceClient<Channel>,
    out: Format,
    command: BackupCommand,
) -> anyhow::Result<()> {
    match command {
        BackupCommand::Create(a) => {
            let req = pb::BackupVmRequest {
                name: a.name,
                destination: Some(a.repo.location(&a.prefix)),
                backup_id: a.id,
                compress: !a.no_compress,
                encryption_key: a.repo.key()?,
                retention: (a.keep_last > 0).then_some(pb::BackupRetention {
                    keep_last: a.keep_last,
                    ..Default::default()
                }),
                spec_json: String::new(),
                quiesce: true,
            };
            let mut stream = client.backup_vm(req).await?.into_inner();
            let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
            while let Some(p) = stream.next().await {
                let p = p?;
                if p.done {
                    if terminal {
                        eprintln!();
                    }
                    if output::structured(
                        out,
                        &serde_json::json!({
                            "location": p.location, "manifestKey": p.manifest_key, "backupId": p.backup_id,
                            "incremental": p.incremental, "fullReason": p.full_reason,
                            "chunksTotal": p.chunks_total, "chunksRead": p.chunks_read, "chunksNew": p.chunks_new,
                            "bytesRead": p.bytes_read, "bytesUploaded": p.bytes_uploaded, "backupBytes": p.backup_bytes,
                        }),
                    )? {
                        return Ok(());
                    }
                    println!(
                        "{} ({}; read {} of {} chunks, stored {} new, {} MiB uploaded)",
                        p.location,
                        if p.incremental {
                            "incremental".to_string()
                        } else {
                            format!("full: {}", p.full_reason)
                        },
                        p.chunks_read,
                        p.chunks_total,
                        p.chunks_new,
                        p.bytes_uploaded >> 20
                    );
                    return Ok(());
                }
                if terminal && p.bytes_total > 0 {
                    eprint!(
                        "\r{:>3}% read, {} new chunks",
                        p.bytes_read * 100 / p.bytes_total,
                        p.chunks_new
                    );
                }
            }
            anyhow::bail!("the agent ended the backup without a result")
        }
        BackupCommand::Restore {
            manifest,
            name,
            repo,
        } => {
            let r = client
                .restore_backup(pb::RestoreBackupRequest {
                    source: Some(repo.location("")),
                    manifest_key: manifest,
                    encryption_key: repo.key()?,
                    name,
                })
                .await?
                .into_inner();
            if output::structured(
                out,
                &r.disks
                    .iter()
                    .map(|d| (&d.name, &d.path))
                    .collect::<Vec<_>>(),
            )? {
                return Ok(());
            }
            for d in &r.disks {
                println!("{}\t{}", d.name, d.path);
            }
            Ok(())
        }
        BackupCommand::Verify { manifest, repo } => {
            let v = client
                .verify_backup(pb::VerifyBackupRequest {
                    source: Some(repo.location("")),
                    manifest_key: manifest,
                    encryption_key: repo.key()?,
                })
                .await?
                .into_inner();
            if !output::structured(
                out,
                &serde_json::json!({"chunks": v.chunks, "bytes": v.bytes, "bad": v.bad_chunks}),
            )? {
                println!(
                    "{} chunks, {} MiB checked; {} bad",
                    v.chunks,
                    v.bytes >> 20,
                    v.bad_chunks.len()
                );
                for b in &v.bad_chunks {
                    println!("bad: {b}");
                }
            }
            if !v.bad_chunks.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
