//! The controller's HTTP port: `/metrics` (Prometheus), `/healthz` (the process serves),
//! `/readyz` (leading and running controllers), and the [`dashboard`](crate::dashboard).

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
use crate::metrics::agent_gauges;

/// Set once this replica leads and its controllers run.
#[derive(Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
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
    if ready.0.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not leading")
    }
}

async fn metrics(State((ctx, _)): State<Shared>) -> impl IntoResponse {
    let gauges = agent_gauges(&ctx.agents.all());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.metrics.render(&gauges),
    )
}
