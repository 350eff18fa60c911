//! The materialised tables in memory: what the API and the fan-out serve.
//!
//! A table's rows are partitioned like its input topic: every row belongs to the *slice* of the
//! partition its last change came from and carries that change's input offset. A slice is written
//! by one writer at a time: the ingest loop while this node owns the partition, the changelog
//! follower while another node does (or while this node is a gateway).
//!
//! Writers stage a [`Delta`] against the current state (lock-free for readers), then
//! [`Tables::commit`] applies it under the table's write lock and hands the resulting
//! [`TableUpdate`] to the [`UpdateSink`] while holding the table's order lock, so that updates
//! reach the sink in exactly the order they were applied (`useq` increases by one per update).
//! Readers take the read lock and always see a state that matches the table's `useq`, `seq` and
//! position exactly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::cdc::decode::{Op, Row};
use crate::table::position::{Owner, Position, Token};
use crate::table::stored_row::StoredRow;

/// One row in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Parsed on first use when loaded from the store or read from a changelog record.
    pub row: StoredRow,
    /// The input partition (= changelog partition) of the row's last change.
    pub part: u32,
    /// The input offset of the row's last change.
    pub off: i64,
}

/// Who writes a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SliceMode {
    /// Nobody here: the slice is empty and not served (a materialiser's unassigned partitions).
    #[default]
    Absent,
    /// This node's ingest loop: it owns the input partition.
    Owned,
    /// This node's changelog follower.
    Followed,
    /// A declared view computed here from its input table (`table::derived`): never owned,
    /// followed, stored or checkpointed.
    Derived,
}

/// The state of one partition of a table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slice {
    /// Input offset of the last change applied (-1: none).
    pub last_off: i64,
    /// Number of changes that altered the slice (the table's `seq` is the sum over slices).
    pub count: u64,
    /// The largest owner seen writing this slice's changelog partition (or this node's own).
    pub owner: Owner,
    /// Every change with an input offset up to this is in the changelog topic.
    pub acked: i64,
    /// Changelog offset up to which this slice's state is known to reflect the changelog partition.
    pub cl_next: i64,
    pub mode: SliceMode,
    /// Keys deleted by changes newer than `acked`, with the offset of the delete: re-delivered
    /// older changes of those keys must not bring them back. Pruned as `acked` advances.
    pub tombs: HashMap<String, i64>,
    /// Times the input partition's offsets restarted (the topic was recreated) in this process:
    /// acknowledgements taken before a restart are ignored.
    pub resets: u32,
    /// A restore is taking the slice over: the changelog follower must not take it up (it would
    /// fold this node's own changelog into the slice beside the ingest, a second writer).
    pub taking: bool,
}

impl Slice {
    pub fn empty(mode: SliceMode) -> Self {
        Slice {
            last_off: -1,
            count: 0,
            owner: Owner::default(),
            acked: -1,
            cl_next: 0,
            mode,
            tombs: HashMap::new(),
            resets: 0,
            taking: false,
        }
    }

    /// Raises `acked` and forgets the tombstones it covers.
    pub fn raise_acked(&mut self, acked: i64) {
        if acked > self.acked {
            self.acked = acked;
            self.tombs.retain(|_, off| *off > acked);
        }
    }
}

/// One table: its rows by key, its slices, its lineage.
#[derive(Debug, Clone)]
pub struct TableState {
    pub name: Arc<str>,
    /// The lineage of the table across the deployment (from the registry).
    pub epoch: Arc<str>,
    /// The input topic that feeds it.
    pub source: Arc<str>,
    pub rows: super::rows::Rows,
    pub slices: Vec<Slice>,
    /// Node-local number of the last update applied (orders updates for subscribers).
    pub useq: u64,
}

impl TableState {
    pub fn new(name: &str, epoch: &str, source: &str, partitions: u32) -> Self {
        TableState {
            name: name.into(),
            epoch: epoch.into(),
            source: source.into(),
            rows: super::rows::Rows::default(),
            slices: (0..partitions)
                .map(|_| Slice::empty(SliceMode::Absent))
                .collect(),
            useq: 0,
        }
    }

    /// The table's change count: the same on every node at the same position.
    pub fn seq(&self) -> u64 {
        self.slices.iter().map(|s| s.count).sum()
    }

    pub fn position(&self) -> Position {
        Position(self.slices.iter().map(|s| s.last_off).collect())
    }

    pub fn token(&self) -> Token {
        Token {
            epoch: self.epoch.to_string(),
            pos: self.position(),
        }
    }

    /// Whether every slice is held here (owned or followed): the table is complete.
    pub fn complete(&self) -> bool {
        self.slices.iter().all(|s| s.mode != SliceMode::Absent)
    }

    pub fn slice(&self, part: u32) -> Option<&Slice> {
        self.slices.get(part as usize)
    }

    pub fn slice_mut(&mut self, part: u32) -> &mut Slice {
        let i = part as usize;
        if self.slices.len() <= i {
            self.slices.resize(i + 1, Slice::empty(SliceMode::Absent));
        }
        &mut self.slices[i]
    }
}

/// Summary of one table for listings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableInfo {
    pub name: String,
    pub rows: usize,
    pub seq: u64,
    pub epoch: String,
    pub pos: String,
    pub partitions: usize,
    /// Slices held here (owned or followed): `partitions` when the table is complete.
    pub held: usize,
}

/// A change as applied to a table.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedChange {
    pub key: String,
    pub op: Op,
    /// The row after the change; `None` when deleted.
    pub row: Option<StoredRow>,
    /// The row before the change; `None` when it did not exist.
    pub before: Option<StoredRow>,
    pub part: u32,
    pub off: i64,
    /// The database commit time (`source.ts_ms`).
    pub ts_ms: Option<i64>,
    /// The Kafka timestamp of the record that carried the change.
    pub kafka_ts_ms: Option<i64>,
    /// When the ingest loop took the record from the consumer (livetable's own share of the
    /// latency starts here).
    pub polled: Option<Instant>,
}

impl AppliedChange {
    /// The RFC 7386 patch of this row: the whole row when new (NULL columns left out), only the
    /// changed columns when updated, `null` when deleted.
    pub fn patch(&self) -> Value {
        crate::patch::row_diff(self.before.as_deref(), self.row.as_deref())
    }
}

/// What one commit to a table changed, in application order.
#[derive(Debug, Clone)]
pub struct TableUpdate {
    pub table: Arc<str>,
    pub epoch: Arc<str>,
    /// Node-local, +1 per update of this table: subscribers skip updates their snapshot holds.
    pub useq: u64,
    /// The table's change count after this update.
    pub seq: u64,
    /// The table's position after this update.
    pub pos: Position,
    pub changes: Vec<AppliedChange>,
}

impl TableUpdate {
    pub fn token(&self) -> Token {
        Token {
            epoch: self.epoch.to_string(),
            pos: self.pos.clone(),
        }
    }
}

/// Where committed updates go (the fan-out implements it): called in application order per table,
/// while the table's order lock is held, so it must be quick and must not call back into the
/// table's writers.
pub trait UpdateSink: Send + Sync {
    fn publish(&self, update: TableUpdate);
}

/// A sink that drops updates (tools, and roles that serve no live clients).
pub struct NoSink;

impl UpdateSink for NoSink {
    fn publish(&self, _update: TableUpdate) {}
}

/// A table in memory: its state, the lock that orders its commits, and the one that lets one
/// whole-table pass run at a time: a column index's build (see `state::index`) or the parse of
/// the rows held as JSON (`state::parse`).
#[derive(Debug)]
pub struct Table {
    state: RwLock<TableState>,
    order: Mutex<()>,
    indexing: Mutex<()>,
    /// Column indexes built (copies taken) so far.
    index_builds: std::sync::atomic::AtomicUsize,
    /// Passes that parsed the rows held as JSON (see `state::parse`).
    parse_passes: std::sync::atomic::AtomicUsize,
}

impl Table {
    pub fn read(&self) -> RwLockReadGuard<'_, TableState> {
        // a poisoned lock means a writer panicked mid-update; the data is still the last full state
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a writer could take the table's lock now (tests of what runs outside it).
    #[cfg(test)]
    pub fn try_update_for_tests(&self) -> bool {
        self.state.try_write().is_ok()
    }

    fn write(&self) -> RwLockWriteGuard<'_, TableState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the table's order lock: no commit to it runs until the guard drops.
    pub(crate) fn order_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes slice bookkeeping (modes, owners, acknowledgements) without changing rows.
    pub fn update_slices(&self, f: impl FnOnce(&mut TableState)) {
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut self.write());
    }

    /// Forgets a slice this node no longer holds (a materialiser's revoked partition): its rows
    /// leave memory (not the store) and it becomes absent. Nothing is published: the rows were
    /// not deleted, they moved to another node.
    pub fn drop_slice(&self, part: u32) {
        let _order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = self.write();
        t.rows.retain(|_, e| e.part != part);
        *t.slice_mut(part) = Slice::empty(SliceMode::Absent);
    }
}

/// All tables in memory.
#[derive(Default)]
pub struct Tables {
    inner: RwLock<HashMap<String, Arc<Table>>>,
}

impl Tables {
    /// The table named `name`, if it exists.
    pub fn get(&self, name: &str) -> Option<Arc<Table>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The table, created empty (every slice absent) if it does not exist. A table whose lineage
    /// changed (a different epoch) is replaced.
    pub fn ensure(&self, name: &str, epoch: &str, source: &str, partitions: u32) -> Arc<Table> {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = map.get(name) {
            let (same, derived) = {
                let s = t.read();
                let derived = s.slices.iter().any(|s| s.mode == SliceMode::Derived);
                (&*s.epoch == epoch, derived)
            };
            if same {
                return t.clone();
            }
            if derived {
                tracing::error!(table = name, "a table of the input takes the name of a declared view: the view is no longer served; rename the view");
            }
        }
        let t = Arc::new(Table {
            state: RwLock::new(TableState::new(name, epoch, source, partitions)),
            order: Mutex::new(()),
            indexing: Mutex::new(()),
            index_builds: Default::default(),
            parse_passes: Default::default(),
        });
        map.insert(name.to_string(), t.clone());
        t
    }

    /// Inserts a whole table (start-up, from the store).
    pub fn insert(&self, state: TableState) -> Arc<Table> {
        let name = state.name.to_string();
        let t = Arc::new(Table {
            state: RwLock::new(state),
            order: Mutex::new(()),
            indexing: Mutex::new(()),
            index_builds: Default::default(),
            parse_passes: Default::default(),
        });
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, t.clone());
        t
    }

    /// Names of every table.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Sorted summaries of every table that holds at least one slice.
    pub fn list(&self) -> Vec<TableInfo> {
        let tables: Vec<Arc<Table>> = self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out: Vec<TableInfo> = tables
            .iter()
            .filter_map(|t| {
                let t = t.read();
                let held = t
                    .slices
                    .iter()
                    .filter(|s| s.mode != SliceMode::Absent)
                    .count();
                (held > 0).then(|| TableInfo {
                    name: t.name.to_string(),
                    rows: t.rows.len(),
                    seq: t.seq(),
                    epoch: t.epoch.to_string(),
                    pos: t.token().to_string(),
                    partitions: t.slices.len(),
                    held,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One row, shared (parsed when a column of it is read).
    pub fn row(&self, table: &str, key: &str) -> Option<StoredRow> {
        let t = self.get(table)?;
        let t = t.read();
        t.rows.get(key).map(|e| e.row.clone())
    }

    /// Applies a staged delta and publishes its update (if it changed rows) to `sink`, in order.
    /// Returns the update's `useq`.
    pub fn commit(&self, delta: Delta, sink: &dyn UpdateSink) -> u64 {
        let table = delta.table.clone();
        let _order = table.order.lock().unwrap_or_else(|e| e.into_inner());
        let update = {
            let mut t = table.write();
            for (key, entry) in delta.rows {
                match entry {
                    Some(e) => {
                        t.rows.insert(key, e);
                    }
                    None => {
                        t.rows.remove(&key);
                    }
                }
            }
            for (part, s) in delta.slices {
                let slice = t.slice_mut(part);
                // a delta's slice fields are its base (read when it was staged) plus its own
                // changes: one staged before another writer's commit must not take the slice back
                // (a follower folding this node's own changelog lost counts that way)
                if s.input_reset {
                    // the input's offsets started over (read from its owner's changelog): the
                    // slice's position, acknowledged offset and deletes are those of the new
                    // offsets, lower than before
                    slice.last_off = s.last_off;
                    slice.count = s.count;
                    slice.acked = s.acked;
                    slice.tombs = s.tombs;
                    slice.resets = slice.resets.wrapping_add(1);
                } else {
                    if s.last_off >= slice.last_off {
                        slice.last_off = s.last_off;
                        slice.count = s.count;
                    }
                    slice.tombs.extend(s.tombs);
                    slice.raise_acked(s.acked);
                }
                slice.owner = slice.owner.max(s.owner);
                if s.cl_next > slice.cl_next {
                    slice.cl_next = s.cl_next;
                }
            }
            if delta.changes.is_empty() {
                return t.useq;
            }
            t.useq += 1;
            TableUpdate {
                table: t.name.clone(),
                epoch: t.epoch.clone(),
                useq: t.useq,
                seq: t.seq(),
                pos: t.position(),
                changes: delta.changes,
            }
        };
        let useq = update.useq;
        sink.publish(update);
        useq
    }
}

/// Bookkeeping of one slice after a delta.
#[derive(Debug, Clone)]
pub struct SliceDelta {
    pub last_off: i64,
    pub count: u64,
    pub owner: Owner,
    pub acked: i64,
    pub cl_next: i64,
    pub resets: u32,
    /// Deletes newer than `acked` in this delta.
    pub tombs: HashMap<String, i64>,
    /// The input partition's offsets started over in this delta ([`Delta::reset_input`]): its
    /// `last_off`, `acked` and `tombs` replace the slice's instead of raising them.
    pub input_reset: bool,
}

/// Changes to one table, staged against its current state by one writer.
pub struct Delta {
    pub table: Arc<Table>,
    /// Final state per touched key (`None`: removed).
    pub rows: HashMap<String, Option<Entry>>,
    pub slices: HashMap<u32, SliceDelta>,
    pub changes: Vec<AppliedChange>,
}

/// What staging one row write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staged {
    /// The row changed.
    Applied,
    /// The row already had this value (or the key was already absent).
    Unchanged,
    /// An older change than the one the row (or its delete) already reflects: skipped.
    Stale,
}

/// One row write: the new row (`None` deletes), from input partition `part` at offset `off`.
#[derive(Debug, Clone)]
pub struct RowWrite {
    pub key: String,
    pub row: Option<StoredRow>,
    pub op: Op,
    pub part: u32,
    pub off: i64,
    pub ts_ms: Option<i64>,
    pub kafka_ts_ms: Option<i64>,
    pub polled: Option<Instant>,
}

impl Delta {
    pub fn new(table: Arc<Table>) -> Self {
        Delta {
            table,
            rows: HashMap::new(),
            slices: HashMap::new(),
            changes: Vec::new(),
        }
    }

    /// The current entry of `key`: staged in this delta, else the table's.
    pub fn current(&self, key: &str) -> Option<Entry> {
        match self.rows.get(key) {
            Some(e) => e.clone(),
            None => self.table.read().rows.get(key).cloned(),
        }
    }

    /// The slice bookkeeping as staged so far.
    pub fn slice(&mut self, part: u32) -> &mut SliceDelta {
        let table = &self.table;
        self.slices.entry(part).or_insert_with(|| {
            let t = table.read();
            let s = t
                .slice(part)
                .cloned()
                .unwrap_or_else(|| Slice::empty(SliceMode::Absent));
            SliceDelta {
                last_off: s.last_off,
                count: s.count,
                owner: s.owner,
                acked: s.acked,
                cl_next: s.cl_next,
                resets: s.resets,
                tombs: HashMap::new(),
                input_reset: false,
            }
        })
    }

    /// The input partition of slice `part` started over (its topic was created again, the owner's
    /// changelog says): what follows has input offsets from 0 again. The slice forgets its position,
    /// acknowledged offset and deletes, and its rows take offset -1, older than any new change, as
    /// the owner's did ([`Rows::set_offsets`]): staged here, so the store gets them with the delta
    /// (no change is published: no value changed).
    ///
    /// [`Rows::set_offsets`]: crate::table::rows::Rows::set_offsets
    pub fn reset_input(&mut self, part: u32) {
        let s = self.slice(part);
        s.last_off = -1;
        s.acked = -1;
        s.tombs.clear();
        s.input_reset = true;
        for e in self.rows.values_mut().flatten() {
            if e.part == part {
                e.off = -1;
            }
        }
        let committed: Vec<(String, Entry)> = {
            let t = self.table.read();
            t.rows
                .iter()
                .filter(|(k, e)| e.part == part && !self.rows.contains_key(*k))
                .map(|(k, e)| {
                    let mut e = e.clone();
                    e.off = -1;
                    (k.clone(), e)
                })
                .collect()
        };
        for (k, e) in committed {
            self.rows.insert(k, Some(e));
        }
    }

    /// Whether a change of `key` from (`part`, `off`) is older than what the state reflects: the
    /// row's last change (same partition) or its delete is at `off` or later. After the input's
    /// offsets started over, rows are at offset -1 ([`Delta::reset_input`]), and the committed
    /// slice's deletes (of the old offsets) no longer count. Reads the delta's slice without
    /// staging one.
    pub fn is_stale(&self, key: &str, part: u32, off: i64) -> bool {
        if let Some(e) = self.current(key) {
            return e.part == part && e.off >= off;
        }
        let staged = self.slices.get(&part);
        if let Some(t) = staged.and_then(|s| s.tombs.get(key)) {
            return *t >= off;
        }
        if staged.is_some_and(|s| s.input_reset) {
            return false;
        }
        let t = self.table.read();
        t.slice(part)
            .and_then(|s| s.tombs.get(key))
            .is_some_and(|t| *t >= off)
    }

    /// Stages one row write. `count_change`: a change newer than the slice's last one is counted
    /// (and moves the slice's position); a re-applied older one (a gap filled after a restore) is
    /// not, so that counts stay the same on every node.
    pub fn stage(&mut self, w: RowWrite) -> Staged {
        let current = self.current(&w.key);
        let before = current.map(|e| e.row);
        let unchanged = match (&before, &w.row) {
            (None, None) => true,
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        {
            let s = self.slice(w.part);
            if w.off > s.last_off {
                s.last_off = w.off;
                if !unchanged {
                    s.count += 1;
                }
            }
            if unchanged {
                return Staged::Unchanged;
            }
            if w.row.is_none() && w.off > s.acked {
                s.tombs.insert(w.key.clone(), w.off);
            }
        }
        match &w.row {
            Some(row) => {
                self.rows.insert(
                    w.key.clone(),
                    Some(Entry {
                        row: row.clone(),
                        part: w.part,
                        off: w.off,
                    }),
                );
            }
            None => {
                self.rows.insert(w.key.clone(), None);
            }
        }
        self.changes.push(AppliedChange {
            key: w.key,
            op: w.op,
            row: w.row,
            before,
            part: w.part,
            off: w.off,
            ts_ms: w.ts_ms,
            kafka_ts_ms: w.kafka_ts_ms,
            polled: w.polled,
        });
        Staged::Applied
    }
}

/// A row as clients see it: NULL columns left out.
pub fn without_nulls(row: &Row) -> Map<String, Value> {
    row.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

mod index;
mod parse;
#[cfg(test)]
mod test_tables;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Collect(Mutex<Vec<TableUpdate>>);
    impl UpdateSink for Collect {
        fn publish(&self, update: TableUpdate) {
            self.0.lock().unwrap().push(update);
        }
    }

    fn w(key: &str, row: Option<Value>, part: u32, off: i64) -> RowWrite {
        RowWrite {
            key: key.into(),
            row: row.map(|v| Arc::new(v.as_object().unwrap().clone()).into()),
            op: Op::Update,
            part,
            off,
            ts_ms: None,
            kafka_ts_ms: None,
            polled: None,
        }
    }

    #[test]
    fn stage_counts_changes_per_slice_and_skips_no_ops() {
        let tables = Tables::default();
        let t = tables.ensure("t", "e1", "topic", 2);
        let sink = Collect(Mutex::new(Vec::new()));
        let mut d = Delta::new(t.clone());
        assert_eq!(
            d.stage(w("a", Some(json!({"v": 1})), 0, 10)),
            Staged::Applied
        );
        assert_eq!(
            d.stage(w("a", Some(json!({"v": 1})), 0, 11)),
            Staged::Unchanged
        );
        assert_eq!(
            d.stage(w("zz", None, 1, 3)),
            Staged::Unchanged,
            "absent key"
        );
        assert_eq!(
            d.stage(w("b", Some(json!({"v": 2})), 1, 4)),
            Staged::Applied
        );
        assert_eq!(tables.commit(d, &sink), 1);
        {
            let s = t.read();
            assert_eq!(s.seq(), 2);
            assert_eq!(s.position(), Position(vec![11, 4]));
            assert_eq!(
                s.rows["a"].off, 10,
                "an unchanged value keeps its change's offset"
            );
        }
        let updates = sink.0.lock().unwrap();
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].changes.len(), 2);
        assert_eq!(updates[0].seq, 2);
        assert_eq!(updates[0].token().to_string(), "e1~11.4");
    }

    #[test]
    fn stale_changes_are_recognised_by_row_offset_and_tombstone() {
        let tables = Tables::default();
        let t = tables.ensure("t", "e1", "topic", 1);
        let sink = NoSink;
        let mut d = Delta::new(t.clone());
        d.stage(w("a", Some(json!({"v": 1})), 0, 10));
        d.stage(w("gone", Some(json!({"v": 1})), 0, 11));
        d.stage(w("gone", None, 0, 12));
        tables.commit(d, &sink);
        let mut d = Delta::new(t.clone());
        assert!(d.is_stale("a", 0, 9));
        assert!(d.is_stale("a", 0, 10));
        assert!(!d.is_stale("a", 0, 13));
        assert!(!d.is_stale("a", 1, 5), "another partition: not comparable");
        assert!(d.is_stale("gone", 0, 11), "deleted at 12");
        assert!(!d.is_stale("new", 0, 1));
        assert!(d.slices.is_empty(), "a check stages no slice");
        // a gap filled after a restore: applied, not counted
        let before = t.read().seq();
        assert_eq!(
            d.stage(w("c", Some(json!({"v": 3})), 0, 5)),
            Staged::Applied
        );
        tables.commit(d, &sink);
        assert_eq!(t.read().seq(), before);
        assert_eq!(t.read().position(), Position(vec![12]));
        // tombstones older than the acknowledged offset are forgotten
        t.update_slices(|s| s.slice_mut(0).raise_acked(12));
        assert!(t.read().slices[0].tombs.is_empty());
    }
}
