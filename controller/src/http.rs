//! `/metrics` (Prometheus), `/healthz` (the process serves) and `/readyz` (leading and running
//! controllers), over plain HTTP/1.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::context::Context;

/// Set once this replica leads and its controllers run.
#[derive(Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
}

/// Serves on `listener` until the process ends.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, ready: Arc<Readiness>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics /healthz /readyz");
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (ctx, ready) = (ctx.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = respond(&req, &ctx, &ready);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!(error = %e, "metrics connection");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, ctx: &Context, ready: &Readiness) -> Response<Full<Bytes>> {
    let (code, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "ok".to_string()),
        "/readyz" if ready.0.load(Ordering::Relaxed) => (StatusCode::OK, "ok".to_string()),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not leading".to_string()),
        "/metrics" => {
            let agents = ctx.agents.all();
            let reachable = agents.iter().filter(|a| a.client().is_some()).count();
            let gauges = [
                ("hypersdk_agents", "Agents known.", agents.len() as f64),
                (
                    "hypersdk_agents_reachable",
                    "Agents answering.",
                    reachable as f64,
                ),
            ];
            (StatusCode::OK, ctx.metrics.render(&gauges))
        }
        _ => (StatusCode::NOT_FOUND, "not found".to_string()),
    };
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}
