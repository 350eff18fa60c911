//! Server-sent events: `GET /sse?table=T[&keys=..][&since=TOKEN]` with `text/event-stream`; events
//! `snapshot` and `patch` carry the same JSON as the WebSocket, with `id:` the resume token. A
//! reconnect with the standard `Last-Event-ID` header (what `EventSource` sends) resumes, on this
//! node or any other of the deployment. The stream is pulled by the socket: when the client is
//! slow, changes compose into one patch. It ends on shutdown.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::protocol::{ErrorCode, Format, Outgoing, SubscribeQuery};
use super::session::Session;
use super::{record_sent, ConnectionSlot};
use crate::auth::{Credentials, Refused};
use crate::http::AppState;

mod events;

use events::Pending;

struct StreamState {
    state: AppState,
    session: Session,
    queue: VecDeque<Outgoing>,
    /// Events of the message being sent (a snapshot may be several), written as the socket
    /// takes them.
    events: VecDeque<Pending>,
    /// When the token expires: the stream ends then with an `error` event.
    expires: Option<tokio::time::Instant>,
    /// The stream ends once the events queued are sent.
    done: bool,
    /// The place of snapshots of its own whose events are queued (see `crate::fanout::copies`).
    held: Vec<crate::fanout::copies::Place>,
    /// The subscription, while it waits for the node to recover from an unclean stop.
    start: Option<Start>,
    _slot: ConnectionSlot,
}

/// What the stream subscribes to.
struct Start {
    table: String,
    selector: super::selector::Selector,
    since: Option<String>,
}

/// Resolves at `at` (never without one).
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl StreamState {
    /// Counts the stream's end for `reason` (`livetable_connections_closed_total`).
    fn closed(&self, reason: &str) {
        self.state
            .metrics
            .connections_closed
            .with_label_values(&[reason])
            .inc();
    }
    /// Subscribes; `Err(message)` when no place for a snapshot of its own came free in time.
    async fn subscribe(&mut self, start: Start) -> Result<(), String> {
        let mut initial = self
            .session
            .subscribe(
                &start.table,
                start.selector,
                start.since.as_deref(),
                Format::Patch,
            )
            .await;
        if let Some(Outgoing::Error {
            code: ErrorCode::Busy,
            message,
        }) = initial.first()
        {
            return Err(message.clone());
        }
        // the initial snapshot's place is kept until its events are taken
        self.held = self.session.take_places();
        initial.extend(
            self.session
                .watch_freshness(self.state.readiness.freshness()),
        );
        self.queue.extend(initial);
        Ok(())
    }
}

/// Opens an event stream for one table.
pub async fn handler(
    State(state): State<AppState>,
    q: Result<Query<SubscribeQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    creds: Credentials,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return crate::http::query_error(e).into_response(),
    };
    let access = match creds.require(&state.auth) {
        Ok(a) => a,
        Err(d) => return Refused(d).into_response(),
    };
    let bad = |status: StatusCode, code: ErrorCode, msg: String| {
        state
            .metrics
            .protocol_errors
            .with_label_values(&[code.as_str()])
            .inc();
        (status, Json(json!({"error": msg}))).into_response()
    };
    let table = match q.table.clone() {
        Some(t) => t,
        None => {
            let list = state.tables.list();
            if list.len() != 1 {
                return bad(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "pass ?table=".into(),
                );
            }
            list[0].name.clone()
        }
    };
    let selector = match q.selector() {
        Ok(s) => s,
        Err(e) => return bad(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e),
    };
    // an event stream speaks snapshots and patches only: a `format` it would ignore is refused
    if let Some(e) = sse_format_error(q.format.as_deref()) {
        return bad(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e);
    }
    // a subscription the token refuses is an HTTP 403 before the stream starts
    if !state.fanout.unions.iter().any(|u| u.name == table) {
        if let Err(d) = access.selector(&table, selector.clone()) {
            crate::auth::log_refusal(&access, &table, &d);
            return Refused(d).into_response();
        }
    }
    let since = events::resume_from(
        headers.get("last-event-id").and_then(|v| v.to_str().ok()),
        q.since.as_deref(),
    );
    let Some(slot) = ConnectionSlot::acquire(
        &state.connections,
        state.fanout.max_connections,
        &state.metrics,
    ) else {
        return bad(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ServerBusy,
            "too many connections".into(),
        );
    };
    let expires = state.auth.deadline(&access);
    let session = Session::new(state.sessions.clone(), 1).with_access(access);
    let start = Start {
        table,
        selector,
        since,
    };
    let mut st = StreamState {
        state,
        session,
        queue: VecDeque::new(),
        events: VecDeque::new(),
        expires,
        done: false,
        held: Vec::new(),
        start: None,
        _slot: slot,
    };
    if st.state.readiness.is_recovered() {
        // no place for a snapshot of its own within the wait: refused before the stream starts
        if let Err(message) = st.subscribe(start).await {
            st.state
                .metrics
                .protocol_errors
                .with_label_values(&[ErrorCode::Busy.as_str()])
                .inc();
            let mut refused = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": message})),
            )
                .into_response();
            refused.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            return refused;
        }
    } else {
        // after an unclean stop a snapshot could be older than what clients were sent before
        // it: the subscription waits until the node recovered (at most RECOVERY_LIMIT), inside
        // the stream, whose head goes out now (a request held longer than the request timeout
        // was answered 503, which a browser's EventSource never retries)
        st.start = Some(start);
    }
    st.state
        .metrics
        .connections_opened
        .with_label_values(&["sse"])
        .inc();
    let keep_alive = st.state.fanout.ping_interval;
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(start) = st.start.take() {
                tokio::select! {
                    _ = st.state.readiness.wait_recovered(crate::table::ingest::RECOVERY_LIMIT) => {}
                    // the token expired during the hold: no snapshot; the loop ends the stream
                    // with its error below
                    _ = until(st.expires) => continue,
                    _ = st.state.shutdown.cancelled() => {
                        st.closed("shutdown");
                        return None;
                    }
                }
                if let Err(message) = st.subscribe(start).await {
                    // busy: told, and the stream ends (the browser reconnects)
                    st.events
                        .push_back(Pending::error(ErrorCode::Busy, message));
                    st.done = true;
                }
                continue;
            }
            if let Some(pending) = st.events.pop_front() {
                return Some((Ok::<Event, Infallible>(pending.event()), st));
            }
            if st.done {
                return None;
            }
            if let Some(out) = st.queue.pop_front() {
                let frames = out.frames();
                record_sent(&st.state.metrics, &out, &frames);
                st.events.extend(events::events_of(&out, frames));
                continue;
            }
            // every event queued before was taken by the stream: the place held for them goes
            // back, and the place of what is queued now (a restart's snapshot) is kept until its
            // events are taken
            st.held = st.session.take_places();
            let (pending, frames) = st.session.take();
            if pending.is_empty() && frames.is_empty() {
                st.held.clear();
            }
            if !pending.is_empty() || !frames.is_empty() {
                for f in frames {
                    st.state.metrics.patches_sent.inc();
                    st.state
                        .metrics
                        .sent_bytes
                        .with_label_values(&["patch"])
                        .inc_by(f.text.len() as u64);
                    super::record_latency(&st.state.metrics, f.ts_ms, f.kafka_ts_ms, f.polled);
                    st.events.push_back(Pending {
                        name: "patch",
                        data: f.text,
                        id: Some(f.pos.to_string()),
                    });
                }
                st.queue.extend(pending);
                continue;
            }
            tokio::select! {
                event = st.session.next() => st.session.on_event(event).await,
                _ = until(st.expires) => {
                    st.state.auth.count(&crate::auth::Denied::expired("the token expired"));
                    st.closed("token_expired");
                    st.expires = None;
                    st.events.push_back(Pending::error(
                        ErrorCode::TokenExpired,
                        "the token expired; reconnect with a new one".into(),
                    ));
                    st.queue.clear();
                    st.done = true;
                    continue;
                }
                _ = st.state.shutdown.cancelled() => {
                    st.closed("shutdown");
                    return None;
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response()
}

/// The error for a `format=` an event stream does not serve: `rows` is the seed system's
/// WebSocket format (one bare row per message, no event type), so a stream would have to ignore
/// it and send patches its client cannot read.
fn sse_format_error(format: Option<&str>) -> Option<String> {
    match format {
        None | Some("patch") => None,
        Some("rows") => Some(
            "format=rows is served over WebSocket only (/ws or /); /sse sends snapshot and patch events"
                .into(),
        ),
        Some(f) => Some(format!("unknown format `{f}`: /sse serves patch")),
    }
}

#[cfg(test)]
mod tests {
    use super::sse_format_error;

    #[test]
    fn only_the_patch_format_is_served() {
        assert_eq!(sse_format_error(None), None);
        assert_eq!(sse_format_error(Some("patch")), None);
        let rows = sse_format_error(Some("rows")).unwrap_or_default();
        assert!(rows.contains("WebSocket only"), "{rows}");
        let other = sse_format_error(Some("csv")).unwrap_or_default();
        assert!(other.contains("unknown format `csv`"), "{other}");
    }
}
