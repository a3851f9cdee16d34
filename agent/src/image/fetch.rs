//! One import: the image streamed (from a URL or a node file) into a partial file while its
//! digest is computed, checked, converted to qcow2 where needed, and renamed into the cache.
//! Whatever goes wrong, the partial file is removed: the cache holds whole, verified images only.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use hypersdk_proto::agent::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::sync::watch;

use super::{Checksum, Hasher, Kind, Source, cached_path, classify, partial_dir, percent};
use crate::qemu::img::{self, QemuImgError};
use crate::spec::DiskFormat;

/// Why an image could not be imported. The message names the image.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot download {url}: {source}")]
    Download {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the image cache ({}): {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{image} has digest {actual}, expected {expected}: nothing was cached")]
    Mismatch {
        image: String,
        expected: Checksum,
        actual: Checksum,
    },
    #[error("{image} is not a disk image: {why}")]
    NotAnImage { image: String, why: String },
    #[error("the import of {0} ended without a result")]
    Abandoned(String),
    #[error("converting {image} to qcow2: {source}")]
    Convert {
        image: String,
        #[source]
        source: QemuImgError,
    },
}

/// What an import needs besides the image.
pub struct Job<'a> {
    pub source: &'a Source,
    pub checksum: &'a Checksum,
    pub cache_dir: &'a Path,
    pub qemu_img: &'a Path,
    pub client: &'a reqwest::Client,
}

/// Partial files of this process are told apart by a counter (and from other agents sharing
/// the cache by the pid).
static PARTIALS: AtomicU64 = AtomicU64::new(0);

/// Imports `job`'s image into the cache; returns its cache file. `progress` follows the bytes.
pub async fn import(
    job: &Job<'_>,
    progress: &watch::Sender<pb::ImportProgress>,
) -> Result<PathBuf, ImportError> {
    let n = PARTIALS.fetch_add(1, Ordering::Relaxed);
    let partial = partial_dir(job.cache_dir).join(format!(
        "{}-{}.{}.{n}",
        job.checksum.algorithm.name(),
        job.checksum.hex,
        std::process::id()
    ));
    let converted = partial.with_extension("qcow2");
    let result = fetch_verify_store(job, &partial, &converted, progress).await;
    for f in [&partial, &converted] {
        let _ = std::fs::remove_file(f);
    }
    result
}

async fn fetch_verify_store(
    job: &Job<'_>,
    partial: &Path,
    converted: &Path,
    progress: &watch::Sender<pb::ImportProgress>,
) -> Result<PathBuf, ImportError> {
    let image = job.source.to_string();
    let actual = stream(job, partial, progress).await?;
    if actual != *job.checksum {
        return Err(ImportError::Mismatch {
            image,
            expected: job.checksum.clone(),
            actual,
        });
    }
    let write = |source| ImportError::Write {
        path: partial.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(partial).map_err(write)?.len();
    let header = crate::host::image::read_header(partial).map_err(|e| ImportError::NotAnImage {
        image: image.clone(),
        why: e.to_string(),
    })?;
    let mut head = vec![0u8; 64];
    let n = std::fs::File::open(partial)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(write)?;
    let kind = classify(&head[..n], len, &header).map_err(|why| ImportError::NotAnImage {
        image: image.clone(),
        why,
    })?;
    let ready = match kind {
        Kind::Qcow2 => partial,
        Kind::Raw => {
            img::convert(job.qemu_img, partial, DiskFormat::Raw, converted, None)
                .await
                .map_err(|source| ImportError::Convert { image, source })?;
            converted
        }
    };
    let target = cached_path(job.cache_dir, job.checksum);
    // Read-only: VMs write into their own overlays, never into the shared image.
    std::fs::set_permissions(ready, std::os::unix::fs::PermissionsExt::from_mode(0o444))
        .and_then(|()| std::fs::rename(ready, &target))
        .and_then(|()| std::fs::File::open(job.cache_dir)?.sync_all())
        .map_err(|source| ImportError::Write {
            path: target.clone(),
            source,
        })?;
    Ok(target)
}

/// The partial file and what it has taken in so far.
struct Sink<'a> {
    out: BufWriter<tokio::fs::File>,
    path: &'a Path,
    hasher: Hasher,
    progress: &'a watch::Sender<pb::ImportProgress>,
}

impl Sink<'_> {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), ImportError> {
        self.hasher.update(bytes);
        self.out
            .write_all(bytes)
            .await
            .map_err(|source| ImportError::Write {
                path: self.path.to_path_buf(),
                source,
            })?;
        // Only a new percent (or each 4 MiB of a file of unknown length) wakes the watchers.
        self.progress.send_if_modified(|p| {
            let before = (p.percent, p.done_bytes >> 22);
            p.done_bytes += bytes.len() as u64;
            p.percent = percent(p.done_bytes, p.total_bytes);
            before != (p.percent, p.done_bytes >> 22)
        });
        Ok(())
    }

    async fn finish(mut self) -> Result<Checksum, ImportError> {
        let write = |source| ImportError::Write {
            path: self.path.to_path_buf(),
            source,
        };
        self.out.flush().await.map_err(write)?;
        self.out.get_ref().sync_all().await.map_err(write)?;
        Ok(self.hasher.finish())
    }
}

/// Streams the source into `partial`; returns the digest of what arrived.
async fn stream(
    job: &Job<'_>,
    partial: &Path,
    progress: &watch::Sender<pb::ImportProgress>,
) -> Result<Checksum, ImportError> {
    let write = |source| ImportError::Write {
        path: partial.to_path_buf(),
        source,
    };
    if let Some(dir) = partial.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(write)?;
    }
    let file = tokio::fs::File::create(partial).await.map_err(write)?;
    let mut sink = Sink {
        out: BufWriter::with_capacity(1 << 20, file),
        path: partial,
        hasher: Hasher::new(job.checksum.algorithm),
        progress,
    };
    match job.source {
        Source::Url(url) => download(job.client, url, &mut sink).await?,
        Source::Path(path) => copy(path, &mut sink).await?,
    }
    sink.finish().await
}

async fn download(
    client: &reqwest::Client,
    url: &str,
    sink: &mut Sink<'_>,
) -> Result<(), ImportError> {
    let failed = |source| ImportError::Download {
        url: url.to_string(),
        source,
    };
    let response = client.get(url).send().await.map_err(failed)?;
    if !response.status().is_success() {
        return Err(ImportError::Status {
            url: url.to_string(),
            status: response.status().as_u16(),
        });
    }
    let total = response.content_length().unwrap_or(0);
    sink.progress.send_modify(|p| p.total_bytes = total);
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        sink.put(&chunk.map_err(failed)?).await?;
    }
    Ok(())
}

async fn copy(path: &Path, sink: &mut Sink<'_>) -> Result<(), ImportError> {
    let read = |source| ImportError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(read)?;
    let total = file.metadata().await.map_err(read)?.len();
    sink.progress.send_modify(|p| p.total_bytes = total);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).await.map_err(read)?;
        if n == 0 {
            return Ok(());
        }
        sink.put(&buf[..n]).await?;
    }
}
