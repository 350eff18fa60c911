//! Views over a table whose rows are their input rows' (`history`, `delta` without `key`
//! columns; [`crate::views::ViewOperator::output_per_input_row`]): what they do instead of
//! starting again from the input's current rows.
//!
//! Such a view keeps, per input key, the input change (partition, offset) its row last took,
//! and writes it into each record's mark ([`crate::table::viewlog::Mark::at`]). Then:
//! - **Restore.** A node on which nothing saved the view (kill -9, a new or lost data
//!   directory) reads the view's topic at start: the rows are the operator's whole state, and
//!   the marks say which change of its input key each row holds.
//! - **Reconcile** (at start, and whenever the input's updates do not follow on: the input was
//!   restored, replaced or a slice handed over). For each input row: a view that already took
//!   that change (same lineage, partition, offset at or past the row's) takes nothing; else it
//!   takes the current row as a change (a history gets it as its next entry, a delta moves from
//!   the value it last had). For each row of the view whose input key the input no longer has:
//!   the view takes a delete, unless the change it holds is past the input's position there (the
//!   input will read it again).
//! - **Skip.** A change of the input at or before the one the key's row holds is skipped: after
//!   a restore from a topic ahead of the input (another node wrote it, or the input lost its last
//!   changes to kill -9 and reads them again), no entry is taken twice.
//!
//! So a view comes back exactly when its topic holds every change the input holds (an idle
//! input, a clean hand-over), and when it is ahead. Where the input holds changes the topic
//! lacks (those in flight when a node died), each such key's changes since its row arrive as one
//! (a history gets the current row once, not each value in between; a delta's movement spans
//! them). A topic written in another lineage of the input gives rows without skip positions:
//! each key then takes its current row unless it equals its last entry.

use std::sync::Arc;

use super::{lock, Fed, View, ViewState, Views};
use crate::cdc::decode::Row;
use crate::table::state::{AppliedChange, Entry, Table, TableUpdate};
use crate::table::viewlog::read::LogContent;
use crate::views::{OutChange, ViewOperator};

impl Views {
    /// Whether a tracked view takes input change `c` of lineage `epoch` (false: its row holds
    /// it already); notes it as the key's last.
    pub(super) fn take(st: &mut ViewState, epoch: &Arc<str>, c: &AppliedChange) -> bool {
        if st.seen_epoch.as_deref() != Some(&**epoch) {
            st.seen.clear();
            st.seen_epoch = Some(epoch.clone());
        }
        if let Some(&(p, o)) = st.seen.get(&c.key) {
            if p == c.part && o >= c.off {
                return false;
            }
        }
        if c.row.is_none() && st.forget_deleted {
            st.seen.remove(&c.key);
        } else {
            st.seen.insert(c.key.clone(), (c.part, c.off));
        }
        true
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
        let (epoch, useq) = {
            let t = input.read();
            if st.seen_epoch.as_deref() != Some(&*t.epoch) {
                st.seen.clear();
                st.seen_epoch = Some(t.epoch.clone());
            }
            let mut rows: Vec<(&String, &Entry)> = t.rows.iter().collect();
            rows.sort_by(|a, b| a.0.cmp(b.0));
            for (key, e) in rows {
                if st
                    .seen
                    .get(key)
                    .is_some_and(|&(p, o)| p == e.part && o >= e.off)
                {
                    continue;
                }
                let row: &Row = &e.row;
                out.extend(st.op.apply_change(key, None, Some(row)));
                st.seen.insert(key.clone(), (e.part, e.off));
            }
            let mut gone: Vec<String> = view
                .table
                .read()
                .rows
                .keys()
                .filter(|k| !t.rows.contains_key(*k))
                .cloned()
                .collect();
            gone.sort_unstable();
            for key in gone {
                if let Some(&(p, o)) = st.seen.get(&key) {
                    let last = t.slices.get(p as usize).map_or(-1, |s| s.last_off);
                    if o > last {
                        // the input is behind the view here: it reads this key's changes again
                        continue;
                    }
                }
                out.extend(st.op.apply_change(&key, None, None));
                if st.forget_deleted {
                    st.seen.remove(&key);
                }
            }
            (t.epoch.clone(), t.useq)
        };
        st.fed = Some(Fed {
            table: input.clone(),
            epoch,
            useq,
        });
        self.metrics
            .view_rebuilds
            .with_label_values(&[&view.def.name])
            .inc();
        let ts = update
            .and_then(|u| u.changes.last())
            .map(|c| (c.ts_ms, c.kafka_ts_ms, c.polled));
        self.commit(view, st, out, ts.unwrap_or_default());
    }

    /// Restores a tracked view from what its topic holds (at start, before it is reconciled with
    /// its input). False, and nothing changed, when the content is not usable: a record that
    /// could not be read, a row of another definition of the view, or nothing written.
    pub(super) fn restore_tracked_from_log(&self, view: &View, content: LogContent) -> bool {
        if content.bad > 0 || content.records == 0 || !content.other_def.is_empty() {
            tracing::warn!(
                view = %view.def.name,
                records = content.records,
                bad = content.bad,
                other_definition = content.other_def.len(),
                "the view's changelog topic is not usable; the view starts from its input's rows"
            );
            return false;
        }
        // the input's lineage most rows were computed in (one, unless the input was replaced)
        let mut epochs: std::collections::HashMap<&str, usize> = Default::default();
        for (_, m, _) in content.rows.values() {
            if let Some(e) = m.input_epoch() {
                *epochs.entry(e).or_default() += 1;
            }
        }
        let epoch: Option<Arc<str>> = epochs
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)))
            .map(|(e, _)| e.into());
        let mut op = ViewOperator::new(&view.def);
        let mut rows: Vec<(String, Option<Row>)> = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for (key, (row, mark, _)) in &content.rows {
            let Some(row) = row else { continue };
            op.rebuild_from_output(key, row);
            rows.push((key.clone(), Some(row.clone())));
            if let (Some(at), Some(e)) = (mark.at, epoch.as_deref()) {
                if mark.input_epoch() == Some(e) {
                    seen.insert(key.clone(), at);
                }
            }
        }
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let (n, held) = (rows.len(), seen.len());
        let mut st = lock(&view.state);
        st.op = op;
        st.seen = seen;
        st.seen_epoch = epoch;
        self.commit(view, &mut st, rows, Default::default());
        self.metrics
            .view_log_restores
            .with_label_values(&[&view.def.name])
            .inc();
        tracing::info!(view = %view.def.name, rows = n, with_positions = held, "view restored from its changelog topic");
        true
    }
}

#[cfg(test)]
mod tests;
