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

use std::collections::HashMap;

use crate::cdc::decode::Row;
use crate::table::state::{AppliedChange, TableState};
use crate::views::ViewOperator;

/// See the module doc.
#[derive(Debug, Default)]
pub(super) struct Taken {
    next: u64,
    /// Input key -> (when taken, partition, offset).
    of: HashMap<String, (u64, u32, i64)>,
}

impl Taken {
    /// Notes that the view took input change `c`.
    pub fn note(&mut self, c: &AppliedChange) {
        if c.row.is_some() {
            self.of.insert(c.key.clone(), (self.next, c.part, c.off));
            self.next += 1;
        } else {
            self.of.remove(&c.key);
        }
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
        ranked.into_iter().map(|(_, k, r, _)| (k, r)).collect()
    }
}
