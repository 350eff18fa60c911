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

use std::sync::Arc;

use super::{Fed, View, ViewState, Views};
use crate::table::state::{Table, TableUpdate};
use crate::views::OutChange;

#[cfg(doc)]
use super::order::Taken;

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
        let mut out: Vec<OutChange> = Vec::new();
        let (epoch, useq) = {
            let ViewState { op, taken, .. } = &mut *st;
            let (Some(taken), Some(members)) = (taken.as_mut(), op.keyed_members()) else {
                return false;
            };
            let t = input.read();
            for (key, row) in taken.changed(&t) {
                out.extend(op.apply_change(key, members.get(key.as_str()), Some(row)));
            }
            let mut gone: Vec<&String> = members
                .keys()
                .filter(|k| !t.rows.contains_key(k.as_str()))
                .collect();
            gone.sort_unstable();
            for key in gone {
                out.extend(op.apply_change(key, members.get(key.as_str()), None));
            }
            (t.epoch.clone(), t.useq)
        };
        st.fed = Some(Fed {
            table: input.clone(),
            epoch,
            useq,
        });
        self.commit_recomputed(view, st, out, update);
        true
    }
}

#[cfg(test)]
mod tests;
