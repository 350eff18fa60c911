//! WebSocket endpoint: `GET /ws?table=T[&keys=..][&since=TOKEN][&format=patch|rows]`, and `GET /`
//! with an upgrade (the seed system's clients connect to `ws://host:port/`: in `format=rows`
//! without `?table=`, they get every table's rows).
//!
//! One task per connection, holding a [`Session`]. It writes what is pending whenever the socket
//! takes it. A client that cannot take its pending output (the snapshot on connect included)
//! within the slow-client deadline is closed with 1008, and no write outlasts a shutdown. While
//! a write waits, the session goes on reading its updates (composed per row past a few frames),
//! so the hub keeps nothing for a slow socket; one that still falls behind a table's updates
//! (the session waited on a snapshot to build) gets a fresh snapshot of it.
//! Its publishes go only where its current token allows (`Access::publish_context`), and none
//! once the token expired.
//! Nothing a client sends can panic the server.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use serde_json::json;
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use super::protocol::{ClientMessage, ErrorCode, Format, Outgoing, SubscribeQuery};
use super::selector::Selector;
use super::session::{error, Session, Waiting};
use super::subscription::SharedFrame;
use super::{record_sent, ConnectionSlot};
use crate::auth::{Access, Credentials, Refused};
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::net::rate::MessageRate;
use crate::publish::{Nack, NackCode, PublishFuture, PublishRequest, Reply};

/// Upgrades to a WebSocket connection, within the global connection cap.
pub async fn handler(
    State(state): State<AppState>,
    Query(q): Query<SubscribeQuery>,
    creds: Credentials,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(state, q, ws, false, creds)
}

/// The upgrade; `root`: the connection came to `/` (the seed system's clients). A token in the
/// request that does not verify is refused here (401); without one, when auth is on, the client
/// must send an `auth` message first.
pub fn upgrade(
    state: AppState,
    q: SubscribeQuery,
    ws: WebSocketUpgrade,
    root: bool,
    creds: Credentials,
) -> Response {
    let access = match creds.0 {
        Some(Err(d)) => return Refused(d).into_response(),
        Some(Ok(a)) => Some(a),
        None if state.auth.enabled() => None,
        None => Some(Access::Open),
    };
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
    let ws = ws
        .read_buffer_size(1024)
        .write_buffer_size(0)
        // snapshots go out in ~128 KiB frames, but a composed patch for a slow client can cover
        // a whole big table in one message: the write buffer must be able to hold it. Memory stays
        // bounded by the loop, which writes one batch and waits for the flush.
        .max_write_buffer_size(512 * 1024 * 1024)
        .max_message_size(max)
        .max_frame_size(max);
    // axum's upgrade task keeps the callback (what it captures) for the connection's whole life,
    // beside the connection's own future: capture one pointer, not the state and the query
    // (bench: connections-snapshot)
    let captured = Box::new((state, Opening { q, root, access }, slot));
    ws.on_upgrade(move |socket| {
        let (state, opening, slot) = *captured;
        // boxed before the task's future is built: an async block keeps what it captures for
        // its whole life, so an idle connection's task holds pointers, not the structs
        let metrics = state.metrics.clone();
        let conn = Box::new(Connection::new(state));
        let socket = Box::new(socket);
        let opening = Box::new(opening);
        async move {
            let reason = conn.run(socket, opening).await;
            metrics
                .connections_closed
                .with_label_values(&[reason])
                .inc();
            drop(slot);
        }
    })
}

/// What the upgrade request asked for, used once when the connection opens.
struct Opening {
    q: SubscribeQuery,
    /// The connection came to `/` (the seed system's clients).
    root: bool,
    /// `None`: the first message must be `auth`.
    access: Option<Access>,
}

struct Connection {
    state: AppState,
    session: Session,
    /// Publishing, when the server has writable topics: built once the connection's token is
    /// known, and given each refreshed token's grants. Boxed: most connections never publish,
    /// and every byte here is kept by each idle connection (bench: connections-snapshot).
    publish: Option<Box<crate::publish::Session>>,
    /// Answers of the publishes not yet answered (at most `max_in_flight`: more are nacked).
    /// Created by the first publish: an empty `FuturesUnordered` allocates (~140 bytes), and
    /// most connections never publish.
    answers: Option<Box<FuturesUnordered<PublishFuture>>>,
    /// Client messages under `--max-messages-per-sec` (burst: twice that).
    limiter: MessageRate,
    violations: u32,
    /// The format the upgrade asked for (`format=`, else patch on `/ws`, `--default-format` on
    /// `/`): that of every later subscription.
    format: Format,
    /// When the token expires (with the leeway): the connection ends then unless refreshed.
    /// Boxed: the loop's resting state holds a reference to it, not the 112-byte timer, and a
    /// connection without a token has none.
    expiry: Option<Pin<Box<Sleep>>>,
}

/// Publishes of one connection whose answers are not yet written; beyond, the socket is not read.
const MAX_UNANSWERED: usize = 1024;

enum Step {
    Continue,
    Close(&'static str),
}

impl Connection {
    fn new(state: AppState) -> Self {
        let session = Session::new(state.sessions.clone(), state.fanout.max_subscriptions);
        Connection {
            state,
            session,
            publish: None,
            answers: None,
            limiter: MessageRate::default(),
            violations: 0,
            format: Format::Patch,
            expiry: None,
        }
    }

    async fn run(
        mut self: Box<Self>,
        mut socket: Box<WebSocket>,
        opening: Box<Opening>,
    ) -> &'static str {
        // boxed: the opening's futures (a snapshot) are large and the loop below is where an
        // idle connection rests; unboxed, its task would keep room for both
        // taken out of its box (freed here, not at the connection's end) into the boxed opening
        let opening = {
            let boxed = opening;
            *boxed
        };
        if let Err(reason) = Box::pin(self.open(&mut socket, opening)).await {
            return reason;
        }
        self.serve(&mut socket).await
    }

    /// The opening: authentication when the upgrade carried no token, the subscription the
    /// request asked for, and what goes out first.
    async fn open(&mut self, socket: &mut WebSocket, opening: Opening) -> Result<(), &'static str> {
        let Opening { q, root, access } = opening;
        let mut initial = Vec::new();
        let access = match access {
            Some(a) => a,
            // the upgrade carried no token: the first message must be `auth`
            None => match crate::auth::ws::first_message(&self.state, socket).await {
                Ok(a) => {
                    initial.push(Outgoing::Authenticated { exp: a.expires() });
                    a
                }
                Err(reason) => return Err(reason),
            },
        };
        self.set_expiry(self.state.auth.deadline(&access));
        self.publish = self
            .state
            .publisher
            .as_ref()
            .map(|p| Box::new(p.session(access.publish_context())));
        self.session.init_access(access);
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
        self.format = format;
        let table = q.table.clone().or_else(|| {
            let list = self.state.tables.list();
            (list.len() == 1 && !(root && format == Format::Rows)).then(|| list[0].name.clone())
        });
        let selector = q.selector();
        let up_to_date = match q.up_to_date() {
            Ok(on) => on && format == Format::Rows,
            Err(e) => {
                initial.push(error(ErrorCode::BadRequest, e));
                false
            }
        };
        // after an unclean stop, a snapshot could be older than what clients were sent before it
        self.state
            .readiness
            .wait_recovered(crate::table::ingest::RECOVERY_LIMIT)
            .await;
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
        // a rows client that asked is told where the rows sent on connect end (a patch client
        // has its snapshot message)
        if up_to_date {
            initial.push(Outgoing::UpToDate);
        }
        // patch clients are told whether what they get is current (rows clients, the seed's, get
        // rows only)
        if format == Format::Patch {
            initial.extend(
                self.session
                    .watch_freshness(self.state.readiness.freshness()),
            );
        }
        // the opening (a snapshot: megabytes for a big table) is bounded like any other write:
        // a client that does not read it is closed as slow, and a shutdown does not wait for it
        // the place of snapshots of its own is given back once they are written (at once when
        // there is nothing to write)
        let held = self.session.take_places();
        if initial.is_empty() {
            return Ok(());
        }
        let out = outbox(&self.state.metrics, Vec::new(), initial);
        let waiting = Box::pin(deliver(&self.state, socket, out, &mut self.session)).await?;
        drop(held);
        if let Some(w) = waiting {
            self.session.finish(w).await;
        }
        Ok(())
    }

    /// The loop: writes what is pending, then waits for the client, the session's updates,
    /// publish answers, the token's expiry, the shutdown and the ping timer.
    async fn serve(&mut self, socket: &mut WebSocket) -> &'static str {
        let mut ping = tokio::time::interval(self.state.fanout.ping_interval);
        ping.tick().await;
        let mut last_seen = Instant::now();
        loop {
            // in a block: what is taken is not kept in the task's resting state below
            {
                let (pending, frames) = self.session.take();
                if pending.is_empty() && frames.is_empty() {
                    // nothing left to write: a place held for it goes back
                    drop(self.session.take_places());
                } else {
                    let out = outbox(&self.state.metrics, frames, pending);
                    let held = self.session.take_places();
                    let delivered = deliver(&self.state, socket, out, &mut self.session).await;
                    // written (or failed): its place goes back
                    drop(held);
                    match delivered {
                        Ok(None) => {}
                        Ok(Some(w)) => self.session.finish(w).await,
                        Err(reason) => return reason,
                    }
                }
            }
            if let Some(why) = self.session.close.take() {
                let bye = close(crate::fanout::session::RowsResync::CODE, why.reason());
                Box::pin(say_bye(socket, bye)).await;
                return "rows_resync";
            }
            tokio::select! {
                biased;
                // first: a client that keeps the socket busy (pings are not rate limited) must
                // not starve its token's expiry or the shutdown
                _ = self.state.shutdown.cancelled() => {
                    Box::pin(say_bye(socket, close(1001, "server shutting down"))).await;
                    return "shutdown";
                }
                _ = expiry(&mut self.expiry) => {
                    self.state.auth.count(&crate::auth::Denied::expired("the token expired"));
                    let bye = error(ErrorCode::TokenExpired, "the token expired; connect again with a new one (or send a refresh message before exp)".into());
                    let mut out = outbox(&self.state.metrics, Vec::new(), vec![bye]);
                    out.push_back((close(4408, "token expired"), true));
                    let _ = Box::pin(write_within(socket, out, WriteLimits::closing(), |_| ())).await;
                    return "token_expired";
                }
                // unanswered publishes are bounded: past the bound the socket is not read until
                // answers went out (the client is slowed down by TCP, nothing grows)
                msg = socket.recv(), if self.unanswered() < MAX_UNANSWERED => {
                    last_seen = Instant::now();
                    let step = match msg {
                        Some(Ok(Message::Text(text))) => match self.on_text(text.as_str()) {
                            None => Step::Continue,
                            Some(step) => step.await,
                        },
                        Some(Ok(Message::Binary(_))) => {
                            self.session.queued.push(error(ErrorCode::BadMessage, "binary frames are not supported".into()));
                            Step::Continue
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Step::Continue,
                        Some(Ok(Message::Close(_))) | None => Step::Close("client_closed"),
                        // a frame over the size limit (1009), a text frame that is not UTF-8
                        // (1007), or a reset connection
                        Some(Err(e)) => Step::Close(read_error(e)),
                    };
                    if let Step::Close(reason) = step {
                        let frame = match reason {
                            "rate_limited" => Some(close(1008, "message rate limit exceeded")),
                            "too_big" => Some(close(1009, "message too big")),
                            "invalid_utf8" => Some(close(1007, "text frame is not valid UTF-8")),
                            _ => None,
                        };
                        if let Some(frame) = frame {
                            Box::pin(say_bye(socket, frame)).await;
                        }
                        return reason;
                    }
                }
                event = self.session.next() => self.session.on_event(event).await,
                Some(reply) = next_answer(&mut self.answers), if self.unanswered() > 0 => {
                    self.session.queued.push(Outgoing::Publish(reply));
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > self.state.fanout.idle_timeout {
                        Box::pin(say_bye(socket, close(1001, "idle timeout"))).await;
                        return "idle";
                    }
                    // bounded too: a client that stopped reading has a full socket, and an
                    // unbounded ping would keep its connection (and the shutdown) waiting
                    let ping = VecDeque::from([(Message::Ping(Default::default()), false)]);
                    match Box::pin(deliver(&self.state, socket, ping, &mut self.session)).await {
                        Ok(None) => {}
                        Ok(Some(w)) => self.session.finish(w).await,
                        Err(reason) => return reason,
                    }
                }
            }
        }
    }

    /// Publishes whose answers are not yet written.
    fn unanswered(&self) -> usize {
        self.answers.as_ref().map_or(0, |a| a.len())
    }

    /// Whether the connection's token expired (its deadline, with the leeway, passed).
    fn expired(&self) -> bool {
        self.expiry
            .as_ref()
            .is_some_and(|s| tokio::time::Instant::now() >= s.deadline())
    }

    /// The token's deadline (with the leeway): the connection ends then unless refreshed.
    fn set_expiry(&mut self, at: Option<tokio::time::Instant>) {
        self.expiry = at.map(|at| Box::pin(tokio::time::sleep_until(at)));
    }

    /// A text frame: a publish is taken (`None`); any other message is handled by the future
    /// returned. Boxed: anything but a publish is rare next to publishes and updates, and a
    /// subscription's snapshot is large; and a plain function, so that the parsed message is not
    /// kept in the connection's task while it is handled (240 bytes per connection).
    fn on_text(&mut self, text: &str) -> Option<BoxFuture<'_, Step>> {
        let parsed = self.on_publish(serde_json::from_str::<ClientMessage>(text))?;
        Some(Box::pin(self.on_message(parsed)))
    }

    /// Takes a publish (`None`); gives back any other message.
    fn on_publish(
        &mut self,
        parsed: Result<ClientMessage, serde_json::Error>,
    ) -> Option<Result<ClientMessage, serde_json::Error>> {
        if let Ok(ClientMessage::Publish(req)) = parsed {
            // publishing has its own per-topic rate limits and in-flight bound
            let answer_now = |req: PublishRequest, code: NackCode, why: &'static str| {
                futures::future::ready(Reply::Nack(Nack::new(req.id, code, why))).boxed()
            };
            let refuse = |req, why| answer_now(req, NackCode::Forbidden, why);
            let answer = match &self.publish {
                None => refuse(
                    req,
                    "publishing is not enabled on this server (no [publish] topics)",
                ),
                // answers arrive in the broker's order: an answer without an id matches nothing,
                // and a retry without one would write the record twice
                Some(_) if req.id.is_none() => answer_now(
                    req,
                    NackCode::BadRequest,
                    "a publish over WebSocket needs an id (its idempotency key)",
                ),
                // the connection ends at its deadline; a publish read before that turn of the
                // loop must not pass on the expired token
                Some(_) if self.expired() => refuse(
                    req,
                    "the token expired; connect again with a new one (or send a refresh message before exp)",
                ),
                Some(p) => p.submit(req),
            };
            self.answers.get_or_insert_with(Box::default).push(answer);
            return None;
        }
        Some(parsed)
    }

    async fn on_message(&mut self, parsed: Result<ClientMessage, serde_json::Error>) -> Step {
        if !self.limiter.check(&self.state.fanout.message_quota) {
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
            // taken by `on_publish` before this is called
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
                let format = self.session.format().unwrap_or(self.format);
                let columns = columns.map(|c| c.spec());
                self.state
                    .readiness
                    .wait_recovered(crate::table::ingest::RECOVERY_LIMIT)
                    .await;
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
            Ok(ClientMessage::Auth { token } | ClientMessage::Refresh { token }) => {
                match self.state.auth.verify(&token) {
                    Ok(access) => {
                        self.set_expiry(self.state.auth.deadline(&access));
                        if let Some(p) = self.publish.as_mut() {
                            p.set_context(access.publish_context());
                        }
                        let mut out = vec![Outgoing::Authenticated {
                            exp: access.expires(),
                        }];
                        out.extend(self.session.set_access(access).await);
                        out
                    }
                    // a refresh that does not verify keeps the current token (it still
                    // expires as before); one that names an expired token is refused alike
                    Err(d) => vec![error(
                        ErrorCode::Unauthorized,
                        format!("token refused: {}", d.reason),
                    )],
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
}

/// What one turn of the loop writes, in order: the shared patch frames, then the messages, each
/// marked when a flush must follow it (a big snapshot goes out frame by frame, so the socket's
/// buffer stays small). The metrics count them as queued for the socket.
fn outbox(m: &Metrics, frames: Vec<SharedFrame>, out: Vec<Outgoing>) -> VecDeque<(Message, bool)> {
    for f in &frames {
        m.patches_sent.inc();
        m.sent_bytes
            .with_label_values(&["patch"])
            .inc_by(f.text.len() as u64);
        super::record_latency(m, f.ts_ms, f.kafka_ts_ms, f.polled);
    }
    // collected in place (the frames' allocation is reused; no new one on the update path)
    let mut q: Vec<(Message, bool)> = frames
        .into_iter()
        .map(|f| (Message::Text(f.text), false))
        .collect();
    for o in &out {
        let parts = o.frames();
        record_sent(m, o, &parts);
        let many = parts.len() > 1;
        q.extend(parts.into_iter().map(|f| (Message::Text(f), many)));
    }
    VecDeque::from(q)
}

/// Writes `out` within the slow-client deadline, unless the server shuts down first. When it
/// cannot, the client is told why (1008 slow consumer, 1001 shutting down) where the socket
/// still takes it, and the close reason is returned.
///
/// While the socket makes the write wait, the session goes on taking its updates into its
/// pending output (composed per row past a few frames), so a slow socket does not leave them
/// to the hub; until one needs to wait (a snapshot to build), which is returned to be done
/// once the write is.
async fn deliver(
    state: &AppState,
    socket: &mut WebSocket,
    out: VecDeque<(Message, bool)>,
    session: &mut Session,
) -> Result<Option<Waiting>, &'static str> {
    let limits = WriteLimits {
        within: Some(state.fanout.slow_client),
        shutdown: Some(&state.shutdown),
    };
    let mut waiting = None;
    let written = write_within(socket, out, limits, |cx| {
        if waiting.is_none() {
            if let Poll::Ready(w) = session.poll_take(cx) {
                waiting = Some(w);
            }
        }
    })
    .await;
    match written {
        Ok(()) => Ok(waiting),
        Err(WriteFailed::Socket) => Err("write_error"),
        Err(WriteFailed::TooSlow) => {
            state.metrics.slow_client_disconnects.inc();
            let bye = close(1008, "slow consumer: pending changes not taken in time");
            Box::pin(say_bye(socket, bye)).await;
            Err("slow_client")
        }
        Err(WriteFailed::Shutdown) => {
            Box::pin(say_bye(socket, close(1001, "server shutting down"))).await;
            Err("shutdown")
        }
    }
}

/// Why [`write_within`] gave up.
enum WriteFailed {
    Socket,
    /// Not written within the limit.
    TooSlow,
    /// The server is shutting down.
    Shutdown,
}

/// What ends a write that the socket makes wait.
struct WriteLimits<'a> {
    within: Option<std::time::Duration>,
    shutdown: Option<&'a CancellationToken>,
}

impl WriteLimits<'_> {
    /// A close frame's: [`CLOSE_WAIT`], shutdown or not (it is what a shutdown writes).
    fn closing() -> Self {
        WriteLimits {
            within: Some(CLOSE_WAIT),
            shutdown: None,
        }
    }
}

/// Writes `out` (flushing where marked) and flushes, within `limits`, calling `meanwhile` each
/// time the socket makes it wait (with the task's context: what it polls wakes the write's
/// task). A poll over the queue
/// rather than an `async` send per message: the connection's task keeps room for whatever its
/// loop awaits, for its whole life (bench: connections-snapshot), and this wait is on every
/// update's path. The timer and the shutdown's waiter are only made (boxed) once the socket makes
/// the write wait: most writes complete at once, and the connection's task would otherwise keep
/// room for them in every connection.
async fn write_within(
    socket: &mut WebSocket,
    mut out: VecDeque<(Message, bool)>,
    limits: WriteLimits<'_>,
    mut meanwhile: impl FnMut(&mut std::task::Context<'_>),
) -> Result<(), WriteFailed> {
    let started = tokio::time::Instant::now();
    let mut socket = Pin::new(socket);
    let mut flushing = false;
    let mut deadline: Option<Pin<Box<Sleep>>> = None;
    let mut stopping: Option<Pin<Box<WaitForCancellationFuture<'_>>>> = None;
    std::future::poll_fn(move |cx| {
        let written = poll_write(&mut socket, &mut out, &mut flushing, cx);
        if written.is_ready() {
            return written.map_err(|()| WriteFailed::Socket);
        }
        meanwhile(cx);
        if let Some(limit) = limits.within {
            let timer =
                deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(started + limit)));
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(WriteFailed::TooSlow));
            }
        }
        if let Some(token) = limits.shutdown {
            let stop = stopping.get_or_insert_with(|| Box::pin(token.cancelled()));
            if stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(WriteFailed::Shutdown));
            }
        }
        Poll::Pending
    })
    .await
}

/// Writes `out` (flushing after the messages marked), then flushes; `Err` when the socket failed.
fn poll_write(
    socket: &mut Pin<&mut WebSocket>,
    out: &mut VecDeque<(Message, bool)>,
    flushing: &mut bool,
    cx: &mut std::task::Context<'_>,
) -> Poll<Result<(), ()>> {
    use futures::Sink;
    loop {
        if *flushing {
            std::task::ready!(socket.as_mut().poll_flush(cx)).map_err(|_| ())?;
            *flushing = false;
        }
        if out.is_empty() {
            return socket.as_mut().poll_flush(cx).map_err(|_| ());
        }
        std::task::ready!(socket.as_mut().poll_ready(cx)).map_err(|_| ())?;
        let Some((message, flush)) = out.pop_front() else {
            continue;
        };
        socket.as_mut().start_send(message).map_err(|_| ())?;
        *flushing = flush;
    }
}

/// The next publish answer, as its JSON text (never, without publishes). Text, not the `Reply`:
/// the loop's select keeps room for the largest of its branches' outputs, for every connection.
async fn next_answer(answers: &mut Option<Box<FuturesUnordered<PublishFuture>>>) -> Option<String> {
    match answers {
        Some(a) => a.next().await.map(|r| r.to_json()),
        None => std::future::pending().await,
    }
}

/// Waits until the token expires (forever without one).
async fn expiry(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The close reason of a failed read: a frame over the limit, a text frame that is not UTF-8,
/// or the connection itself (reset, idle timeout).
fn read_error(e: axum::Error) -> &'static str {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => match *e {
            tungstenite::Error::Capacity(_) => "too_big",
            tungstenite::Error::Utf8(_) => "invalid_utf8",
            _ => "read_error",
        },
        Err(_) => "read_error",
    }
}

/// How long a close frame may take to be written: the client may not be reading (a slow
/// client's socket is full), and the connection must end anyway.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes a close frame, giving up after [`CLOSE_WAIT`].
async fn say_bye(socket: &mut WebSocket, frame: Message) {
    let _ = write_within(
        socket,
        VecDeque::from([(frame, true)]),
        WriteLimits::closing(),
        |_| (),
    )
    .await;
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

#[cfg(test)]
mod tests;
