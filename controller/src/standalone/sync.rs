//! One pass over the manifest directory: apply each manifest to the API (create, or replace when
//! it changed), delete objects whose manifest is gone, write the status files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{
    ManifestError, ObjectKey, changed, identify, parse_documents, resources, status_file, to_yaml,
};

/// A file of the manifest directory could not be read, or a status file not written.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("reading {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError {
    let path = path.to_path_buf();
    move |source| SyncError::Read { path, source }
}

fn write(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError {
    let path = path.to_path_buf();
    move |source| SyncError::Write { path, source }
}

pub struct Standalone {
    client: kube::Client,
    dir: PathBuf,
    /// Objects applied from files in the last pass, to delete when their file goes.
    applied: BTreeSet<ObjectKey>,
    /// Problems reported in the last pass (where, what), to log each only once.
    errors: BTreeMap<String, String>,
}

impl Standalone {
    pub fn new(client: kube::Client, dir: PathBuf) -> Self {
        Standalone {
            client,
            dir,
            applied: BTreeSet::new(),
            errors: BTreeMap::new(),
        }
    }

    /// One pass: apply the manifests, then write status files.
    pub async fn sync(&mut self) -> Result<(), SyncError> {
        let mut errors = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for file in manifest_files(&self.dir)? {
            let text = std::fs::read_to_string(&file).map_err(read(&file))?;
            let docs = match parse_documents(&text) {
                Ok(d) => d,
                Err(e) => {
                    errors.insert(file.display().to_string(), e.to_string());
                    continue;
                }
            };
            for (i, doc) in docs.into_iter().enumerate() {
                match self.apply(doc).await {
                    Ok(key) => {
                        seen.insert(key);
                    }
                    Err(e) => {
                        let at = format!("{} document {}", file.display(), i + 1);
                        errors.insert(at, e.to_string());
                    }
                }
            }
        }
        for gone in self.applied.difference(&seen) {
            if let Err(e) = self.delete(gone).await {
                let at = format!("deleting {}/{}/{}", gone.0, gone.1, gone.2);
                errors.insert(at, e.to_string());
            }
        }
        self.applied = seen;
        for (at, e) in &errors {
            if self.errors.get(at) != Some(e) {
                warn!(manifest = at, error = e, "manifest not applied");
            }
        }
        self.errors = errors;
        self.write_status().await
    }

    async fn apply(&self, mut doc: Value) -> Result<ObjectKey, ManifestError> {
        let (ar, key) = identify(&mut doc)?;
        let (kind, ns, name) = &key;
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &ar);
        let mut obj: DynamicObject =
            serde_json::from_value(doc.clone()).map_err(ManifestError::Object)?;
        let current = if name.is_empty() {
            None
        } else {
            api.get_opt(name).await.map_err(ManifestError::Api)?
        };
        match current {
            None => {
                api.create(&PostParams::default(), &obj)
                    .await
                    .map_err(ManifestError::Api)?;
                info!(kind, ns, name, "created");
            }
            Some(cur) if changed(&cur, &doc) => {
                obj.metadata.resource_version = cur.metadata.resource_version.clone();
                // Finalizers belong to the controllers, not to the file.
                obj.metadata.finalizers = cur.metadata.finalizers.clone();
                api.replace(name, &PostParams::default(), &obj)
                    .await
                    .map_err(ManifestError::Api)?;
                info!(kind, ns, name, "updated");
            }
            Some(_) => {}
        }
        Ok(key)
    }

    async fn delete(&self, (kind, ns, name): &ObjectKey) -> Result<(), ManifestError> {
        let ar = resources()
            .into_iter()
            .find(|r| &r.kind == kind)
            .expect("applied kinds are served");
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &ar);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                info!(kind, ns, name, "deleted (manifest removed)");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(ManifestError::Api(e)),
        }
    }

    /// Writes a status file per object and `errors.yaml`, and removes the other status files.
    async fn write_status(&self) -> Result<(), SyncError> {
        let dir = self.dir.join("status");
        std::fs::create_dir_all(&dir).map_err(write(&dir))?;
        let mut keep = BTreeSet::new();
        for ar in resources() {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let Ok(list) = api.list(&ListParams::default()).await else {
                continue;
            };
            for obj in list {
                let (file, content) = status_file(&ar, &obj);
                write_if_changed(&dir.join(&file), &content)?;
                keep.insert(file);
            }
        }
        if !self.errors.is_empty() {
            let list: Vec<Value> = self
                .errors
                .iter()
                .map(|(at, e)| json!({"manifest": at, "error": e}))
                .collect();
            write_if_changed(&dir.join("errors.yaml"), &to_yaml(&json!(list)))?;
            keep.insert("errors.yaml".into());
        }
        remove_others(&dir, &keep)
    }
}

/// Removes the status files not in `keep`.
fn remove_others(dir: &Path, keep: &BTreeSet<String>) -> Result<(), SyncError> {
    for entry in std::fs::read_dir(dir).map_err(read(dir))? {
        let name = entry.map_err(read(dir))?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".yaml") && !keep.contains(name.as_ref()) {
            let path = dir.join(name.as_ref());
            std::fs::remove_file(&path).map_err(write(&path))?;
        }
    }
    Ok(())
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, SyncError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Rewrites a file only when its content changes (so watchers of the directory see real changes),
/// through a temporary file so readers never see half a file.
fn write_if_changed(path: &Path, content: &str) -> Result<(), SyncError> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(());
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, content).map_err(write(&tmp))?;
    std::fs::rename(&tmp, path).map_err(write(path))
}
