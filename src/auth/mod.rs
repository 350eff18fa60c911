//! Who may read what: `--auth none` (everyone reads everything) or `--auth jwt` (a signed token
//! says which tables, keys and rows; `docs/protocol.md`, "Authentication").
//!
//! The token comes from `Authorization: Bearer`, the `access_token` query parameter (browsers'
//! `EventSource` and `WebSocket` cannot set headers), or a first `auth` message on a WebSocket.
//! A verified token becomes an [`Access`]; every route asks it for the [`Selector`] of what it
//! serves, so a route cannot forget a rule: the table claims, key patterns and row filters apply
//! to snapshots, patches, resumes, unions, the rows mode and the HTTP API alike. Refusals say
//! which rule refused (`GET /api/explain` says it before a client subscribes). Publishing asks it
//! for the `PublishContext` (`publish`): the topics the token may write to, its `sub` and claims.
//!
//! [`Selector`]: crate::fanout::selector::Selector

pub mod claims;
pub mod glob;
pub mod keys;
pub mod origin;
pub mod publish;
pub mod ws;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub use claims::{Access, Denied, DenyKind};
use keys::{KeyError, KeySet, Verifier};

use crate::config::security::AuthConfig;
use crate::http::AppState;
use crate::metrics::Metrics;

/// How this process authenticates clients.
pub struct Auth {
    verifier: Option<Verifier>,
    metrics: Arc<Metrics>,
}

impl Auth {
    /// `--auth none`.
    pub fn open(metrics: Arc<Metrics>) -> Auth {
        Auth {
            verifier: None,
            metrics,
        }
    }

    /// Reads the keys the configuration names (a start-up error when they do not load).
    pub fn from_config(config: &AuthConfig, metrics: Arc<Metrics>) -> Result<Auth, KeyError> {
        match config {
            AuthConfig::None => Ok(Auth::open(metrics)),
            AuthConfig::Jwt(jwt) => {
                let path = jwt.keys.path();
                let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                let keys = KeySet::parse(&jwt.keys, &bytes)?;
                Ok(Auth {
                    verifier: Some(Verifier::new(jwt.clone(), keys)),
                    metrics,
                })
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// The access a token gives.
    pub fn verify(&self, token: &str) -> Result<Access, Denied> {
        match &self.verifier {
            None => Ok(Access::Open),
            Some(v) => v
                .verify(token)
                .map(|g| Access::Token(Arc::new(g)))
                .inspect_err(|d| self.count(d)),
        }
    }

    /// What a request without a token gets.
    pub fn anonymous(&self) -> Result<Access, Denied> {
        if self.enabled() {
            let d = Denied::unauthorized(
                "a token is required: `Authorization: Bearer <token>`, `?access_token=<token>`, or on a WebSocket a first {\"type\":\"auth\",\"token\":..} message",
            );
            self.count(&d);
            Err(d)
        } else {
            Ok(Access::Open)
        }
    }

    /// Counts a refusal (`livetable_access_denied_total{reason}`).
    pub fn count(&self, d: &Denied) {
        self.metrics
            .security
            .access_denied
            .with_label_values(&[d.kind.code()])
            .inc();
    }

    /// When a connection holding `access` must end: its `exp` plus the leeway.
    pub fn deadline(&self, access: &Access) -> Option<tokio::time::Instant> {
        let exp = access.expires()?;
        let leeway = self
            .verifier
            .as_ref()
            .map_or(Duration::ZERO, |v| v.config().leeway);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Some(tokio::time::Instant::now() + time_left(exp, now, leeway))
    }

    /// Re-reads the key file when it changes, until `cancel`.
    pub fn watch(self: &Arc<Self>, every: Duration, cancel: CancellationToken) {
        let Some(v) = &self.verifier else {
            return;
        };
        let source = v.config().keys.clone();
        let me = self.clone();
        crate::net::watch::spawn(
            "jwt_keys",
            vec![source.path().to_path_buf()],
            every,
            cancel,
            self.metrics.clone(),
            move |files: &[Vec<u8>]| {
                let keys = KeySet::parse(&source, &files[0]).map_err(|e| e.to_string())?;
                if let Some(v) = &me.verifier {
                    v.replace(keys);
                }
                Ok(())
            },
        );
    }
}

/// How long a token expiring at Unix second `exp` has left at `now`, with the leeway; at most
/// ten years (an `exp` far in the future would overflow the deadline's instant).
fn time_left(exp: u64, now: Duration, leeway: Duration) -> Duration {
    const MAX: Duration = Duration::from_secs(10 * 365 * 86_400);
    Duration::from_secs(exp)
        .saturating_sub(now)
        .saturating_add(leeway)
        .min(MAX)
}

/// The token a request presents (`None`: none).
pub fn presented_token(parts: &Parts) -> Option<String> {
    if let Some(v) = parts.headers.get(header::AUTHORIZATION) {
        if let Some((scheme, token)) = v.to_str().ok().and_then(|s| s.split_once(' ')) {
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
                return Some(token.trim().to_string());
            }
        }
    }
    #[derive(Deserialize)]
    struct Q {
        access_token: Option<String>,
    }
    Query::<Q>::try_from_uri(&parts.uri)
        .ok()
        .and_then(|q| q.0.access_token)
        .filter(|t| !t.is_empty())
}

/// The caller's credentials: `None` when no token was presented, else what verifying it gave.
pub struct Credentials(pub Option<Result<Access, Denied>>);

impl Credentials {
    /// The access, or the refusal (no token where one is required, or an invalid one).
    pub fn require(self, auth: &Auth) -> Result<Access, Denied> {
        match self.0 {
            None => auth.anonymous(),
            Some(r) => r,
        }
    }
}

impl FromRequestParts<AppState> for Credentials {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Credentials(
            presented_token(parts).map(|t| state.auth.verify(&t)),
        ))
    }
}

/// A refusal as an HTTP answer: 401 (no, invalid or expired token, with `WWW-Authenticate`) or
/// 403 (the token does not allow it); the JSON says which rule.
pub struct Refused(pub Denied);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let status = match self.0.kind {
            DenyKind::Forbidden => StatusCode::FORBIDDEN,
            DenyKind::Unauthorized | DenyKind::Expired => StatusCode::UNAUTHORIZED,
        };
        let mut resp = (
            status,
            Json(json!({"error": self.0.reason, "code": self.0.kind.code()})),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            let v = if self.0.kind == DenyKind::Expired {
                r#"Bearer error="invalid_token", error_description="the token expired""#
            } else {
                "Bearer"
            };
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(v));
        }
        resp
    }
}

impl From<Denied> for Refused {
    fn from(d: Denied) -> Self {
        Refused(d)
    }
}

#[derive(Debug, Deserialize)]
pub struct ExplainQuery {
    table: Option<String>,
    keys: Option<String>,
}

/// `GET /api/explain[?table=T[&keys=a,b]]`: what the caller's token may read and why, per table;
/// 401 with the reason when the token itself is refused.
pub async fn explain(
    State(state): State<AppState>,
    creds: Credentials,
    q: Result<Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let access = match creds.require(&state.auth) {
        Ok(a) => a,
        Err(d) => return Refused(d).into_response(),
    };
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": format!("bad query: {}", e.body_text())})),
            )
                .into_response()
        }
    };
    let keys: Option<HashSet<String>> = crate::fanout::protocol::parse_keys(q.keys.as_deref());
    let token = json!({
        "auth": if state.auth.enabled() { "jwt" } else { "none" },
        "sub": access.sub(),
        "exp": access.expires(),
        // the topics it may publish to (`null`: auth is off, every writable topic)
        "publish": access.publish_patterns(),
    });
    let tables: Vec<Value> = match q.table {
        Some(t) => vec![explain_one(&state, &access, &t, keys)],
        None => {
            let mut names: Vec<String> = state.tables.names();
            names.sort();
            names
                .iter()
                .map(|t| explain_one(&state, &access, t, None))
                .collect()
        }
    };
    Json(json!({"token": token, "tables": tables})).into_response()
}

fn explain_one(
    state: &AppState,
    access: &Access,
    table: &str,
    keys: Option<HashSet<String>>,
) -> Value {
    if let Some(u) = state.fanout.unions.iter().find(|u| u.name == table) {
        let mut members: Vec<String> = state
            .tables
            .names()
            .into_iter()
            .filter(|n| u.pattern.is_match(n))
            .collect();
        members.sort();
        let members: Vec<Value> = members.iter().map(|m| access.explain(m, None)).collect();
        return json!({
            "table": table,
            "union": true,
            "allowed": true,
            "reason": "a union: each member table is served as the token allows it",
            "members": members,
        });
    }
    let mut v = access.explain(table, keys);
    if state.tables.get(table).is_none() {
        v["exists"] = Value::Bool(false);
    }
    v
}

/// Logs a refused subscription with the rule that refused it.
pub fn log_refusal(access: &Access, table: &str, d: &Denied) {
    tracing::info!(
        table,
        sub = access.sub().unwrap_or(""),
        code = d.kind.code(),
        reason = %d.reason,
        "subscription refused"
    );
}

#[cfg(test)]
mod deadline_tests {
    use super::*;

    #[test]
    fn a_far_exp_gives_a_deadline_that_does_not_overflow() {
        let now = Duration::from_secs(1_800_000_000);
        assert_eq!(
            time_left(1_800_000_060, now, Duration::from_secs(5)),
            Duration::from_secs(65)
        );
        assert_eq!(time_left(1, now, Duration::ZERO), Duration::ZERO);
        let far = time_left(u64::MAX, now, Duration::MAX);
        assert_eq!(far, Duration::from_secs(10 * 365 * 86_400));
        // the instant it makes exists
        let _ = tokio::time::Instant::now() + far;
    }
}
