//! When a view that read its topic at start places its rows by the records again
//! ([`Views::tick`]), and the read itself ([`Views::order_from_log`]).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::super::{lock, View, Views};
use super::Taken;
use crate::table::viewlog::read::LogContent;

impl Views {
    /// Places again the rows of each `latest` that took changes its records hold, when due
    /// ([`Taken::due`]), and drops records kept too long (call it about once a second: an input
    /// restored or read again in many updates costs a recomputation per tick at most, and one
    /// that then stays idle is placed all the same); deletes the waiting keys of a `history` or
    /// `delta` its input passed without them ([`Views::tick_pending`]).
    pub fn tick(&self) {
        self.tick_at(Instant::now());
        self.tick_pending();
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
    /// `Ok(None)` no topic, `Err` not read: read when this node takes the topic over) for its
    /// first recomputation.
    pub(in crate::table::derived) fn order_from_log(
        &self,
        view: &View,
        read: Result<Option<LogContent>, String>,
    ) {
        match read {
            Ok(Some(content)) => {
                self.keep_order(view, &content);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(view = %view.def.name, error = %e, "the view's changelog topic could not be read; its rows are taken by input offset until this node takes the topic over");
                if let Some(taken) = lock(&view.state).taken.as_mut() {
                    taken.set_unread();
                }
            }
        }
    }

    /// Keeps what `view`'s topic holds for its next recomputation ([`Taken::keep_records`]);
    /// false when there is nothing to keep. A content with a record that could not be read, a
    /// row of another definition, or no input positions, is not used (the rows are then taken
    /// by offset).
    pub(in crate::table::derived) fn keep_order(&self, view: &View, content: &LogContent) -> bool {
        if content.records == 0 {
            return false;
        }
        if !Self::usable_log(view, content, "its rows are taken by input offset") {
            return false;
        }
        if content.rows.values().all(|(_, m, _)| m.upto.is_empty()) {
            tracing::warn!(
                view = %view.def.name,
                records = content.records,
                "the view's changelog topic names no input positions (written by a livetable before 2026-12-07); its rows are taken by input offset"
            );
            return false;
        }
        let mut st = lock(&view.state);
        let Some(taken) = st.taken.as_mut() else {
            return false;
        };
        let rows = taken.keep_records(content);
        self.metrics
            .view_log_restores
            .with_label_values(&[&view.def.name])
            .inc();
        tracing::info!(view = %view.def.name, rows, "view's order read from its changelog topic");
        true
    }
}
