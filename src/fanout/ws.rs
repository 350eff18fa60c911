//! WebSocket endpoint: `GET /ws?table=T[&keys=..][&since=E:S][&format=patch|rows]`, and `GET /`
//! with an upgrade (the seed system's clients connect to `ws://host:port/`).
//!
//! One task per connection. It subscribes to the hub's updates before taking a snapshot, absorbs
//! every update into its subscriptions (composing while the socket is busy), and writes what is
//! pending whenever the socket takes it. A client that cannot take its pending output within the
//! slow-client deadline is closed with 1008; one that falls behind the shared update channel gets a
//! fresh snapshot. Nothing a client sends can panic the server.

use std::collections::HashSet;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::SinkExt;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::hub::{Absorbed, SharedFrame, Start, Subscription};
use super::protocol::{
    parse_keys, parse_since, ClientMessage, ErrorCode, Format, Outgoing, SubscribeQuery,
};
use super::{record_sent, ConnectionSlot};
use crate::http::AppState;

/// Upgrades to a WebSocket connection, within the global connection cap.
pub async fn handler(
    State(state): State<AppState>,
    Query(q): Query<SubscribeQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(slot) = ConnectionSlot::acquire(
        &state.connections,
        state.fanout.max_connections,
        &state.metrics,
    ) else {
        state
            .metrics
            .protocol_errors
            .with_label_values(&[ErrorCode::ServerBusy.as_str()])
            .inc();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "too many connections"})),
        )
            .into_response();
    };
    state
        .metrics
        .connections_opened
        .with_label_values(&["ws"])
        .inc();
    let max = state.fanout.max_message_bytes;
    // clients send small control messages: a 1 KiB read buffer (it grows for a bigger frame) keeps
    // an idle connection small (bench: RSS per idle connection)
    ws.read_buffer_size(1024)
        .write_buffer_size(0)
        // snapshots go out in ~128 KiB frames, but a composed patch for a slow client can cover
        // a whole big table in one message: the write buffer must be able to hold it. Memory stays
        // bounded by the loop, which writes one batch and waits for the flush.
        .max_write_buffer_size(512 * 1024 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let reason = Connection::new(state.clone()).run(socket, q).await;
            state
                .metrics
                .connections_closed
                .with_label_values(&[reason])
                .inc();
            drop(slot);
        })
}

/// Shared frames a connection queues before it switches to composing.
const MAX_QUEUED_FRAMES: usize = 16;

struct Connection {
    state: AppState,
    subs: Vec<Subscription>,
    tokens: f64,
    last_refill: Instant,
    violations: u32,
    /// Whole messages waiting to be written before the subscriptions' pending patches.
    queued: Vec<Outgoing>,
    /// Shared, already serialised patch frames (with their `ts_ms`), written as they are.
    frames: Vec<SharedFrame>,
}

enum Step {
    Continue,
    Close(&'static str),
}

impl Connection {
    fn new(state: AppState) -> Self {
        let tokens = state.fanout.messages_per_sec * 2.0;
        Connection {
            state,
            subs: Vec::new(),
            tokens,
            last_refill: Instant::now(),
            violations: 0,
            queued: Vec::new(),
            frames: Vec::new(),
        }
    }

    async fn run(mut self, mut socket: WebSocket, q: SubscribeQuery) -> &'static str {
        let mut updates = self.state.hub.updates();
        let format = match q.format.as_deref() {
            // `/ws` speaks patches unless asked; `/` resolves --default-format before it gets here
            None => Format::Patch,
            Some(f) => match Format::parse(f) {
                Some(f) => f,
                None => {
                    let _ = self
                        .send(
                            &mut socket,
                            vec![error(
                                ErrorCode::BadRequest,
                                format!("unknown format `{f}`: use patch or rows"),
                            )],
                        )
                        .await;
                    self.state.fanout.default_format
                }
            },
        };
        let table = q.table.clone().or_else(|| {
            let list = self.state.tables.list();
            (list.len() == 1).then(|| list[0].name.clone())
        });
        let initial = match table {
            Some(table) => self.subscribe(
                &table,
                parse_keys(q.keys.as_deref()),
                q.since.as_deref(),
                format,
            ),
            None if q.table.is_none() && self.state.tables.list().is_empty() => Vec::new(),
            None => vec![error(
                ErrorCode::BadRequest,
                "several tables are served: pass ?table= or send a subscribe message".into(),
            )],
        };
        if self.send(&mut socket, initial).await.is_err() {
            return "write_error";
        }
        let mut ping = tokio::time::interval(self.state.fanout.ping_interval);
        ping.tick().await;
        let mut last_seen = Instant::now();
        loop {
            let mut pending: Vec<Outgoing> = std::mem::take(&mut self.queued);
            pending.extend(self.subs.iter_mut().flat_map(Subscription::take));
            let frames = std::mem::take(&mut self.frames);
            if !pending.is_empty() || !frames.is_empty() {
                let write = async {
                    self.send_frames(&mut socket, frames).await?;
                    self.send(&mut socket, pending).await
                };
                match tokio::time::timeout(self.state.fanout.slow_client, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(())) => return "write_error",
                    Err(_) => {
                        self.state.metrics.slow_client_disconnects.inc();
                        let _ = socket
                            .send(close(
                                1008,
                                "slow consumer: pending changes not taken in time",
                            ))
                            .await;
                        return "slow_client";
                    }
                }
            }
            tokio::select! {
                biased;
                msg = socket.recv() => {
                    last_seen = Instant::now();
                    let step = match msg {
                        Some(Ok(Message::Text(text))) => self.on_text(&mut socket, text.as_str()).await,
                        Some(Ok(Message::Binary(_))) => self.reply(&mut socket, error(ErrorCode::BadMessage, "binary frames are not supported".into())).await,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Step::Continue,
                        Some(Ok(Message::Close(_))) | None => Step::Close("client_closed"),
                        // a reset connection, or a frame over the size limit (the WebSocket layer refuses it)
                        Some(Err(_)) => Step::Close("read_error"),
                    };
                    if let Step::Close(reason) = step {
                        return reason;
                    }
                }
                update = updates.recv() => match update {
                    Ok(u) => {
                        self.absorb(&u);
                        for _ in 0..1024 {
                            match updates.try_recv() {
                                Ok(u) => self.absorb(&u),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        let out = self.resnapshot();
                        if self.send(&mut socket, out).await.is_err() {
                            return "write_error";
                        }
                    }
                    Err(RecvError::Closed) => {
                        let _ = socket.send(close(1001, "server shutting down")).await;
                        return "shutdown";
                    }
                },
                _ = ping.tick() => {
                    if last_seen.elapsed() > self.state.fanout.idle_timeout {
                        let _ = socket.send(close(1001, "idle timeout")).await;
                        return "idle";
                    }
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return "write_error";
                    }
                }
            }
        }
    }

    fn absorb(&mut self, u: &crate::table::ingest::TableUpdate) {
        let mut stale = Vec::new();
        for (i, s) in self.subs.iter_mut().enumerate() {
            // up to date: forward the shared frame; once a few frames wait for the socket,
            // compose further changes into one pending patch instead (bounded by the rows)
            if self.frames.len() < MAX_QUEUED_FRAMES {
                if let Some(frame) = s.forward(u) {
                    self.frames.push(frame);
                    continue;
                }
            }
            let before = s.pending_rows();
            if s.absorb(u) == Absorbed::EpochChanged {
                stale.push(i);
            } else if before > 0 {
                self.state
                    .metrics
                    .conflated_changes
                    .inc_by(u.changes.len() as u64);
            }
        }
        // the table was restored or reset: a new lineage, so a new snapshot
        for i in stale {
            let (table, keys, format) = (
                self.subs[i].table.clone(),
                self.subs[i].keys.clone(),
                self.subs[i].format,
            );
            if let Ok((sub, snapshot, _)) = self.state.hub.subscribe(&table, keys, None, format) {
                self.state.metrics.resnapshots.inc();
                self.subs[i] = sub;
                self.queued.extend(snapshot);
            }
        }
    }

    /// Fresh snapshots for every subscription (after falling behind the update channel).
    fn resnapshot(&mut self) -> Vec<Outgoing> {
        self.state.metrics.resnapshots.inc();
        let mut out = Vec::new();
        for s in &mut self.subs {
            if let Ok((sub, snap, _)) =
                self.state
                    .hub
                    .subscribe(&s.table, s.keys.clone(), None, s.format)
            {
                *s = sub;
                out.extend(snap);
            }
        }
        out
    }

    fn subscribe(
        &mut self,
        table: &str,
        keys: Option<HashSet<String>>,
        since: Option<&str>,
        format: Format,
    ) -> Vec<Outgoing> {
        let since = match since.map(|s| (s, parse_since(s))) {
            Some((raw, None)) => {
                return vec![error(
                    ErrorCode::BadRequest,
                    format!("since `{raw}` is not EPOCH:SEQ"),
                )]
            }
            Some((_, parsed)) => parsed,
            None => None,
        };
        self.subs.retain(|s| s.table != table);
        if self.subs.len() >= self.state.fanout.max_subscriptions {
            return vec![error(
                ErrorCode::TooManySubscriptions,
                format!(
                    "at most {} subscriptions per connection",
                    self.state.fanout.max_subscriptions
                ),
            )];
        }
        match self.state.hub.subscribe(table, keys, since, format) {
            Ok((sub, out, start)) => {
                match start {
                    Start::ResumeHit => {
                        self.state.metrics.resumes.with_label_values(&["hit"]).inc()
                    }
                    Start::ResumeMiss => self
                        .state
                        .metrics
                        .resumes
                        .with_label_values(&["miss"])
                        .inc(),
                    Start::Snapshot => {}
                }
                self.subs.push(sub);
                out
            }
            Err(e) => vec![error(ErrorCode::UnknownTable, e.to_string())],
        }
    }

    async fn on_text(&mut self, socket: &mut WebSocket, text: &str) -> Step {
        if !self.take_token() {
            self.violations += 1;
            if self.violations > 100 {
                let _ = socket
                    .send(close(1008, "message rate limit exceeded"))
                    .await;
                return Step::Close("rate_limited");
            }
            return self
                .reply(
                    socket,
                    error(
                        ErrorCode::RateLimited,
                        "too many messages; this one was dropped".into(),
                    ),
                )
                .await;
        }
        let out = match serde_json::from_str::<ClientMessage>(text) {
            Ok(ClientMessage::Ping) => vec![Outgoing::Pong],
            Ok(ClientMessage::Subscribe { table, keys, since }) => {
                let keys = keys
                    .map(|k| k.into_iter().collect::<HashSet<_>>())
                    .filter(|k| !k.is_empty());
                let format = self
                    .subs
                    .first()
                    .map_or(self.state.fanout.default_format, |s| s.format);
                self.subscribe(&table, keys, since.as_deref(), format)
            }
            Ok(ClientMessage::Unsubscribe { table }) => {
                let before = self.subs.len();
                self.subs.retain(|s| s.table != table);
                if before == self.subs.len() {
                    vec![error(
                        ErrorCode::BadRequest,
                        format!("not subscribed to `{table}`"),
                    )]
                } else {
                    Vec::new()
                }
            }
            Err(e) => vec![error(
                ErrorCode::BadMessage,
                format!("invalid message: {e}"),
            )],
        };
        match self.send(socket, out).await {
            Ok(()) => Step::Continue,
            Err(()) => Step::Close("write_error"),
        }
    }

    async fn reply(&mut self, socket: &mut WebSocket, out: Outgoing) -> Step {
        match self.send(socket, vec![out]).await {
            Ok(()) => Step::Continue,
            Err(()) => Step::Close("write_error"),
        }
    }

    fn take_token(&mut self) -> bool {
        let rate = self.state.fanout.messages_per_sec;
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last_refill).as_secs_f64() * rate)
            .min(rate * 2.0);
        self.last_refill = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Writes shared frames (no flush: [`Connection::send`] follows).
    async fn send_frames(
        &self,
        socket: &mut WebSocket,
        frames: Vec<SharedFrame>,
    ) -> Result<(), ()> {
        let m = &self.state.metrics;
        let flush = !frames.is_empty();
        for f in frames {
            m.patches_sent.inc();
            m.sent_bytes
                .with_label_values(&["patch"])
                .inc_by(f.text.len() as u64);
            super::record_latency(m, f.ts_ms, f.kafka_ts_ms);
            socket.feed(Message::Text(f.text)).await.map_err(|_| ())?;
        }
        if flush {
            socket.flush().await.map_err(|_| ())?;
        }
        Ok(())
    }

    /// Writes frames with one flush.
    async fn send(&self, socket: &mut WebSocket, out: Vec<Outgoing>) -> Result<(), ()> {
        if out.is_empty() {
            return Ok(());
        }
        for o in &out {
            let frames = o.frames();
            record_sent(&self.state.metrics, o, &frames);
            let many = frames.len() > 1;
            for f in frames {
                socket.feed(Message::Text(f)).await.map_err(|_| ())?;
                if many {
                    // a big snapshot goes out frame by frame: the socket's buffer stays small
                    socket.flush().await.map_err(|_| ())?;
                }
            }
        }
        socket.flush().await.map_err(|_| ())
    }
}

fn error(code: ErrorCode, message: String) -> Outgoing {
    Outgoing::Error { code, message }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}
