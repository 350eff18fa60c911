//! Positions in a view's input, shared by the views whose records name how far the view had
//! taken each input partition when they were written ([`crate::table::viewlog::Mark::upto`]: a
//! keyed `history`, a `latest` over a table, a keyed `delta`): the view's own positions
//! ([`Upto`]), the marks read from its topic at a start that saved nothing ([`HeldMarks`]), and
//! the input partitions whose offsets restarted ([`Resets`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::table::state::TableState;
use crate::table::viewlog::Mark;

/// Per input partition, the offset up to which a view took the input's changes, of one lineage
/// of the input (what every record's mark carries).
#[derive(Debug, Default)]
pub(super) struct Upto {
    epoch: Option<Arc<str>>,
    parts: HashMap<u32, i64>,
}

impl Upto {
    /// Notes that the view took the input's changes of lineage `epoch` up to `off` in `part`
    /// (positions of another lineage are forgotten).
    pub fn pass(&mut self, epoch: &Arc<str>, part: u32, off: i64) {
        if self.epoch.as_deref() != Some(&**epoch) {
            self.parts.clear();
            self.epoch = Some(epoch.clone());
        }
        let u = self.parts.entry(part).or_insert(off);
        *u = (*u).max(off);
    }

    /// Notes that the view took every change the input `t` holds (it may hold more: positions
    /// of `t`'s lineage stay where they are past `t`'s).
    pub fn pass_input(&mut self, t: &TableState) {
        for (p, s) in t.slices.iter().enumerate() {
            if s.last_off >= 0 {
                self.pass(&t.epoch, p as u32, s.last_off);
            }
        }
    }

    /// The view holds exactly what the input `t` holds (a recomputation from its rows).
    pub fn set_to_input(&mut self, t: &TableState) {
        self.parts.clear();
        self.epoch = None;
        self.pass_input(t);
    }

    /// Forgets the partitions `parts` (their offsets restarted).
    pub fn forget(&mut self, parts: &HashSet<u32>) {
        self.parts.retain(|p, _| !parts.contains(p));
    }

    /// The lineage of the positions (`None`: nothing taken yet).
    pub fn epoch(&self) -> Option<&str> {
        self.epoch.as_deref()
    }

    /// How far the view took partition `part`.
    pub fn get(&self, part: u32) -> Option<i64> {
        self.parts.get(&part).copied()
    }

    /// Every partition's position, by partition, when of lineage `epoch` (empty otherwise).
    pub fn of(&self, epoch: &str) -> Vec<(u32, i64)> {
        if self.epoch.as_deref() != Some(epoch) {
            return Vec::new();
        }
        let mut v: Vec<(u32, i64)> = self.parts.iter().map(|(p, o)| (*p, *o)).collect();
        v.sort_unstable();
        v
    }
}

/// The marks of the records read from a view's topic at a start that saved nothing, per output
/// row, kept until the view (or its input) reaches every offset they name.
#[derive(Debug, Default)]
pub(super) struct HeldMarks {
    marks: HashMap<String, Arc<Mark>>,
    /// Per lineage, the furthest offset of each partition the marks name.
    reach: HashMap<String, HashMap<u32, i64>>,
    /// Partitions whose offsets restarted since: the marks say nothing of them.
    reset: HashSet<u32>,
}

impl HeldMarks {
    pub fn new(marks: HashMap<String, Arc<Mark>>) -> Self {
        let mut reach: HashMap<String, HashMap<u32, i64>> = HashMap::new();
        for m in marks.values() {
            if let Some(e) = m.input_epoch() {
                let r = reach.entry(e.to_string()).or_default();
                for (p, u) in &m.upto {
                    let v = r.entry(*p).or_insert(*u);
                    *v = (*v).max(*u);
                }
            }
        }
        HeldMarks {
            marks,
            reach,
            reset: HashSet::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    /// The mark of output row `group`.
    pub fn get(&self, group: &str) -> Option<&Arc<Mark>> {
        self.marks.get(group)
    }

    /// How far the record of output row `group` had taken partition `part` of lineage `epoch`
    /// (`None` as well when the partition's offsets restarted since).
    pub fn upto(&self, group: &str, epoch: &str, part: u32) -> Option<i64> {
        if self.reset.contains(&part) {
            return None;
        }
        let mark = self.marks.get(group)?;
        if mark.input_epoch() != Some(epoch) {
            return None;
        }
        mark.upto.iter().find(|(p, _)| *p == part).map(|(_, u)| *u)
    }

    /// Notes that the offsets of partitions `parts` restarted.
    pub fn restarted(&mut self, parts: &HashSet<u32>) {
        self.reset.extend(parts);
    }

    /// Whether partition `part`'s offsets restarted since the marks were read.
    pub fn is_reset(&self, part: u32) -> bool {
        self.reset.contains(&part)
    }

    /// Whether the positions `at` (per partition) of lineage `epoch` reach every offset the
    /// marks of that lineage name (partitions that restarted left out); `None` when no mark is
    /// of that lineage.
    pub fn reached(&self, epoch: &str, at: impl Fn(u32) -> Option<i64>) -> Option<bool> {
        let reach = self.reach.get(epoch)?;
        Some(
            reach
                .iter()
                .all(|(p, u)| self.reset.contains(p) || at(*p).is_some_and(|v| v >= *u)),
        )
    }
}

/// The input's offset restarts per partition (a partition's topic created again), as last
/// looked at.
#[derive(Debug, Default)]
pub(super) struct Resets(Vec<u32>);

impl Resets {
    /// The partitions of `t` whose offsets restarted since the last look (none at the first),
    /// compared partition by partition when partitions were added or removed.
    pub fn since(&self, t: &TableState) -> HashSet<u32> {
        t.slices
            .iter()
            .enumerate()
            .filter(|(p, s)| self.0.get(*p).is_some_and(|r| *r != s.resets))
            .map(|(p, _)| p as u32)
            .collect()
    }

    /// [`Resets::since`], then notes `t`'s restarts as looked at.
    pub fn look(&mut self, t: &TableState) -> HashSet<u32> {
        if t.slices.iter().map(|s| s.resets).eq(self.0.iter().copied()) {
            // the usual case, on every update: nothing restarted
            return HashSet::new();
        }
        let restarted = self.since(t);
        self.note(t);
        restarted
    }

    /// Notes `t`'s restarts as looked at.
    pub fn note(&mut self, t: &TableState) {
        self.0.clear();
        self.0.extend(t.slices.iter().map(|s| s.resets));
    }
}

#[cfg(test)]
mod tests;
