//! The hub: receives every committed table update (it is the tables' [`UpdateSink`]), keeps a
//! buffer of updates per table (the replay window for resumes, and what subscribers have not
//! read: all tables under one byte budget) and broadcasts updates on one channel per table.
//! Subscriptions start with a resume (only the changes a client missed) or a snapshot.
//!
//! A resume token names a position defined by Kafka offsets (see `table::position`), so it means
//! the same on every node: a client cut from one gateway resumes on another. A node that has not
//! reached the client's position yet says so ([`SubscribeError::Behind`]); the caller waits a
//! little, then falls back to a snapshot.

mod budget;
mod buffer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use axum::extract::ws::Utf8Bytes;
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use super::protocol::{patch_json, Format, Outgoing};
use super::route::{RouteSpec, RoutedFeed, Router};
use super::selector::Selector;
use super::snapshot::{copy_of, CachedSnapshot, SnapshotCopy};
use super::subscription::{row_text, Subscription};
use crate::filter::equality;
use crate::metrics::Metrics;
use crate::patch::row_diff;
use crate::table::position::{Position, Token};
use crate::table::state::{TableUpdate, Tables, UpdateSink};
use budget::Budget;
pub use buffer::BufferLimits;
use buffer::UpdateBuffer;

/// Why a subscription cannot start (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("unknown table `{0}`")]
    UnknownTable(String),
    /// The client's resume position is ahead of this node (it was served by a node further on).
    #[error("this node has not reached the resume position yet")]
    Behind,
}

/// How a subscription started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Snapshot,
    ResumeHit,
    ResumeMiss,
}

/// An update as broadcast: the table update and, when anyone listened, its whole-table patch
/// frame serialised once for every up-to-date whole-table subscriber.
#[derive(Debug)]
pub struct HubUpdate {
    pub update: TableUpdate,
    pub frame: Option<Utf8Bytes>,
    /// The resume token of the state after this update.
    pub token: Arc<str>,
    /// Estimated heap bytes (what it costs the hub's buffer).
    bytes: usize,
}

/// An update as sent to subscribers: a weak reference (the hub's buffer keeps the update), with
/// what tells whether a subscriber still needed it should the buffer drop it unread.
#[derive(Debug, Clone)]
pub struct Sent {
    pub useq: u64,
    pub epoch: Arc<str>,
    pub update: Weak<HubUpdate>,
}

impl Sent {
    pub fn of(u: &Arc<HubUpdate>) -> Self {
        Sent {
            useq: u.update.useq,
            epoch: u.update.epoch.clone(),
            update: Arc::downgrade(u),
        }
    }

    /// The update, or what was missed.
    pub fn take(self) -> Result<Arc<HubUpdate>, Missed> {
        self.update.upgrade().ok_or(Missed::Dropped {
            useq: self.useq,
            epoch: self.epoch,
        })
    }
}

/// What a subscriber's feed could not give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missed {
    /// It fell behind its channel or queue: updates were skipped.
    Lagged,
    /// This update was dropped by the hub's byte budget before it was read: a subscriber already
    /// past `useq` of `epoch` (its snapshot holds it) lost nothing.
    Dropped { useq: u64, epoch: Arc<str> },
}

impl HubUpdate {
    /// An update with its frame and token, its bytes estimated.
    pub fn new(update: TableUpdate, frame: Option<Utf8Bytes>, token: Arc<str>) -> Self {
        let bytes = buffer::update_bytes(&update, frame.as_ref());
        HubUpdate {
            update,
            frame,
            token,
            bytes,
        }
    }
}

/// A table state as this node's update order names it.
#[derive(Debug, Clone)]
pub(super) struct Mark {
    useq: u64,
    seq: u64,
    pos: Position,
}

/// One table's channel.
struct Channel {
    /// Weak references: the updates themselves are kept by the buffer alone.
    tx: broadcast::Sender<Sent>,
    buffer: Mutex<UpdateBuffer>,
    snapshot: Mutex<Option<Arc<CachedSnapshot>>>,
    /// Held while a whole-table snapshot is built, so concurrent subscribers share it.
    building: Mutex<()>,
    /// Subscriptions sent only the updates their keys or indexed `where` may see.
    router: Arc<Mutex<Router>>,
    /// `livetable_fanout_buffer_bytes` of the table.
    buffer_bytes: prometheus::IntGauge,
}

/// Fan-out of applied changes.
pub struct Hub {
    tables: Arc<Tables>,
    metrics: Arc<Metrics>,
    channels: RwLock<HashMap<String, Arc<Channel>>>,
    /// Names of tables as their channels appear (for subscriptions waiting for a table).
    created: broadcast::Sender<String>,
    /// Changes in each table's replay window.
    window_changes: usize,
    /// Bytes of all tables' buffers.
    budget: Budget,
    channel_capacity: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// `limits`: what the buffers keep (each table's changes for resumes, bytes of all tables
    /// together); `channel`:
    /// updates a subscriber may fall behind before it must re-snapshot.
    pub fn new(
        tables: Arc<Tables>,
        metrics: Arc<Metrics>,
        limits: BufferLimits,
        channel: usize,
    ) -> Self {
        let (created, _) = broadcast::channel(1024);
        Hub {
            tables,
            metrics,
            channels: RwLock::new(HashMap::new()),
            created,
            window_changes: limits.changes,
            budget: Budget::new(limits.bytes),
            channel_capacity: channel.max(16),
        }
    }

    pub fn tables(&self) -> &Arc<Tables> {
        &self.tables
    }

    /// Opens the channel of a table now (at start-up, for the tables of the local store): its
    /// replay buffer then covers every change from the state the node started with, so a client
    /// whose position is at or after it resumes with a patch after a restart.
    pub fn open(&self, table: &str) {
        let _ = self.channel(table);
    }

    /// The channel of `table`, created when the table exists.
    fn channel(&self, table: &str) -> Option<Arc<Channel>> {
        if let Some(c) = self
            .channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(table)
        {
            return Some(c.clone());
        }
        let t = self.tables.get(table)?;
        let (epoch, last) = {
            let s = t.read();
            if !s
                .slices
                .iter()
                .any(|s| s.mode != crate::table::state::SliceMode::Absent)
            {
                return None;
            }
            (
                s.epoch.clone(),
                Mark {
                    useq: s.useq,
                    seq: s.seq(),
                    pos: s.position(),
                },
            )
        };
        let mut map = self.channels.write().unwrap_or_else(|e| e.into_inner());
        let created = !map.contains_key(table);
        let c = map
            .entry(table.to_string())
            .or_insert_with(|| {
                let (tx, _) = broadcast::channel(self.channel_capacity);
                Arc::new(Channel {
                    tx,
                    buffer: Mutex::new(UpdateBuffer::new(epoch, last)),
                    snapshot: Mutex::new(None),
                    building: Mutex::new(()),
                    router: Arc::new(Mutex::new(Router::counted(&self.metrics))),
                    buffer_bytes: self.metrics.fanout_buffer_bytes.with_label_values(&[table]),
                })
            })
            .clone();
        drop(map);
        if created {
            let gauge = self.metrics.subscriptions.with_label_values(&[table]);
            gauge.add(0);
            let _ = self.created.send(table.to_string());
        }
        Some(c)
    }

    /// A receiver of every update of `table` from now on (`None`: no such table).
    /// Each is a weak reference: one that no longer upgrades was dropped by the byte budget
    /// before this receiver read it (the receiver lagged).
    pub fn updates(&self, table: &str) -> Option<broadcast::Receiver<Sent>> {
        self.channel(table).map(|c| c.tx.subscribe())
    }

    /// A feed of the updates of `table` that `spec` may concern, from now on (`None`: no such
    /// table). Like [`Hub::updates`], take it BEFORE [`Hub::subscribe`].
    pub fn routed(&self, table: &str, spec: RouteSpec) -> Option<RoutedFeed> {
        self.channel(table)
            .map(|c| RoutedFeed::register(&c.router, spec, self.channel_capacity))
    }

    /// A receiver of the names of tables as they appear.
    pub fn created(&self) -> broadcast::Receiver<String> {
        self.created.subscribe()
    }

    /// Starts a subscription: a resume from `since` when the replay buffer covers it, else a
    /// snapshot. Take [`Hub::updates`] BEFORE this, so no change falls between the two.
    pub fn subscribe(
        &self,
        table: &str,
        selector: Selector,
        since: Option<&str>,
        format: Format,
    ) -> Result<(Subscription, Vec<Outgoing>, Start), SubscribeError> {
        let channel = self
            .channel(table)
            .ok_or_else(|| SubscribeError::UnknownTable(table.to_string()))?;
        let t = self
            .tables
            .get(table)
            .ok_or_else(|| SubscribeError::UnknownTable(table.to_string()))?;
        let started = std::time::Instant::now();
        let gauge = self.metrics.subscriptions.with_label_values(&[table]);
        // a where with an equality finds its snapshot rows through an index of that column
        if selector.keys.is_none() {
            if let Some((column, _)) = selector.indexed.as_deref().and_then(equality) {
                t.ensure_index(&column);
            }
        }
        let mut sub = Subscription::new(table, selector, format, gauge);
        if let Some(token) = since.and_then(Token::parse) {
            if let Some(out) = self.replay_from(&channel, &mut sub, &token, None)? {
                self.metrics
                    .snapshot_seconds
                    .observe(started.elapsed().as_secs_f64());
                return Ok((sub, out, Start::ResumeHit));
            }
        }
        let out = match format {
            Format::Patch if sub.selector.is_whole() => {
                self.shared_snapshot(&channel, &t, &mut sub)
            }
            Format::Patch => {
                let (copy, rows, parts) = snapshot_of(&t, &sub.selector);
                sub.start_at(copy.epoch.clone(), copy.useq, copy.seq, copy.pos.clone());
                vec![Outgoing::Snapshot {
                    table: table.to_string(),
                    epoch: copy.epoch.to_string(),
                    seq: sub.seq,
                    pos: sub.token(),
                    rows,
                    parts,
                }]
            }
            Format::Rows => {
                // copied under the read lock, made into messages after it
                let (copy, _) = copy_of(&t, &sub.selector);
                sub.start_at(copy.epoch.clone(), copy.useq, copy.seq, copy.pos.clone());
                let sel = &sub.selector;
                copy.selected(sel)
                    .map(|(_, row)| row_text(row, sel))
                    .collect()
            }
        };
        self.metrics
            .snapshot_seconds
            .observe(started.elapsed().as_secs_f64());
        let start = if since.is_some() {
            Start::ResumeMiss
        } else {
            Start::Snapshot
        };
        Ok((sub, out, start))
    }

    /// A whole-table snapshot for `sub`: the cached frames plus the buffered changes since them
    /// when the buffer covers them, else new frames (from rows copied under the table's read
    /// lock, built after it).
    fn shared_snapshot(
        &self,
        channel: &Channel,
        t: &crate::table::state::Table,
        sub: &mut Subscription,
    ) -> Vec<Outgoing> {
        let _building = lock(&channel.building);
        let cached = lock(&channel.snapshot).clone();
        if let Some(c) = cached {
            let token = Token {
                epoch: c.epoch.to_string(),
                pos: c.pos.clone(),
            };
            // the cached frames, then what changed since them
            let base = Mark {
                useq: c.useq,
                seq: c.seq,
                pos: c.pos.clone(),
            };
            if let Ok(Some(rest)) = self.replay_from(channel, sub, &token, Some(base)) {
                let mut out = vec![c.outgoing(&sub.table)];
                out.extend(
                    rest.into_iter().filter(
                        |o| !matches!(o, Outgoing::Patch { patch, .. } if patch.is_empty()),
                    ),
                );
                return out;
            }
        }
        let snap = {
            let whole = Selector::default();
            let (copy, rows, parts) = snapshot_of(t, &whole);
            Arc::new(CachedSnapshot {
                epoch: copy.epoch,
                useq: copy.useq,
                seq: copy.seq,
                pos: copy.pos,
                rows,
                parts,
            })
        };
        sub.start_at(snap.epoch.clone(), snap.useq, snap.seq, snap.pos.clone());
        *lock(&channel.snapshot) = Some(snap.clone());
        vec![snap.outgoing(&sub.table)]
    }

    /// Whether a resume of `table` from `since` would be served from the replay buffer: the same
    /// lineage, and the buffer reaching back to it. A `format=rows` subscription that fell behind
    /// can only go on that way; when this says no, nothing needs to be built for it.
    pub fn replay_reaches(&self, table: &str, since: &str) -> bool {
        let (Some(channel), Some(token)) = (self.channel(table), Token::parse(since)) else {
            return false;
        };
        let reaches = lock(&channel.buffer).reaches(&token);
        reaches
    }

    /// Composes into `sub` every buffered change after `token`. `Ok(None)`: the buffer does not
    /// hold all of them (another lineage, or evicted). `base`: the state `token` names when it is
    /// a cached snapshot of this node (else the token is a client's, and a node that has not
    /// published its position yet is [`SubscribeError::Behind`]).
    fn replay_from(
        &self,
        channel: &Channel,
        sub: &mut Subscription,
        token: &Token,
        base: Option<Mark>,
    ) -> Result<Option<Vec<Outgoing>>, SubscribeError> {
        // the window's updates (shared) and where it ends, taken under the buffer's lock; the
        // client's filters run on them after it is let go (the table's commits publish through
        // that lock: a costly `where` must not hold them up)
        let (window, last, epoch) = {
            let buf = lock(&channel.buffer);
            if !buf.reaches(token) {
                return Ok(None);
            }
            if base.is_none() && !buf.last.pos.covers(&token.pos) {
                return Err(SubscribeError::Behind);
            }
            let window: Vec<Arc<HubUpdate>> = buf.window().cloned().collect();
            (window, buf.last.clone(), buf.epoch.clone())
        };
        for u in &window {
            for c in &u.update.changes {
                if c.off > token.pos.get(c.part) {
                    sub.absorb_change(c);
                }
            }
        }
        drop(window);
        let mark = match base {
            Some(b) if b.useq > last.useq => b,
            _ => last,
        };
        sub.start_at(epoch, mark.useq, mark.seq, mark.pos);
        let mut out = sub.take();
        if out.is_empty() && sub.format == Format::Patch {
            out.push(sub.confirmation());
        }
        Ok(Some(out))
    }
}

impl UpdateSink for Hub {
    fn publish(&self, update: TableUpdate) {
        let Some(channel) = self.channel(&update.table) else {
            return;
        };
        let token: Arc<str> = update.token().to_string().into();
        let frame = (channel.tx.receiver_count() > 0)
            .then(|| Utf8Bytes::from(whole_table_frame(&update, &token)));
        let update = Arc::new(HubUpdate::new(update, frame, token));
        let sent = Sent::of(&update);
        let new_lineage;
        {
            let mut buf = lock(&channel.buffer);
            let before = buf.bytes();
            new_lineage = buf.epoch != update.update.epoch;
            if new_lineage {
                // a new lineage: nothing before it can be resumed
                buf.reset(update.update.epoch.clone(), update.update.pos.clone());
                *lock(&channel.snapshot) = None;
            }
            // sent before the buffer trims, so that this update counts as unread by its receivers
            lock(&channel.router).route(&sent, &update, new_lineage);
            let _ = channel.tx.send(sent);
            buf.push(update, self.budget.stamp(), self.window_changes);
            self.budget.account(before, buf.bytes());
            let mut unread = 0;
            if self.budget.over() {
                let all: Vec<Arc<Channel>> = self
                    .channels
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect();
                unread = self.budget.enforce(&channel, &mut buf, &all);
            }
            if unread > 0 {
                self.metrics.fanout_buffer_evictions.inc_by(unread);
            }
            channel.buffer_bytes.set(buf.bytes() as i64);
        }
    }
}

/// The patch frame of all changes of an update, for whole-table subscribers.
pub(crate) fn whole_table_frame(update: &TableUpdate, token: &str) -> String {
    // per key: the row before the update's first change of it -> after its last one
    let mut rows: HashMap<
        &str,
        (
            Option<&crate::cdc::decode::Row>,
            Option<&crate::cdc::decode::Row>,
        ),
    > = HashMap::new();
    let mut order = Vec::new();
    let mut ts_ms = None;
    for c in &update.changes {
        match rows.get_mut(c.key.as_str()) {
            Some(r) => r.1 = c.row.as_deref(),
            None => {
                order.push(c.key.as_str());
                rows.insert(&c.key, (c.before.as_deref(), c.row.as_deref()));
            }
        }
        ts_ms = c.ts_ms.or(ts_ms);
    }
    let mut patch = Map::new();
    for k in order {
        let (before, after) = rows[k];
        if before.is_none() && after.is_none() {
            continue;
        }
        patch.insert(k.to_string(), row_diff(before, after));
    }
    patch_json(
        &update.table,
        &update.epoch,
        update.seq,
        token,
        ts_ms,
        &patch,
    )
}

/// Rows of a union: `table/key` -> row, from every member's snapshot.
pub fn union_key(table: &str, key: &str) -> String {
    format!("{table}/{key}")
}

/// Rekeys a member's patch for a union.
pub fn rekey(table: &str, patch: Map<String, Value>) -> Map<String, Value> {
    patch
        .into_iter()
        .map(|(k, v)| (union_key(table, &k), v))
        .collect()
}
/// A snapshot's frames, from rows copied under the table's read lock (see [`SnapshotCopy`]);
/// how long the lock was held, and how long the frames took without it, is logged at debug
/// level.
fn snapshot_of(
    t: &crate::table::state::Table,
    selector: &Selector,
) -> (SnapshotCopy, usize, Arc<[Utf8Bytes]>) {
    let started = std::time::Instant::now();
    let (copy, locked) = copy_of(t, selector);
    let copied = started.elapsed();
    let (rows, parts) = copy.parts(selector);
    tracing::debug!(
        table = &*copy.name,
        rows,
        under_read_lock_ms = locked.as_secs_f64() * 1e3,
        copy_ms = copied.as_secs_f64() * 1e3,
        frames_ms = (started.elapsed() - copied).as_secs_f64() * 1e3,
        "snapshot built"
    );
    (copy, rows, parts)
}

#[cfg(test)]
mod tests;
