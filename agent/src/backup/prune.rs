//! Retention and garbage collection.
//!
//! Retention deletes the manifests a policy does not keep; garbage collection then deletes the
//! chunks no manifest names. A backup refers to chunks before its manifest exists (it uploads
//! them, or finds them stored), so collection must not run concurrently with one unguarded:
//! a backup writes `locks/<id>` before it looks at any chunk, and a collection writes its
//! marker `gc/<time>` before it reads the locks. Either the collection sees the lock (and
//! deletes no chunk), or the backup sees the marker (and checks, before writing its manifest,
//! that every chunk it names is still there). Locks and markers older than [`STALE_MS`] are
//! left over from crashed processes and ignored.

use std::collections::HashSet;

use tracing::info;

use super::retention::{self, Entry, Policy};
use super::store::Repo;
use super::{BackupError, gc_key};
use crate::context::now_ms;

/// After a day, a lock or marker is taken as left over.
pub const STALE_MS: i64 = 24 * 3600 * 1000;

fn join(prefix: &str, rest: &str) -> String {
    if prefix.is_empty() {
        rest.to_string()
    } else {
        format!("{prefix}/{rest}")
    }
}

/// Whether a garbage collection marker newer than `since_ms` exists.
pub async fn collections_since(repo: &Repo, since_ms: i64) -> bool {
    match repo.list(&join(&repo.prefix, "gc/")).await {
        Ok(markers) => markers.iter().any(|(_, at)| *at >= since_ms),
        // Unknown: assume one runs; the only cost is the check at the end.
        Err(_) => true,
    }
}

/// Applies `policy` to `vm`'s backups, then collects garbage if anything was removed. Returns
/// (backups removed, chunks deleted).
pub async fn apply(repo: &Repo, vm: &str, policy: Policy) -> Result<(u32, u64), BackupError> {
    if policy.keeps_all() {
        return Ok((0, 0));
    }
    let manifests = repo.manifests(vm).await?;
    let entries: Vec<Entry> = manifests
        .iter()
        .map(|(_, m)| Entry {
            id: m.id.clone(),
            created_ms: m.created_ms,
        })
        .collect();
    let keep = retention::keep(&entries, policy);
    let mut removed = 0;
    for (key, m) in &manifests {
        if !keep.contains(&m.id) {
            repo.delete(key).await?;
            removed += 1;
        }
    }
    if removed == 0 {
        return Ok((0, 0));
    }
    let deleted = collect(repo).await?;
    info!(vm, removed, chunks_deleted = deleted, "retention applied");
    Ok((removed, deleted))
}

/// Deletes every chunk that no manifest names, unless a backup is in progress. Returns how
/// many were deleted.
pub async fn collect(repo: &Repo) -> Result<u64, BackupError> {
    let started = now_ms();
    let marker = gc_key(&repo.prefix, started);
    repo.put(&marker, Vec::new()).await?;
    let result = collect_marked(repo, started).await;
    let _ = repo.delete(&marker).await;
    result
}

async fn collect_marked(repo: &Repo, started: i64) -> Result<u64, BackupError> {
    let locks = repo.list(&join(&repo.prefix, "locks/")).await?;
    if locks.iter().any(|(_, at)| *at > started - STALE_MS) {
        info!("a backup is in progress: chunks are collected after a later backup");
        return Ok(0);
    }
    let mut referenced = HashSet::new();
    for (key, _) in repo.list(&join(&repo.prefix, "backups/")).await? {
        if !key.ends_with(".json") {
            continue;
        }
        let m = repo.manifest(&key).await?;
        referenced.extend(m.chunk_ids().map(String::from));
    }
    let mut deleted = 0;
    for (key, _) in repo.list(&join(&repo.prefix, "chunks/")).await? {
        let id = key.rsplit('/').next().unwrap_or_default();
        if !referenced.contains(id) {
            repo.delete(&key).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}
