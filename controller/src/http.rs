//! The controller's HTTP port: `/metrics` (Prometheus), `/healthz` (the process serves),
//! `/readyz` (serving; the leader reconciles), and the [`dashboard`](crate::dashboard).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::context::Context;
use crate::dashboard::serve::{Dashboard, router};
use crate::metrics::{Gauge, agent_gauges};

/// Whether this replica serves (`/readyz`), and whether it leads (the `hypersdk_leader` gauge):
/// of several replicas all serve, one reconciles.
#[derive(Default)]
pub struct Readiness {
    ready: AtomicBool,
    leading: AtomicBool,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }
}

type Shared = (Arc<Context>, Arc<Readiness>);

/// Serves on `listener` until the process ends.
pub async fn serve(listener: TcpListener, dashboard: Arc<Dashboard>, ready: Arc<Readiness>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics /healthz /readyz and the dashboard");
    }
    let shared: Shared = (dashboard.ctx.clone(), ready);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
        .merge(router(dashboard));
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "HTTP server");
    }
}

async fn readyz(State((_, ready)): State<Shared>) -> impl IntoResponse {
    if ready.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

async fn metrics(State((ctx, ready)): State<Shared>) -> impl IntoResponse {
    let leading = ready.leading.load(Ordering::Relaxed);
    let mut gauges = Vec::from(agent_gauges(&ctx.agents.all()));
    gauges.push(Gauge::single(
        "hypersdk_leader",
        "1 on the replica that holds the leader Lease and reconciles.",
        f64::from(u8::from(leading)),
    ));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.metrics.render(&gauges),
    )
}
