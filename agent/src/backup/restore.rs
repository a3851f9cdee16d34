//! RestoreBackup and VerifyBackup: reading a backup's chunks back, each checked against its id.
//!
//! A restore writes each disk as a sparse raw file (zero chunks are holes), checks the disk's
//! digest against the manifest, and converts it to qcow2 in the agent's image dir; nothing is
//! left behind if any step fails.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use hypersdk_proto::agent::v1 as pb;
use tracing::info;

use super::seal::{self, Keys};
use super::store::Repo;
use super::upload::blocking;
use super::{
    BackupError, CHUNK_SIZE, Manifest, ZERO_CHUNK, chunk_key, chunk_len, disk_digest,
    prefix_of_manifest,
};
use crate::context::Context;
use crate::spec::DiskFormat;

/// Chunks downloaded and opened at once.
const PARALLEL: usize = 4;

fn bad(field: &'static str, why: impl Into<String>) -> BackupError {
    BackupError::BadRequest {
        field,
        why: why.into(),
    }
}

/// The repository and manifest a request names, and the keys to read it with (checked
/// against the manifest before any chunk is read).
async fn open(
    source: Option<pb::S3Location>,
    manifest_key: &str,
    key: &[u8],
) -> Result<(Repo, Manifest, Option<Arc<Keys>>), BackupError> {
    let source = source.ok_or_else(|| bad("source", "is required"))?;
    let prefix = prefix_of_manifest(manifest_key).ok_or_else(|| {
        bad(
            "manifest_key",
            format!("{manifest_key:?} is not a backup manifest (…/backups/<vm>/<id>.json)"),
        )
    })?;
    let repo = Repo::open(&source, prefix)?;
    let manifest = repo.manifest(manifest_key).await?;
    let keys = match (&manifest.key_check, key.is_empty()) {
        (None, _) => None,
        (Some(_), true) => return Err(BackupError::Key("no key was given")),
        (Some(check), false) => {
            let keys = Keys::new(key).map_err(|why| bad("encryption_key", why))?;
            if &keys.check != check {
                return Err(BackupError::Key(
                    "the key given is not the one it was made with",
                ));
            }
            Some(Arc::new(keys))
        }
    };
    Ok((repo, manifest, keys))
}

/// Reads and opens chunk `id` (of at most `max` bytes).
async fn fetch(
    repo: &Repo,
    keys: Option<Arc<Keys>>,
    id: String,
    max: usize,
) -> Result<Vec<u8>, BackupError> {
    let blob = repo.get(&chunk_key(&repo.prefix, &id)).await?;
    blocking(move || {
        seal::open(&blob, &id, keys.as_deref(), max).map_err(|why| BackupError::Chunk { id, why })
    })
    .await?
}

pub async fn restore(
    ctx: &Context,
    r: pb::RestoreBackupRequest,
) -> Result<pb::RestoreBackupResponse, BackupError> {
    crate::spec::check_name("name", &r.name).map_err(|e| bad("name", e.to_string()))?;
    let (repo, manifest, keys) = open(r.source, &r.manifest_key, &r.encryption_key).await?;
    let dir = ctx.images_dir.join("restored");
    std::fs::create_dir_all(&dir)
        .map_err(BackupError::io(format!("creating {}", dir.display())))?;
    let mut disks = Vec::new();
    let mut written = 0;
    for d in &manifest.disks {
        let target = restored_path(&ctx.images_dir, &r.name, &d.name);
        if target.exists() {
            remove_all(&disks);
            return Err(bad(
                "name",
                format!(
                    "{} exists: restored disks of a VM of this name are there",
                    target.display()
                ),
            ));
        }
        let raw = dir.join(format!(".{}-{}.raw.partial", r.name, d.name));
        let result = restore_disk(ctx, &repo, keys.clone(), d, &raw, &target).await;
        let _ = std::fs::remove_file(&raw);
        match result {
            Ok(bytes) => written += bytes,
            Err(e) => {
                let _ = std::fs::remove_file(&target);
                remove_all(&disks);
                return Err(e);
            }
        }
        disks.push(pb::RestoredDisk {
            name: d.name.clone(),
            path: target.to_string_lossy().into_owned(),
            size_bytes: d.size_bytes,
            digest: d.digest.clone(),
        });
    }
    info!(
        vm = r.name,
        backup = manifest.id,
        bytes = written,
        "backup restored"
    );
    Ok(pb::RestoreBackupResponse {
        disks,
        spec_json: if manifest.spec.is_null() {
            String::new()
        } else {
            manifest.spec.to_string()
        },
        agent_spec_json: manifest.agent_spec.to_string(),
        vm: manifest.vm.clone(),
        bytes_written: written,
    })
}

fn remove_all(disks: &[pb::RestoredDisk]) {
    for d in disks {
        let _ = std::fs::remove_file(&d.path);
    }
}

async fn restore_disk(
    ctx: &Context,
    repo: &Repo,
    keys: Option<Arc<Keys>>,
    d: &super::DiskManifest,
    raw: &Path,
    target: &Path,
) -> Result<u64, BackupError> {
    if disk_digest(d.size_bytes, &d.chunks) != d.digest {
        return Err(BackupError::Manifest {
            key: d.name.clone(),
            why: "the disk's chunk list does not match its digest".into(),
        });
    }
    let file = std::fs::File::create(raw)
        .map_err(BackupError::io(format!("creating {}", raw.display())))?;
    file.set_len(d.size_bytes)
        .map_err(BackupError::io(format!("sizing {}", raw.display())))?;
    let file = Arc::new(file);
    let size = d.size_bytes;
    // Owned work items: the stream's closures borrow nothing (the future must be Send for any
    // lifetime the gRPC service gives it).
    let work: Vec<(u64, String)> = d
        .chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| c.as_str() != ZERO_CHUNK)
        .map(|(i, c)| (i as u64, c.clone()))
        .collect();
    let repo = repo.clone();
    let shared = file.clone();
    let written = futures::stream::iter(work)
        .map(move |(i, id)| {
            let (repo, keys, file) = (repo.clone(), keys.clone(), shared.clone());
            async move {
                let len = chunk_len(size, i) as usize;
                let data = fetch(&repo, keys, id.clone(), len).await?;
                if data.len() != len {
                    return Err(BackupError::Manifest {
                        key: id,
                        why: format!("chunk {i} holds {} bytes, not {len}", data.len()),
                    });
                }
                blocking(move || {
                    file.write_all_at(&data, i * CHUNK_SIZE)
                        .map(|()| data.len() as u64)
                })
                .await?
                .map_err(BackupError::io("writing the restored disk"))
            }
        })
        .buffer_unordered(PARALLEL)
        .try_fold(
            0u64,
            |sum, n| async move { Ok::<u64, BackupError>(sum + n) },
        )
        .await?;
    file.sync_all()
        .map_err(BackupError::io("syncing the restored disk"))?;
    crate::qemu::img::convert(&ctx.qemu_img, raw, DiskFormat::Raw, target, None).await?;
    Ok(written)
}

pub async fn verify(r: pb::VerifyBackupRequest) -> Result<pb::VerifyBackupResponse, BackupError> {
    let (repo, manifest, keys) = open(r.source, &r.manifest_key, &r.encryption_key).await?;
    let ids: BTreeSet<String> = manifest.chunk_ids().map(String::from).collect();
    let results: Vec<(String, Result<Vec<u8>, BackupError>)> = futures::stream::iter(ids)
        .map(|id| {
            let (repo, keys) = (repo.clone(), keys.clone());
            async move {
                (
                    id.clone(),
                    fetch(&repo, keys, id, CHUNK_SIZE as usize).await,
                )
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut out = pb::VerifyBackupResponse::default();
    for (id, r) in results {
        match r {
            Ok(data) => {
                out.chunks += 1;
                out.bytes += data.len() as u64;
            }
            Err(e) => out.bad_chunks.push(format!("{id}: {e}")),
        }
    }
    out.bad_chunks.sort();
    for d in &manifest.disks {
        if disk_digest(d.size_bytes, &d.chunks) != d.digest {
            out.bad_chunks.push(format!(
                "disk {}: chunk list does not match its digest",
                d.name
            ));
        }
    }
    Ok(out)
}

/// Where restored disks of VM `name` go.
pub fn restored_path(images_dir: &Path, name: &str, disk: &str) -> PathBuf {
    images_dir
        .join("restored")
        .join(format!("{name}-{disk}.qcow2"))
}
