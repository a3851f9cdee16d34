//! An in-memory Kubernetes API server, served as a tower service that `kube::Client::new` drives:
//! get, list, watch (ndjson, from a resourceVersion), create, merge/JSON/apply patch, replace,
//! delete (finalizers honoured) and the status subresource. The standalone mode and the tests run
//! the real kube-runtime controllers over it; only the transport differs from a cluster.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use serde_json::{Value, json};
use tokio::sync::mpsc::Sender;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::path::{ApiPath, Query};
use super::store::{ApiError, Change, Store};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The API; clones share one store.
#[derive(Clone)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
    /// The store's resourceVersion after each write, to wake watches.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApi {
    /// An empty API that knows (and validates) this controller's custom resources.
    pub fn new() -> Self {
        let mut store = Store::default();
        for crd in crate::crd::all() {
            store.register_schema(
                (crd.spec.group.clone(), crd.spec.names.plural.clone()),
                crd.spec.names.kind.clone(),
                super::schema::openapi_schema(&crd),
            );
        }
        FakeApi {
            store: Arc::new(Mutex::new(store)),
            changed: tokio::sync::watch::channel(0).0,
        }
    }

    /// A client whose requests this API serves; `default_namespace` as a kubeconfig would set it.
    pub fn client(&self, default_namespace: &str) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req).await) }
        });
        kube::Client::new(service, default_namespace)
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(&ApiError::BadRequest(format!("reading body: {e}"))),
        };
        let Some(path) = ApiPath::parse(parts.uri.path()) else {
            return error(&ApiError::NotFound(format!(
                "no route for {}",
                parts.uri.path()
            )));
        };
        let query = Query::parse(parts.uri.query().unwrap_or(""));
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let result = match (&parts.method, &path.name) {
            (&Method::GET, None) if query.watch => return self.watch(path, query),
            (&Method::GET, None) => Ok(self.list(&path, &query)),
            (&Method::GET, Some(name)) => self.lock().get(&path.resource, path.ns(), name),
            (&Method::POST, None) => {
                parse(&body).and_then(|obj| self.lock().create(&path.resource, path.ns(), obj))
            }
            (&Method::PATCH, Some(name)) => self.patch(&path, name, &content_type, &body),
            (&Method::PUT, Some(name)) => parse(&body).and_then(|obj| {
                self.lock().update(
                    &path.resource,
                    path.ns(),
                    name,
                    path.status,
                    Change::Replace(&obj),
                )
            }),
            (&Method::DELETE, Some(name)) => self.lock().delete(&path.resource, path.ns(), name),
            _ => Err(ApiError::BadRequest(format!(
                "{} {} is not supported",
                parts.method,
                parts.uri.path()
            ))),
        };
        self.notify();
        let ok = if parts.method == Method::POST {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        match result {
            Ok(v) => respond(ok, &v),
            Err(e) => error(&e),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock would be a bug in the store; its data stays usable.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        let rv = self.lock().resource_version();
        self.changed
            .send_if_modified(|old| std::mem::replace(old, rv) != rv);
    }

    fn list(&self, path: &ApiPath, query: &Query) -> Value {
        let store = self.lock();
        let items = store.list(&path.resource, path.ns(), &query.label_selector);
        json!({"apiVersion": path.api_version(), "kind": "List",
               "metadata": {"resourceVersion": store.resource_version().to_string()},
               "items": items})
    }

    fn patch(
        &self,
        path: &ApiPath,
        name: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        let patch = parse(body)?;
        let mut store = self.lock();
        match content_type.split(';').next().unwrap_or("") {
            "application/json-patch+json" => {
                let p: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::BadRequest(format!("json patch: {e}")))?;
                store.update(
                    &path.resource,
                    path.ns(),
                    name,
                    path.status,
                    Change::JsonPatch(&p),
                )
            }
            // Server-side apply creates what is missing; otherwise it is treated as a merge.
            "application/apply-patch+yaml"
                if store.get(&path.resource, path.ns(), name).is_err() =>
            {
                store.create(&path.resource, path.ns(), patch)
            }
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => store.update(
                &path.resource,
                path.ns(),
                name,
                path.status,
                Change::MergePatch(&patch),
            ),
            other => Err(ApiError::BadRequest(format!(
                "unsupported patch type {other}"
            ))),
        }
    }

    /// Streams events after `resourceVersion` (or ADDED for every object, without one) until
    /// `timeoutSeconds`, as newline-delimited JSON.
    fn watch(&self, path: ApiPath, query: Query) -> Response<Body> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        tokio::spawn(self.clone().stream_events(path, query, tx));
        let stream =
            ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(http_body::Frame::data(b)));
        Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
            .expect("static response parts")
    }

    /// Sends a watch's events into `tx` until its timeout, the client leaving, or 410 Gone.
    async fn stream_events(self, path: ApiPath, query: Query, tx: Sender<Bytes>) {
        let timeout = Duration::from_secs(query.timeout_seconds.unwrap_or(300).min(3600));
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = self.changed.subscribe();
        let mut cursor = match query.resource_version {
            Some(rv) if rv > 0 => rv,
            _ => match self.send_initial(&path, &query, &tx).await {
                Some(rv) => rv,
                None => return,
            },
        };
        loop {
            let events = self.lock().events_since(&path.resource, path.ns(), cursor);
            let events = match events {
                Ok(events) => events,
                Err(gone) => {
                    let _ = tx.send(line("ERROR", &gone.status())).await;
                    return;
                }
            };
            for e in events {
                cursor = e.rv;
                let labels_ok = query
                    .label_selector
                    .iter()
                    .all(|(k, v)| e.object["metadata"]["labels"][k].as_str() == Some(v));
                if labels_ok && tx.send(line(e.type_, &e.object)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
            }
        }
    }

    /// ADDED for every object now; the resourceVersion to go on from (None: the client left).
    async fn send_initial(&self, path: &ApiPath, query: &Query, tx: &Sender<Bytes>) -> Option<u64> {
        let (items, rv) = {
            let store = self.lock();
            (
                store.list(&path.resource, path.ns(), &query.label_selector),
                store.resource_version(),
            )
        };
        for item in items {
            tx.send(line("ADDED", &item)).await.ok()?;
        }
        Some(rv)
    }
}

fn line(type_: &str, object: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": type_, "object": object}))
        .expect("JSON values serialise");
    s.push(b'\n');
    Bytes::from(s)
}

fn parse(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("request body: {e}")))
}

fn respond(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(
                serde_json::to_vec(v).expect("JSON values serialise"),
            ))
            .boxed_unsync(),
        )
        .expect("static response parts")
}

fn error(e: &ApiError) -> Response<Body> {
    respond(
        StatusCode::from_u16(e.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.status(),
    )
}
