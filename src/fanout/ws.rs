//! WebSocket endpoint: `GET /ws?table=T[&keys=..][&since=TOKEN][&format=patch|rows]`, and `GET /`
//! with an upgrade (the seed system's clients connect to `ws://host:port/`: in `format=rows`
//! without `?table=`, they get every table's rows).
//!
//! One task per connection, holding a [`Session`]. It writes what is pending whenever the socket
//! takes it. A client that cannot take its pending output within the slow-client deadline is
//! closed with 1008; one that falls behind a table's update channel gets a fresh snapshot of it.
//! Nothing a client sends can panic the server.

use std::collections::HashSet;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use serde_json::json;

use super::protocol::{ClientMessage, ErrorCode, Format, Outgoing, SubscribeQuery};
use super::selector::Selector;
use super::session::{error, Session};
use super::subscription::SharedFrame;
use super::{record_sent, ConnectionSlot};
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::publish::{Nack, NackCode, PublishContext, PublishFuture, Reply};

/// Upgrades to a WebSocket connection, within the global connection cap.
pub async fn handler(
    State(state): State<AppState>,
    Query(q): Query<SubscribeQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(state, q, ws, false)
}

/// The upgrade; `root`: the connection came to `/` (the seed system's clients).
pub fn upgrade(state: AppState, q: SubscribeQuery, ws: WebSocketUpgrade, root: bool) -> Response {
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
            let reason = Connection::new(state.clone()).run(socket, q, root).await;
            state
                .metrics
                .connections_closed
                .with_label_values(&[reason])
                .inc();
            drop(slot);
        })
}

struct Connection {
    state: AppState,
    session: Session,
    /// Publishing, when the server has writable topics.
    publish: Option<crate::publish::Session>,
    /// Answers of the publishes not yet answered (at most `max_in_flight`: more are nacked).
    answers: FuturesUnordered<PublishFuture>,
    tokens: f64,
    last_refill: Instant,
    violations: u32,
}

/// Publishes of one connection whose answers are not yet written; beyond, the socket is not read.
const MAX_UNANSWERED: usize = 1024;

enum Step {
    Continue,
    Close(&'static str),
}

impl Connection {
    fn new(state: AppState) -> Self {
        let tokens = state.fanout.messages_per_sec * 2.0;
        let session = Session::new(
            state.hub.clone(),
            state.metrics.clone(),
            state.fanout.resume_wait,
            state.fanout.max_subscriptions,
            state.fanout.unions.clone(),
        );
        let publish = state
            .publisher
            .as_ref()
            .map(|p| p.session(PublishContext::default()));
        Connection {
            state,
            session,
            publish,
            answers: FuturesUnordered::new(),
            tokens,
            last_refill: Instant::now(),
            violations: 0,
        }
    }

    async fn run(mut self, mut socket: WebSocket, q: SubscribeQuery, root: bool) -> &'static str {
        let mut initial = Vec::new();
        let format = match q.format.as_deref() {
            // `/ws` speaks patches unless asked; `/` uses --default-format
            None if root => self.state.fanout.default_format,
            None => Format::Patch,
            Some(f) => match Format::parse(f) {
                Some(f) => f,
                None => {
                    initial.push(error(
                        ErrorCode::BadRequest,
                        format!("unknown format `{f}`: use patch or rows"),
                    ));
                    Format::Patch
                }
            },
        };
        let table = q.table.clone().or_else(|| {
            let list = self.state.tables.list();
            (list.len() == 1 && !(root && format == Format::Rows)).then(|| list[0].name.clone())
        });
        let selector = q.selector();
        match (table, selector) {
            (_, Err(e)) => initial.push(error(ErrorCode::BadRequest, e)),
            (Some(table), Ok(selector)) => initial.extend(
                self.session
                    .subscribe(&table, selector, q.since.as_deref(), format)
                    .await,
            ),
            // the seed system's clients: every table's rows, as tables appear
            (None, Ok(_)) if format == Format::Rows => initial.extend(
                self.session
                    .subscribe_all_rows(self.state.fanout.root_tables.clone())
                    .await,
            ),
            (None, Ok(_)) if self.state.tables.list().is_empty() => {}
            (None, Ok(_)) => initial.push(error(
                ErrorCode::BadRequest,
                "several tables are served: pass ?table= or send a subscribe message".into(),
            )),
        }
        // patch clients are told whether what they get is current (rows clients, the seed's, get
        // rows only)
        if format == Format::Patch {
            initial.extend(
                self.session
                    .watch_freshness(self.state.readiness.freshness()),
            );
        }
        if send(&self.state.metrics, &mut socket, initial)
            .await
            .is_err()
        {
            return "write_error";
        }
        let mut ping = tokio::time::interval(self.state.fanout.ping_interval);
        ping.tick().await;
        let mut last_seen = Instant::now();
        loop {
            let (pending, frames) = self.session.take();
            if !pending.is_empty() || !frames.is_empty() {
                let write = async {
                    send_frames(&self.state.metrics, &mut socket, frames).await?;
                    send(&self.state.metrics, &mut socket, pending).await
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
                // unanswered publishes are bounded: past the bound the socket is not read until
                // answers went out (the client is slowed down by TCP, nothing grows)
                msg = socket.recv(), if self.answers.len() < MAX_UNANSWERED => {
                    last_seen = Instant::now();
                    let step = match msg {
                        Some(Ok(Message::Text(text))) => self.on_text(text.as_str()).await,
                        Some(Ok(Message::Binary(_))) => {
                            self.session.queued.push(error(ErrorCode::BadMessage, "binary frames are not supported".into()));
                            Step::Continue
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Step::Continue,
                        Some(Ok(Message::Close(_))) | None => Step::Close("client_closed"),
                        // a reset connection, or a frame over the size limit (the WebSocket layer refuses it)
                        Some(Err(_)) => Step::Close("read_error"),
                    };
                    if let Step::Close(reason) = step {
                        if reason == "rate_limited" {
                            let _ = socket.send(close(1008, "message rate limit exceeded")).await;
                        }
                        return reason;
                    }
                }
                event = self.session.next() => self.session.on_event(event).await,
                Some(reply) = self.answers.next(), if !self.answers.is_empty() => {
                    self.session.queued.push(Outgoing::Publish(reply.to_json()));
                }
                _ = self.state.shutdown.cancelled() => {
                    let _ = socket.send(close(1001, "server shutting down")).await;
                    return "shutdown";
                }
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

    async fn on_text(&mut self, text: &str) -> Step {
        let parsed = serde_json::from_str::<ClientMessage>(text);
        if let Ok(ClientMessage::Publish(req)) = parsed {
            // publishing has its own per-topic rate limits and in-flight bound
            let answer = match &self.publish {
                Some(p) => p.submit(req),
                None => futures::future::ready(Reply::Nack(Nack::new(
                    req.id,
                    NackCode::Forbidden,
                    "publishing is not enabled on this server (no [publish] topics)",
                )))
                .boxed(),
            };
            self.answers.push(answer);
            return Step::Continue;
        }
        if !self.take_token() {
            self.violations += 1;
            if self.violations > 100 {
                return Step::Close("rate_limited");
            }
            self.session.queued.push(error(
                ErrorCode::RateLimited,
                "too many messages; this one was dropped".into(),
            ));
            return Step::Continue;
        }
        let out = match parsed {
            Ok(ClientMessage::Ping) => vec![Outgoing::Pong],
            Ok(ClientMessage::Publish(_)) => Vec::new(),
            Ok(ClientMessage::Subscribe {
                table,
                keys,
                since,
                filter,
                columns,
            }) => {
                let keys = keys
                    .map(|k| k.into_iter().collect::<HashSet<_>>())
                    .filter(|k| !k.is_empty());
                let format = self
                    .session
                    .format()
                    .unwrap_or(self.state.fanout.default_format);
                let columns = columns.map(|c| c.spec());
                match Selector::build(keys, filter.as_deref(), columns.as_deref()) {
                    Ok(selector) => {
                        self.session
                            .subscribe(&table, selector, since.as_deref(), format)
                            .await
                    }
                    Err(e) => vec![error(ErrorCode::BadRequest, e)],
                }
            }
            Ok(ClientMessage::Unsubscribe { table }) => {
                if self.session.unsubscribe(&table) {
                    Vec::new()
                } else {
                    vec![error(
                        ErrorCode::BadRequest,
                        format!("not subscribed to `{table}`"),
                    )]
                }
            }
            Err(e) => vec![error(
                ErrorCode::BadMessage,
                format!("invalid message: {e}"),
            )],
        };
        self.session.queued.extend(out);
        Step::Continue
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
}

/// Writes shared frames (no flush: [`send`] follows).
async fn send_frames(
    m: &Metrics,
    socket: &mut WebSocket,
    frames: Vec<SharedFrame>,
) -> Result<(), ()> {
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

/// Writes messages with one flush.
async fn send(metrics: &Metrics, socket: &mut WebSocket, out: Vec<Outgoing>) -> Result<(), ()> {
    if out.is_empty() {
        return Ok(());
    }
    for o in &out {
        let frames = o.frames();
        record_sent(metrics, o, &frames);
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

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}
