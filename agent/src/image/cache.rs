//! The node's image cache: one file per image digest, fetched once however many VMs want it
//! at the same time (they all follow the one import's progress).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hypersdk_proto::agent::v1 as pb;
use tokio::sync::watch;
use tracing::{info, warn};

use super::fetch::{self, ImportError};
use super::{Checksum, Source, cached_path, partial_dir};

/// Where an import stands, as its followers see it.
#[derive(Debug, Clone)]
pub enum State {
    Running(pb::ImportProgress),
    Done(PathBuf),
    Failed(Arc<ImportError>),
}

#[derive(Debug)]
pub struct ImageCache {
    dir: PathBuf,
    qemu_img: PathBuf,
    client: reqwest::Client,
    /// Imports under way, by digest.
    inflight: Mutex<HashMap<Checksum, watch::Receiver<State>>>,
}

impl ImageCache {
    /// Opens the cache in `dir`, removing partial files an earlier agent process left.
    pub fn open(dir: &Path, qemu_img: &Path) -> std::io::Result<ImageCache> {
        let partial = partial_dir(dir);
        match std::fs::remove_dir_all(&partial) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(&partial)?;
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(20))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(ImageCache {
            dir: dir.to_path_buf(),
            qemu_img: qemu_img.to_path_buf(),
            client,
            inflight: Mutex::new(HashMap::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache file of the image `checksum` from `source`: at once if cached, else after the
    /// one import of it (started here if none is under way).
    pub fn get(self: &Arc<Self>, source: &Source, checksum: &Checksum) -> watch::Receiver<State> {
        let cached = cached_path(&self.dir, checksum);
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = inflight.get(checksum) {
            return rx.clone();
        }
        if cached.is_file() {
            return watch::channel(State::Done(cached)).1;
        }
        let start = pb::ImportProgress {
            source: source.to_string(),
            ..Default::default()
        };
        let (tx, rx) = watch::channel(State::Running(start.clone()));
        inflight.insert(checksum.clone(), rx.clone());
        let (this, source, checksum) = (self.clone(), source.clone(), checksum.clone());
        tokio::spawn(async move {
            let state = this.import(&source, &checksum, start, &tx).await;
            // Out of the map before the end is told: a later caller finds the file (or, after
            // a failure, starts afresh).
            this.inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&checksum);
            tx.send_replace(state);
        });
        rx
    }

    async fn import(
        &self,
        source: &Source,
        checksum: &Checksum,
        start: pb::ImportProgress,
        tx: &watch::Sender<State>,
    ) -> State {
        let (progress, mut seen) = watch::channel(start);
        let job = fetch::Job {
            source,
            checksum,
            cache_dir: &self.dir,
            qemu_img: &self.qemu_img,
            client: &self.client,
        };
        info!(%source, %checksum, "importing image");
        let began = std::time::Instant::now();
        let import = fetch::import(&job, &progress);
        tokio::pin!(import);
        let result = loop {
            tokio::select! {
                r = &mut import => break r,
                Ok(()) = seen.changed() => {
                    tx.send_replace(State::Running(seen.borrow_and_update().clone()));
                }
            }
        };
        match result {
            Ok(path) => {
                let bytes = progress.borrow().done_bytes;
                let secs = began.elapsed().as_secs_f64();
                info!(%source, bytes, secs, "image imported into {}", path.display());
                State::Done(path)
            }
            Err(e) => {
                warn!(%source, "image import failed: {e}");
                State::Failed(Arc::new(e))
            }
        }
    }
}

/// Follows an import to its end, giving each progress report to `on_progress`.
pub async fn follow(
    source: &Source,
    mut rx: watch::Receiver<State>,
    mut on_progress: impl FnMut(pb::ImportProgress),
) -> Result<PathBuf, Arc<ImportError>> {
    loop {
        let state = rx.borrow_and_update().clone();
        match state {
            State::Done(path) => return Ok(path),
            State::Failed(e) => return Err(e),
            State::Running(p) => on_progress(p),
        }
        if rx.changed().await.is_err() {
            // The sender is gone only after its final state, which borrow() still holds.
            return match rx.borrow().clone() {
                State::Done(path) => Ok(path),
                State::Failed(e) => Err(e),
                State::Running(_) => Err(Arc::new(ImportError::Abandoned(source.to_string()))),
            };
        }
    }
}
