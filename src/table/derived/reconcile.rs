//! Views over a table whose rows are their input rows' (`history`, `delta` without `key`
//! columns; [`crate::views::ViewOperator::output_per_input_row`]), and `history` with `key`
//! columns ([`crate::views::ViewOperator::keyed_history`]): what they do instead of starting
//! again from the input's current rows.
//!
//! A keyed history files the changes of several input rows into one row, so no row can name the
//! change of each input row it holds. In memory it keeps `seen` per input key present, as the
//! others do; every record's mark carries, per input partition, the offset up to which the view
//! had taken the changes when it was written ([`Tracked::upto`], as
//! [`crate::table::viewlog::Mark::upto`]). After a restore, an input key not seen since is held
//! when the record of the output row its row files into holds its change ([`Tracked::groups`]);
//! a reconcile takes each other row as one change, oldest offset first (a row deleted meanwhile
//! is not known: its output row went with it). Once the view's positions reach every offset the
//! restored records name, the rows they held are held by their own change and the records are
//! dropped; until then a clean stop does not save the view. The rest of this doc is about the
//! views whose rows are their input rows'.
//!
//! Such a view keeps, per input key, the input change (lineage, partition, offset) its row last
//! took ([`Tracked`]), and writes it into each record's mark
//! ([`crate::table::viewlog::Mark::at`], with the lineage in `input`). Then:
//! - **Restore.** A node on which nothing saved the view (kill -9, a new or lost data
//!   directory) reads the view's topic at start: the rows are the operator's whole state, and
//!   the marks say which change of its input key each row holds.
//! - **Reconcile** (at start, at the first update of the input after a restore, and whenever the
//!   input's updates do not follow on: the input was restored, replaced or a slice handed over).
//!   For each input row: a view that already took that change (same lineage, partition, offset
//!   at or past the row's) takes nothing; else it takes the current row as a change (a history
//!   gets it as its next entry, a delta moves from the value it last had). For each row of the
//!   view whose input key the input does not have: the view takes a delete, unless the change it
//!   holds is past the input's position in that partition (the input reads it again, or has not
//!   read that far): then the key waits until the input's position there reaches it, and is
//!   deleted then if the input still lacks it. When an update triggers it, the keys that update
//!   changed are brought up to their row before its first change of them, then take its
//!   changes one by one.
//! - **Unread.** A topic that could not be read at start is read when this node takes it over:
//!   the view is restored and reconciled then, before the whole rewrite.
//! - **Skip.** A change of the input at or before the one the key's row holds is skipped: after
//!   a restore from a topic ahead of the input (another node wrote it, or the input lost its last
//!   changes to kill -9 and reads them again), no entry is taken twice. A delta's tombstone names
//!   the change its key went with ([`Tracked::gone`]): the input's changes of that key up to it
//!   are skipped too, so a deleted key is not shown again while the input reads them. A
//!   partition whose offsets restarted (its topic was created again, seen by the input in this
//!   process) forgets what its keys held.
//!
//! So a view comes back exactly when its topic holds every change the input holds (an idle
//! input, a clean hand-over), and when it is ahead. Where the input holds changes the topic
//! lacks (those in flight when a node died), each such key's changes since its row arrive as one
//! (a history gets the current row once, not each value in between; a delta's movement spans
//! them). Rows of another lineage of the input hold no position in this one: each such key takes
//! its current row (a history adds nothing when it equals its last entry; a keyed history's last
//! entry is usually another row's, so it files the row again), and keys the input lacks at that
//! moment are taken as deletes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::positions::{HeldMarks, Resets, Upto};
use super::{lock, Fed, View, ViewState, Views};
use crate::cdc::decode::Row;
use crate::table::state::{AppliedChange, Entry, Table, TableState, TableUpdate};
use crate::table::viewlog::read::LogContent;
use crate::views::{OutChange, ViewOperator};

/// The input change a row holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Seen {
    pub epoch: Arc<str>,
    pub part: u32,
    pub off: i64,
}

impl Seen {
    /// Whether this row holds a change of `epoch` at `part`/`off`.
    fn holds(&self, epoch: &str, part: u32, off: i64) -> bool {
        &*self.epoch == epoch && self.part == part && self.off >= off
    }

    /// The positions of `by_key` of lineage `epoch`, as a clean stop saves them.
    pub fn of_lineage(by_key: &HashMap<String, Seen>, epoch: &str) -> Vec<(String, u32, i64)> {
        by_key
            .iter()
            .filter(|(_, s)| &*s.epoch == epoch)
            .map(|(k, s)| (k.clone(), s.part, s.off))
            .collect()
    }

    /// Saved positions (of lineage `epoch`) back by key.
    pub fn lineage(saved: Vec<(String, u32, i64)>, epoch: &Arc<str>) -> HashMap<String, Seen> {
        saved
            .into_iter()
            .map(|(k, part, off)| {
                let epoch = epoch.clone();
                (k, Seen { epoch, part, off })
            })
            .collect()
    }
}

/// What a tracked view keeps besides its operator.
#[derive(Debug, Default)]
pub(super) struct Tracked {
    /// The view deletes a key's row when the input row goes (`delta`; a `history` keeps the row,
    /// with a `null` entry): its entry in `seen` goes too.
    pub forget_deleted: bool,
    /// A `history` with `key` columns: several input rows file into one output row, so no row
    /// can name the change of each input row it holds. In memory it keeps `seen` per input key
    /// present, as the others do (`pending` stays empty: its rows are never deleted); in its
    /// topic every record carries how far the view had taken each input partition when it was
    /// written (`upto`), and a restore compares an input row's change with the record of the
    /// output row that row files into (`groups`).
    pub keyed: bool,
    /// Keyed: how far the view took the input's changes (what every mark carries).
    pub upto: Upto,
    /// Keyed, restored from the topic: each output row's mark, for the input keys not in
    /// `seen`; once the view's own positions reach every offset they name, no record holds
    /// more than the view and they are dropped.
    pub groups: HeldMarks,
    /// Per input key, the change its row last took.
    pub seen: HashMap<String, Seen>,
    /// A `delta` (`forget_deleted`): keys whose row went, with the change that deleted it (or
    /// the last change the row held, when the input lacked the key). It is written into the
    /// tombstone's mark (`at`), saved by a clean stop and read back from the tombstones at a
    /// restore, so that an input reading again a change of such a key at or below it (it lost
    /// its last changes to a kill -9, or another node wrote the topic) does not bring the key
    /// back. Dropped at the first update once the input had read past it before that update.
    pub gone: HashMap<String, Seen>,
    /// Keys the view holds ahead of the input's position, which the input does not have yet:
    /// deleted once the input's position in their partition reaches them without them.
    pub pending: HashMap<String, Seen>,
    /// The input's offset restarts per partition last looked at.
    pub resets: Resets,
    /// Restored from the topic and not reconciled yet: the input's first update reconciles.
    pub restored: bool,
    /// Its topic could not be read at start: restored when this node takes the topic over
    /// ([`Views::restore_unread`]), before it writes the view there.
    pub unread: bool,
}

impl Tracked {
    pub fn new(forget_deleted: bool, keyed: bool) -> Self {
        Tracked {
            forget_deleted,
            keyed,
            ..Tracked::default()
        }
    }

    /// Keyed: how far the view took each input partition, when of lineage `epoch` (what every
    /// mark carries; empty otherwise).
    pub fn upto_of(&self, epoch: &str) -> Vec<(u32, i64)> {
        if !self.keyed {
            return Vec::new();
        }
        self.upto.of(epoch)
    }

    /// Whether the view holds the change of lineage `epoch` at `part`/`off` of input key `key`,
    /// whose row is then `row` (a delete: the row before): by the key's own last change, else
    /// (keyed, restored) by the record of the output row that `row` files into, written when
    /// the view had taken that partition up to the change or past it.
    fn holds(
        &self,
        op: &ViewOperator,
        key: &str,
        row: Option<&Row>,
        (epoch, part, off): (&str, u32, i64),
    ) -> bool {
        if let Some(s) = self.seen.get(key) {
            return s.holds(epoch, part, off);
        }
        if self.gone_holds(key, epoch, part, off) {
            return true;
        }
        row.and_then(|r| self.group_upto(op, key, r, epoch, part))
            .is_some_and(|u| u >= off)
    }

    /// Whether `key` went with a change of lineage `epoch` at or past `part`/`off` (see
    /// [`Tracked::gone`]).
    fn gone_holds(&self, key: &str, epoch: &str, part: u32, off: i64) -> bool {
        self.gone
            .get(key)
            .is_some_and(|g| g.holds(epoch, part, off))
    }

    /// Drops the deletes of [`Tracked::gone`] that the input `t` had read before `update` (its
    /// changes up to them are not read again), and those of another lineage. Those `update`
    /// reads again are kept for it, and a delete it brings is written with its change before
    /// the next update drops it.
    fn drop_passed_gone(&mut self, t: &TableState, update: Option<&TableUpdate>) {
        if self.gone.is_empty() {
            return;
        }
        // per partition, where the input was before `update`
        let mut before: HashMap<u32, i64> = HashMap::new();
        for c in update.map_or(&[][..], |u| &u.changes[..]) {
            let b = before.entry(c.part).or_insert(c.off - 1);
            *b = (*b).min(c.off - 1);
        }
        self.gone.retain(|_, g| {
            let read = before
                .get(&g.part)
                .copied()
                .or_else(|| t.slices.get(g.part as usize).map(|s| s.last_off));
            *g.epoch == *t.epoch && read.is_none_or(|r| r < g.off)
        });
    }

    /// A key taken as deleted without an input change of it (the input `t` lacks the key): its
    /// row holds the input's delete of it when the input's slice names it (a delete newer than
    /// what its changelog acknowledged), else the slice's acknowledged position (every change
    /// up to there is in the input's changelog, so a new owner fills no gap below it: the
    /// changes of the key up to there are followed by its delete), or the last change it held
    /// when that is further (or of another lineage). A `delta`'s row goes: its tombstone names
    /// it ([`Tracked::gone`]).
    fn forget(&mut self, key: &str, t: &TableState) {
        let Some(s) = self.seen.get_mut(key) else {
            return;
        };
        if *s.epoch == *t.epoch {
            let read = t.slices.get(s.part as usize).map_or(-1, |sl| {
                sl.tombs
                    .get(key)
                    .copied()
                    .unwrap_or(sl.acked.min(sl.last_off))
            });
            s.off = s.off.max(read);
        }
        if self.forget_deleted {
            if let Some(s) = self.seen.remove(key) {
                self.gone.insert(key.to_string(), s);
            }
        }
    }

    /// Keyed, restored: how far in `part` the record of the output row that input key `key`'s
    /// row `row` files into had taken the input, when of lineage `epoch` and the partition's
    /// offsets did not restart since.
    fn group_upto(
        &self,
        op: &ViewOperator,
        key: &str,
        row: &Row,
        epoch: &str,
        part: u32,
    ) -> Option<i64> {
        if !self.keyed || self.groups.is_empty() {
            return None;
        }
        self.groups
            .upto(&op.event_key(Some(key), row)?, epoch, part)
    }

    /// Notes that the view took input change `part`/`off` of lineage `epoch` of `key`.
    fn note(&mut self, key: &str, epoch: &Arc<str>, part: u32, off: i64) {
        self.seen.insert(
            key.to_string(),
            Seen {
                epoch: epoch.clone(),
                part,
                off,
            },
        );
        self.gone.remove(key);
        if self.keyed {
            self.upto.pass(epoch, part, off);
        }
    }

    /// Keyed (see the module doc): takes each input row whose change it does not hold as one
    /// change, oldest offset first, then the changes of `update` it lacks (the rows `update`
    /// changed are not brought up to their row before it: the group's last entry may be
    /// another row's, so that row would be filed twice); the marks then name the input's
    /// positions.
    fn reconcile_keyed(
        &mut self,
        op: &mut ViewOperator,
        t: &TableState,
        update: Option<&TableUpdate>,
        out: &mut Vec<OutChange>,
    ) {
        let changes = update.map_or(&[][..], |u| &u.changes[..]);
        let changed: HashSet<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        let mut rows: Vec<(&String, &Entry)> = Vec::new();
        for (key, e) in &t.rows {
            if changed.contains(key.as_str()) {
                continue;
            }
            if !self.holds(op, key, Some(&e.row), (&t.epoch, e.part, e.off)) {
                rows.push((key, e));
            }
        }
        rows.sort_by(|a, b| (a.1.off, a.1.part, a.0).cmp(&(b.1.off, b.1.part, b.0)));
        for (key, e) in rows {
            out.extend(op.apply_change(key, None, Some(&e.row)));
            self.note(key, &t.epoch, e.part, e.off);
        }
        if let Some(u) = update {
            for c in &u.changes {
                if self.take(op, &u.epoch, c) {
                    out.extend(op.apply_change(&c.key, c.before.as_deref(), c.row.as_deref()));
                }
            }
        }
        // the view holds every change the input holds
        self.upto.pass_input(t);
        self.drop_passed_groups(op, t);
    }

    /// Drops the restored records' marks once the view's positions reach every offset they
    /// name (of the view's lineage; partitions that restarted left out): no row holds more
    /// than the view then, and the input reads none of their changes again. The input's rows
    /// `t` that the records held are from then on held by their own key (`seen`), up to where
    /// their output row's record was written.
    pub fn drop_passed_groups(&mut self, op: &ViewOperator, t: &TableState) {
        if self.groups.is_empty() {
            return;
        }
        // nothing taken yet (an empty input): the records may all be ahead of it
        let Some(epoch) = self.upto.epoch() else {
            return;
        };
        let passed = self.groups.reached(epoch, |p| self.upto.get(p));
        if passed == Some(false) {
            return;
        }
        for (key, e) in &t.rows {
            if self.seen.contains_key(key) {
                continue;
            }
            // held up to where its output row's record was written: the input may still fill
            // a gap below that (a change its former owner applied but its changelog lost)
            let upto = self
                .group_upto(op, key, &e.row, &t.epoch, e.part)
                .filter(|u| *u >= e.off);
            if let Some(off) = upto {
                self.seen.insert(
                    key.clone(),
                    Seen {
                        epoch: t.epoch.clone(),
                        part: e.part,
                        off,
                    },
                );
            }
        }
        self.groups = HeldMarks::default();
    }

    /// The change `key`'s row holds, when of lineage `epoch` (what its mark carries; a keyed
    /// history's rows are not input rows: none).
    pub fn at(&self, key: &str, epoch: Option<&str>) -> Option<(u32, i64)> {
        if self.keyed {
            return None;
        }
        // a deleted key's tombstone names the change it went with
        let s = self.seen.get(key).or_else(|| self.gone.get(key))?;
        (Some(&*s.epoch) == epoch).then_some((s.part, s.off))
    }

    /// Forgets what the keys of a partition whose offsets restarted held; returns the keys of
    /// such a partition that were waiting for the input (the caller deletes those it lacks).
    fn note_resets(&mut self, t: &TableState) -> Vec<String> {
        let restarted = self.resets.look(t);
        if restarted.is_empty() {
            return Vec::new();
        }
        self.upto.forget(&restarted);
        self.groups.restarted(&restarted);
        self.seen.retain(|_, s| !restarted.contains(&s.part));
        self.gone.retain(|_, s| !restarted.contains(&s.part));
        let mut waiting = Vec::new();
        self.pending.retain(|k, s| {
            let keep = !restarted.contains(&s.part);
            if !keep {
                waiting.push(k.clone());
            }
            keep
        });
        waiting.sort_unstable();
        waiting
    }

    /// Deletes the waiting keys ([`Tracked::pending`]) the input `t` passed without them: its
    /// position in their partition reached them, or it is of another lineage.
    fn delete_passed_pending(
        &mut self,
        op: &mut ViewOperator,
        t: &TableState,
        out: &mut Vec<OutChange>,
    ) {
        if self.pending.is_empty() {
            return;
        }
        let mut passed: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, s)| {
                *s.epoch != *t.epoch
                    || t.slices
                        .get(s.part as usize)
                        .is_some_and(|sl| sl.last_off >= s.off)
            })
            .map(|(k, _)| k.clone())
            .collect();
        passed.sort_unstable();
        for key in &passed {
            self.pending.remove(key);
        }
        self.delete_missing(op, t, passed, out);
    }

    /// Deletes the keys of `keys` the input `t` does not have.
    fn delete_missing(
        &mut self,
        op: &mut ViewOperator,
        t: &TableState,
        keys: Vec<String>,
        out: &mut Vec<OutChange>,
    ) {
        for key in keys {
            if !t.rows.contains_key(&key) {
                out.extend(op.apply_change(&key, None, None));
                self.forget(&key, t);
            }
        }
    }

    /// Whether the view takes input change `c` of lineage `epoch` (false: its row holds it
    /// already); notes it as the key's last.
    fn take(&mut self, op: &ViewOperator, epoch: &Arc<str>, c: &AppliedChange) -> bool {
        let row = c.row.as_deref().or(c.before.as_deref());
        if self.holds(op, &c.key, row, (epoch, c.part, c.off)) {
            if self.keyed {
                // held, so the view's position moves past it (the input reads a partition in
                // order: every change below it was taken or held too)
                self.upto.pass(epoch, c.part, c.off);
            }
            return false;
        }
        self.pending.remove(&c.key);
        if c.row.is_none() && self.forget_deleted {
            self.seen.remove(&c.key);
            let (epoch, part, off) = (epoch.clone(), c.part, c.off);
            self.gone.insert(c.key.clone(), Seen { epoch, part, off });
        } else if c.row.is_none() && self.keyed {
            // a keyed history's rows are groups: what a deleted input key gave is in them, and
            // `seen` stays as large as the input
            self.seen.remove(&c.key);
            self.upto.pass(epoch, c.part, c.off);
        } else {
            self.note(&c.key, epoch, c.part, c.off);
        }
        true
    }

    /// Keyed, restored: the `upto` a record of output row `key` carries, when the record it was
    /// restored from held more than `base` (the view's positions now) in some partition: a row
    /// keeps naming what it holds (after a restore from a topic ahead of the input, the input's
    /// positions are below it until the input reads those changes again).
    pub fn upto_for(
        &self,
        key: &str,
        base: &crate::table::viewlog::Mark,
    ) -> Option<Vec<(u32, i64)>> {
        if !self.keyed {
            return None;
        }
        let restored = self.groups.get(key)?;
        if base.input_epoch().is_none() || restored.input_epoch() != base.input_epoch() {
            return None;
        }
        let mut merged: BTreeMap<u32, i64> = base.upto.iter().copied().collect();
        let mut raised = false;
        for (p, u) in &restored.upto {
            if self.groups.is_reset(*p) {
                continue;
            }
            let e = merged.entry(*p).or_insert(i64::MIN);
            if *u > *e {
                *e = *u;
                raised = true;
            }
        }
        raised.then(|| merged.into_iter().collect())
    }
}

impl Views {
    /// The output of `update` for a tracked view that follows its input: the changes its rows
    /// do not hold, then the deletes of waiting keys the input's position passed without them.
    pub(super) fn feed_tracked(
        st: &mut ViewState,
        input: &Table,
        update: &TableUpdate,
    ) -> Vec<OutChange> {
        let ViewState { op, track, .. } = st;
        let Some(tr) = track.as_mut() else {
            return Vec::new();
        };
        let t = input.read();
        let waiting = tr.note_resets(&t);
        tr.drop_passed_gone(&t, Some(update));
        let mut out = Vec::new();
        tr.delete_missing(op, &t, waiting, &mut out);
        for c in &update.changes {
            if tr.take(op, &update.epoch, c) {
                out.extend(op.apply_change(&c.key, c.before.as_deref(), c.row.as_deref()));
            }
        }
        tr.delete_passed_pending(op, &t, &mut out);
        tr.drop_passed_groups(op, &t);
        out
    }

    /// The deletes of a tracked view's waiting keys its input passed without them, when no
    /// update said so (the input's position moved with writes that changed no row, or the keys
    /// were saved by a clean stop): called about once a second ([`Views::tick`]).
    pub(super) fn tick_pending(&self) {
        for view in self.by_input.values().flatten() {
            if lock(&view.state)
                .track
                .as_ref()
                .is_none_or(|tr| tr.pending.is_empty())
            {
                continue;
            }
            let Some(input) = self.tables.get(&view.def.from) else {
                continue;
            };
            // the input's order lock first, as on the publish path
            let _order = input.order_guard();
            let mut st = lock(&view.state);
            let t = input.read();
            // only against the input the view was last fed: one replaced since (another
            // lineage, a table created again) is reconciled by its first update
            let follows = st
                .fed
                .as_ref()
                .is_some_and(|f| Arc::ptr_eq(&f.table, &input) && f.epoch == t.epoch);
            let mut out = Vec::new();
            {
                let ViewState { op, track, .. } = &mut *st;
                let Some(tr) = track.as_mut().filter(|tr| follows && !tr.restored) else {
                    continue;
                };
                tr.delete_passed_pending(op, &t, &mut out);
            }
            drop(t);
            // not a recomputation: `livetable_view_rebuilds_total` does not count it
            self.commit(view, &mut st, out, Default::default());
        }
    }

    /// Brings a tracked view up to the input's current rows, taking only what it lacks (see the
    /// module doc); the caller holds the input's order lock.
    pub(super) fn reconcile(
        &self,
        view: &View,
        st: &mut ViewState,
        input: &Arc<Table>,
        update: Option<&TableUpdate>,
    ) {
        let mut out: Vec<OutChange> = Vec::new();
        let fed = 'fed: {
            let ViewState { op, track, .. } = &mut *st;
            let Some(tr) = track.as_mut() else {
                return;
            };
            let t = input.read();
            let waiting = tr.note_resets(&t);
            tr.drop_passed_gone(&t, update);
            tr.delete_missing(op, &t, waiting, &mut out);
            tr.restored = false;
            if tr.keyed {
                tr.reconcile_keyed(op, &t, update, &mut out);
                break 'fed Fed::at(input, &t);
            }
            // the keys `update` changed: brought up to the row before its first change of them,
            // then given the update's changes
            let mut first: HashMap<&str, &AppliedChange> = HashMap::new();
            for c in update.map_or(&[][..], |u| &u.changes[..]) {
                first.entry(c.key.as_str()).or_insert(c);
            }
            let mut rows: Vec<(&String, &Entry)> = t
                .rows
                .iter()
                .filter(|(k, _)| !first.contains_key(k.as_str()))
                .collect();
            rows.sort_by(|a, b| a.0.cmp(b.0));
            for (key, e) in rows {
                let held = match tr.seen.get(key) {
                    Some(s) => s.holds(&t.epoch, e.part, e.off),
                    None => tr.gone_holds(key, &t.epoch, e.part, e.off),
                };
                if held {
                    continue;
                }
                let row: &Row = &e.row;
                out.extend(op.apply_change(key, None, Some(row)));
                tr.pending.remove(key);
                tr.gone.remove(key);
                tr.seen.insert(
                    key.clone(),
                    Seen {
                        epoch: t.epoch.clone(),
                        part: e.part,
                        off: e.off,
                    },
                );
            }
            let mut missing: Vec<String> = view
                .table
                .read()
                .rows
                .keys()
                .filter(|k| !t.rows.contains_key(*k) && !first.contains_key(k.as_str()))
                .cloned()
                .collect();
            missing.sort_unstable();
            for key in missing {
                if let Some(s) = tr.seen.get(&key) {
                    let last = t.slices.get(s.part as usize).map_or(-1, |s| s.last_off);
                    if *s.epoch == *t.epoch && s.off > last {
                        // the input has not read that far here: wait for it
                        tr.pending.insert(key, s.clone());
                        continue;
                    }
                }
                tr.pending.remove(&key);
                out.extend(op.apply_change(&key, None, None));
                tr.forget(&key, &t);
            }
            if let Some(u) = update {
                let mut keys: Vec<(&str, &AppliedChange)> = first.into_iter().collect();
                keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
                for (key, c) in keys {
                    // a row that holds nothing of the key, or an older change of this lineage,
                    // is brought up to the row before this change; a row of another lineage is
                    // not (that lineage's first update is its whole past), and one that holds
                    // this change skips what it holds
                    let (gap, known) = match tr.seen.get(key) {
                        // deleted with a change at or past this one: the update's changes of
                        // it are read again, and skipped
                        None if tr.gone_holds(key, &u.epoch, c.part, c.off) => (false, false),
                        None => (true, false),
                        Some(s) => (
                            *s.epoch == *u.epoch && !s.holds(&u.epoch, c.part, c.off),
                            true,
                        ),
                    };
                    if !gap {
                        continue;
                    }
                    // a row with no position (written before positions were kept) is not
                    // deleted for a key new to the update: that may be the input's whole past
                    let has_row = known && view.table.read().rows.contains_key(key);
                    match c.before.as_deref() {
                        Some(before) => out.extend(op.apply_change(key, None, Some(before))),
                        None if has_row => out.extend(op.apply_change(key, None, None)),
                        None => {}
                    }
                    tr.pending.remove(key);
                }
                for c in &u.changes {
                    if tr.take(op, &u.epoch, c) {
                        out.extend(op.apply_change(&c.key, c.before.as_deref(), c.row.as_deref()));
                    }
                }
            }
            Fed::at(input, &t)
        };
        st.fed = Some(fed);
        self.commit_recomputed(view, st, out, update);
    }

    /// Restores a tracked view from what its topic holds (at start, before any view commits:
    /// it is reconciled with its input next). False, and nothing changed, when the content is
    /// not usable: a record that could not be read, a row of another definition of the view, or
    /// nothing written.
    pub(super) fn restore_tracked_from_log(&self, view: &View, content: &LogContent) -> bool {
        if !Self::usable_log(view, content, "the view starts from its input's rows") {
            return false;
        }
        let (keyed, forget_deleted) = lock(&view.state)
            .track
            .as_ref()
            .map_or((false, false), |t| (t.keyed, t.forget_deleted));
        if keyed && !content.rows.values().any(|(_, m, _)| !m.upto.is_empty()) {
            tracing::warn!(
                view = %view.def.name,
                records = content.records,
                "the view's changelog topic names no input positions (written by a livetable before 2026-12-07); the view starts from its input's rows"
            );
            return false;
        }
        let mut op = ViewOperator::new(&view.def);
        let mut rows: Vec<(String, Option<Row>)> = Vec::new();
        let mut groups = HashMap::new();
        let mut seen = HashMap::new();
        let mut gone = HashMap::new();
        // one `Arc` per lineage the marks name
        let mut epochs: HashMap<String, Arc<str>> = HashMap::new();
        let mut lineage = |e: &str| -> Arc<str> {
            epochs
                .entry(e.to_string())
                .or_insert_with(|| e.into())
                .clone()
        };
        for (key, (row, mark, _)) in &content.rows {
            let Some(row) = row else {
                // a delta's tombstone: the change its key went with
                if let (true, Some((part, off)), Some(e)) =
                    (forget_deleted, mark.at, mark.input_epoch())
                {
                    let epoch = lineage(e);
                    gone.insert(key.clone(), Seen { epoch, part, off });
                }
                continue;
            };
            op.rebuild_from_output(key, row);
            rows.push((key.clone(), Some(row.clone())));
            if keyed {
                groups.insert(key.clone(), mark.clone());
                continue;
            }
            if let (Some((part, off)), Some(e)) = (mark.at, mark.input_epoch()) {
                let epoch = lineage(e);
                seen.insert(key.clone(), Seen { epoch, part, off });
            }
        }
        // rows the view holds that the topic does not (a restore after the view started) go
        let stale: Vec<String> = {
            let t = view.table.read();
            t.rows
                .keys()
                .filter(|k| !content.rows.get(*k).is_some_and(|(r, _, _)| r.is_some()))
                .cloned()
                .collect()
        };
        rows.extend(stale.into_iter().map(|k| (k, None)));
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let (n, held, deleted) = (rows.len(), seen.len() + groups.len(), gone.len());
        let mut st = lock(&view.state);
        let Some(tr) = st.track.as_mut() else {
            return false;
        };
        tr.groups = HeldMarks::new(groups);
        tr.seen = seen;
        tr.gone = gone;
        tr.pending.clear();
        tr.restored = true;
        tr.unread = false;
        st.op = op;
        st.fed = None;
        self.commit(view, &mut st, rows, Default::default());
        self.metrics
            .view_log_restores
            .with_label_values(&[&view.def.name])
            .inc();
        tracing::info!(view = %view.def.name, rows = n, with_positions = held, deleted, "view restored from its changelog topic");
        true
    }
}

impl Views {
    /// A view whose topic could not be read at start, now that this node takes the topic over
    /// and read it (`content`), so that the whole rewrite that follows does not replace the
    /// past the topic holds: a tracked view is restored from it and brought up to its input; a
    /// `latest` (or keyed `delta`) computed again with its rows placed by the records
    /// (`order.rs`). Any other view: nothing.
    pub fn restore_unread(&self, name: &str, content: &LogContent) {
        let Some(view) = self.view_named(name) else {
            return;
        };
        let (tracked, ordered) = {
            let mut st = lock(&view.state);
            let ordered = st
                .taken
                .as_mut()
                .is_some_and(super::order::Taken::take_unread);
            let tracked = st
                .track
                .as_mut()
                .is_some_and(|tr| std::mem::take(&mut tr.unread));
            (tracked, ordered)
        };
        if !(tracked || ordered) || content.records == 0 {
            return;
        }
        let input = self.tables.get(&view.def.from);
        // the input's order lock first, as on the publish path
        let _order = input.as_ref().map(|t| t.order_guard());
        let restored = if tracked {
            self.restore_tracked_from_log(view, content)
        } else {
            self.keep_order(view, content)
        };
        if let (true, Some(input)) = (restored, &input) {
            let mut st = lock(&view.state);
            if tracked {
                self.reconcile(view, &mut st, input, None);
            } else {
                if let Some(taken) = st.taken.as_mut() {
                    taken.records_clock_from_now();
                }
                self.rebuild(view, &mut st, input, None);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
