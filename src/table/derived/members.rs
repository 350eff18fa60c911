//! `delta` with `key` columns over a table ([`crate::views::ViewOperator::keyed_members`]): each
//! input row keeps its own movement, and the output row of a key is that of the row changed
//! last among those with that key. A recomputation from the input's rows would lose every
//! movement (nothing in the rows tells it) and the order of the rows; so when the input's
//! updates do not follow on (a restore, a slice handed over, a table replaced) the view goes on
//! from what it holds instead: the rows still at the change it took keep their movement and
//! their place; each other row is taken as one change from the row it holds of that key (its
//! movement spans the changes it did not see), by input offset then partition ([`Taken::changed`]),
//! so it becomes its key's latest; a row the input no longer has leaves, handing its key to the
//! row changed before it.
//!
//! A node on which nothing saved the view (kill -9, a new or empty data directory) reads its
//! topic at start, as a `latest` does (`order.rs`): each record is the own row of the input row
//! changed last among those with its key, so the input rows its record holds are placed first,
//! the one whose values it shows last, which gets the record's movement back; the rows changed
//! since come after them by offset, with no movement until they move again.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::order::Taken;
use super::{Fed, View, ViewState, Views};
use crate::cdc::decode::Row;
use crate::table::state::{Table, TableUpdate};
use crate::views::{OutChange, ViewOperator};

impl Views {
    /// Brings a keyed `delta` up to the input's current rows (see the module doc); the caller
    /// holds the input's order lock. False when the view is not one (nothing done).
    pub(super) fn reconcile_members(
        &self,
        view: &View,
        st: &mut ViewState,
        input: &Arc<Table>,
        update: Option<&TableUpdate>,
    ) -> bool {
        if st.taken.as_ref().is_some_and(Taken::has_records) {
            return self.place_members(view, st, input, update);
        }
        let mut out: Vec<OutChange> = Vec::new();
        let fed = {
            let ViewState { op, taken, .. } = &mut *st;
            let (Some(taken), Some(members)) = (taken.as_mut(), op.keyed_members()) else {
                return false;
            };
            let t = input.read();
            for (key, row, comparable) in taken.changed(&t) {
                let held = members.get(key.as_str());
                // at a position that cannot be compared with the one it took (another lineage
                // of the input, its partition's offsets restarted) with the values it holds:
                // not a change
                if !comparable && held.is_some_and(|own| op.same_values(own, row)) {
                    continue;
                }
                out.extend(op.apply_change(key, held, Some(row)));
            }
            let mut gone: Vec<&String> = members
                .keys()
                .filter(|k| !t.rows.contains_key(k.as_str()))
                .collect();
            gone.sort_unstable();
            for key in gone {
                out.extend(op.apply_change(key, members.get(key.as_str()), None));
            }
            Fed::at(input, &t)
        };
        st.fed = Some(fed);
        self.commit_recomputed(view, st, out, update);
        true
    }

    /// A keyed `delta` that read its topic at start (kill -9, an empty data directory): computed
    /// again from the input's rows in the order its records give ([`Taken::seed_from_records`]);
    /// each row keeps the own row (values and movement) it had when its values are the same,
    /// and the row a record shows gets the record's movement.
    fn place_members(
        &self,
        view: &View,
        st: &mut ViewState,
        input: &Arc<Table>,
        update: Option<&TableUpdate>,
    ) -> bool {
        let mut result: BTreeMap<String, Option<Row>> = BTreeMap::new();
        let fed = {
            let ViewState { op, taken, .. } = &mut *st;
            let (Some(taken), Some(members)) = (taken.as_mut(), op.keyed_members()) else {
                return false;
            };
            let t = input.read();
            let mut fresh = ViewOperator::new(&view.def);
            let seeded = taken.seed_from_records(&fresh, &t);
            Self::seeded(view, &seeded);
            let mut outs: Vec<OutChange> = Vec::new();
            for (key, row) in taken.replay(&t) {
                outs.extend(fresh.apply_change(key, None, Some(row)));
            }
            let mut kept: Vec<(&String, &Row)> = members
                .iter()
                .filter(|(k, own)| {
                    t.rows
                        .get(k.as_str())
                        .is_some_and(|e| fresh.same_values(own, &e.row))
                })
                .collect();
            kept.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let tops = seeded.tops.iter().map(|(k, own)| (k, own));
            for (key, own) in kept.into_iter().chain(tops) {
                outs.extend(fresh.set_own_row(key, own));
            }
            result.extend(outs);
            *op = fresh;
            Fed::at(input, &t)
        };
        st.fed = Some(fed);
        let out = Self::recomputed(view, result);
        self.commit_recomputed(view, st, out, update);
        true
    }
}

#[cfg(test)]
mod tests;
