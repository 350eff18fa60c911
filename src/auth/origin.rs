//! Browser origins. CORS does not apply to WebSockets, and an `EventSource` or WebSocket opened by
//! any page a visitor has open would otherwise read what the visitor's network position (an
//! intranet) gives access to: WebSocket upgrades, SSE requests and publishes (POST) with an
//! `Origin` header must come from the same origin or from `--allowed-origins` (403 otherwise). Requests without
//! `Origin` (non-browser clients) are not browsers' and pass. The HTTP API answers cross-origin
//! reads with CORS headers for the same list (a tower-http layer).

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::security::Origins;
use crate::http::AppState;

/// Whether a request with these headers may open a live connection.
pub fn allowed(origins: &Origins, headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    if origins.any {
        return true;
    }
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    if origins.list.contains(&origin) {
        return true;
    }
    // the same origin: the Origin's authority is the Host the request was sent to
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    match (origin.split_once("://"), host) {
        (Some((scheme, authority)), Some(host)) => {
            authority == host
                || with_default_port(scheme, authority) == with_default_port(scheme, &host)
        }
        _ => false,
    }
}

fn with_default_port(scheme: &str, authority: &str) -> String {
    let has_port = authority.rsplit_once(':').is_some_and(|(h, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':')
    });
    if has_port {
        authority.to_string()
    } else {
        let port = match scheme {
            "https" | "wss" => 443,
            _ => 80,
        };
        format!("{authority}:{port}")
    }
}

/// Middleware of the live routes and of publishing: WebSocket upgrades (on `/ws` and `/`), `/sse`
/// and POSTs (a publish: a page could send one cross-site without a preflight, as `text/plain`)
/// from an origin that is not allowed get 403.
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let live = req.uri().path() == "/sse"
        || req.method() == Method::POST
        || req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if live && !allowed(&state.origins, req.headers()) {
        state
            .metrics
            .security
            .access_denied
            .with_label_values(&["origin"])
            .inc();
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(200)
            .collect::<String>();
        tracing::info!(%origin, path = req.uri().path(), "live connection refused: origin not allowed");
        return (
            StatusCode::FORBIDDEN,
            Json(json!({
                "error": format!("origin `{origin}` is not allowed (--allowed-origins)"),
                "code": "origin_not_allowed",
            })),
        )
            .into_response();
    }
    next.run(req).await
}

/// CORS for the HTTP API: the allowed origins may read it from a browser, with a token in
/// `Authorization`. `None` when only the same origin may (no CORS headers needed).
pub fn cors(origins: &Origins) -> Option<CorsLayer> {
    let allow = if origins.any {
        AllowOrigin::any()
    } else if origins.list.is_empty() {
        return None;
    } else {
        AllowOrigin::list(
            origins
                .list
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::HEAD, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                axum::http::HeaderName::from_static("last-event-id"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::security::parse_origins;

    fn h(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        if let Some(o) = origin {
            m.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        m.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        m
    }

    #[test]
    fn same_origin_listed_or_no_origin() {
        let none = parse_origins("").unwrap();
        assert!(allowed(&none, &h(None, "lt:8080")));
        assert!(allowed(&none, &h(Some("http://lt:8080"), "lt:8080")));
        assert!(allowed(
            &none,
            &h(Some("https://lt.example.com"), "lt.example.com")
        ));
        assert!(allowed(
            &none,
            &h(Some("https://lt.example.com"), "lt.example.com:443")
        ));
        assert!(!allowed(&none, &h(Some("https://evil.example"), "lt:8080")));
        assert!(!allowed(&none, &h(Some("null"), "lt:8080")));
        assert!(!allowed(&none, &h(Some("http://lt:8081"), "lt:8080")));
        let list = parse_origins("https://App.example.com/, http://localhost:3000").unwrap();
        assert!(allowed(
            &list,
            &h(Some("https://app.example.com"), "lt:8080")
        ));
        assert!(allowed(&list, &h(Some("http://localhost:3000"), "lt:8080")));
        assert!(!allowed(
            &list,
            &h(Some("http://localhost:3001"), "lt:8080")
        ));
        let any = parse_origins("*").unwrap();
        assert!(allowed(&any, &h(Some("https://evil.example"), "lt:8080")));
        assert!(parse_origins("not an origin").is_err());
        assert!(parse_origins("https://a.example/path").is_err());
    }
}
