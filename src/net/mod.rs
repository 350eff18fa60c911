//! The listeners: an accept loop per address that bounds every connection in number and in time
//! before a byte of it is read (`axum::serve` has neither), optional TLS (rustls, reloaded when
//! the files change), then HTTP/1.1 with upgrades (hyper).
//!
//! - number: a slot per connection, in total (`--max-connections`) and per client address
//!   (`--max-connections-per-ip`), taken at accept and held by the socket (an upgraded WebSocket
//!   keeps it). Over the cap a connection is answered 503 and closed;
//! - time: the TLS handshake and every request head (a WebSocket upgrade, and the wait between
//!   keep-alive requests) within `--handshake-timeout-secs` (slowloris); no connection lives past
//!   `--idle-timeout-secs` without a byte in either direction; TCP keepalive and
//!   `TCP_USER_TIMEOUT` end half-open connections (a peer that vanished) in about as long;
//! - size: request heads up to [`MAX_HEAD_BYTES`] (hyper answers 431 above).
//!
//! HTTP requests are further bounded by tower layers ([`http_layers`]): a timeout and a limit of
//! requests in flight, both answered with a JSON 503.

pub mod io;
pub mod limits;
pub mod rate;
pub mod tls;
pub mod watch;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Json, Router};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::security::Limits;
use crate::metrics::Metrics;
use limits::ConnLimiter;
use tls::Tls;

/// Largest request head (request line, query string and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Connections over the cap being answered 503 at once; more are closed without an answer.
const MAX_REFUSING: usize = 64;

/// How one listener treats its connections.
#[derive(Clone)]
pub struct ListenerOptions {
    /// `public` or `admin`, for the logs.
    pub name: &'static str,
    pub max_connections: usize,
    /// 0: no limit.
    pub max_per_ip: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub tls: Option<Arc<Tls>>,
}

impl ListenerOptions {
    /// The public listener's options from the settings.
    pub fn public(max_connections: usize, limits: &Limits, tls: Option<Arc<Tls>>) -> Self {
        ListenerOptions {
            name: "public",
            max_connections,
            max_per_ip: limits.max_connections_per_ip,
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
            tls,
        }
    }

    /// The admin listener: a few plain-HTTP connections (scrapers, probes).
    pub fn admin(limits: &Limits) -> Self {
        ListenerOptions {
            name: "admin",
            max_connections: 256,
            max_per_ip: 0,
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
            tls: None,
        }
    }
}

/// Serves `app` on `listener` until `cancel`, then stops accepting, lets requests in flight
/// finish (upgraded connections end through the application's own shutdown) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    opts: ListenerOptions,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let limiter = ConnLimiter::new(opts.max_connections, opts.max_per_ip, metrics.clone());
    let refusing = Arc::new(AtomicUsize::new(0));
    let tracker = TaskTracker::new();
    let opts = Arc::new(opts);
    loop {
        let (stream, remote) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // out of descriptors (EMFILE) or a connection reset before accept: the
                    // listener itself is fine; pause briefly so a descriptor shortage does not spin
                    tracing::warn!(listener = opts.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match limiter.acquire(remote.ip()) {
            Ok(slot) => {
                let (app, opts, metrics, cancel) =
                    (app.clone(), opts.clone(), metrics.clone(), cancel.clone());
                tracker.spawn(async move {
                    set_socket_options(&stream, opts.idle_timeout);
                    let io = io::TimedIo::new(
                        stream,
                        opts.idle_timeout,
                        slot,
                        metrics.clone(),
                        cancel.clone(),
                    );
                    match &opts.tls {
                        None => http(io, remote, app, &opts, &metrics, cancel).await,
                        Some(tls) => {
                            let accept = tls.acceptor().accept(io);
                            match tokio::time::timeout(opts.handshake_timeout, accept).await {
                                Ok(Ok(s)) => http(s, remote, app, &opts, &metrics, cancel).await,
                                Ok(Err(e)) => {
                                    tracing::debug!(%remote, error = %e, "tls handshake failed");
                                    metrics.security.tls_handshake_errors.inc();
                                }
                                Err(_) => {
                                    metrics
                                        .security
                                        .tcp_timeouts
                                        .with_label_values(&["handshake"])
                                        .inc();
                                }
                            }
                        }
                    }
                });
            }
            Err(reason) => {
                metrics
                    .security
                    .tcp_refused
                    .with_label_values(&[reason.label()])
                    .inc();
                tracing::debug!(%remote, reason = reason.label(), "connection refused");
                // a plain-HTTP client learns why; a TLS one (or a flood) is just closed
                if opts.tls.is_none() && refusing.load(Ordering::Acquire) < MAX_REFUSING {
                    refusing.fetch_add(1, Ordering::AcqRel);
                    let refusing = refusing.clone();
                    let message = match reason {
                        limits::Refusal::Total => "too many connections",
                        limits::Refusal::PerIp => "too many connections from this address",
                    };
                    tracker.spawn(async move {
                        refuse(stream, message).await;
                        refusing.fetch_sub(1, Ordering::AcqRel);
                    });
                } else {
                    drop(stream);
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Keepalive probes and a bound on unacknowledged data: a peer that vanished (no FIN, no RST)
/// is found within about the idle timeout.
fn set_socket_options(stream: &TcpStream, idle: Duration) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let probe = (idle / 8).max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time((idle / 2).max(Duration::from_secs(1)))
        .with_interval(probe)
        .with_retries(4);
    let _ = sock.set_tcp_keepalive(&keepalive);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = sock.set_tcp_user_timeout(Some(idle));
}

/// HTTP/1.1 with upgrades on an admitted connection.
async fn http<I>(
    io: I,
    remote: SocketAddr,
    app: Router,
    opts: &ListenerOptions,
    metrics: &Metrics,
    cancel: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(remote));
        app.clone().oneshot(req)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(opts.handshake_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            metrics
                .security
                .tcp_timeouts
                .with_label_values(&["handshake"])
                .inc();
        }
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

/// Answers every request of a connection over the cap with 503, then closes it; the whole
/// exchange is bounded by a couple of seconds.
async fn refuse(stream: TcpStream, message: &'static str) {
    let service = hyper::service::service_fn(move |_req: hyper::Request<Incoming>| async move {
        let mut resp = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": message, "code": "server_busy"})),
        )
            .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Ok::<_, Infallible>(safe_headers(resp).await)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(2))
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(Duration::from_secs(3), conn).await;
}

/// The tower layers of the HTTP routes: at most `max_concurrent` requests in flight (more are
/// answered 503 at once: load shedding, no queue) and each answered within `timeout` (else 503).
/// A WebSocket upgrade or an SSE response counts until its response head only.
/// Errors are JSON everywhere: a plain-text error of a framework extractor (a query string that
/// does not parse, a method not allowed, ...) becomes `{"error": "..."}` with its status.
/// Those 503s are counted (`livetable_http_refused_total{reason}`: they never reach the routes'
/// own request counter).
pub fn http_layers(
    app: Router,
    timeout: Duration,
    max_concurrent: usize,
    metrics: Arc<Metrics>,
) -> Router {
    let refused = move |e: BoxError| {
        let metrics = metrics.clone();
        async move { overloaded(e, &metrics) }
    };
    let layers = tower::ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refused))
        .load_shed()
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            max_concurrent,
        ))
        .timeout(timeout);
    app.layer(layers)
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::map_response(safe_headers))
}

/// Headers on every response: browsers never guess a type other than the one sent (a row value
/// that looks like HTML in a JSON answer stays JSON), never send this page's URL (which may
/// hold `?access_token=`) to the sites it links to, and nothing but the client keeps a copy of
/// the answers (rows may be behind a token) unless the route says otherwise.
async fn safe_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}

async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let plain = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, 16 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    };
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut out = (status, Json(json!({"error": message}))).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

fn overloaded(e: BoxError, metrics: &Metrics) -> Response {
    let (message, code) = if e.is::<tower::timeout::error::Elapsed>() {
        ("the request took too long", "timeout")
    } else {
        ("too many requests in flight; retry shortly", "server_busy")
    };
    metrics.http_refused.with_label_values(&[code]).inc();
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": message, "code": code})),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// Logs loudly when the public listener is reachable from other machines without tokens or TLS.
pub fn warn_if_exposed(listen: SocketAddr, auth: bool, tls: bool, admin_separate: bool) {
    if listen.ip().is_loopback() {
        return;
    }
    if !auth {
        tracing::warn!(
            %listen,
            "!!! livetable listens on a non-loopback address WITHOUT authentication: anyone who reaches {listen} reads every table. Set --auth jwt (README, 'Deploying on the internet') or listen on 127.0.0.1 behind a proxy that authenticates !!!"
        );
    }
    if !tls {
        tracing::warn!(%listen, "livetable serves plain HTTP on a non-loopback address: tokens and data cross the network in clear unless a TLS proxy fronts it (--tls-cert, --tls-key)");
    }
    if !admin_separate {
        tracing::warn!(%listen, "/metrics, /healthz and /readyz are served on the public listener (table names and sizes included); set --admin-listen to move them to a private address");
    }
}

#[cfg(test)]
mod tests;
