//! A small HTTP server on 127.0.0.1 that serves image files to agents, counts the requests for
//! each path, and can send slowly (so that an import is seen under way).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Default)]
struct Files {
    bodies: HashMap<String, Bytes>,
    hits: HashMap<String, usize>,
}

pub struct ImageServer {
    pub addr: SocketAddr,
    files: Arc<Mutex<Files>>,
    task: tokio::task::JoinHandle<()>,
}

/// Bytes sent per step when the server is paced.
const STEP: usize = 64 << 10;

impl ImageServer {
    /// A server; with `pace`, each 64 KiB of a body is sent after that pause.
    pub async fn start(pace: Option<Duration>) -> ImageServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let files = Arc::new(Mutex::new(Files::default()));
        let shared = files.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let files = shared.clone();
                let service = hyper::service::service_fn(move |req| {
                    let files = files.clone();
                    async move { Ok::<_, Infallible>(answer(&files, &req, pace)) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        ImageServer { addr, files, task }
    }

    pub fn put(&self, path: &str, body: impl Into<Bytes>) {
        let mut files = self.files.lock().unwrap();
        files.bodies.insert(path.to_string(), body.into());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests made for `path` so far.
    pub fn hits(&self, path: &str) -> usize {
        self.files
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer<B>(
    files: &Mutex<Files>,
    req: &Request<B>,
    pace: Option<Duration>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let path = req.uri().path().to_string();
    let body = {
        let mut files = files.lock().unwrap();
        *files.hits.entry(path.clone()).or_default() += 1;
        files.bodies.get(&path).cloned()
    };
    let Some(body) = body else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found")).boxed());
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    };
    let len = body.len();
    let body = match pace {
        None => Full::new(body).boxed(),
        Some(pause) => {
            let chunks = futures::stream::unfold(body, move |mut rest| async move {
                if rest.is_empty() {
                    return None;
                }
                tokio::time::sleep(pause).await;
                let chunk = rest.split_to(STEP.min(rest.len()));
                Some((Ok(Frame::data(chunk)), rest))
            });
            StreamBody::new(chunks).boxed()
        }
    };
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(hyper::header::CONTENT_LENGTH, len.into());
    r
}
