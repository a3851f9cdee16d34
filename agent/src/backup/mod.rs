//! Backups of VM disks to S3-compatible object storage, restic/Proxmox-Backup-Server style.
//!
//! A disk is read at one instant (see [`expose`]), cut into fixed-size chunks of [`CHUNK_SIZE`]
//! bytes, and each chunk is stored once under its id ([`chunk_id`]): a chunk that another backup
//! (of any VM) already stored is not uploaded again. Chunks are zstd-compressed and, with a key,
//! encrypted client-side ([`seal`]). A backup is its manifest ([`Manifest`]): the chunk ids of
//! every disk in order. The manifest is written last, so a backup that failed part-way is never
//! listed; the chunks it had uploaded are garbage once [`prune`] finds nothing referring to them.
//!
//! Repository layout under the destination's prefix:
//! - `chunks/<2 hex>/<64 hex>`: sealed chunks;
//! - `backups/<vm>/<id>.json`: manifests;
//! - `locks/<id>`: a backup in progress (garbage collection keeps every chunk while one exists);
//! - `gc/<millis>`: when a garbage collection began (a backup that overlapped one checks again
//!   that the chunks it deduplicated against are still there).
//!
//! This file holds the pure parts: manifest, chunk arithmetic, key names.

pub mod expose;
mod fleece;
pub mod nbd;
pub mod prune;
pub mod read;
pub mod restore;
pub mod retention;
pub mod seal;
mod serve;
pub mod store;
pub mod upload;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes per chunk: large enough that per-object overhead (a PUT, a HEAD, a manifest entry)
/// stays small next to the data, small enough that a few changed clusters re-upload little.
pub const CHUNK_SIZE: u64 = 4 << 20;

/// The manifest format this agent writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// In a manifest, the id of a chunk that is all zeros: it is stored nowhere.
pub const ZERO_CHUNK: &str = "0";

/// Errors of backup, restore and verification, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{field}: {why}")]
    BadRequest { field: &'static str, why: String },
    #[error("object storage: {what}: {source}")]
    Store {
        what: String,
        #[source]
        source: object_store::Error,
    },
    #[error("reading disk {disk}: {source}")]
    Read {
        disk: String,
        #[source]
        source: nbd::NbdError,
    },
    #[error("exposing the disks: {0}")]
    Expose(String),
    #[error("chunk {id}: {why}")]
    Chunk { id: String, why: seal::SealError },
    #[error("manifest {key}: {why}")]
    Manifest { key: String, why: String },
    #[error("the backup is encrypted and {0}: give the key it was made with (keySecretRef)")]
    Key(&'static str),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("qemu-img: {0}")]
    QemuImg(#[from] crate::qemu::img::QemuImgError),
}

impl BackupError {
    pub fn store(what: impl Into<String>) -> impl FnOnce(object_store::Error) -> BackupError {
        let what = what.into();
        move |source| BackupError::Store { what, source }
    }
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
        let what = what.into();
        move |source| BackupError::Io { what, source }
    }
}

/// One backup: what a restore needs to rebuild the VM's disks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub version: u32,
    pub id: String,
    pub vm: String,
    /// Milliseconds since the Unix epoch, when the disks were captured.
    pub created_ms: i64,
    /// The backup the unchanged chunks were taken from, for an incremental one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub chunk_size: u64,
    pub compressed: bool,
    /// A value derived from the key ([`seal::key_check`]): a restore with another key is
    /// refused before any chunk is read. None: not encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_check: Option<String>,
    /// Whether the guest's filesystems were frozen at the capture.
    #[serde(default)]
    pub quiesced: bool,
    /// The VM's spec as the agent ran it, and as the caller described it (e.g. the
    /// VirtualMachine's spec), for a restore to make the VM again.
    pub agent_spec: serde_json::Value,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub spec: serde_json::Value,
    pub disks: Vec<DiskManifest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskManifest {
    pub name: String,
    pub size_bytes: u64,
    /// Chunk ids in disk order; [`ZERO_CHUNK`] for a chunk of zeros.
    pub chunks: Vec<String>,
    /// [`disk_digest`] of `chunks`: a restore checks the disk it wrote against it.
    pub digest: String,
    /// Whether only the chunks changed since `parent` were read, and if not, why.
    pub incremental: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub full_reason: String,
}

impl Manifest {
    /// Every stored chunk this backup needs.
    pub fn chunk_ids(&self) -> impl Iterator<Item = &str> {
        self.disks
            .iter()
            .flat_map(|d| d.chunks.iter())
            .map(String::as_str)
            .filter(|c| *c != ZERO_CHUNK)
    }

    /// Disk bytes the backup holds (what the disks would take restored, holes excluded).
    pub fn data_bytes(&self) -> u64 {
        self.disks
            .iter()
            .map(|d| {
                d.chunks
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| *c != ZERO_CHUNK)
                    .map(|(i, _)| chunk_len(d.size_bytes, i as u64))
                    .sum::<u64>()
            })
            .sum()
    }
}

/// Number of chunks of a disk of `size` bytes.
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK_SIZE)
}

/// Length of chunk `index` of a disk of `size` bytes (the last one may be short).
pub fn chunk_len(size: u64, index: u64) -> u64 {
    let start = index * CHUNK_SIZE;
    size.saturating_sub(start).min(CHUNK_SIZE)
}

/// The chunks that byte ranges `(offset, length)` touch, in order, without repeats.
pub fn chunks_touched(size: u64, ranges: &[(u64, u64)]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(offset, length) in ranges {
        if length == 0 || offset >= size {
            continue;
        }
        let end = (offset + length).min(size);
        let first = offset / CHUNK_SIZE;
        let last = (end - 1) / CHUNK_SIZE;
        for c in first..=last {
            if out.last().is_none_or(|&l| l < c) {
                out.push(c);
            } else if !out.contains(&c) {
                out.push(c);
                out.sort_unstable();
            }
        }
    }
    out
}

/// A chunk's id: the SHA-256 of its content, keyed with a value derived from the encryption key
/// when there is one, so that the ids in an encrypted repository say nothing about content to
/// whoever reads the bucket without the key.
pub fn chunk_id(data: &[u8], id_key: Option<&[u8; 32]>) -> String {
    let mut h = Sha256::new();
    if let Some(k) = id_key {
        h.update(k);
    }
    h.update(data);
    hex(&h.finalize())
}

/// Whether `data` is all zeros (such chunks are not stored).
pub fn is_zero(data: &[u8]) -> bool {
    // A comparison with zeros is a memcmp: fast in unoptimised builds too.
    static ZEROS: [u8; 65536] = [0; 65536];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

/// A disk's digest: SHA-256 over its size and its chunk ids in order. As every chunk id is a
/// hash of the chunk's content, this identifies the whole disk's content; it is computed the
/// same way from the chunks a restore wrote.
pub fn disk_digest(size: u64, chunks: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    for c in chunks {
        h.update(c.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Object key of chunk `id` under `prefix`.
pub fn chunk_key(prefix: &str, id: &str) -> String {
    join(prefix, &format!("chunks/{}/{id}", &id[..2.min(id.len())]))
}

/// Object key of the manifest of backup `id` of `vm`.
pub fn manifest_key(prefix: &str, vm: &str, id: &str) -> String {
    join(prefix, &format!("backups/{vm}/{id}.json"))
}

/// Where `vm`'s manifests are.
pub fn manifests_of(prefix: &str, vm: &str) -> String {
    join(prefix, &format!("backups/{vm}/"))
}

pub fn lock_key(prefix: &str, id: &str) -> String {
    join(prefix, &format!("locks/{id}"))
}

pub fn gc_key(prefix: &str, started_ms: i64) -> String {
    join(prefix, &format!("gc/{started_ms:016}"))
}

/// The repository prefix of a manifest key (what precedes `backups/`).
pub fn prefix_of_manifest(key: &str) -> Option<&str> {
    let at = if key.starts_with("backups/") {
        0
    } else {
        key.find("/backups/")? + 1
    };
    key[at..]
        .ends_with(".json")
        .then(|| key[..at].trim_end_matches('/'))
}

fn join(prefix: &str, rest: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        rest.to_string()
    } else {
        format!("{prefix}/{rest}")
    }
}

/// A backup id: its time (sortable) and a random suffix, e.g. `20260204T100000Z-3fa2`.
pub fn new_backup_id(now_ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(now_ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut r = [0u8; 2];
    getrandom(&mut r);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        hex(&r)
    )
}

/// Checks a caller's backup id: it becomes part of object keys and bitmap names.
pub fn check_backup_id(id: &str) -> Result<(), BackupError> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(BackupError::BadRequest {
            field: "backup_id",
            why: format!("{id:?} must be 1-100 letters, digits, '-', '_' or '.'"),
        })
    }
}

fn getrandom(buf: &mut [u8]) {
    use aes_gcm::aead::rand_core::RngCore;
    aes_gcm::aead::OsRng.fill_bytes(buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_arithmetic() {
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(CHUNK_SIZE), 1);
        assert_eq!(chunk_count(CHUNK_SIZE + 1), 2);
        assert_eq!(chunk_len(CHUNK_SIZE + 10, 0), CHUNK_SIZE);
        assert_eq!(chunk_len(CHUNK_SIZE + 10, 1), 10);
        assert_eq!(chunk_len(CHUNK_SIZE + 10, 2), 0);
    }

    #[test]
    fn dirty_ranges_map_to_chunks() {
        let size = 10 * CHUNK_SIZE;
        assert_eq!(chunks_touched(size, &[]), Vec::<u64>::new());
        assert_eq!(chunks_touched(size, &[(0, 1)]), [0]);
        // A range across a boundary touches both sides.
        assert_eq!(chunks_touched(size, &[(CHUNK_SIZE - 1, 2)]), [0, 1]);
        assert_eq!(
            chunks_touched(
                size,
                &[(CHUNK_SIZE, CHUNK_SIZE), (5 * CHUNK_SIZE + 3, 65536)]
            ),
            [1, 5]
        );
        // Out of order and repeated ranges, and one past the end.
        assert_eq!(
            chunks_touched(
                size,
                &[
                    (3 * CHUNK_SIZE, 1),
                    (0, 1),
                    (3 * CHUNK_SIZE + 9, 1),
                    (size, 5)
                ]
            ),
            [0, 3]
        );
        assert_eq!(
            chunks_touched(size, &[(9 * CHUNK_SIZE, 4 * CHUNK_SIZE)]),
            [9]
        );
    }

    #[test]
    fn ids_are_content_hashes_keyed_when_encrypted() {
        let a = chunk_id(b"abc", None);
        assert_eq!(
            a,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let k = [7u8; 32];
        assert_ne!(chunk_id(b"abc", Some(&k)), a);
        assert_eq!(chunk_id(b"abc", Some(&k)), chunk_id(b"abc", Some(&k)));
        assert!(is_zero(&vec![0u8; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn keys_and_prefixes() {
        let id = "ab".repeat(32);
        assert_eq!(chunk_key("p/q/", &id), format!("p/q/chunks/ab/{id}"));
        assert_eq!(chunk_key("", &id), format!("chunks/ab/{id}"));
        let m = manifest_key("kubevirt/daily", "vm1", "20260204T100000Z-0a0b");
        assert_eq!(m, "kubevirt/daily/backups/vm1/20260204T100000Z-0a0b.json");
        assert_eq!(prefix_of_manifest(&m), Some("kubevirt/daily"));
        assert_eq!(prefix_of_manifest("backups/vm1/x.json"), Some(""));
        assert_eq!(prefix_of_manifest("kubevirt/daily/vm1.qcow2"), None);
        assert_eq!(manifests_of("", "vm1"), "backups/vm1/");
    }

    #[test]
    fn backup_ids() {
        let id = new_backup_id(1_770_199_200_000);
        assert!(id.starts_with("20260204T100000Z-"), "{id}");
        check_backup_id(&id).unwrap();
        let e = check_backup_id("../x").unwrap_err().to_string();
        assert!(e.starts_with("backup_id: "), "{e}");
    }

    #[test]
    fn digest_and_sizes() {
        let chunks = vec!["a".to_string(), ZERO_CHUNK.to_string(), "b".to_string()];
        assert_ne!(disk_digest(1, &chunks), disk_digest(2, &chunks));
        let m = Manifest {
            version: MANIFEST_VERSION,
            id: "x".into(),
            vm: "v".into(),
            created_ms: 0,
            parent: None,
            chunk_size: CHUNK_SIZE,
            compressed: true,
            key_check: None,
            quiesced: false,
            agent_spec: serde_json::Value::Null,
            spec: serde_json::Value::Null,
            disks: vec![DiskManifest {
                name: "root".into(),
                size_bytes: 2 * CHUNK_SIZE + 5,
                chunks,
                digest: String::new(),
                incremental: false,
                full_reason: String::new(),
            }],
        };
        assert_eq!(m.data_bytes(), CHUNK_SIZE + 5);
        assert_eq!(m.chunk_ids().collect::<Vec<_>>(), ["a", "b"]);
    }
}
