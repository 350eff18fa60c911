//! The subscriptions of one live connection, whatever its transport: tables (or keys of them),
//! unions of tables, every table (`format=rows` on `/`), and subscriptions waiting for a table
//! that does not exist yet. It absorbs updates from the hub (one broadcast channel per table, or
//! for a subscription by keys or an indexed `where`, the updates routed to it) and hands out what
//! is pending for the client.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use serde_json::{Map, Value};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};
use tokio_stream::StreamMap;

use super::route::{RouteSpec, RoutedFeed};

use super::hub::{rekey, union_key, Hub, HubUpdate, Missed, Sent, Start, SubscribeError};
use super::protocol::{ErrorCode, Format, Outgoing};
use super::selector::Selector;
use super::snapshot::frames;
use super::subscription::{Absorbed, SharedFrame, Subscription};
use crate::auth::{Access, Denied};
use crate::config::UnionDef;
use crate::metrics::Metrics;

/// Shared frames a connection queues before it switches to composing.
pub const MAX_QUEUED_FRAMES: usize = 16;
/// Bytes of shared frames a connection queues before it switches to composing (a frame it holds
/// outlives the hub's copy of its update).
pub const MAX_QUEUED_FRAME_BYTES: usize = 1 << 20;

/// A subscription's place in the session.
struct Member {
    sub: Subscription,
    /// The union it belongs to (rows rekeyed `table/key`, sent as the union's).
    union: Option<String>,
    /// What the client asked for, before the token's grants narrowed it (`sub.selector`).
    /// `None` when the access narrows nothing (no token: the same as `sub.selector`). Boxed:
    /// each member is kept for the connection's life (bench: connections-snapshot).
    requested: Option<Box<Selector>>,
    /// Its own routed feed (`None`: the table's broadcast channel, shared by the session).
    feed: Option<u64>,
}

impl Member {
    /// Whether it reads feed `key` (its table's, shared or its own).
    fn reads(&self, key: &FeedKey) -> bool {
        self.sub.table == key.0 && self.feed == key.1
    }

    /// What the client asked for, before the token's grants narrowed it.
    fn requested(&self) -> Selector {
        match &self.requested {
            Some(r) => Selector::clone(r),
            None => self.sub.selector.clone(),
        }
    }
}

/// A feed of a session: a table's broadcast channel (`None`) or one member's routed feed.
type FeedKey = (String, Option<u64>);

/// Where a session's updates come from.
enum Feed {
    /// Weak references, as the hub sends them: one that no longer upgrades was dropped by the
    /// hub's byte budget before it was read.
    Broadcast(BroadcastStream<Sent>),
    Routed(RoutedFeed),
}

impl futures::Stream for Feed {
    type Item = Result<Arc<HubUpdate>, Missed>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.get_mut() {
            Feed::Broadcast(b) => b.poll_next_unpin(cx).map(|o| {
                o.map(|r| match r {
                    Ok(sent) => sent.take(),
                    Err(BroadcastStreamRecvError::Lagged(_)) => Err(Missed::Lagged),
                })
            }),
            Feed::Routed(r) => r.poll_next_unpin(cx),
        }
    }
}

/// A subscription waiting for its table.
struct Waiter {
    table: String,
    selector: Selector,
    format: Format,
}

/// What happened on the session's channels.
pub enum Event {
    /// The node became caught up, or stopped being.
    Freshness(crate::table::readiness::Freshness),
    Update(FeedKey, Result<Arc<HubUpdate>, Missed>),
    Created(String),
    /// Table creations were missed (the notification channel lagged): look at every table.
    Rescan,
}

/// What an event left to do that must wait (a snapshot to build), taken out of it without
/// waiting: [`Session::finish`] does it.
pub struct Waiting(Wait);

enum Wait {
    /// Members whose table's lineage changed (taken out by [`Session::absorb`]).
    Restart(Vec<Member>),
    /// A feed that lost a member something: its members start again.
    Resnapshot(FeedKey),
    Created(String),
    Rescan,
}

/// Events [`Session::poll_take`] takes in one poll (each an update, or what was ready on the
/// feeds, up to 1,024 updates) before it lets its task's other work go first.
const TAKEN_PER_POLL: usize = 16;

/// One connection's subscriptions.
pub struct Session {
    env: Arc<SessionEnv>,
    members: Vec<Member>,
    streams: StreamMap<FeedKey, Feed>,
    /// The last routed feed id given out.
    last_feed: u64,
    /// Waiting subscriptions, unions, the every-table mode: `None` until one is used.
    rare: Option<Box<Rare>>,
    /// The tables created since (a subscription waits for its table, or every table is
    /// wanted). Streams, not receivers awaited in [`Session::next`]: the connection's task keeps
    /// room for what it awaits while idle, for every connection (bench: connections-snapshot).
    created: Option<BroadcastStream<String>>,
    /// Whether the node is caught up (patch-format sessions are told when it changes).
    freshness: Option<WatchStream<crate::table::readiness::Freshness>>,
    /// What the connection's token allows; every subscription is narrowed by it.
    access: Access,
    /// Whole messages waiting to be written before the pending patches.
    pub queued: Vec<Outgoing>,
    /// Shared, already serialised patch frames, written as they are.
    pub frames: Vec<SharedFrame>,
    /// Set when the connection must be closed after what is pending: a `format=rows`
    /// subscription could not be continued exactly (see [`Session::restart`]).
    pub close: Option<RowsResync>,
    max_subscriptions: u32,
}

/// What every session of a listener shares (one pointer per session instead of a copy of each
/// handle: bench connections-snapshot).
pub struct SessionEnv {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// How long a resume waits for this node to reach the client's position.
    pub resume_wait: Duration,
    pub unions: Arc<[UnionDef]>,
    /// Places of copies made for one client (`--max-table-copies`).
    pub copies: Arc<crate::fanout::copies::Copies>,
}

/// What few sessions use, boxed: each session is kept for its connection's life.
#[derive(Default)]
struct Rare {
    waiting: Vec<Waiter>,
    /// Unions this session subscribed to, with their format.
    open_unions: Vec<(String, Format)>,
    /// `Some`: every table (matching the pattern) in `format=rows`.
    all_rows: Option<Option<regex::Regex>>,
    /// The places of snapshots of this session's own not yet written (see
    /// [`Session::take_places`]).
    held: Vec<crate::fanout::copies::Place>,
}

/// Why a `format=rows` connection is closed. The format has no message that replaces what the
/// client holds, so a list of the current rows on an open connection would leave on the client
/// the rows it should no longer hold. Reconnecting starts it over with the current rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsResync {
    /// It fell behind its table further than the replay buffer reaches, or the table's lineage
    /// changed.
    Behind,
    /// A refreshed token changed the grants: rows it may no longer read would stay.
    Grants,
}

impl RowsResync {
    /// The WebSocket close code (application range).
    pub const CODE: u16 = 4409;

    pub fn reason(self) -> &'static str {
        match self {
            RowsResync::Behind => "fell behind the table: reconnect for its current rows",
            RowsResync::Grants => "the grants changed: reconnect for the rows they allow",
        }
    }
}

impl Session {
    pub fn new(env: Arc<SessionEnv>, max_subscriptions: usize) -> Self {
        Session {
            env,
            max_subscriptions: u32::try_from(max_subscriptions).unwrap_or(u32::MAX),
            members: Vec::new(),
            streams: StreamMap::new(),
            last_feed: 0,
            rare: None,
            created: None,
            freshness: None,
            access: Access::Open,
            queued: Vec::new(),
            frames: Vec::new(),
            close: None,
        }
    }

    /// Tells this (patch-format) session when the node stops or starts being caught up; returns
    /// a status message when it is not caught up now.
    pub fn watch_freshness(
        &mut self,
        mut rx: tokio::sync::watch::Receiver<crate::table::readiness::Freshness>,
    ) -> Option<Outgoing> {
        let now = rx.borrow_and_update().clone();
        self.freshness = Some(WatchStream::from_changes(rx));
        (!now.caught_up).then_some(Outgoing::Status {
            caught_up: false,
            reason: now.reason,
        })
    }

    /// The session of a connection holding `access`.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// Sets the access of a session that holds no subscription yet.
    pub fn init_access(&mut self, access: Access) {
        self.access = access;
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// The place of the snapshots queued so far (see [`crate::fanout::copies`]): the caller
    /// drops it once what was queued before this call is written (or handed to the socket), or
    /// when nothing is queued.
    pub fn take_places(&mut self) -> Vec<crate::fanout::copies::Place> {
        self.rare
            .as_mut()
            .map(|r| std::mem::take(&mut r.held))
            .unwrap_or_default()
    }

    fn holds_place(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| !r.held.is_empty())
    }

    /// A place for a client's request that needs a copy of its own, waiting up to
    /// [`crate::fanout::copies::WAIT`]; every snapshot it starts shares it (a session holds one
    /// place at most, so it never waits on itself). `Err`: the `busy` error to send instead.
    async fn take_place(&mut self) -> Result<(), Outgoing> {
        if self.holds_place() {
            return Ok(());
        }
        match self.env.copies.enter(crate::fanout::copies::WAIT).await {
            Ok(p) => {
                self.rare().held.push(p);
                Ok(())
            }
            Err(busy) => Err(error(ErrorCode::Busy, busy.to_string())),
        }
    }

    /// Members, waiting subscriptions and unions.
    fn subscriptions(&self) -> usize {
        self.members.len()
            + self
                .rare
                .as_ref()
                .map_or(0, |r| r.waiting.len() + r.open_unions.len())
    }

    fn watch_created(&mut self) {
        if self.created.is_none() {
            self.created = Some(BroadcastStream::new(self.env.hub.created()));
        }
    }

    /// Subscribes to every table (matching `pattern`), now and as they appear, in rows format.
    pub async fn subscribe_all_rows(&mut self, pattern: Option<regex::Regex>) -> Vec<Outgoing> {
        // every table's rows are this client's own: one place for them all
        if let Err(busy) = self.take_place().await {
            return vec![busy];
        }
        self.watch_created();
        self.rare().all_rows = Some(pattern);
        let mut out = Vec::new();
        for info in self.env.hub.tables().list() {
            if self.all_rows_wants(&info.name) {
                out.extend(
                    self.start(&info.name, Selector::default(), None, Format::Rows, None)
                        .await,
                );
            }
        }
        out
    }

    fn all_rows_wants(&self, table: &str) -> bool {
        let wanted = match self.rare.as_ref().and_then(|r| r.all_rows.as_ref()) {
            Some(Some(p)) => p.is_match(table),
            Some(None) => true,
            None => false,
        };
        // every table means every table the token may read
        wanted && self.access.check_table(table).is_ok()
    }

    /// Sets the connection's access (a verified token). When a refreshed token changes the
    /// grants, every subscription starts again under the new ones: a fresh snapshot, or an error
    /// `forbidden` for a subscription they no longer allow.
    pub async fn set_access(&mut self, access: Access) -> Vec<Outgoing> {
        let changed = !self.access.same_grants(&access);
        self.access = access;
        if !changed {
            return Vec::new();
        }
        let members = std::mem::take(&mut self.members);
        self.streams = StreamMap::new();
        let mut unions = Vec::new();
        for m in members {
            let table = m.sub.table.clone();
            let format = m.sub.format;
            if format == Format::Rows {
                self.close = Some(RowsResync::Grants);
                continue;
            }
            if let Some(u) = &m.union {
                // a union starts again as a whole (a new snapshot of it), once
                if !unions.contains(u) {
                    unions.push(u.clone());
                }
                continue;
            }
            let requested = m.requested();
            drop(m.sub);
            let o = self
                .start(&table, requested, None, format, m.union.as_deref())
                .await;
            self.queue(m.union.as_deref(), &table, o);
        }
        for u in unions {
            self.restart_union(&u).await;
        }
        let waiting = match self.rare.as_mut() {
            Some(r) => std::mem::take(&mut r.waiting),
            None => Vec::new(),
        };
        for w in waiting {
            match self.access.check_table(&w.table) {
                Ok(()) => self.rare().waiting.push(w),
                Err(d) => {
                    let refused = self.refused(&w.table, d);
                    self.queued.push(refused);
                }
            }
        }
        // tables the new grants add to the every-table mode or to unions
        for info in self.env.hub.tables().list() {
            self.on_created(&info.name).await;
        }
        std::mem::take(&mut self.queued)
    }

    fn refused(&self, table: &str, d: Denied) -> Outgoing {
        crate::auth::log_refusal(&self.access, table, &d);
        let code = match d.kind {
            crate::auth::DenyKind::Forbidden => ErrorCode::Forbidden,
            crate::auth::DenyKind::Expired => ErrorCode::TokenExpired,
            crate::auth::DenyKind::Unauthorized => ErrorCode::Unauthorized,
        };
        error(code, d.reason)
    }

    /// Subscribes to `table` (a table or a union), replacing an earlier subscription to it.
    pub async fn subscribe(
        &mut self,
        table: &str,
        selector: Selector,
        since: Option<&str>,
        format: Format,
    ) -> Vec<Outgoing> {
        self.unsubscribe(table);
        if self.members.len() + self.rare.as_ref().map_or(0, |r| r.waiting.len())
            >= self.max_subscriptions as usize
        {
            return vec![error(
                ErrorCode::TooManySubscriptions,
                format!(
                    "at most {} subscriptions per connection",
                    self.max_subscriptions
                ),
            )];
        }
        if let Some(u) = self.env.unions.iter().find(|u| u.name == table).cloned() {
            return self.subscribe_union(&u, format).await;
        }
        // judged on what the token lets it read (its filters can make a scan of a whole-table
        // subscription, its keys a lookup of a scan), and only for a table that exists (a
        // refused or waiting subscription copies nothing)
        let copies = self.env.hub.tables().get(table).is_some()
            && self
                .access
                .selector(table, selector.clone())
                .is_ok_and(|s| crate::fanout::copies::needs_place(&s, format));
        if copies {
            if let Err(busy) = self.take_place().await {
                return vec![busy];
            }
        }
        self.start(table, selector, since, format, None).await
    }

    async fn subscribe_union(&mut self, u: &UnionDef, format: Format) -> Vec<Outgoing> {
        // in rows, every member's rows are this client's own: one place for them all
        if format == Format::Rows {
            if let Err(busy) = self.take_place().await {
                return vec![busy];
            }
        }
        self.watch_created();
        self.rare().open_unions.push((u.name.clone(), format));
        let tables: Vec<String> = self
            .env
            .hub
            .tables()
            .list()
            .into_iter()
            .map(|i| i.name)
            .filter(|n| u.pattern.is_match(n))
            .collect();
        let mut rows: Vec<Vec<u8>> = vec![Vec::new()];
        let mut out = Vec::new();
        for t in tables {
            for o in self
                .start(&t, Selector::default(), None, format, Some(&u.name))
                .await
            {
                match o {
                    Outgoing::Snapshot { parts, .. } => {
                        // the member's rows, rekeyed into the union's snapshot
                        for p in parts.iter() {
                            if let Ok(v) = serde_json::from_str::<Value>(p.as_str()) {
                                let m = v
                                    .get("rows")
                                    .or_else(|| v.get("patch"))
                                    .and_then(Value::as_object)
                                    .cloned()
                                    .unwrap_or_default();
                                append_rows(&mut rows, &t, m);
                            }
                        }
                    }
                    // what follows a member's snapshot (the changes since a shared snapshot,
                    // rows in rows format) is the union's too: keys `table/key`, rows with
                    // `__table`
                    other => out.push(into_union(&u.name, &t, other)),
                }
            }
        }
        if format == Format::Patch {
            let head = format!(
                r#""table":{},"epoch":"","seq":0,"pos":"""#,
                serde_json::to_string(&u.name).unwrap_or_default()
            );
            let parts = frames(&head, rows);
            let n = self
                .members
                .iter()
                .filter(|m| m.union.as_deref() == Some(&u.name))
                .count();
            out.insert(
                0,
                Outgoing::Snapshot {
                    table: u.name.clone(),
                    epoch: String::new(),
                    seq: 0,
                    pos: String::new(),
                    rows: n,
                    parts,
                },
            );
        }
        out
    }

    /// Starts one table subscription (waiting for the table when it does not exist). Boxed: a
    /// snapshot's future is large, and an async fn is as large as the largest future it awaits,
    /// for its whole life: unboxed, every idle connection's task would keep room for one (bench:
    /// connections-snapshot).
    fn start<'a>(
        &'a mut self,
        table: &'a str,
        selector: Selector,
        since: Option<&'a str>,
        format: Format,
        union: Option<&'a str>,
    ) -> futures::future::BoxFuture<'a, Vec<Outgoing>> {
        Box::pin(async move {
            let (out, start) = self
                .start_unboxed(table, selector, since, format, union)
                .await;
            match start {
                Some(Start::ResumeHit) => {
                    self.env.metrics.resumes.with_label_values(&["hit"]).inc()
                }
                Some(Start::ResumeMiss) => {
                    self.env.metrics.resumes.with_label_values(&["miss"]).inc()
                }
                Some(Start::Snapshot) | None => {}
            }
            out
        })
    }

    async fn start_unboxed(
        &mut self,
        table: &str,
        selector: Selector,
        since: Option<&str>,
        format: Format,
        union: Option<&str>,
    ) -> (Vec<Outgoing>, Option<Start>) {
        let requested = (!matches!(self.access, Access::Open)).then(|| Box::new(selector.clone()));
        let selector = match self.access.selector(table, selector) {
            Ok(s) => s,
            // a union's member the token does not allow is simply not part of it for this client
            Err(_) if union.is_some() => return (Vec::new(), None),
            Err(d) => return (vec![self.refused(table, d)], None),
        };
        // a subscription by keys or an indexed `where` gets only the updates it may see
        let route = union.is_none().then(|| RouteSpec::of(&selector)).flatten();
        let feed = match route {
            Some(spec) => self.env.hub.routed(table, spec).map(Feed::Routed),
            None => self
                .env
                .hub
                .updates(table)
                .map(|rx| Feed::Broadcast(BroadcastStream::new(rx))),
        };
        let Some(feed) = feed else {
            if union.is_some() {
                return (Vec::new(), None);
            }
            self.watch_created();
            self.rare().waiting.push(Waiter {
                table: table.to_string(),
                selector: match requested {
                    Some(r) => *r,
                    None => selector,
                },
                format,
            });
            // `format=rows` has no envelope: every message is a row, so it is told nothing
            // (its rows come when the table appears)
            let told = match format {
                Format::Rows => Vec::new(),
                Format::Patch => vec![Outgoing::Waiting {
                    table: table.to_string(),
                }],
            };
            return (told, None);
        };
        // a snapshot of this client's own that may hold the whole table: under the session's
        // place (a client's subscribe waited for it, see `take_place`); one the session starts
        // itself (a restart, a table that appeared) takes a free place if it has none, and is
        // never refused
        if crate::fanout::copies::needs_place(&selector, format) && !self.holds_place() {
            if let Some(p) = self.env.copies.try_enter() {
                self.rare().held.push(p);
            }
        }
        match start_subscription(
            self.env.hub.clone(),
            table,
            selector,
            since.map(String::from),
            format,
            self.env.resume_wait,
        )
        .await
        {
            Ok((sub, out, start)) => {
                let key = match feed {
                    Feed::Routed(_) => {
                        self.last_feed += 1;
                        (table.to_string(), Some(self.last_feed))
                    }
                    Feed::Broadcast(_) => (table.to_string(), None),
                };
                // the table's broadcast receiver this session already has holds every update
                // since before this subscription started (absorbing skips the older ones); a
                // new one in its place would drop those the other members have not absorbed yet
                if key.1.is_some() || !self.streams.contains_key(&key) {
                    if self.streams.is_empty() {
                        // most sessions have one feed: StreamMap's first insert would make
                        // room for four (80 bytes each), kept for the connection's life
                        self.streams = StreamMap::with_capacity(1);
                    }
                    self.streams.insert(key.clone(), feed);
                }
                // most sessions hold one subscription: no room for four (464 bytes each) kept
                // for the connection's life
                self.members.reserve_exact(1);
                self.members.push(Member {
                    sub,
                    union: union.map(String::from),
                    requested,
                    feed: key.1,
                });
                (out, Some(start))
            }
            Err(e) => (vec![error(ErrorCode::UnknownTable, e.to_string())], None),
        }
    }

    /// Stops a subscription (a table or a union); false when there was none. A union's member
    /// of the same table is not that table's subscription: it stays.
    pub fn unsubscribe(&mut self, table: &str) -> bool {
        let before = self.subscriptions();
        self.members.retain(|m| match m.union.as_deref() {
            Some(union) => union != table,
            None => m.sub.table != table,
        });
        if let Some(r) = self.rare.as_mut() {
            r.waiting.retain(|w| w.table != table);
            r.open_unions.retain(|(u, _)| u != table);
        }
        self.prune_feeds();
        before != self.subscriptions()
    }

    /// Drops the feeds no member reads any more (a routed feed's registration goes with it).
    fn prune_feeds(&mut self) {
        let live: HashSet<FeedKey> = self
            .members
            .iter()
            .map(|m| (m.sub.table.clone(), m.feed))
            .collect();
        let gone: Vec<FeedKey> = self
            .streams
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            self.streams.remove(&k);
        }
    }

    /// The format of the first subscription (what a `subscribe` message without one uses).
    pub fn format(&self) -> Option<Format> {
        self.members.first().map(|m| m.sub.format)
    }

    /// Waits for the next update or table creation (forever when nothing can come).
    pub async fn next(&mut self) -> Event {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// [`Session::next`] as a poll: it keeps nothing between polls but the session's own
    /// streams, so an idle connection's task holds no futures for it.
    fn poll_event(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Event> {
        use std::task::Poll;
        if let Some(f) = self.freshness.as_mut() {
            match f.poll_next_unpin(cx) {
                Poll::Ready(Some(f)) => return Poll::Ready(Event::Freshness(f)),
                // the node is going away: nothing more to tell
                Poll::Ready(None) => self.freshness = None,
                Poll::Pending => {}
            }
        }
        if !self.streams.is_empty() {
            if let Poll::Ready(Some((key, item))) = self.streams.poll_next_unpin(cx) {
                return Poll::Ready(Event::Update(key, item));
            }
        }
        if let Some(c) = self.created.as_mut() {
            match c.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(name))) => return Poll::Ready(Event::Created(name)),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(_)))) => {
                    return Poll::Ready(Event::Rescan)
                }
                Poll::Ready(None) => self.created = None,
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// Takes an event into the session's pending output.
    pub async fn on_event(&mut self, event: Event) {
        if let Some(w) = self.take_event(event) {
            self.finish(w).await;
        }
    }

    /// While the connection's socket is busy: takes the events that are ready into the pending
    /// output without waiting, so that the hub does not keep for this connection what it has
    /// not written yet (past a few queued frames, changes compose per row: bounded by the rows
    /// subscribed). `Ready` with what must wait (a snapshot to build): the connection stops
    /// reading its feeds, finishes its write, then hands it to [`Session::finish`].
    pub fn poll_take(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Waiting> {
        use std::task::Poll;
        for _ in 0..TAKEN_PER_POLL {
            match self.poll_event(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(event) => {
                    if let Some(w) = self.take_event(event) {
                        return Poll::Ready(w);
                    }
                }
            }
        }
        // more is ready: the write (and the other connections) go first, then this goes on
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Takes an event into the pending output without waiting; gives back what must wait (a
    /// snapshot to build: a lineage change, a feed fallen behind, a table created).
    fn take_event(&mut self, event: Event) -> Option<Waiting> {
        match event {
            Event::Update(key, Ok(u)) => {
                let stale = self.absorb(&key, &u);
                if !stale.is_empty() {
                    return Some(Waiting(Wait::Restart(stale)));
                }
                // drain what else is ready on the feeds; stop at anything that must wait (what
                // is still queued is taken on the next turn)
                for _ in 0..1024 {
                    let Some(Some((t, item))) =
                        futures::FutureExt::now_or_never(self.streams.next())
                    else {
                        break;
                    };
                    match item {
                        Ok(u) => {
                            let stale = self.absorb(&t, &u);
                            if !stale.is_empty() {
                                return Some(Waiting(Wait::Restart(stale)));
                            }
                        }
                        Err(missed) if self.lost(&t, &missed) => {
                            return Some(Waiting(Wait::Resnapshot(t)))
                        }
                        Err(_) => {}
                    }
                }
                None
            }
            Event::Update(key, Err(missed)) if self.lost(&key, &missed) => {
                Some(Waiting(Wait::Resnapshot(key)))
            }
            Event::Update(_, Err(_)) => None,
            Event::Created(name) => Some(Waiting(Wait::Created(name))),
            Event::Freshness(f) => {
                self.queued.push(Outgoing::Status {
                    caught_up: f.caught_up,
                    reason: f.reason,
                });
                None
            }
            Event::Rescan => Some(Waiting(Wait::Rescan)),
        }
    }

    /// Does what an event left waiting. Boxed: it is rare, and unboxed it would make every idle
    /// connection's task as large as itself.
    pub fn finish(&mut self, w: Waiting) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            match w.0 {
                Wait::Restart(stale) => {
                    for m in stale {
                        self.restart(m).await;
                    }
                    self.prune_feeds();
                }
                Wait::Resnapshot(key) => self.resnapshot(&key).await,
                Wait::Created(name) => self.on_created(&name).await,
                Wait::Rescan => {
                    for info in self.env.hub.tables().list() {
                        self.on_created(&info.name).await;
                    }
                }
            }
        })
    }

    /// Boxed, as [`Session::start`]: rare (a table appeared), and on `on_event`'s path.
    fn on_created<'a>(&'a mut self, name: &'a str) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(self.on_created_unboxed(name))
    }

    async fn on_created_unboxed(&mut self, name: &str) {
        let waiters: Vec<Waiter> = {
            let Some(r) = self.rare.as_mut() else {
                return;
            };
            let (now, later): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut r.waiting)
                .into_iter()
                .partition(|w| w.table == name);
            r.waiting = later;
            now
        };
        for w in waiters {
            let out = self.start(&w.table, w.selector, None, w.format, None).await;
            self.queued.extend(out);
        }
        if self.all_rows_wants(name) && !self.members.iter().any(|m| m.sub.table == name) {
            let out = self
                .start(name, Selector::default(), None, Format::Rows, None)
                .await;
            self.queued.extend(out);
        }
        let unions: Vec<(String, Format)> = match &self.rare {
            Some(r) => r
                .open_unions
                .iter()
                .filter(|(u, _)| {
                    self.env
                        .unions
                        .iter()
                        .any(|d| &d.name == u && d.pattern.is_match(name))
                })
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        for (u, format) in unions {
            if self
                .members
                .iter()
                .any(|m| m.sub.table == name && m.union.as_deref() == Some(u.as_str()))
            {
                continue;
            }
            for o in self
                .start(name, Selector::default(), None, format, Some(&u))
                .await
            {
                self.queued.push(into_union(&u, name, o));
            }
        }
    }

    /// Whether what feed `key` could not give lost a member something: anything when it lagged;
    /// an update dropped unread only when a member reading the feed is not past it yet (the hub
    /// sends an update to a subscriber whose snapshot may already hold it).
    fn lost(&self, key: &FeedKey, missed: &Missed) -> bool {
        match missed {
            Missed::Lagged => true,
            Missed::Dropped { useq, epoch } => self
                .members
                .iter()
                .filter(|m| m.reads(key))
                .any(|m| m.sub.epoch != *epoch || m.sub.useq < *useq),
        }
    }

    /// Absorbs an update into the members reading feed `key`; takes out and returns those whose
    /// table's lineage changed (they need a new snapshot: [`Session::finish`]).
    fn absorb(&mut self, key: &FeedKey, u: &HubUpdate) -> Vec<Member> {
        let mut stale = Vec::new();
        for (i, m) in self.members.iter_mut().enumerate() {
            if !m.reads(key) {
                continue;
            }
            // up to date: forward the shared frame; once a few frames wait for the socket,
            // compose further changes into one pending patch instead (bounded by the rows)
            if m.union.is_none()
                && self.frames.len() < MAX_QUEUED_FRAMES
                && self.frames.iter().map(|f| f.text.len()).sum::<usize>() < MAX_QUEUED_FRAME_BYTES
            {
                if let Some(frame) = m.sub.forward(u) {
                    self.frames.push(frame);
                    continue;
                }
            }
            let before = m.sub.pending_rows();
            if m.sub.absorb(u) == Absorbed::EpochChanged {
                stale.push(i);
            } else if before > 0 {
                self.env
                    .metrics
                    .conflated_changes
                    .inc_by(u.update.changes.len() as u64);
            }
        }
        // the table's lineage changed: these get a new snapshot
        stale
            .into_iter()
            .rev()
            .map(|i| self.members.remove(i))
            .collect()
    }

    /// Fresh snapshots for the subscriptions reading feed `key` (after falling behind it).
    async fn resnapshot(&mut self, key: &FeedKey) {
        let (mine, rest): (Vec<Member>, Vec<Member>) = std::mem::take(&mut self.members)
            .into_iter()
            .partition(|m| m.reads(key));
        self.members = rest;
        self.streams.remove(key);
        // a union in patches starts again as a whole, once
        let mut unions = HashSet::new();
        for m in mine {
            if let (Format::Patch, Some(u)) = (m.sub.format, &m.union) {
                if !unions.insert(u.clone()) {
                    continue;
                }
            }
            self.restart(m).await;
        }
    }

    /// Starts union `u` (in patches) again as a whole: a new snapshot of the union replaces what
    /// the client holds of it. A member's own new snapshot, sent as a patch of the union, would
    /// leave on the client the member's rows deleted meanwhile and its columns gone.
    async fn restart_union(&mut self, u: &str) {
        let Some(def) = self.env.unions.iter().find(|d| d.name == u).cloned() else {
            return;
        };
        self.unsubscribe(u);
        let out = Box::pin(self.subscribe_union(&def, Format::Patch)).await;
        self.queued.extend(out);
    }

    /// Starts member `m` again: it fell behind its feed, or its table's lineage changed.
    ///
    /// A patch subscription gets a fresh snapshot, which replaces what the client holds. A
    /// `format=rows` one has no such message: the current rows alone would leave the rows
    /// deleted meanwhile on the client. So it goes on from its position through the replay
    /// buffer, deletes included; when the buffer does not reach back that far (or the lineage
    /// changed), the connection is closed ([`RowsResync`]) and the client's reconnect gets the
    /// current rows as a new connection.
    ///
    /// Boxed, as [`Session::start`]: `absorb`, on every update's path, awaits it, and an
    /// unboxed start nested there made each idle connection's task ~2 KiB bigger (bench:
    /// connections-snapshot, 7.8 -> 9.9 KiB per connection).
    fn restart(&mut self, m: Member) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(self.restart_unboxed(m))
    }

    async fn restart_unboxed(&mut self, mut m: Member) {
        self.env.metrics.resnapshots.inc();
        if let (Format::Patch, Some(u)) = (m.sub.format, m.union.clone()) {
            drop(m);
            self.restart_union(&u).await;
            return;
        }
        let table = m.sub.table.clone();
        let format = m.sub.format;
        let since = match format {
            Format::Rows => {
                // what it composed so far goes out first: the replay starts after it
                let pending = m.sub.take();
                self.queue(m.union.as_deref(), &table, pending);
                let token = m.sub.token();
                if !self.env.hub.replay_reaches(&table, &token) {
                    // closed without building anything: a lagging server has no time to spare
                    drop(m);
                    self.unsubscribe(&table);
                    self.close = Some(RowsResync::Behind);
                    return;
                }
                Some(token)
            }
            Format::Patch => None,
        };
        let union = m.union.take();
        let requested = m.requested();
        drop(m);
        let (out, start) = self
            .start_unboxed(
                &table,
                requested,
                since.as_deref(),
                format,
                union.as_deref(),
            )
            .await;
        // the buffer can move on between the check above and the resume
        if format == Format::Rows && start.is_some_and(|s| s != Start::ResumeHit) {
            self.unsubscribe(&table);
            self.close = Some(RowsResync::Behind);
            return;
        }
        self.queue(union.as_deref(), &table, out);
    }

    /// Queues a subscription's output, wrapped for its union when it is a member of one.
    fn queue(&mut self, union: Option<&str>, table: &str, out: Vec<Outgoing>) {
        match union {
            Some(u) => self
                .queued
                .extend(out.into_iter().map(|o| into_union(u, table, o))),
            None => self.queued.extend(out),
        }
    }

    /// What is pending: queued messages, then each subscription's composed output.
    pub fn take(&mut self) -> (Vec<Outgoing>, Vec<SharedFrame>) {
        let mut out = std::mem::take(&mut self.queued);
        for m in &mut self.members {
            for o in m.sub.take() {
                match &m.union {
                    Some(u) => out.push(into_union(u, &m.sub.table, o)),
                    None => out.push(o),
                }
            }
        }
        (out, std::mem::take(&mut self.frames))
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
            && self
                .rare
                .as_ref()
                .is_none_or(|r| r.waiting.is_empty() && r.all_rows.is_none())
    }
}

/// Starts a subscription off the async workers (a snapshot of a big table takes milliseconds);
/// when this node has not reached the client's resume position, waits for it up to `wait`, then
/// falls back to a snapshot.
pub async fn start_subscription(
    hub: Arc<Hub>,
    table: &str,
    selector: Selector,
    since: Option<String>,
    format: Format,
    wait: Duration,
) -> Result<(Subscription, Vec<Outgoing>, Start), SubscribeError> {
    let deadline = Instant::now() + wait;
    let mut since = since;
    loop {
        let (h, t, k, s) = (
            hub.clone(),
            table.to_string(),
            selector.clone(),
            since.clone(),
        );
        let result = tokio::task::spawn_blocking(move || h.subscribe(&t, k, s.as_deref(), format))
            .await
            .map_err(|_| SubscribeError::UnknownTable(table.to_string()))?;
        match result {
            Err(SubscribeError::Behind) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(SubscribeError::Behind) => since = None,
            other => return other,
        }
    }
}

/// A member's message as the union's: keys become `table/key`.
fn into_union(union: &str, table: &str, o: Outgoing) -> Outgoing {
    match o {
        Outgoing::Patch {
            ts_ms,
            kafka_ts_ms,
            polled,
            patch,
            ..
        } => Outgoing::Patch {
            table: union.to_string(),
            epoch: String::new(),
            seq: 0,
            pos: String::new(),
            ts_ms,
            kafka_ts_ms,
            polled,
            patch: rekey(table, patch),
        },
        Outgoing::Snapshot { parts, .. } => {
            // a member that appeared later: its rows arrive as a patch of the union
            let mut patch = Map::new();
            for p in parts.iter() {
                if let Ok(v) = serde_json::from_str::<Value>(p.as_str()) {
                    if let Some(m) = v
                        .get("rows")
                        .or_else(|| v.get("patch"))
                        .and_then(Value::as_object)
                    {
                        for (k, r) in m {
                            patch.insert(union_key(table, k), r.clone());
                        }
                    }
                }
            }
            Outgoing::Patch {
                table: union.to_string(),
                epoch: String::new(),
                seq: 0,
                pos: String::new(),
                ts_ms: None,
                kafka_ts_ms: None,
                polled: None,
                patch,
            }
        }
        Outgoing::Row(Value::Object(mut row)) => {
            row.insert("__table".into(), Value::String(table.to_string()));
            Outgoing::Row(Value::Object(row))
        }
        Outgoing::RowText(text) => match serde_json::from_str::<Map<String, Value>>(&text) {
            Ok(mut row) => {
                row.insert("__table".into(), Value::String(table.to_string()));
                Outgoing::Row(Value::Object(row))
            }
            Err(_) => Outgoing::RowText(text),
        },
        other => other,
    }
}

fn append_rows(chunks: &mut Vec<Vec<u8>>, table: &str, rows: Map<String, Value>) {
    for (k, r) in rows {
        let current = chunks.last_mut().map(|c| c.len()).unwrap_or(0);
        if current >= super::protocol::SNAPSHOT_PART_BYTES {
            chunks.push(Vec::new());
        }
        if let Some(c) = chunks.last_mut() {
            if !c.is_empty() {
                c.push(b',');
            }
            let _ = serde_json::to_writer(&mut *c, &union_key(table, &k));
            c.push(b':');
            let _ = serde_json::to_writer(&mut *c, &r);
        }
    }
}

pub fn error(code: ErrorCode, message: String) -> Outgoing {
    Outgoing::Error { code, message }
}

#[cfg(test)]
mod tests;
