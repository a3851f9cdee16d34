//! BackupVm: expose the disks, read the chunks to back up, store those the repository lacks,
//! write the manifest, release the disks, then apply retention.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use hypersdk_proto::agent::v1 as pb;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use super::expose::{ExposeRequest, Exposed};
use super::prune;
use super::retention::Policy;
use super::seal::{self, Keys};
use super::store::Repo;
use super::{
    BackupError, CHUNK_SIZE, DiskManifest, MANIFEST_VERSION, Manifest, ZERO_CHUNK, check_backup_id,
    chunk_count, chunk_id, chunk_key, disk_digest, is_zero, lock_key, manifest_key, new_backup_id,
};
use crate::context::now_ms;
use crate::error::AgentError;
use crate::vm::actor::Op;
use crate::vm::registry::Vms;

/// Chunks being compressed, encrypted or uploaded at once (each holds up to two chunk buffers).
const PARALLEL: usize = 4;

fn bad(field: &'static str, why: impl Into<String>) -> BackupError {
    BackupError::BadRequest {
        field,
        why: why.into(),
    }
}

/// What a checked request asks for.
struct Job {
    vm: String,
    id: String,
    repo: Repo,
    keys: Option<Arc<Keys>>,
    compress: bool,
    quiesce: bool,
    spec: Value,
    policy: Policy,
}

fn check(r: pb::BackupVmRequest) -> Result<Job, BackupError> {
    crate::spec::check_name("name", &r.name).map_err(|e| bad("name", e.to_string()))?;
    let dest = r
        .destination
        .ok_or_else(|| bad("destination", "is required"))?;
    let repo = Repo::open(&dest, &dest.prefix)?;
    let keys = if r.encryption_key.is_empty() {
        None
    } else {
        Some(Arc::new(
            Keys::new(&r.encryption_key).map_err(|why| bad("encryption_key", why))?,
        ))
    };
    let id = if r.backup_id.is_empty() {
        new_backup_id(now_ms())
    } else {
        check_backup_id(&r.backup_id)?;
        r.backup_id
    };
    let spec = if r.spec_json.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&r.spec_json).map_err(|e| bad("spec_json", e.to_string()))?
    };
    let policy = r.retention.map_or(Policy::default(), |p| Policy {
        keep_last: p.keep_last,
        keep_daily: p.keep_daily,
        keep_weekly: p.keep_weekly,
        keep_monthly: p.keep_monthly,
    });
    Ok(Job {
        vm: r.name,
        id,
        repo,
        keys,
        compress: r.compress,
        quiesce: r.quiesce,
        spec,
        policy,
    })
}

/// Runs a backup, publishing progress on `progress`; returns the final figures.
pub async fn backup(
    vms: &Vms,
    r: pb::BackupVmRequest,
    progress: &watch::Sender<pb::BackupProgress>,
) -> Result<pb::BackupProgress, BackupError> {
    let job = check(r)?;
    let repo = &job.repo;
    let key = manifest_key(&repo.prefix, &job.vm, &job.id);
    if repo.exists(&key).await? {
        return Err(bad(
            "backup_id",
            format!("{:?} exists in the repository already", job.id),
        ));
    }
    // The lock keeps garbage collection from deleting chunks this backup will refer to
    // before its manifest does; a collection already running is checked for at the end.
    let lock = lock_key(&repo.prefix, &job.id);
    let started = now_ms();
    repo.put(
        &lock,
        json!({"vm": job.vm, "startedMs": started})
            .to_string()
            .into_bytes(),
    )
    .await?;
    let collecting = prune::collections_since(repo, started - prune::STALE_MS).await;
    let result = backup_locked(vms, &job, &key, progress, collecting).await;
    if let Err(e) = repo.delete(&lock).await {
        warn!("removing the backup's lock: {e}");
    }
    let mut done = result?;
    match prune::apply(repo, &job.vm, job.policy).await {
        Ok((pruned, deleted)) => {
            done.pruned = pruned;
            done.chunks_deleted = deleted;
        }
        Err(e) => warn!("retention after the backup: {e}"),
    }
    progress.send_replace(done.clone());
    Ok(done)
}

async fn backup_locked(
    vms: &Vms,
    job: &Job,
    key: &str,
    progress: &watch::Sender<pb::BackupProgress>,
    collecting: bool,
) -> Result<pb::BackupProgress, BackupError> {
    let repo = &job.repo;
    let check = job.keys.as_ref().map(|k| k.check.clone());
    // The parent: the newest backup of this VM made with the same key, whose chunks the
    // unchanged parts of the disks can be taken from.
    let parent = repo
        .manifests(&job.vm)
        .await?
        .into_iter()
        .map(|(_, m)| m)
        .rfind(|m| m.key_check == check && m.chunk_size == CHUNK_SIZE);
    let request = ExposeRequest {
        backup_id: job.id.clone(),
        parent_id: parent.as_ref().map(|m| m.id.clone()),
        quiesce: job.quiesce,
    };
    let (_, exposed) = vms
        .call_for(&job.vm, |done| Op::ExposeBackup { request, done })
        .await
        .map_err(|e: AgentError| BackupError::Expose(e.to_string()))?;
    let created_ms = now_ms();
    let stored = store_disks(job, &exposed, parent.as_ref(), progress).await;
    let written = match stored {
        Ok((disks, p)) => {
            let manifest = Manifest {
                version: MANIFEST_VERSION,
                id: job.id.clone(),
                vm: job.vm.clone(),
                created_ms,
                parent: parent
                    .as_ref()
                    .map(|m| m.id.clone())
                    .filter(|_| disks.iter().any(|d| d.incremental)),
                chunk_size: CHUNK_SIZE,
                compressed: job.compress,
                key_check: check.clone(),
                quiesced: exposed.quiesced,
                agent_spec: exposed.agent_spec.clone(),
                spec: job.spec.clone(),
                disks,
            };
            write_manifest(repo, key, &manifest, collecting)
                .await
                .map(|()| (manifest, p))
        }
        Err(e) => Err(e),
    };
    let success = written.is_ok();
    let release = vms
        .call_for(&job.vm, |done| Op::ReleaseBackup {
            exposed: Box::new(exposed),
            success,
            done,
        })
        .await;
    if let Err(e) = release {
        warn!("releasing the disks after the backup: {e}");
    }
    let (manifest, mut p) = written?;
    p.done = true;
    p.location = repo.url(key);
    p.manifest_key = key.to_string();
    p.backup_id = manifest.id.clone();
    p.backup_bytes = manifest.data_bytes();
    p.quiesced = manifest.quiesced;
    p.incremental = manifest.disks.iter().all(|d| d.incremental);
    p.full_reason = manifest
        .disks
        .iter()
        .filter(|d| !d.incremental)
        .map(|d| format!("{}: {}", d.name, d.full_reason))
        .collect::<Vec<_>>()
        .join("; ");
    info!(
        backup = manifest.id,
        chunks_new = p.chunks_new,
        chunks_read = p.chunks_read,
        uploaded = p.bytes_uploaded,
        incremental = p.incremental,
        "backup written"
    );
    Ok(p)
}

/// Writes the manifest, after making sure (if a garbage collection ran meanwhile) that every
/// chunk it names is still stored.
async fn write_manifest(
    repo: &Repo,
    key: &str,
    manifest: &Manifest,
    collecting: bool,
) -> Result<(), BackupError> {
    if collecting {
        let ids: HashSet<&str> = manifest.chunk_ids().collect();
        for id in ids {
            if !repo.exists(&chunk_key(&repo.prefix, id)).await? {
                return Err(BackupError::Manifest {
                    key: key.to_string(),
                    why: format!(
                        "chunk {id} was removed by a garbage collection that ran during the backup; run the backup again"
                    ),
                });
            }
        }
    }
    let body = serde_json::to_vec_pretty(manifest).map_err(|e| BackupError::Manifest {
        key: key.to_string(),
        why: e.to_string(),
    })?;
    repo.put(key, body).await
}

type Stored = (Vec<DiskManifest>, pb::BackupProgress);

async fn store_disks(
    job: &Job,
    exposed: &Exposed,
    parent: Option<&Manifest>,
    progress: &watch::Sender<pb::BackupProgress>,
) -> Result<Stored, BackupError> {
    // Chunks known to be stored: the parent's (no need to ask the store), and this backup's.
    let known: Arc<HashSet<String>> = Arc::new(
        parent
            .map(|m| m.chunk_ids().map(String::from).collect())
            .unwrap_or_default(),
    );
    let claimed = Arc::new(Mutex::new(HashSet::<String>::new()));
    let mut p = pb::BackupProgress::default();
    let mut disks = Vec::new();
    let mut plans = Vec::new();
    for d in &exposed.disks {
        let parent_disk = parent.and_then(|m| m.disks.iter().find(|x| x.name == d.name));
        let plan = super::read::plan(d, parent_disk).await?;
        p.chunks_total += chunk_count(plan.size);
        p.bytes_total += plan.indexes.len() as u64 * CHUNK_SIZE;
        plans.push((d.name.clone(), plan, parent_disk));
    }
    progress.send_replace(p.clone());
    for (name, plan, parent_disk) in plans {
        let size = plan.size;
        let incremental = plan.incremental;
        let full_reason = plan.full_reason.clone();
        let mut chunks = match parent_disk.filter(|_| incremental) {
            Some(pd) => pd.chunks.clone(),
            None => vec![String::new(); chunk_count(size) as usize],
        };
        let (tx, rx) = mpsc::channel(PARALLEL);
        let reader = tokio::spawn(plan.run(name.clone(), tx));
        let mut results = ReceiverStream::new(rx)
            .map(|(i, data)| store_chunk(job, known.clone(), claimed.clone(), i, data))
            .buffer_unordered(PARALLEL);
        while let Some(r) = results.next().await {
            let (i, id, len, uploaded) = r?;
            chunks[i as usize] = id;
            p.chunks_read += 1;
            p.bytes_read += len;
            if uploaded > 0 {
                p.chunks_new += 1;
                p.bytes_uploaded += uploaded;
            }
            progress.send_replace(p.clone());
        }
        drop(results);
        reader
            .await
            .map_err(|e| BackupError::Expose(format!("the reader of disk {name} ended: {e}")))??;
        let digest = disk_digest(size, &chunks);
        disks.push(DiskManifest {
            name,
            size_bytes: size,
            chunks,
            digest,
            incremental,
            full_reason,
        });
    }
    Ok((disks, p))
}

/// Hashes chunk `i`, and stores it unless it is zeros or stored already. Returns (index, id,
/// its length, bytes uploaded).
async fn store_chunk(
    job: &Job,
    known: Arc<HashSet<String>>,
    claimed: Arc<Mutex<HashSet<String>>>,
    i: u64,
    data: Vec<u8>,
) -> Result<(u64, String, u64, u64), BackupError> {
    let len = data.len() as u64;
    let keys = job.keys.clone();
    let (id, data) = blocking(move || {
        if is_zero(&data) {
            (ZERO_CHUNK.to_string(), data)
        } else {
            (chunk_id(&data, keys.as_ref().map(|k| &k.id_key)), data)
        }
    })
    .await?;
    let fresh = id != ZERO_CHUNK
        && !known.contains(&id)
        && claimed.lock().expect("claimed chunks").insert(id.clone());
    if !fresh {
        return Ok((i, id, len, 0));
    }
    let key = chunk_key(&job.repo.prefix, &id);
    if job.repo.exists(&key).await? {
        return Ok((i, id, len, 0));
    }
    let keys = job.keys.clone();
    let compress = job.compress;
    let sealed_id = id.clone();
    let blob = blocking(move || seal::seal(&data, &sealed_id, compress, keys.as_deref()))
        .await?
        .map_err(|why| BackupError::Chunk {
            id: id.clone(),
            why,
        })?;
    let uploaded = blob.len() as u64;
    job.repo.put(&key, blob).await?;
    Ok((i, id, len, uploaded))
}

/// Runs CPU-heavy work (hashing, compression, encryption) off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackupError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackupError::Expose(format!("a worker ended: {e}")))
}
