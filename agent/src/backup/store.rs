//! The repository's object store: S3 (or an S3-compatible server) through `object_store`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use hypersdk_proto::agent::v1 as pb;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, PutOptions, PutPayload,
    RetryConfig,
};

use super::{BackupError, Manifest};

/// A repository: a bucket and a prefix in it.
#[derive(Clone)]
pub struct Repo {
    pub store: Arc<dyn ObjectStore>,
    pub bucket: String,
    pub prefix: String,
    storage_class: Option<String>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

impl Repo {
    /// The store `location` names. A store that does not answer fails the request after a few
    /// quick retries rather than after object_store's default of minutes: a backup or restore
    /// reports it (and its caller's retry policy applies) instead of hanging.
    pub fn open(location: &pb::S3Location, prefix: &str) -> Result<Repo, BackupError> {
        let bad = |field, why: &str| BackupError::BadRequest {
            field,
            why: why.to_string(),
        };
        if location.bucket.is_empty() {
            return Err(bad("destination.bucket", "is required"));
        }
        let region = if location.region.is_empty() {
            "us-east-1"
        } else {
            &location.region
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(region)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120))
                    .with_allow_http(true),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(200),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: Duration::from_secs(20),
            });
        if !location.endpoint.is_empty() {
            if !location.endpoint.starts_with("http://")
                && !location.endpoint.starts_with("https://")
            {
                return Err(bad(
                    "destination.endpoint",
                    "must be an http:// or https:// URL",
                ));
            }
            builder = builder
                .with_endpoint(&location.endpoint)
                .with_virtual_hosted_style_request(false);
        }
        match (
            location.access_key_id.is_empty(),
            location.secret_access_key.is_empty(),
        ) {
            (false, false) => {
                builder = builder
                    .with_access_key_id(&location.access_key_id)
                    .with_secret_access_key(&location.secret_access_key);
            }
            (true, true) => builder = builder.with_skip_signature(true),
            _ => {
                return Err(bad(
                    "destination.credentialsSecretRef",
                    "needs both accessKeyId and secretAccessKey",
                ));
            }
        }
        let store = builder
            .build()
            .map_err(BackupError::store("configuring S3"))?;
        Ok(Repo {
            store: Arc::new(store),
            bucket: location.bucket.clone(),
            prefix: prefix.trim_matches('/').to_string(),
            storage_class: (!location.storage_class.is_empty())
                .then(|| location.storage_class.clone()),
        })
    }

    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    pub async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), BackupError> {
        let mut attributes = Attributes::new();
        if let Some(class) = &self.storage_class {
            attributes.insert(Attribute::StorageClass, class.clone().into());
        }
        let opts = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        self.store
            .put_opts(
                &ObjectPath::from(key),
                PutPayload::from(Bytes::from(data)),
                opts,
            )
            .await
            .map_err(BackupError::store(format!("writing {key}")))?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, BackupError> {
        let r = self
            .store
            .get(&ObjectPath::from(key))
            .await
            .map_err(BackupError::store(format!("reading {key}")))?;
        r.bytes()
            .await
            .map_err(BackupError::store(format!("reading {key}")))
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, BackupError> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(BackupError::store(format!("looking up {key}"))(e)),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), BackupError> {
        match self.store.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(BackupError::store(format!("deleting {key}"))(e)),
        }
    }

    /// Keys and last-modified times (ms) of the objects under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, i64)>, BackupError> {
        let p = ObjectPath::from(prefix.trim_end_matches('/'));
        self.store
            .list(Some(&p))
            .map_ok(|m| (m.location.to_string(), m.last_modified.timestamp_millis()))
            .try_collect()
            .await
            .map_err(BackupError::store(format!("listing {prefix}")))
    }

    pub async fn manifest(&self, key: &str) -> Result<Manifest, BackupError> {
        let bytes = self.get(key).await?;
        serde_json::from_slice(&bytes).map_err(|e| BackupError::Manifest {
            key: key.to_string(),
            why: e.to_string(),
        })
    }

    /// The manifests of `vm`, oldest first (ids sort by time). Unreadable ones are errors:
    /// retention must not decide on a partial list.
    pub async fn manifests(&self, vm: &str) -> Result<Vec<(String, Manifest)>, BackupError> {
        let mut keys: Vec<String> = self
            .list(&super::manifests_of(&self.prefix, vm))
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.ends_with(".json"))
            .collect();
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let m = self.manifest(&k).await?;
            out.push((k, m));
        }
        out.sort_by_key(|(_, m)| m.created_ms);
        Ok(out)
    }
}
