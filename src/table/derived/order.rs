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
//! [`super::Views::tick`] does at most about once per ten times a placement's cost, and once
//! more when the input reaches them. Meanwhile the view is neither written to its topic (its records hold
//! more) nor saved by a clean stop. Records are dropped once the input has not moved for
//! [`RECORDS_KEPT_AT_MOST`], and after [`RECORDS_KEPT_AT_ALL`] in any case.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::positions::{HeldMarks, Resets, Upto};
use crate::cdc::decode::Row;
use crate::table::state::{AppliedChange, Entry, TableState, TableUpdate};
use crate::table::viewlog::read::LogContent;
use crate::views::ViewOperator;
use place::{latest_order, shown_last};

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
    /// How far the view took the input's changes (what every record's mark carries).
    upto: Upto,
    /// The input's offset restarts per partition last looked at.
    resets: Resets,
    /// Read from the view's topic at a start that saved nothing, until the input holds what
    /// they do ([`Records`]).
    records: Option<Records>,
    /// A change the records hold was taken as the latest of its group (the input is restored,
    /// or reads again, what they hold): the rows are placed by them again, at most about a
    /// tenth of the time ([`Taken::due`]).
    stale: bool,
    /// When the rows were last placed by the records, and what that recomputation cost.
    placed: Option<(Instant, Duration)>,
    /// Its topic could not be read at start: read when this node takes the topic over
    /// ([`super::Views::restore_unread`]), before it writes the view there.
    unread: bool,
}

/// A view's topic as read at a start that saved nothing: each output row and its mark, used by
/// every recomputation ([`Taken::seed_from_records`]) until the input's positions reach every
/// offset the marks name (an input still being restored, or reading again what the topic holds,
/// is not complete before).
#[derive(Debug)]
struct Records {
    rows: HashMap<String, Row>,
    marks: HeldMarks,
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
    /// Whether the input `t` holds everything the marks name (or is of another lineage and
    /// holds rows: no mark holds any of them).
    fn passed(&self, t: &TableState) -> bool {
        self.marks
            .reached(&t.epoch, |p| t.slices.get(p as usize).map(|s| s.last_off))
            .unwrap_or(t.seq() > 0)
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
        self.upto.pass(epoch, c.part, c.off);
    }

    /// The view holds exactly what the input `t` holds (a recomputation from its rows, a clean
    /// stop's save at them).
    fn pass_input(&mut self, t: &TableState) {
        self.upto.set_to_input(t);
        self.resets.note(t);
    }

    /// Forgets how far the view took a partition of `t` whose offsets restarted (its topic was
    /// created again): its new offsets are below the old ones.
    pub fn note_resets(&mut self, t: &TableState) {
        let restarted = self.resets.look(t);
        if restarted.is_empty() {
            return;
        }
        self.upto.forget(&restarted);
        if let Some(r) = self.records.as_mut() {
            r.marks.restarted(&restarted);
        }
        // the rows it took there hold no position in the new offsets (the input's own rows of
        // such a partition are at -1 until they change)
        for (_, part, off) in self.of.values_mut() {
            if restarted.contains(part) {
                *off = -1;
            }
        }
    }

    /// How far the view took each input partition, when of lineage `epoch` (what every record's
    /// mark carries; empty otherwise).
    pub fn upto_of(&self, epoch: &str) -> Vec<(u32, i64)> {
        self.upto.of(epoch)
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
        let mut rows = HashMap::new();
        let mut marks = HashMap::new();
        for (k, (row, mark, _)) in &content.rows {
            if let Some(row) = row {
                rows.insert(k.clone(), row.clone());
                marks.insert(k.clone(), mark.clone());
            }
        }
        let n = rows.len();
        self.records = Some(Records {
            rows,
            marks: HeldMarks::new(marks),
            read: Instant::now(),
            progress: None,
        });
        n
    }

    /// Notes that the view's topic could not be read at start.
    pub fn set_unread(&mut self) {
        self.unread = true;
    }

    /// Whether the view's topic could not be read at start and was not since (then it is from
    /// now on).
    pub fn take_unread(&mut self) -> bool {
        std::mem::take(&mut self.unread)
    }

    /// Whether the view's topic could not be read at start and was not since.
    pub fn is_unread(&self) -> bool {
        self.unread
    }

    /// Starts the no-move clock of the records kept now (read at a take-over: the input has
    /// been running, so it does not wait for the input's next update).
    pub fn records_clock_from_now(&mut self) {
        if let Some(r) = self.records.as_mut() {
            r.progress = Some(Instant::now());
        }
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
                    r.marks
                        .upto(&g, &update.epoch, c.part)
                        .is_some_and(|u| c.off <= u)
                })
        });
    }

    /// Whether the rows are to be placed by the records again now (by [`super::Views::tick`]): the
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
            let upto = records.marks.upto(&group, &t.epoch, e.part);
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
            let Some(record) = records.rows.get(group) else {
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
        let lineage = self.upto.epoch().is_none_or(|e| e == &*t.epoch);
        if !lineage {
            self.of.clear();
        }
        let restarted = self.resets.since(t);
        let mut rows: Vec<(&String, &Entry)> = t
            .rows
            .iter()
            .filter(|(k, e)| {
                let same = |(_, part, off): &(u64, u32, i64)| (*part, *off) == (e.part, e.off);
                restarted.contains(&e.part) || !self.of.get(*k).is_some_and(same)
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

mod place;
mod tick;

#[cfg(test)]
pub(super) mod tests;
