//! Server-sent events: `GET /sse?table=T[&keys=..]` with `text/event-stream`; events `snapshot` and
//! `patch` carry the same JSON as the WebSocket, with `id: EPOCH:SEQ`. A reconnect with the
//! standard `Last-Event-ID` header (what `EventSource` sends) resumes from the replay buffer.
//! The stream is pulled by the socket: when the client is slow, changes compose into one patch.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::sync::broadcast::{self, error::RecvError};

use super::hub::{Absorbed, Start, Subscription};
use super::protocol::{parse_keys, parse_since, ErrorCode, Format, Outgoing, SubscribeQuery};
use super::{record_sent, ConnectionSlot};
use crate::http::AppState;
use crate::table::ingest::TableUpdate;

struct StreamState {
    state: AppState,
    updates: broadcast::Receiver<std::sync::Arc<TableUpdate>>,
    sub: Subscription,
    queue: VecDeque<Outgoing>,
    /// Events of the message being sent (a snapshot may be several).
    events: VecDeque<Event>,
    _slot: ConnectionSlot,
}

/// Opens an event stream for one table.
pub async fn handler(
    State(state): State<AppState>,
    Query(q): Query<SubscribeQuery>,
    headers: HeaderMap,
) -> Response {
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
    let since_text = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or(q.since.clone());
    let since = match since_text.as_deref().map(|s| (s, parse_since(s))) {
        Some((raw, None)) => {
            return bad(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("`{raw}` is not EPOCH:SEQ"),
            )
        }
        Some((_, parsed)) => parsed,
        None => None,
    };
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
    let updates = state.hub.updates();
    let (sub, initial, start) =
        match state
            .hub
            .subscribe(&table, parse_keys(q.keys.as_deref()), since, Format::Patch)
        {
            Ok(x) => x,
            Err(e) => {
                return bad(
                    StatusCode::NOT_FOUND,
                    ErrorCode::UnknownTable,
                    e.to_string(),
                )
            }
        };
    match start {
        Start::ResumeHit => state.metrics.resumes.with_label_values(&["hit"]).inc(),
        Start::ResumeMiss => state.metrics.resumes.with_label_values(&["miss"]).inc(),
        Start::Snapshot => {}
    }
    state
        .metrics
        .connections_opened
        .with_label_values(&["sse"])
        .inc();
    let st = StreamState {
        state,
        updates,
        sub,
        queue: initial.into(),
        events: VecDeque::new(),
        _slot: slot,
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(event) = st.events.pop_front() {
                return Some((Ok::<Event, Infallible>(event), st));
            }
            if let Some(out) = st.queue.pop_front() {
                let frames = out.frames();
                record_sent(&st.state.metrics, &out, &frames);
                let last = frames.len().saturating_sub(1);
                for (i, f) in frames.into_iter().enumerate() {
                    // a snapshot's further frames are patches; only the last frame carries the id,
                    // so a browser that reconnects mid-snapshot does not resume from a partial state
                    let name = if i == 0 { out.event_name() } else { "patch" };
                    let mut event = Event::default().event(name).data(f.as_str());
                    if i == last {
                        if let Some(id) = out.event_id() {
                            event = event.id(id);
                        }
                    }
                    st.events.push_back(event);
                }
                continue;
            }
            match st.updates.recv().await {
                Ok(u) => {
                    let mut updates = vec![u];
                    while let Ok(u) = st.updates.try_recv() {
                        updates.push(u);
                        if updates.len() >= 1024 {
                            break;
                        }
                    }
                    for u in updates {
                        if st.sub.absorb(&u) == Absorbed::EpochChanged {
                            resnapshot(&mut st);
                        }
                    }
                    let pending = st.sub.take();
                    st.queue.extend(pending);
                }
                Err(RecvError::Lagged(_)) => resnapshot(&mut st),
                Err(RecvError::Closed) => {
                    st.state
                        .metrics
                        .connections_closed
                        .with_label_values(&["shutdown"])
                        .inc();
                    return None;
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn resnapshot(st: &mut StreamState) {
    st.state.metrics.resnapshots.inc();
    if let Ok((sub, snap, _)) =
        st.state
            .hub
            .subscribe(&st.sub.table, st.sub.keys.clone(), None, Format::Patch)
    {
        st.sub = sub;
        st.queue.clear();
        st.queue.extend(snap);
    }
}
