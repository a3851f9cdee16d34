//! One pass over the manifest directory: apply each manifest to the API (create, or replace when
//! it changed), delete objects whose manifest is gone, write the status files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{ObjectKey, changed, parse_documents, resources, to_yaml};

pub struct Standalone {
    client: kube::Client,
    dir: PathBuf,
    /// Objects applied from files in the last pass, to delete when their file goes.
    applied: BTreeSet<ObjectKey>,
    /// Problems reported in the last pass, to log each only once.
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
    pub async fn sync(&mut self) -> std::io::Result<()> {
        let mut errors = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for file in manifest_files(&self.dir)? {
            let text = std::fs::read_to_string(&file)?;
            let docs = match parse_documents(&text) {
                Ok(d) => d,
                Err(e) => {
                    errors.insert(file.display().to_string(), e);
                    continue;
                }
            };
            for (i, doc) in docs.into_iter().enumerate() {
                let at = format!("{} document {}", file.display(), i + 1);
                match self.apply(doc).await {
                    Ok(key) => {
                        seen.insert(key);
                    }
                    Err(e) => {
                        errors.insert(at, e);
                    }
                }
            }
        }
        for gone in self.applied.difference(&seen) {
            if let Err(e) = self.delete(gone).await {
                errors.insert(format!("deleting {}/{}/{}", gone.0, gone.1, gone.2), e);
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

    async fn apply(&self, mut doc: Value) -> Result<ObjectKey, String> {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let ar = resources()
            .into_iter()
            .find(|r| r.kind == kind && r.api_version == api_version)
            .ok_or_else(|| {
                format!("apiVersion {api_version:?} kind {kind:?} is not served here")
            })?;
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        doc["metadata"]["namespace"] = json!(ns);
        let key = (kind.clone(), ns.clone(), name.clone());
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, &ar);
        let obj: DynamicObject = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
        let current = if name.is_empty() {
            None
        } else {
            api.get_opt(&name).await.map_err(api_error)?
        };
        match current {
            None => {
                api.create(&PostParams::default(), &obj)
                    .await
                    .map_err(api_error)?;
                info!(kind, ns, name, "created");
            }
            Some(cur) if changed(&cur, &doc) => {
                let mut obj = obj;
                obj.metadata.resource_version = cur.metadata.resource_version.clone();
                // Finalizers belong to the controllers, not to the file.
                obj.metadata.finalizers = cur.metadata.finalizers.clone();
                api.replace(&name, &PostParams::default(), &obj)
                    .await
                    .map_err(api_error)?;
                info!(kind, ns, name, "updated");
            }
            Some(_) => {}
        }
        Ok(key)
    }

    async fn delete(&self, (kind, ns, name): &ObjectKey) -> Result<(), String> {
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
            Err(e) => Err(api_error(e)),
        }
    }

    async fn write_status(&self) -> std::io::Result<()> {
        let dir = self.dir.join("status");
        std::fs::create_dir_all(&dir)?;
        let mut keep = BTreeSet::new();
        for ar in resources() {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let Ok(list) = api.list(&ListParams::default()).await else {
                continue;
            };
            for obj in list {
                let ns = obj.metadata.namespace.clone().unwrap_or_default();
                let name = obj.metadata.name.clone().unwrap_or_default();
                let file = format!("{}-{ns}-{name}.yaml", ar.kind.to_lowercase());
                let body = json!({
                    "apiVersion": ar.api_version, "kind": ar.kind,
                    "metadata": {"name": name, "namespace": ns, "generation": obj.metadata.generation},
                    "status": obj.data.get("status").cloned().unwrap_or(Value::Null),
                });
                write_if_changed(&dir.join(&file), &to_yaml(&body))?;
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
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && !keep.contains(&name) {
                std::fs::remove_file(dir.join(name))?;
            }
        }
        Ok(())
    }
}

fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
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

fn api_error(e: kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message,
        other => other.to_string(),
    }
}

/// Rewrites a file only when its content changes (so watchers of the directory see real changes),
/// through a temporary file so readers never see half a file.
fn write_if_changed(path: &Path, content: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(());
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(tmp, path)
}
