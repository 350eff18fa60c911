//! The HTTP API (axum): tables and rows, health, readiness and metrics.
//! Errors are JSON `{"error": "..."}` with a status, and never leak internals.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::metrics::Metrics;
use crate::table::ingest::Readiness;
use crate::table::state::Tables;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub tables: Arc<Tables>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub hub: Arc<crate::fanout::hub::Hub>,
    pub fanout: Arc<crate::fanout::FanoutLimits>,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// An API error: a status and a message safe to show to clients.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    // the data routes answer only once the tables are complete (after a restore)
    let data = Router::new()
        .route("/api/tables", get(list_tables))
        .route("/api/tables/{table}", get(get_table))
        .route("/api/tables/{table}/rows/{key}", get(get_row))
        .route("/ws", get(crate::fanout::ws::handler))
        .route("/sse", get(crate::fanout::sse::handler))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_restored,
        ));
    Router::new()
        .merge(data)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .route("/livetable.js", get(client_js))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

async fn require_restored(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state
        .readiness
        .restored
        .load(std::sync::atomic::Ordering::Acquire)
    {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "restoring the tables from the changelog; retry shortly".into(),
        )
        .into_response()
    }
}

async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .http_requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    state
        .metrics
        .http_seconds
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    resp
}

async fn list_tables(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "tables": state.tables.list() }))
}

async fn get_table(
    State(state): State<AppState>,
    Path(table): Path<String>,
) -> Result<Response, ApiError> {
    let t = state
        .tables
        .get(&table)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("unknown table `{table}`")))?;
    // a large table takes milliseconds to serialise: keep it off the async workers
    let body = tokio::task::spawn_blocking(move || {
        let t = t.read().unwrap_or_else(|e| e.into_inner());
        serde_json::to_vec(&json!({"table": table, "seq": t.seq, "epoch": t.epoch, "rows": t.rows}))
    })
    .await
    .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into()))?
    .map_err(|_| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn get_row(
    State(state): State<AppState>,
    Path((table, key)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if state.tables.get(&table).is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("unknown table `{table}`"),
        ));
    }
    let row = state.tables.row(&table, &key).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no row `{key}` in table `{table}`"),
        )
    })?;
    Ok(Json(serde_json::Value::Object(row)))
}

/// The live page and its client, embedded in the binary (no build step).
const INDEX_HTML: &str = include_str!("../web/index.html");
const CLIENT_JS: &str = include_str!("../web/livetable.js");

async fn client_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        CLIENT_JS,
    )
        .into_response()
}

/// `/`: a WebSocket upgrade here is a `/ws` connection with the default format (clients of the seed
/// system connect to `ws://host:port/`); a plain GET serves the live page.
async fn index(
    state: State<AppState>,
    q: axum::extract::Query<crate::fanout::protocol::SubscribeQuery>,
    ws: Result<
        axum::extract::ws::WebSocketUpgrade,
        axum::extract::ws::rejection::WebSocketUpgradeRejection,
    >,
) -> Response {
    match ws {
        Ok(_)
            if !state
                .readiness
                .restored
                .load(std::sync::atomic::Ordering::Acquire) =>
        {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "restoring the tables from the changelog; retry shortly".into(),
            )
            .into_response()
        }
        Ok(ws) => {
            // an upgrade on `/` (the seed system's clients) speaks the configured default format
            let mut q = q;
            if q.format.is_none() {
                q.format = Some(state.fanout.default_format.as_str().to_string());
            }
            crate::fanout::ws::handler(state, q, ws).await
        }
        Err(_) => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            INDEX_HTML,
        )
            .into_response(),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    if state
        .readiness
        .healthy
        .load(std::sync::atomic::Ordering::Acquire)
    {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed"})),
        )
            .into_response()
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    let r = &state.readiness;
    let restored = r.restored.load(std::sync::atomic::Ordering::Acquire);
    let caught_up = r.caught_up.load(std::sync::atomic::Ordering::Acquire);
    let body =
        Json(json!({"ready": restored && caught_up, "restored": restored, "caught_up": caught_up}));
    if r.is_ready() {
        body.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    state
        .metrics
        .ready
        .set(i64::from(state.readiness.is_ready()));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
