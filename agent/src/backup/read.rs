//! Reading an exposed disk over NBD: which chunks (all, or those the bitmap marks changed) and
//! their bytes, handed on in disk order through a bounded channel (the reader runs ahead of the
//! uploads by at most that many chunks, bounding memory).

use tokio::sync::mpsc;

use super::expose::ExposedDisk;
use super::nbd::{Client, NbdError};
use super::{BackupError, CHUNK_SIZE, DiskManifest, chunk_count, chunk_len, chunks_touched};

/// What a disk's read will cover.
pub struct DiskRead {
    pub size: u64,
    /// Chunk indexes to read, in order.
    pub indexes: Vec<u64>,
    /// Whether the others may be taken from the parent backup.
    pub incremental: bool,
    pub full_reason: String,
    client: Client,
}

/// Connects to `disk`'s export and decides what to read: with the previous backup's bitmap and
/// a parent manifest of the same disk and size, the chunks its dirty clusters touch; else all.
pub async fn plan(
    disk: &ExposedDisk,
    parent: Option<&DiskManifest>,
) -> Result<DiskRead, BackupError> {
    let read_err = |source| BackupError::Read {
        disk: disk.name.clone(),
        source,
    };
    let bitmap = disk.bitmap.as_deref().filter(|_| parent.is_some());
    let mut client = Client::connect(&disk.socket, &disk.export, bitmap)
        .await
        .map_err(read_err)?;
    let size = client.size;
    let mut full_reason = disk.full_reason.clone();
    let usable_parent = parent.filter(|p| {
        let same = p.size_bytes == size;
        if !same && full_reason.is_empty() {
            full_reason = "the disk's size changed since the last backup".into();
        }
        same
    });
    if bitmap.is_some() && usable_parent.is_none() && full_reason.is_empty() {
        full_reason = "the last backup has no disk of this name".into();
    }
    let indexes = match (bitmap, usable_parent) {
        (Some(_), Some(_)) => {
            let ranges = client.all_dirty_ranges().await.map_err(read_err)?;
            chunks_touched(size, &ranges)
        }
        _ => (0..chunk_count(size)).collect(),
    };
    Ok(DiskRead {
        size,
        incremental: bitmap.is_some() && usable_parent.is_some(),
        full_reason,
        indexes,
        client,
    })
}

impl DiskRead {
    /// Reads the planned chunks in order into `out`. Stops early (without error) when the
    /// receiver is gone: the upload side failed and says why.
    pub async fn run(
        mut self,
        name: String,
        out: mpsc::Sender<(u64, Vec<u8>)>,
    ) -> Result<(), BackupError> {
        for i in std::mem::take(&mut self.indexes) {
            let mut buf = vec![0u8; chunk_len(self.size, i) as usize];
            self.client
                .read(i * CHUNK_SIZE, &mut buf)
                .await
                .map_err(|source: NbdError| BackupError::Read {
                    disk: name.clone(),
                    source,
                })?;
            if out.send((i, buf)).await.is_err() {
                break;
            }
        }
        self.client.disconnect().await;
        Ok(())
    }
}
