//! Views whose output depends on the order in which their input's rows changed (`group_by` with
//! `latest` over a table, [`ViewOperator::replay_order_matters`]): what a recomputation from the
//! input's current rows needs to take them in the order the view took them.
//!
//! [`Taken`] keeps, per input key, when the view took its row (a number that grows with every
//! change the view takes) and which input change (partition, offset) that was. A recomputation
//! takes first the rows still at that change, in that order, so every group keeps its `latest`
//! and the order behind it; then the others (a row changed while the view did not follow, a row
//! of a slice handed to this node, every row at a start that saved nothing) by input offset, then
//! partition: within a partition the order they were applied in, across partitions offsets that
//! rise at about the same rate for an evenly spread input.
//!
//! A start that saved nothing (kill -9, a new or empty data directory) reads the view's topic:
//! every record's mark carries how far the view had taken each input partition when it was
//! written ([`crate::table::viewlog::Mark::upto`]). An input row whose change is at or below the
//! `upto` of its group's record was taken before that record; among those rows, the ones whose
//! values the record's `latest` columns show were taken last ([`latest_order`]), so each group
//! comes back with the `latest` it had, and the rows changed since (the changes in flight when
//! the node died) are taken after them, by offset. A `delta` with `key` columns reads its topic
//! the same way: its record shows the own row (values and movement) of the row changed last,
//! which is placed last and gets that movement back (`members.rs`).
//!
//! The records are kept until the input's positions reach every offset they name (an input
//! still restored, or reading again what the topic holds, is not complete before): a change they
//! hold is taken as it comes and marks the rows to be placed by them again, which
//! [`Views::tick`] does at most about once per ten times a placement's cost, and once more when
//! the input reaches them. Meanwhile the view is neither written to its topic (its records hold
//! more) nor saved by a clean stop. Records are dropped once the input has not moved for
//! [`RECORDS_KEPT_AT_MOST`], and after [`RECORDS_KEPT_AT_ALL`] in any case.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use super::{lock, View, Views};
use crate::cdc::decode::Row;
use crate::table::state::{AppliedChange, Entry, TableState, TableUpdate};
use crate::table::viewlog::read::LogContent;
use crate::table::viewlog::Mark;
use crate::views::ViewOperator;

/// What [`Taken::seed_from_records`] did.
#[derive(Debug, Default)]
pub(super) struct Seeded {
    /// Groups, and input rows, whose order the records gave.
    pub groups: usize,
    pub rows: usize,
    /// The records were dropped: the input holds everything they name.
    pub done: bool,
    /// A keyed `delta`: the input rows whose own output row (values and movement) is their
    /// group's record, with it.
    pub tops: Vec<(String, Row)>,
}

/// See the module doc.
#[derive(Debug, Default)]
pub(super) struct Taken {
    next: u64,
    /// Input key -> (when taken, partition, offset).
    of: HashMap<String, (u64, u32, i64)>,
    /// Per input partition, the offset up to which the view took the input's changes, of
    /// lineage `upto_epoch` (what every record's mark carries).
    upto: HashMap<u32, i64>,
    upto_epoch: Option<Arc<str>>,
    /// The input's offset restarts per partition last looked at.
    resets: Vec<u32>,
    /// Read from the view's topic at a start that saved nothing, until the input holds what
    /// they do ([`Records`]).
    records: Option<Records>,
    /// A change the records hold was taken as the latest of its group (the input is restored,
    /// or reads again, what they hold): the rows are placed by them again, at most about a
    /// tenth of the time ([`Taken::due`]).
    stale: bool,
    /// When the rows were last placed by the records, and what that recomputation cost.
    placed: Option<(Instant, Duration)>,
}

/// A view's topic as read at a start that saved nothing: each output row and its mark, used by
/// every recomputation ([`Taken::seed_from_records`]) until the input's positions reach every
/// offset the marks name (an input still being restored, or reading again what the topic holds,
/// is not complete before).
#[derive(Debug)]
struct Records {
    rows: HashMap<String, (Row, Arc<Mark>)>,
    /// Per lineage, the furthest offset of each partition the marks name.
    reach: HashMap<String, HashMap<u32, i64>>,
    /// Partitions whose offsets restarted since: the marks say nothing of them.
    reset: HashSet<u32>,
    /// When they were read, and when the input last moved while they were kept (`None`: not
    /// yet).
    read: Instant,
    progress: Option<Instant>,
}

/// How long a view keeps the records read at start once its input stops moving (see
/// [`Taken::expired`]).
pub(super) const RECORDS_KEPT_AT_MOST: Duration = Duration::from_secs(600);

/// How long a view keeps the records read at start at most, however its input moves (a
/// partition whose offsets restarted climbs towards them again as a slow restore does).
pub(super) const RECORDS_KEPT_AT_ALL: Duration = Duration::from_secs(3600);

impl Records {
    /// How far the record of output row `group` had taken partition `part` of lineage `epoch`.
    fn upto(&self, group: &str, epoch: &str, part: u32) -> Option<i64> {
        if self.reset.contains(&part) {
            return None;
        }
        let (_, mark) = self.rows.get(group)?;
        if mark.input_epoch() != Some(epoch) {
            return None;
        }
        mark.upto.iter().find(|(p, _)| *p == part).map(|(_, u)| *u)
    }

    /// Whether the input `t` holds everything the marks name (or is of another lineage and
    /// holds rows: no mark holds any of them).
    fn passed(&self, t: &TableState) -> bool {
        match self.reach.get(&*t.epoch) {
            None => t.seq() > 0,
            Some(reach) => reach.iter().all(|(p, u)| {
                self.reset.contains(p)
                    || t.slices.get(*p as usize).is_some_and(|s| s.last_off >= *u)
            }),
        }
    }
}

impl Taken {
    /// Notes that the view took input change `c` of lineage `epoch`.
    pub fn note(&mut self, epoch: &Arc<str>, c: &AppliedChange) {
        if c.row.is_some() {
            self.of.insert(c.key.clone(), (self.next, c.part, c.off));
            self.next += 1;
        } else {
            self.of.remove(&c.key);
        }
        self.pass(epoch, c.part, c.off);
    }

    /// Notes that the view took the input's changes of lineage `epoch` up to `off` in `part`.
    fn pass(&mut self, epoch: &Arc<str>, part: u32, off: i64) {
        if self.upto_epoch.as_deref() != Some(&**epoch) {
            self.upto.clear();
            self.upto_epoch = Some(epoch.clone());
        }
        let u = self.upto.entry(part).or_insert(off);
        *u = (*u).max(off);
    }

    /// The view holds exactly what the input `t` holds (a recomputation from its rows, a clean
    /// stop's save at them).
    fn pass_input(&mut self, t: &TableState) {
        self.upto.clear();
        self.upto_epoch = None;
        for (p, s) in t.slices.iter().enumerate() {
            if s.last_off >= 0 {
                self.pass(&t.epoch, p as u32, s.last_off);
            }
        }
        self.resets = t.slices.iter().map(|s| s.resets).collect();
    }

    /// Forgets how far the view took a partition of `t` whose offsets restarted (its topic was
    /// created again): its new offsets are below the old ones.
    pub fn note_resets(&mut self, t: &TableState) {
        if t.slices
            .iter()
            .map(|s| s.resets)
            .eq(self.resets.iter().copied())
        {
            return;
        }
        let now: Vec<u32> = t.slices.iter().map(|s| s.resets).collect();
        if !self.resets.is_empty() {
            let restarted = restarted(&self.resets, t);
            for p in &restarted {
                self.upto.remove(p);
                if let Some(r) = self.records.as_mut() {
                    r.reset.insert(*p);
                }
            }
            // the rows it took there hold no position in the new offsets (the input's own rows
            // of such a partition are at -1 until they change)
            for (_, part, off) in self.of.values_mut() {
                if restarted.contains(part) {
                    *off = -1;
                }
            }
        }
        self.resets = now;
    }

    /// How far the view took each input partition, when of lineage `epoch` (what every record's
    /// mark carries; empty otherwise).
    pub fn upto_of(&self, epoch: &str) -> Vec<(u32, i64)> {
        if self.upto_epoch.as_deref() != Some(epoch) {
            return Vec::new();
        }
        let mut v: Vec<(u32, i64)> = self.upto.iter().map(|(p, o)| (*p, *o)).collect();
        v.sort_unstable();
        v
    }

    /// Seeds the order from `op`, loaded from a clean stop's save at exactly the input's rows
    /// `t`: a row whose `latest` values it holds is placed where it took them; a row without one
    /// (NULL in every `latest` column) before them.
    pub fn seed(&mut self, op: &ViewOperator, t: &TableState) {
        self.of = t
            .rows
            .iter()
            .map(|(k, e)| {
                let when = op.replay_rank(k, &e.row).map_or(0, |r| r + 1);
                (k.clone(), (when, e.part, e.off))
            })
            .collect();
        self.next = self.of.values().map(|(w, _, _)| w + 1).max().unwrap_or(0);
        self.pass_input(t);
        self.records = None;
    }

    /// Keeps what the view's topic holds (read at a start that saved nothing) for the next
    /// recomputation; the number of rows it has.
    pub fn keep_records(&mut self, content: &LogContent) -> usize {
        let rows: HashMap<String, (Row, Arc<Mark>)> = content
            .rows
            .iter()
            .filter_map(|(k, (row, mark, _))| Some((k.clone(), (row.clone()?, mark.clone()))))
            .collect();
        let mut reach: HashMap<String, HashMap<u32, i64>> = HashMap::new();
        for (_, m) in rows.values() {
            if let Some(e) = m.input_epoch() {
                let r = reach.entry(e.to_string()).or_default();
                for (p, u) in &m.upto {
                    let v = r.entry(*p).or_insert(*u);
                    *v = (*v).max(*u);
                }
            }
        }
        let n = rows.len();
        self.records = Some(Records {
            rows,
            reach,
            reset: HashSet::new(),
            read: Instant::now(),
            progress: None,
        });
        n
    }

    /// Whether records read from the view's topic are kept.
    pub fn has_records(&self) -> bool {
        self.records.is_some()
    }

    /// Notes that the view took `update`: when one of its changes is one the records hold, the
    /// rows are to be placed by them again.
    pub fn note_held(&mut self, op: &ViewOperator, update: &TableUpdate) {
        let Some(r) = self.records.as_mut() else {
            return;
        };
        r.progress = Some(Instant::now());
        self.stale |= update.changes.iter().any(|c| {
            [c.row.as_deref(), c.before.as_deref()]
                .into_iter()
                .flatten()
                .filter_map(|row| op.event_key(Some(&c.key), row))
                .any(|g| {
                    r.upto(&g, &update.epoch, c.part)
                        .is_some_and(|u| c.off <= u)
                })
        });
    }

    /// Whether the rows are to be placed by the records again now (by [`Views::tick`]): the
    /// view took changes they hold and its last placement is ten times its cost ago, or it took
    /// some and the records expire (at `now`).
    pub fn due(&self, now: Instant) -> bool {
        self.records.is_some()
            && self.stale
            && (self.expired(now)
                || self.placed.is_none_or(|(at, cost)| {
                    now.saturating_duration_since(at) >= cost.saturating_mul(10)
                }))
    }

    /// Notes what a placement by the records cost (the whole recomputation and its commit).
    pub fn placed_in(&mut self, cost: Duration) {
        self.placed = Some((Instant::now(), cost));
    }

    /// Whether the records were kept for [`RECORDS_KEPT_AT_MOST`] since the input last moved,
    /// or for [`RECORDS_KEPT_AT_ALL`] (a partition whose offsets restarted while the node was
    /// down never reaches them), at `now`.
    pub fn expired(&self, now: Instant) -> bool {
        self.records.as_ref().is_some_and(|r| {
            now.saturating_duration_since(r.read) >= RECORDS_KEPT_AT_ALL
                || r.progress
                    .is_some_and(|p| now.saturating_duration_since(p) >= RECORDS_KEPT_AT_MOST)
        })
    }

    /// Drops the records kept; true when there were some.
    pub fn drop_records(&mut self) -> bool {
        self.records.take().is_some()
    }

    /// Whether the input `t` holds everything the records kept name: the next recomputation
    /// places the rows by them for the last time and drops them.
    pub fn records_reached(&self, t: &TableState) -> bool {
        self.records.as_ref().is_some_and(|r| r.passed(t))
    }

    /// Places the input rows of `t` that the records kept by [`Taken::keep_records`] hold, in
    /// the order they say (see the module doc), ahead of the rows taken since (in the order
    /// taken) and of the others, for the replay that follows; drops the records once `t` holds
    /// everything they name.
    pub fn seed_from_records(&mut self, op: &ViewOperator, t: &TableState) -> Seeded {
        self.note_resets(t);
        let mut seeded = Seeded::default();
        let Some(records) = self.records.take() else {
            return seeded;
        };
        let mut held: BTreeMap<&str, Vec<(&String, &Entry)>> = BTreeMap::new();
        for (k, e) in t.rows.iter() {
            let Some(group) = op.event_key(Some(k), &e.row) else {
                continue;
            };
            let upto = records.upto(&group, &t.epoch, e.part);
            if let (true, Some((group, _))) = (
                upto.is_some_and(|u| e.off <= u),
                records.rows.get_key_value(&group),
            ) {
                held.entry(group.as_str()).or_default().push((k, e));
            }
        }
        let columns = op.latest_columns();
        let mut of: HashMap<String, (u64, u32, i64)> = HashMap::new();
        let mut n = 0u64;
        seeded.groups = held.len();
        for (group, mut rows) in held {
            let Some((record, _)) = records.rows.get(group) else {
                continue;
            };
            rows.sort_unstable_by(|a, b| (a.1.off, a.1.part, a.0).cmp(&(b.1.off, b.1.part, b.0)));
            let rows: Vec<((&String, &Entry), &Row)> =
                rows.into_iter().map(|(k, e)| ((k, e), &*e.row)).collect();
            let order = if columns.is_empty() {
                // a keyed `delta`: its record is the own row of the row changed last (and of
                // any other row with the same values: which of them it was is not known)
                let (order, shown) = shown_last(record, rows, |own, row| op.same_values(own, row));
                seeded
                    .tops
                    .extend(shown.into_iter().map(|(k, _)| (k.clone(), record.clone())));
                order
            } else {
                latest_order(&columns, record, rows)
            };
            for (k, e) in order {
                of.insert(k.clone(), (n, e.part, e.off));
                n += 1;
            }
        }
        seeded.rows = n as usize;
        // the rows taken since, after them in the order taken
        for (k, (when, part, off)) in self.of.drain() {
            of.entry(k).or_insert((n + when, part, off));
        }
        self.next += n;
        self.of = of;
        seeded.done = records.passed(t);
        if !seeded.done {
            self.records = Some(records);
        }
        self.stale = false;
        seeded
    }

    /// The input's rows `t` not taken as they are now (changed while the view did not follow,
    /// or never taken), by input offset then partition, each with whether its position can be
    /// compared with the one taken (not when the input is of another lineage, or the row's
    /// partition restarted its offsets); the view takes them in that order, which is noted, and
    /// no longer holds the keys `t` lacks.
    pub fn changed<'t>(&mut self, t: &'t TableState) -> Vec<(&'t String, &'t Row, bool)> {
        let lineage = self.upto_epoch.as_deref().is_none_or(|e| e == &*t.epoch);
        if !lineage {
            self.of.clear();
        }
        let restarted = restarted(&self.resets, t);
        let mut rows: Vec<(&String, &Entry)> = t
            .rows
            .iter()
            .filter(|(k, e)| {
                restarted.contains(&e.part)
                    || !matches!(self.of.get(*k), Some((_, part, off)) if (*part, *off) == (e.part, e.off))
            })
            .collect();
        rows.sort_unstable_by(|a, b| (a.1.off, a.1.part, a.0).cmp(&(b.1.off, b.1.part, b.0)));
        self.of.retain(|k, _| t.rows.contains_key(k));
        for (k, e) in &rows {
            self.of.insert((*k).clone(), (self.next, e.part, e.off));
            self.next += 1;
        }
        self.pass_input(t);
        rows.into_iter()
            .map(|(k, e)| {
                let comparable = lineage && e.off >= 0 && !restarted.contains(&e.part);
                (k, &*e.row, comparable)
            })
            .collect()
    }

    /// The input's rows `t` in the order a recomputation takes them (see the module doc); the
    /// view takes them in that order, which is noted.
    pub fn replay<'t>(&mut self, t: &'t TableState) -> Vec<(&'t String, &'t Row)> {
        // (not taken as it is now, when taken, input offset, partition)
        type Rank = (bool, u64, i64, u32);
        let mut ranked: Vec<(Rank, &String, &Row, (u32, i64))> = t
            .rows
            .iter()
            .map(|(k, e)| {
                let row: &Row = &e.row;
                let rank = match self.of.get(k) {
                    Some((when, part, off)) if (*part, *off) == (e.part, e.off) => {
                        (false, *when, 0, 0)
                    }
                    _ => (true, 0, e.off, e.part),
                };
                (rank, k, row, (e.part, e.off))
            })
            .collect();
        ranked.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        self.of = ranked
            .iter()
            .enumerate()
            .map(|(i, (_, k, _, (part, off)))| ((*k).clone(), (i as u64, *part, *off)))
            .collect();
        self.next = ranked.len() as u64;
        self.pass_input(t);
        ranked.into_iter().map(|(_, k, r, _)| (k, r)).collect()
    }
}

impl Views {
    /// Places again the rows of each `latest` that took changes its records hold, when due
    /// ([`Taken::due`]), and drops records kept too long (call it about once a second: an input
    /// restored or read again in many updates costs a recomputation per tick at most, and one
    /// that then stays idle is placed all the same).
    pub fn tick(&self) {
        self.tick_at(Instant::now());
    }

    /// [`Views::tick`] with the clock at `now`.
    pub fn tick_at(&self, now: Instant) {
        for view in self.by_input.values().flatten() {
            if !lock(&view.state)
                .taken
                .as_ref()
                .is_some_and(Taken::has_records)
            {
                continue;
            }
            let Some(input) = self.tables.get(&view.def.from) else {
                continue;
            };
            // the input's order lock first, as on the publish path
            let _order = input.order_guard();
            let mut st = lock(&view.state);
            let Some(taken) = st.taken.as_ref() else {
                continue;
            };
            // the input may reach the records with writes that change no row (nothing is
            // published then)
            let reached = taken.records_reached(&input.read());
            let expired = taken.expired(now);
            if reached || taken.due(now) {
                let began = Instant::now();
                self.rebuild(view, &mut st, &input, None);
                if let Some(taken) = st.taken.as_mut() {
                    taken.placed_in(began.elapsed());
                }
            }
            if expired && st.taken.as_mut().is_some_and(Taken::drop_records) {
                tracing::warn!(view = %view.def.name, "the input did not reach what the view's topic holds (stopped for 10 minutes, or an hour passed; its offsets restarted while the node was down?): the records read at start are dropped");
                view.log.dirty.store(true, Ordering::Release);
            }
        }
    }

    /// A `latest` view on which nothing was saved, at start: keeps what its topic holds (`read`:
    /// `Ok(None)` no topic, `Err` not read) for its first recomputation. A content with a record
    /// that could not be read, or a row of another definition, is not used (the rows are then
    /// taken by offset).
    pub(super) fn order_from_log(&self, view: &View, read: Result<Option<LogContent>, String>) {
        let content = match read {
            Ok(Some(c)) if c.records > 0 => c,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(view = %view.def.name, error = %e, "the view's changelog topic could not be read; its rows are taken by input offset");
                return;
            }
        };
        if !Self::usable_log(view, &content, "its rows are taken by input offset") {
            return;
        }
        if content.rows.values().all(|(_, m, _)| m.upto.is_empty()) {
            tracing::warn!(
                view = %view.def.name,
                records = content.records,
                "the view's changelog topic names no input positions (written by a livetable before 2026-12-07); its rows are taken by input offset"
            );
            return;
        }
        let mut st = lock(&view.state);
        let Some(taken) = st.taken.as_mut() else {
            return;
        };
        let rows = taken.keep_records(&content);
        self.metrics
            .view_log_restores
            .with_label_values(&[&view.def.name])
            .inc();
        tracing::info!(view = %view.def.name, rows, "view's order read from its changelog topic");
    }
}

/// The partitions of `t` whose offsets restarted since `resets` was noted (none noted: none).
fn restarted(resets: &[u32], t: &TableState) -> HashSet<u32> {
    t.slices
        .iter()
        .enumerate()
        .filter(|(p, s)| resets.get(*p).is_some_and(|r| *r != s.resets))
        .map(|(p, _)| p as u32)
        .collect()
}

/// One group's input `rows` (given oldest offset first) with the one of highest offset whose
/// values `record` shows (`same(record, row)`) last (a keyed `delta`'s output row is the own
/// row of the row changed last: its values plus its movement), and every row it shows.
fn shown_last<T: Copy>(
    record: &Row,
    rows: Vec<(T, &Row)>,
    same: impl Fn(&Row, &Row) -> bool,
) -> (Vec<T>, Vec<T>) {
    let shown: Vec<bool> = rows.iter().map(|(_, row)| same(record, row)).collect();
    let mut order: Vec<T> = rows.iter().map(|(t, _)| *t).collect();
    let top = shown.iter().rposition(|s| *s).map(|i| order.remove(i));
    order.extend(top);
    let all = rows
        .iter()
        .zip(&shown)
        .filter(|(_, s)| **s)
        .map(|((t, _), _)| *t)
        .collect();
    (order, all)
}

/// The order (oldest first) in which one group's input `rows` (given oldest offset first) were
/// taken, as far as the group's output row `record` tells: `columns` are its `latest`
/// aggregates (input column, output column). From the newest down, each next row is the one of
/// highest offset that could have given every output column not yet given whose input column
/// it has a value in (NULL is skipped, as `latest` does), and gives at least one; the rows left
/// come before them by offset.
pub(super) fn latest_order<T>(
    columns: &[(&str, &str)],
    record: &Row,
    rows: Vec<(T, &Row)>,
) -> Vec<T> {
    let value = |row: &Row, c: &str| row.get(c).filter(|v| !v.is_null()).cloned();
    let mut open: Vec<(&str, serde_json::Value)> = columns
        .iter()
        .filter_map(|(input, output)| Some((*input, value(record, output)?)))
        .collect();
    let mut rest: Vec<Option<(T, &Row)>> = rows.into_iter().map(Some).collect();
    let mut top: Vec<T> = Vec::new();
    while !open.is_empty() {
        let gives = |row: &Row| {
            let mut any = false;
            for (input, want) in &open {
                match value(row, input) {
                    Some(v) if v == *want => any = true,
                    Some(_) => return false,
                    None => {}
                }
            }
            any
        };
        let pick = rest
            .iter()
            .rposition(|r| r.as_ref().is_some_and(|(_, row)| gives(row)));
        let Some((t, row)) = pick.and_then(|i| rest[i].take()) else {
            break;
        };
        open.retain(|(input, _)| value(row, input).is_none());
        top.push(t);
    }
    rest.into_iter()
        .flatten()
        .map(|(t, _)| t)
        .chain(top.into_iter().rev())
        .collect()
}

#[cfg(test)]
pub(super) mod tests;
