//! The hub: publishes applied changes to live subscribers and keeps a bounded replay buffer per
//! table for resumes. A [`Subscription`] turns the stream of changes into what one client gets:
//! a snapshot, then merge patches; while the client is slow, changes compose into one pending
//! patch (memory bounded by the rows it subscribes to), sent with the newest seq when it drains.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::broadcast;

use crate::fanout::patch::compose_row;
use crate::fanout::protocol::{patch_json, Format, Outgoing, SNAPSHOT_PART_BYTES};
use crate::table::ingest::TableUpdate;
use crate::table::state::Tables;

/// Why a subscription cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("unknown table `{0}`")]
    UnknownTable(String),
}

/// The newest whole-table snapshot frame of a table.
struct CachedSnapshot {
    epoch: String,
    seq: u64,
    rows: usize,
    parts: Arc<[axum::extract::ws::Utf8Bytes]>,
}

impl CachedSnapshot {
    fn outgoing(&self) -> Outgoing {
        Outgoing::Snapshot {
            epoch: self.epoch.clone(),
            seq: self.seq,
            rows: self.rows,
            parts: self.parts.clone(),
        }
    }
}

struct ReplayBuffer {
    epoch: String,
    changes: usize,
    updates: VecDeque<Arc<TableUpdate>>,
}

/// Fan-out of applied changes.
pub struct Hub {
    tables: Arc<Tables>,
    metrics: Arc<crate::metrics::Metrics>,
    tx: broadcast::Sender<Arc<TableUpdate>>,
    replay: Mutex<HashMap<String, ReplayBuffer>>,
    replay_capacity: usize,
    /// Whole-table snapshot frames: a storm of clients connecting at once costs one build; a
    /// client connecting later gets the cached frame plus the replay buffer's changes since.
    snapshots: Mutex<HashMap<String, Arc<CachedSnapshot>>>,
    /// Held while a whole-table snapshot is built, so concurrent subscribers wait and share it.
    building: Mutex<()>,
}

/// How a subscription started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Snapshot,
    ResumeHit,
    ResumeMiss,
}

impl Hub {
    /// `replay_capacity`: changes kept per table for resumes; `channel`: updates buffered for
    /// subscribers before a slow one must re-snapshot.
    pub fn new(
        tables: Arc<Tables>,
        metrics: Arc<crate::metrics::Metrics>,
        replay_capacity: usize,
        channel: usize,
    ) -> Self {
        let (tx, _) = broadcast::channel(channel.max(16));
        Hub {
            tables,
            metrics,
            tx,
            replay: Mutex::new(HashMap::new()),
            replay_capacity,
            snapshots: Mutex::new(HashMap::new()),
            building: Mutex::new(()),
        }
    }

    /// Publishes a batch's changes of one table (after the tables show them).
    pub fn publish(&self, mut update: TableUpdate) {
        if self.tx.receiver_count() > 0 {
            update.frame = Some(whole_table_frame(&update).into());
        }
        let update = Arc::new(update);
        {
            let mut replay = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            let buf = replay
                .entry(update.table.clone())
                .or_insert_with(|| ReplayBuffer {
                    epoch: update.epoch.clone(),
                    changes: 0,
                    updates: VecDeque::new(),
                });
            if buf.epoch != update.epoch {
                buf.epoch = update.epoch.clone();
                buf.updates.clear();
                buf.changes = 0;
            }
            buf.changes += update.changes.len();
            buf.updates.push_back(update.clone());
            while buf.changes > self.replay_capacity && buf.updates.len() > 1 {
                if let Some(old) = buf.updates.pop_front() {
                    buf.changes -= old.changes.len();
                }
            }
        }
        let _ = self.tx.send(update);
    }

    /// A receiver of every update from now on.
    pub fn updates(&self) -> broadcast::Receiver<Arc<TableUpdate>> {
        self.tx.subscribe()
    }

    /// Starts a subscription: a resume from `since` when the replay buffer still covers it, else
    /// a snapshot. Call [`Hub::updates`] BEFORE this, so no change falls between the two.
    pub fn subscribe(
        &self,
        table: &str,
        keys: Option<HashSet<String>>,
        since: Option<(String, u64)>,
        format: Format,
    ) -> Result<(Subscription, Vec<Outgoing>, Start), SubscribeError> {
        let t = self
            .tables
            .get(table)
            .ok_or_else(|| SubscribeError::UnknownTable(table.to_string()))?;
        let started = std::time::Instant::now();
        let gauge = self.metrics.subscriptions.with_label_values(&[table]);
        gauge.inc();
        let mut sub = Subscription {
            table: table.to_string(),
            keys,
            epoch: String::new(),
            seq: 0,
            format,
            pending: Pending::default(),
            gauge,
        };
        if let Some((epoch, since_seq)) = &since {
            if let Some(out) = self.resume(&mut sub, epoch, *since_seq) {
                self.metrics
                    .snapshot_seconds
                    .observe(started.elapsed().as_secs_f64());
                return Ok((sub, out, Start::ResumeHit));
            }
        }
        let out = match format {
            Format::Patch if sub.keys.is_none() => self.shared_snapshot(&mut sub, &t),
            Format::Patch => {
                let t = t.read().unwrap_or_else(|e| e.into_inner());
                sub.epoch = t.epoch.clone();
                sub.seq = t.seq;
                let (rows, parts) = snapshot_parts(&sub.table, &t, sub.keys.as_ref());
                vec![Outgoing::Snapshot {
                    epoch: sub.epoch.clone(),
                    seq: sub.seq,
                    rows,
                    parts,
                }]
            }
            Format::Rows => {
                let t = t.read().unwrap_or_else(|e| e.into_inner());
                sub.epoch = t.epoch.clone();
                sub.seq = t.seq;
                t.rows
                    .iter()
                    .filter(|(k, _)| sub.wants(k))
                    .map(|(_, r)| Outgoing::Row(Value::Object(r.clone())))
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

    /// A whole-table snapshot for `sub`: the cached frame plus the buffered changes since it when
    /// the replay buffer covers them, else a new frame built under the table's read lock.
    fn shared_snapshot(
        &self,
        sub: &mut Subscription,
        t: &std::sync::RwLock<crate::table::state::TableState>,
    ) -> Vec<Outgoing> {
        let _building = self.building.lock().unwrap_or_else(|e| e.into_inner());
        let cached = self
            .snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sub.table)
            .cloned();
        if let Some(c) = cached {
            if let Some(rest) = self.resume(sub, &c.epoch, c.seq) {
                let mut out = vec![c.outgoing()];
                // resume() confirms an unchanged state with an empty patch: not needed here
                out.extend(
                    rest.into_iter().filter(
                        |o| !matches!(o, Outgoing::Patch { patch, .. } if patch.is_empty()),
                    ),
                );
                return out;
            }
        }
        let snap = {
            let t = t.read().unwrap_or_else(|e| e.into_inner());
            let (rows, parts) = snapshot_parts(&sub.table, &t, None);
            Arc::new(CachedSnapshot {
                epoch: t.epoch.clone(),
                seq: t.seq,
                rows,
                parts,
            })
        };
        sub.epoch = snap.epoch.clone();
        sub.seq = snap.seq;
        self.snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sub.table.clone(), snap.clone());
        vec![snap.outgoing()]
    }

    /// Replays `since_seq`+1.. from the buffer into `sub` if the buffer still holds all of it.
    fn resume(&self, sub: &mut Subscription, epoch: &str, since_seq: u64) -> Option<Vec<Outgoing>> {
        let replay = self.replay.lock().unwrap_or_else(|e| e.into_inner());
        let (current_seq, current_epoch) = {
            let t = self.tables.get(&sub.table)?;
            let t = t.read().unwrap_or_else(|e| e.into_inner());
            (t.seq, t.epoch.clone())
        };
        if current_epoch != epoch || since_seq > current_seq {
            return None;
        }
        sub.epoch = current_epoch;
        sub.seq = since_seq;
        let buf = replay.get(&sub.table);
        let oldest = buf
            .and_then(|b| b.updates.front())
            .and_then(|u| u.changes.first())
            .map(|c| c.seq);
        let newest = buf
            .and_then(|b| b.updates.back())
            .and_then(|u| u.changes.last())
            .map(|c| c.seq)
            .unwrap_or(0);
        match oldest {
            Some(oldest) if since_seq + 1 >= oldest => {}
            // nothing changed since then and nothing buffered (e.g. after a restart): in sync
            _ if since_seq == current_seq && newest <= since_seq => {}
            _ => return None,
        }
        if let Some(buf) = buf {
            if buf.epoch != sub.epoch {
                return None;
            }
            for u in &buf.updates {
                sub.absorb(u);
            }
        }
        let mut out = sub.take();
        if out.is_empty() && sub.format == Format::Patch {
            // confirm the resume: an empty patch at the client's seq
            out.push(Outgoing::Patch {
                table: sub.table.clone(),
                epoch: sub.epoch.clone(),
                seq: sub.seq,
                ts_ms: None,
                kafka_ts_ms: None,
                patch: Map::new(),
            });
        }
        Some(out)
    }
}

/// The snapshot frames of a table (only the keys in `keys` when given), serialised straight from
/// its rows, NULL columns left out: `{"type":"snapshot","table":T,"epoch":E,"seq":N,"rows":{...}}`
/// with the first rows, and when they exceed [`SNAPSHOT_PART_BYTES`], `"more":true` and further
/// `{"type":"patch",...,"seq":N,"ts_ms":null,"patch":{...}}` frames adding the other rows (all but
/// the last with `"more":true`). Returns the number of rows with the frames.
fn snapshot_parts(
    table: &str,
    t: &crate::table::state::TableState,
    keys: Option<&HashSet<String>>,
) -> (usize, Arc<[axum::extract::ws::Utf8Bytes]>) {
    use serde::ser::{SerializeMap, Serializer};
    struct NonNull<'a>(&'a Map<String, Value>);
    impl serde::Serialize for NonNull<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(None)?;
            for (k, v) in self.0.iter().filter(|(_, v)| !v.is_null()) {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }
    // the rows as `"key":{row}` entries, cut into chunks of about SNAPSHOT_PART_BYTES
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut rows = 0;
    for (k, r) in t
        .rows
        .iter()
        .filter(|(k, _)| keys.is_none_or(|keys| keys.contains(*k)))
    {
        if current.len() >= SNAPSHOT_PART_BYTES {
            chunks.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(b',');
        }
        // serialising strings and JSON values into a Vec cannot fail
        let _ = serde_json::to_writer(&mut current, k);
        current.push(b':');
        let _ = serde_json::to_writer(&mut current, &NonNull(r));
        rows += 1;
    }
    chunks.push(current);
    let (table, epoch) = (
        serde_json::to_string(table).unwrap_or_default(),
        serde_json::to_string(&t.epoch).unwrap_or_default(),
    );
    let last = chunks.len() - 1;
    let parts: Vec<axum::extract::ws::Utf8Bytes> = chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let head = if i == 0 {
                format!(r#"{{"type":"snapshot","table":{table},"epoch":{epoch},"seq":{},"rows":{{"#, t.seq)
            } else {
                format!(r#"{{"type":"patch","table":{table},"epoch":{epoch},"seq":{},"ts_ms":null,"patch":{{"#, t.seq)
            };
            let tail = if i < last { r#"},"more":true}"# } else { "}}" };
            let mut text = String::with_capacity(head.len() + c.len() + tail.len());
            text.push_str(&head);
            text.push_str(&String::from_utf8_lossy(&c));
            text.push_str(tail);
            text.into()
        })
        .collect();
    (rows, parts.into())
}

/// The patch frame of all changes of an update, for whole-table subscribers.
fn whole_table_frame(update: &TableUpdate) -> String {
    let mut patch = Map::new();
    let mut ts_ms = None;
    for c in &update.changes {
        if c.truncated.is_empty() {
            compose_row(&mut patch, &c.key, c.patch.clone());
        } else {
            for k in &c.truncated {
                compose_row(&mut patch, k, Value::Null);
            }
        }
        ts_ms = c.ts_ms.or(ts_ms);
    }
    let seq = update.changes.last().map_or(0, |c| c.seq);
    patch_json(&update.table, &update.epoch, seq, ts_ms, &patch)
}

#[derive(Debug, Default)]
struct Pending {
    /// Composed patch per key (format=patch) or newest full row per key (format=rows).
    rows: Map<String, Value>,
    seq: u64,
    ts_ms: Option<i64>,
    kafka_ts_ms: Option<i64>,
}

/// An already serialised patch frame shared by many clients, with its times for the metrics.
#[derive(Debug, Clone)]
pub struct SharedFrame {
    pub text: axum::extract::ws::Utf8Bytes,
    pub ts_ms: Option<i64>,
    pub kafka_ts_ms: Option<i64>,
}

/// One client's subscription to one table.
#[derive(Debug)]
pub struct Subscription {
    pub table: String,
    pub keys: Option<HashSet<String>>,
    pub epoch: String,
    /// Every change up to this seq has been absorbed.
    pub seq: u64,
    pub format: Format,
    pending: Pending,
    /// `livetable_subscriptions{table}`: +1 while this subscription lives.
    gauge: prometheus::IntGauge,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// What absorbing an update found.
#[derive(Debug, PartialEq, Eq)]
pub enum Absorbed {
    Ok,
    /// The table's epoch changed under the subscription: re-snapshot.
    EpochChanged,
}

impl Subscription {
    fn wants(&self, key: &str) -> bool {
        self.keys.as_ref().is_none_or(|k| k.contains(key))
    }

    /// For an up-to-date whole-table patch subscription: the update's shared frame (and its
    /// `ts_ms`), so nothing is composed or serialised per client. `None`: use [`Subscription::absorb`].
    pub fn forward(&mut self, update: &TableUpdate) -> Option<SharedFrame> {
        if self.format != Format::Patch
            || self.keys.is_some()
            || self.has_pending()
            || update.table != self.table
            || update.epoch != self.epoch
        {
            return None;
        }
        let frame = update.frame.as_ref()?;
        let (first, last) = (update.changes.first()?, update.changes.last()?);
        if first.seq != self.seq + 1 {
            return None;
        }
        self.seq = last.seq;
        Some(SharedFrame {
            text: frame.clone(),
            ts_ms: update.changes.iter().rev().find_map(|c| c.ts_ms),
            kafka_ts_ms: update.changes.iter().rev().find_map(|c| c.kafka_ts_ms),
        })
    }

    /// Composes the changes of `update` newer than the subscription into its pending output.
    pub fn absorb(&mut self, update: &TableUpdate) -> Absorbed {
        if update.table != self.table {
            return Absorbed::Ok;
        }
        if update.epoch != self.epoch {
            return Absorbed::EpochChanged;
        }
        for c in &update.changes {
            if c.seq <= self.seq {
                continue;
            }
            self.seq = c.seq;
            let touched: Vec<(&String, Value)> = if c.truncated.is_empty() {
                if !self.wants(&c.key) {
                    continue;
                }
                let v = match self.format {
                    Format::Patch => c.patch.clone(),
                    Format::Rows => match (&c.row, &c.before) {
                        (Some(r), _) => Value::Object(r.clone()),
                        (None, before) => deleted_row(&c.key, before.as_ref()),
                    },
                };
                vec![(&c.key, v)]
            } else {
                c.truncated
                    .iter()
                    .filter(|k| self.wants(k))
                    .map(|k| {
                        (
                            k,
                            if self.format == Format::Rows {
                                deleted_row(k, None)
                            } else {
                                Value::Null
                            },
                        )
                    })
                    .collect()
            };
            if touched.is_empty() {
                continue;
            }
            for (key, v) in touched {
                match self.format {
                    Format::Patch => compose_row(&mut self.pending.rows, key, v),
                    Format::Rows => {
                        self.pending.rows.insert(key.clone(), v);
                    }
                }
            }
            self.pending.seq = c.seq;
            self.pending.ts_ms = c.ts_ms.or(self.pending.ts_ms);
            self.pending.kafka_ts_ms = c.kafka_ts_ms.or(self.pending.kafka_ts_ms);
        }
        Absorbed::Ok
    }

    /// Whether output is waiting.
    pub fn has_pending(&self) -> bool {
        !self.pending.rows.is_empty()
    }

    /// Takes the pending output: one composed patch, or one message per changed row.
    pub fn take(&mut self) -> Vec<Outgoing> {
        if self.pending.rows.is_empty() {
            return Vec::new();
        }
        let p = std::mem::take(&mut self.pending);
        match self.format {
            Format::Patch => vec![Outgoing::Patch {
                table: self.table.clone(),
                epoch: self.epoch.clone(),
                seq: p.seq,
                ts_ms: p.ts_ms,
                kafka_ts_ms: p.kafka_ts_ms,
                patch: p.rows,
            }],
            Format::Rows => p.rows.into_values().map(Outgoing::Row).collect(),
        }
    }

    /// Number of composed rows waiting (for the conflation metric).
    pub fn pending_rows(&self) -> usize {
        self.pending.rows.len()
    }
}

fn deleted_row(key: &str, before: Option<&Map<String, Value>>) -> Value {
    let mut row = before.cloned().unwrap_or_default();
    if row.is_empty() {
        row.insert("__key".into(), Value::String(key.to_string()));
    }
    row.insert("__deleted".into(), Value::Bool(true));
    Value::Object(row)
}
