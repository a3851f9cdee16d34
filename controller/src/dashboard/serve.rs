//! The dashboard's routes: the single page and its assets, `/api/state` (the state once),
//! `/api/events` (server-sent events: the state again after every change) and `/api/actions`
//! (creates an object). Every `/api` request passes [`Access::check`].

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::create::{CreateError, create};
use super::watch::Stores;
use super::{Access, Action, Refusal, assets, state};
use crate::context::Context;

pub struct Dashboard {
    pub ctx: Arc<Context>,
    pub stores: Arc<Stores>,
    pub access: Access,
}

impl Dashboard {
    /// Starts the watches the dashboard shows.
    pub fn new(ctx: Arc<Context>, access: Access) -> Arc<Dashboard> {
        let stores = Stores::start(&ctx);
        Arc::new(Dashboard {
            ctx,
            stores,
            access,
        })
    }

    fn check(&self, headers: &HeaderMap, write: bool) -> Result<(), Refusal> {
        let auth = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.access.check(auth, write)
    }

    fn state_text(&self) -> String {
        let inputs = self.stores.inputs(&self.ctx, self.access.actions);
        state(inputs).to_string()
    }
}

pub fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/api/state", get(state_once))
        .route("/api/events", get(events))
        .route("/api/actions", post(act))
        .fallback(asset)
        .with_state(dashboard)
}

fn refused(r: Refusal) -> Response {
    let code = match r {
        Refusal::NoTokenConfigured | Refusal::BadToken => StatusCode::UNAUTHORIZED,
        Refusal::ReadOnly => StatusCode::FORBIDDEN,
    };
    let mut resp = (code, r.to_string()).into_response();
    if code == StatusCode::UNAUTHORIZED {
        let bearer = header::HeaderValue::from_static("Bearer");
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, bearer);
    }
    resp
}

async fn asset(uri: Uri) -> Response {
    match assets::get(uri.path()) {
        Some(a) => (
            [
                (header::CONTENT_TYPE, a.content_type),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            a.bytes,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

async fn state_once(State(d): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if let Err(r) = d.check(&headers, false) {
        return refused(r);
    }
    d.stores.ready().await;
    ([(header::CONTENT_TYPE, "application/json")], d.state_text()).into_response()
}

/// The state now, then again after each change; a change during a send is sent next (the
/// counter coalesces bursts, e.g. the first listing of a thousand VMs).
async fn events(State(d): State<Arc<Dashboard>>, headers: HeaderMap) -> Response {
    if let Err(r) = d.check(&headers, false) {
        return refused(r);
    }
    d.stores.ready().await;
    let changes = d.stores.subscribe();
    let stream =
        futures::stream::unfold((d, changes, true), |(d, mut changes, first)| async move {
            if !first && changes.changed().await.is_err() {
                return None;
            }
            let event = Event::default().event("state").data(d.state_text());
            Some((Ok::<_, Infallible>(event), (d, changes, false)))
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn act(State(d): State<Arc<Dashboard>>, headers: HeaderMap, body: String) -> Response {
    if let Err(r) = d.check(&headers, true) {
        return refused(r);
    }
    let action: Action = match serde_json::from_str(&body) {
        Ok(a) => a,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("action: {e}")).into_response(),
    };
    match create(&d.ctx.client, &action).await {
        Ok((kind, name)) => (
            StatusCode::CREATED,
            Json(json!({"kind": kind, "name": name})),
        )
            .into_response(),
        Err(e) => {
            let code = match &e {
                CreateError::Action(_) => StatusCode::BAD_REQUEST,
                CreateError::Api(kube::Error::Api(s)) => {
                    StatusCode::from_u16(s.code).unwrap_or(StatusCode::BAD_GATEWAY)
                }
                CreateError::Api(_) => StatusCode::BAD_GATEWAY,
            };
            (code, e.to_string()).into_response()
        }
    }
}
