//! The HTTP API (axum): tables and rows, health, readiness and metrics, the live page.
//! Errors are JSON `{"error": "..."}` with a status, and never leak internals.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

pub(crate) mod table_body;
pub mod table_reads;

use crate::auth::{Auth, Credentials, Refused};
use crate::config::security::Origins;
use crate::config::Role;
use crate::fanout::hub::{union_key, Hub};
use crate::fanout::protocol::SubscribeQuery;
use crate::fanout::selector::Selector;
use crate::fanout::snapshot::copy_of;
use crate::fanout::FanoutLimits;
use crate::metrics::Metrics;
use crate::table::readiness::Readiness;
use crate::table::state::{without_nulls, Tables};
use table_body::TableBody;

/// Shared state of the handlers: one pointer, so that each live connection keeps 8 bytes of
/// it rather than a copy of every handle (bench: connections-snapshot).
#[derive(Clone)]
pub struct AppState(Arc<AppShared>);

impl AppState {
    pub fn new(shared: AppShared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppShared;

    fn deref(&self) -> &AppShared {
        &self.0
    }
}

/// What [`AppState`] points to.
pub struct AppShared {
    pub role: Role,
    pub tables: Arc<Tables>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub hub: Arc<Hub>,
    pub fanout: Arc<FanoutLimits>,
    /// What every live connection's session shares.
    pub sessions: Arc<crate::fanout::session::SessionEnv>,
    pub connections: Arc<AtomicUsize>,
    /// Places of copies of tables made for one client (`--max-table-copies`).
    pub copies: Arc<crate::fanout::copies::Copies>,
    /// Cancelled on shutdown: live connections close (WebSocket 1001, SSE ends).
    pub shutdown: CancellationToken,
    /// Writable topics (`[publish]`), when configured.
    pub publisher: Option<Arc<crate::publish::Publisher>>,
    /// The writable topics as `GET /api/topics` lists them.
    pub writable: Arc<Vec<WritableTopic>>,
    /// Token verification (`--auth`).
    pub auth: Arc<Auth>,
    /// Browser origins allowed on the live routes and by CORS (`--allowed-origins`).
    pub origins: Arc<Origins>,
    /// `/metrics`, `/healthz`, `/readyz` are served by the admin listener instead.
    pub admin_separate: bool,
}

/// A writable topic as `GET /api/topics` shows it: the table it is read back as, when the same
/// topic is also an `upsert` input (a page publishes there and sees the result live).
#[derive(Debug, Clone, serde::Serialize)]
pub struct WritableTopic {
    pub name: String,
    pub table: Option<String>,
    pub max_bytes: usize,
    /// Whether a JSON Schema checks the values.
    pub schema: bool,
    /// The value field that must equal a token claim.
    pub pin: Option<crate::publish::Pin>,
}

impl WritableTopic {
    /// The writable topics of `config`, with the table of each topic that is also an upsert input.
    pub fn list(config: &crate::config::Config) -> Vec<WritableTopic> {
        let Some(publish) = &config.publish else {
            return Vec::new();
        };
        publish
            .topics
            .values()
            .map(|t| WritableTopic {
                name: t.name.clone(),
                table: config.upsert.get(&t.name).map(|u| u.table.clone()),
                max_bytes: t.max_bytes,
                schema: t.schema.is_some(),
                pin: t.pin.clone(),
            })
            .collect()
    }
}

/// An API error: a status and a message safe to show to clients.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

/// `/metrics`, `/healthz`, `/readyz`: on the public router, or on their own with `--admin-listen`.
fn admin_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The router of the admin listener.
pub fn admin_router(state: AppState) -> Router {
    admin_routes()
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .with_state(state)
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    let mut app = if state.admin_separate {
        Router::new()
    } else {
        admin_routes()
    };
    if state.role.serves() {
        // the data routes answer once the local store is loaded
        let mut api = Router::new()
            .route("/api/tables", get(list_tables))
            .route("/api/tables/{table}", get(get_table))
            .route("/api/tables/{table}/rows/{key}", get(get_row))
            .route("/api/topics", get(list_topics))
            .route("/api/explain", get(crate::auth::explain));
        if let Some(cors) = crate::auth::origin::cors(&state.origins) {
            api = api.layer(cors);
        }
        let data = api
            .route("/ws", get(ws))
            .route("/sse", get(crate::fanout::sse::handler))
            .route("/", get(index))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                crate::auth::origin::guard,
            ))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_loaded,
            ));
        app = app
            .merge(data)
            .route("/livetable.js", get(client_js))
            .route(
                "/api/topics/{topic}",
                post(publish).route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    crate::auth::origin::guard,
                )),
            );
    } else {
        app = app.route(
            "/",
            get(|| async {
                ApiError(
                    StatusCode::NOT_FOUND,
                    "this node is a materialiser: clients connect to a gateway".into(),
                )
            }),
        );
    }
    app.fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// `POST /api/topics/{topic}`: publishes `{"key":K,"value":{...}}`; the `Idempotency-Key`
/// header is the publish id. Answers the `ack`/`nack` JSON of the WebSocket protocol with the
/// status of docs/publish.md.
async fn publish(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    creds: Credentials,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    // with --auth jwt a publish needs a valid token, and goes only to the topics it allows
    let access = match creds.require(&state.auth) {
        Ok(a) => a,
        Err(d) => return Refused(d).into_response(),
    };
    use crate::publish::{HttpPublishBody, Nack, NackCode, PublishRequest};
    let Some(publisher) = &state.publisher else {
        return ApiError(
            StatusCode::NOT_FOUND,
            "publishing is not enabled on this server (no [publish] topics)".into(),
        )
        .into_response();
    };
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().map_err(|_| ()));
    let id = || {
        key.and_then(Result::ok)
            .map(|k| serde_json::Value::String(k.to_string()))
    };
    // a body the server would not read whole (over the 2 MiB request limit, far above any
    // topic's `max_bytes`) is answered with a nack, as every other refused publish
    // one session per request: the process-wide in-flight bound applies; the per-connection
    // rate limit and in-flight bound are WebSocket's
    let session = publisher.session(access.publish_context());
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let (code, why) = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                (
                    NackCode::TooLarge,
                    "the body is over the 2 MiB request limit",
                )
            } else {
                (NackCode::BadRequest, "the body could not be read")
            };
            let nack = Nack::new(id(), code, format!("{why}: {e}"));
            return reply_response(session.refuse(&topic, nack));
        }
    };
    let reply = match (key, serde_json::from_slice::<HttpPublishBody>(&body)) {
        // never published without the id its client sent: its retry would write it twice
        (Some(Err(_)), _) => session.refuse(
            &topic,
            Nack::new(
                None,
                NackCode::BadRequest,
                "the Idempotency-Key header must be visible ASCII",
            ),
        ),
        (key, Ok(body)) => {
            let key = key.and_then(Result::ok);
            session
                .submit(PublishRequest::from_http(&topic, key, body))
                .await
        }
        (_, Err(e)) => session.refuse(
            &topic,
            Nack::new(
                id(),
                NackCode::BadRequest,
                format!("the body is not {{\"key\":K,\"value\":{{...}}}}: {e}"),
            ),
        ),
    };
    reply_response(reply)
}

/// A publish's answer: the `ack`/`nack` JSON with the status of docs/publish.md.
fn reply_response(reply: crate::publish::Reply) -> Response {
    (
        StatusCode::from_u16(reply.http_status()).unwrap_or(StatusCode::OK),
        [(header::CONTENT_TYPE, "application/json")],
        reply.to_json(),
    )
        .into_response()
}

async fn require_loaded(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.readiness.loaded.load(Ordering::Acquire) {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "loading the local store; retry shortly".into(),
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

async fn list_tables(
    State(state): State<AppState>,
    creds: Credentials,
) -> Result<Json<Value>, Refused> {
    let access = creds.require(&state.auth)?;
    // only the tables the caller may read
    let mut tables = state.tables.list();
    tables.retain(|t| access.check_table(&t.name).is_ok());
    let unions: Vec<Value> = state
        .fanout
        .unions
        .iter()
        .map(|u| {
            let members: Vec<&str> = tables
                .iter()
                .map(|t| t.name.as_str())
                .filter(|n| u.pattern.is_match(n))
                .collect();
            json!({"name": u.name, "pattern": u.pattern.as_str(), "tables": members})
        })
        .collect();
    let r = &state.readiness;
    Ok(Json(json!({
        "tables": tables,
        "unions": unions,
        "caught_up": r.is_ready(),
        "reason": r.reason(),
    })))
}

/// `GET /api/topics`: the topics the caller may publish to (empty without `[publish]`).
async fn list_topics(
    State(state): State<AppState>,
    creds: Credentials,
) -> Result<Json<Value>, Refused> {
    // only the topics the caller may publish to (a token's `publish` list)
    let ctx = creds.require(&state.auth)?.publish_context();
    let topics: Vec<&WritableTopic> = state
        .writable
        .iter()
        .filter(|t| ctx.allows(&t.name))
        .collect();
    Ok(Json(json!({ "topics": topics })))
}

/// A query string that does not parse (a repeated or malformed parameter): a JSON 400.
pub(crate) fn query_error(e: QueryRejection) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        format!("bad query: {}", e.body_text()),
    )
}

fn path_error(e: PathRejection) -> ApiError {
    ApiError(
        StatusCode::BAD_REQUEST,
        format!("bad path: {}", e.body_text()),
    )
}

async fn get_table(
    State(state): State<AppState>,
    creds: Credentials,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<SubscribeQuery>, QueryRejection>,
) -> Result<Response, Response> {
    let access = creds
        .require(&state.auth)
        .map_err(|d| Refused(d).into_response())?;
    let Path(table) = path.map_err(|e| path_error(e).into_response())?;
    let Query(q) = q.map_err(|e| query_error(e).into_response())?;
    // `keys`, `where` and `columns` select as they do for live clients
    let selector = q
        .selector()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e).into_response())?;
    if let Some(u) = state
        .fanout
        .unions
        .iter()
        .find(|u| u.name == table)
        .cloned()
    {
        let tables = state.tables.clone();
        // its members' copies and its whole body are held until it is built
        let place = state
            .copies
            .enter(crate::fanout::copies::WAIT)
            .await
            .map_err(table_reads::busy)?;
        let body = tokio::task::spawn_blocking(move || {
            let mut rows = Map::new();
            for name in tables.names().into_iter().filter(|n| u.pattern.is_match(n)) {
                // each member as the caller may read it (members it may not are left out)
                let Ok(sel) = access.selector(&name, Selector::default()) else {
                    continue;
                };
                if let Some(t) = tables.get(&name) {
                    // the rows the caller may read of the member, copied as a snapshot's are
                    // (under its read lock, which its ingest waits for); the union's own
                    // selection and projection after it
                    let (copy, _) = copy_of(&t, &sel);
                    for (k, row) in copy.selected(&sel) {
                        let key = union_key(&name, k);
                        if selector.selects(&key, row) {
                            let row = selector.project(row).into_owned();
                            rows.insert(key, Value::Object(row));
                        }
                    }
                }
            }
            serde_json::to_vec(&json!({"table": u.name, "union": true, "rows": rows}))
        })
        .await
        .map_err(|_| internal().into_response())?
        .map_err(|_| internal().into_response())?;
        // built whole; its place is held until the client took it
        return Ok(table_reads::respond_built(body, place));
    }
    let sel = access.selector(&table, selector).map_err(|d| {
        crate::auth::log_refusal(&access, &table, &d);
        Refused(d).into_response()
    })?;
    let t = state.tables.get(&table).ok_or_else(|| {
        ApiError(StatusCode::NOT_FOUND, format!("unknown table `{table}`")).into_response()
    })?;
    // a read that may copy the whole table holds a place until its body is built (bounded:
    // `--max-table-copies`); one by keys takes none (an equality may scan: a GET builds no
    // index)
    let place = if sel.keys.is_none() {
        let p = state.copies.enter(crate::fanout::copies::WAIT).await;
        Some(p.map_err(table_reads::busy)?)
    } else {
        None
    };
    // a large table takes milliseconds to copy and serialise: keep it off the async workers;
    // what is left of a large body is built as the client takes it
    let (first, body) = tokio::task::spawn_blocking(move || {
        let (copy, _) = copy_of(&t, &sel);
        let mut body = TableBody::new(copy, table, sel);
        let first = body
            .next_piece(table_reads::PIECE_BYTES)
            .unwrap_or_default();
        (first, body)
    })
    .await
    .map_err(|_| internal().into_response())?;
    Ok(table_reads::respond(first, body, place))
}

fn internal() -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
}

async fn get_row(
    State(state): State<AppState>,
    creds: Credentials,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Response> {
    let access = creds
        .require(&state.auth)
        .map_err(|d| Refused(d).into_response())?;
    let Path((table, key)) = path.map_err(|e| path_error(e).into_response())?;
    // a key outside the token's key patterns is refused (403, saying so); a row its row filter
    // hides is answered like a row that does not exist (404), so other rows' existence stays
    // private
    let sel = access
        .selector(&table, Selector::keys(Some([key.clone()].into())))
        .map_err(|d| Refused(d).into_response())?;
    if state.tables.get(&table).is_none() {
        return Err(
            ApiError(StatusCode::NOT_FOUND, format!("unknown table `{table}`")).into_response(),
        );
    }
    let no_row = || {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no row `{key}` in table `{table}`"),
        )
        .into_response()
    };
    let row = state.tables.row(&table, &key).ok_or_else(no_row)?;
    // a row loaded from the store (or a changelog) is answered with its JSON as stored, parsed
    // only when a filter of the token reads rows (see `row_body`)
    let body = table_body::row_body(&key, &row, &sel).ok_or_else(no_row)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// `/ws`: a WebSocket upgrade; a plain GET gets a JSON error.
async fn ws(
    State(state): State<AppState>,
    q: Result<Query<SubscribeQuery>, QueryRejection>,
    creds: Credentials,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return query_error(e).into_response(),
    };
    match upgrade {
        Ok(ws) => crate::fanout::ws::upgrade(state, q, ws, false, creds),
        Err(e) => ApiError(
            e.status(),
            format!("a WebSocket upgrade is required here: {}", e.body_text()),
        )
        .into_response(),
    }
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

/// `/`: a WebSocket upgrade here is a live connection with the default format (clients of the
/// seed system connect to `ws://host:port/`); a plain GET serves the live page.
async fn index(
    State(state): State<AppState>,
    q: Result<Query<SubscribeQuery>, QueryRejection>,
    creds: Credentials,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return query_error(e).into_response(),
    };
    match upgrade {
        Ok(ws) => crate::fanout::ws::upgrade(state, q, ws, true, creds),
        Err(_) => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            INDEX_HTML,
        )
            .into_response(),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    if state.readiness.is_healthy() {
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
    let ready = r.is_ready();
    let body = Json(json!({
        "ready": ready,
        "role": state.role.as_str(),
        "loaded": r.loaded.load(Ordering::Acquire),
        "ingest": r.needs_ingest.then(|| r.ingest.load(Ordering::Acquire)),
        "follower": r.needs_follower.then(|| r.follower.load(Ordering::Acquire)),
        "reason": r.reason(),
    }));
    if ready {
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

/// The NULL-free row a patch client sees (for tests and tools).
pub fn client_row(row: &crate::cdc::decode::Row) -> Value {
    Value::Object(without_nulls(row))
}
