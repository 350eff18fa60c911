//! The views' side of their changelog topics ([`crate::table::viewlog`]): what a commit sends to
//! the writer, the whole view for a writer that takes it over, and the restore of views over
//! events from their topics.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use super::{fingerprint, lock, View, ViewState, Views};
use crate::cdc::decode::Row;
use crate::table::viewlog::read::LogContent;
use crate::table::viewlog::{self, Commit, LogFlags, Mark};
use crate::views::{InputKind, RestorePlan, ViewOperator};

/// One row of a view for its topic: key, row (`None`: deleted) and mark.
pub type LogChange = (String, Option<Arc<Row>>, Arc<Mark>);

/// A view restored from its topic, while the events it already holds are read again.
pub(super) struct Skip {
    pub content: LogContent,
    /// Past these positions nothing is skipped.
    pub ends: HashMap<i32, i64>,
    /// Partitions whose offsets started over since the restore: the rows' marks say nothing
    /// of their new events.
    pub reset: HashSet<i32>,
}

impl Skip {
    /// The mark of a row of `key` written now at `base`: no lower than what its restored row
    /// already held (the events between are skipped, not counted again).
    fn mark(&self, key: &str, base: &Arc<Mark>) -> Arc<Mark> {
        let Some((_, restored, _)) = self.content.rows.get(key) else {
            return base.clone();
        };
        if restored
            .events
            .iter()
            .all(|(p, n)| self.reset.contains(p) || base.next(*p) >= *n)
        {
            return base.clone();
        }
        let mut merged: HashMap<i32, i64> = base.events.iter().copied().collect();
        for (p, n) in restored
            .events
            .iter()
            .filter(|(p, _)| !self.reset.contains(p))
        {
            let e = merged.entry(*p).or_insert(*n);
            *e = (*e).max(*n);
        }
        let mut events: Vec<(i32, i64)> = merged.into_iter().collect();
        events.sort_unstable();
        Arc::new(Mark {
            events,
            input: base.input.clone(),
            state: None,
            at: None,
            upto: base.upto.clone(),
        })
    }

    fn passed(&self, pos: &HashMap<i32, i64>) -> bool {
        self.ends
            .iter()
            .all(|(p, end)| self.reset.contains(p) || pos.get(p).is_some_and(|n| n >= end))
    }

    /// The offsets of partition `p` started over: nothing of it is skipped any more.
    pub fn start_over(&mut self, p: i32) {
        self.reset.insert(p);
    }

    /// Whether the event at `offset` of `part`, whose output row is `key`, is in the rows.
    fn covers(&self, key: &str, part: i32, offset: i64) -> bool {
        !self.reset.contains(&part) && self.content.covers(key, part, offset)
    }
}

impl Views {
    /// Connects the writer of the views' topics: commits of the views it writes go to `tx`.
    pub fn set_log(&self, tx: SyncSender<Commit>) {
        let _ = self.log_tx.set(tx);
    }

    /// Each view's name, flags and definition id, for the writer.
    pub fn log_views(&self) -> Vec<(String, Arc<LogFlags>, String)> {
        self.by_input
            .values()
            .flatten()
            .map(|v| (v.def.name.clone(), v.log.clone(), self.def_id(v)))
            .collect()
    }

    /// The id of a view's definition in its topic's records (input, operator, options, and an
    /// events input's declaration).
    pub(super) fn def_id(&self, view: &View) -> String {
        let source = self.sources.get(&view.def.from).map_or("", String::as_str);
        viewlog::def_id(&format!("{}|{source}", fingerprint(&view.def)))
    }

    /// The definition id of view `name` (`None`: no such view).
    pub fn log_def(&self, name: &str) -> Option<String> {
        let view = self.view_named(name)?;
        Some(self.def_id(view))
    }

    /// The mark of what `st` holds now (`None`: a view over a table not fed yet, or a `latest`
    /// still keeping the records it read at start: its rows are not written over them before
    /// its input holds what they name).
    pub(super) fn mark_of(view: &View, st: &ViewState) -> Option<Arc<Mark>> {
        if st
            .taken
            .as_ref()
            .is_some_and(super::order::Taken::has_records)
        {
            return None;
        }
        match view.def.input {
            InputKind::Events => {
                let mut events: Vec<(i32, i64)> = st.pos.iter().map(|(p, n)| (*p, *n)).collect();
                events.sort_unstable();
                Some(Arc::new(Mark {
                    events,
                    ..Mark::default()
                }))
            }
            InputKind::Table => st.fed.as_ref().map(|f| {
                Arc::new(Mark {
                    input: Some(format!("{}#{}", f.epoch, f.useq)),
                    // a keyed history, a `latest`: how far in each input partition it took
                    // the changes
                    upto: match (&st.track, &st.taken) {
                        (Some(tr), _) => tr.upto_of(&f.epoch),
                        (None, Some(taken)) => taken.upto_of(&f.epoch),
                        (None, None) => Vec::new(),
                    },
                    ..Mark::default()
                })
            }),
        }
    }

    /// Whether `content` of `view`'s topic can restore it over a table: some records, none that
    /// could not be read, none of another definition; when not, a warning that says what the
    /// view does `instead`.
    pub(super) fn usable_log(view: &View, content: &LogContent, instead: &str) -> bool {
        if content.bad == 0 && content.records > 0 && content.other_def.is_empty() {
            return true;
        }
        tracing::warn!(
            view = %view.def.name,
            records = content.records,
            bad = content.bad,
            other_definition = content.other_def.len(),
            "the view's changelog topic is not usable; {instead}"
        );
        false
    }

    /// The view named `name`.
    pub(super) fn view_named(&self, name: &str) -> Option<&Arc<View>> {
        self.by_input
            .values()
            .flatten()
            .find(|v| v.def.name == name)
    }

    /// The mark of `key`'s row written now at `base` (a restored view's row keeps what it held).
    /// With it goes what the row does not show and a restore needs (an `avg`'s sum and count).
    fn mark_for(st: &ViewState, key: &str, base: &Arc<Mark>) -> Arc<Mark> {
        let mark = match &st.skip {
            Some(s) => s.mark(key, base),
            None => base.clone(),
        };
        // a view over a table that tracks its input rows: the change the key's row holds
        let at = st
            .track
            .as_ref()
            .and_then(|tr| tr.at(key, mark.input_epoch()));
        // a keyed history's row restored from a record that held more keeps naming it
        let upto = st.track.as_ref().and_then(|tr| tr.upto_for(key, &mark));
        match (st.op.row_state(key), at, upto) {
            (None, None, None) => mark,
            (state, at, upto) => Arc::new(Mark {
                state,
                at,
                upto: upto.unwrap_or_else(|| mark.upto.clone()),
                ..(*mark).clone()
            }),
        }
    }

    /// Sends a commit of `view` to the writer when this node writes its topic; a commit that
    /// cannot be queued (the writer is behind, or gone) makes the writer write the whole view
    /// again instead of blocking the thread that commits.
    pub(super) fn send_log(
        &self,
        view: &View,
        st: &ViewState,
        changes: &[(String, Option<Arc<Row>>)],
    ) {
        if !view.log.writes.load(Ordering::Acquire) {
            return;
        }
        let (Some(tx), Some(base)) = (self.log_tx.get(), Self::mark_of(view, st)) else {
            view.log.dirty.store(true, Ordering::Release);
            return;
        };
        let commit = Commit {
            view: view.def.name.as_str().into(),
            off: st.off,
            changes: changes
                .iter()
                .map(|(k, r)| {
                    let mark = Self::mark_for(st, k, &base);
                    (k.clone(), r.clone(), mark)
                })
                .collect(),
            base,
        };
        match tx.try_send(commit) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                view.log.dirty.store(true, Ordering::Release);
            }
        }
    }

    /// The whole of view `name` for its topic, with the view's position and the mark of the
    /// input's position: what a writer that takes the view over writes first, a delta's keys
    /// deleted that its input may read again as tombstones that name their change (`None`: no
    /// such view, or a view over a table not fed yet).
    pub fn log_snapshot(&self, name: &str) -> Option<(i64, Arc<Mark>, Vec<LogChange>)> {
        let view = self.view_named(name)?;
        let st = lock(&view.state);
        let base = Self::mark_of(view, &st)?;
        let t = view.table.read();
        let mut rows: Vec<LogChange> = t
            .rows
            .iter()
            .map(|(k, e)| {
                let mark = Self::mark_for(&st, k, &base);
                (k.clone(), Some(e.row.shared().clone()), mark)
            })
            .collect();
        // a delta's keys deleted that its input may read again: their tombstones name the
        // change they went with (a restore from the rewrite skips it)
        let gone = st.track.as_ref().map(|tr| &tr.gone).into_iter().flatten();
        let mut gone: Vec<LogChange> = gone
            .filter(|(k, _)| !t.rows.contains_key(*k))
            .map(|(k, _)| (k.clone(), None, Self::mark_for(&st, k, &base)))
            .collect();
        gone.sort_by(|a, b| a.0.cmp(&b.0));
        rows.extend(gone);
        Some((st.off, base, rows))
    }

    /// The current row of `key` of view `name` (`None` in the change: no such row) with its
    /// mark: what the writer sends again to carry a newer floor once the view is idle.
    pub fn log_row(&self, name: &str, key: &str) -> Option<LogChange> {
        let view = self.view_named(name)?;
        let st = lock(&view.state);
        let base = Self::mark_of(view, &st)?;
        let mark = Self::mark_for(&st, key, &base);
        let row = view
            .table
            .read()
            .rows
            .get(key)
            .map(|e| e.row.shared().clone());
        Some((key.to_string(), row, mark))
    }

    /// The views over events that can be restored from their topics, by events input: those of
    /// an input none of whose views was loaded from a clean stop's save, whose plan is
    /// [`RestorePlan::FromOutput`] or [`RestorePlan::FromOutputAndRowState`].
    pub fn restorable_from_logs(&self) -> Vec<String> {
        let loaded: Vec<String> = lock(&self.events_next)
            .keys()
            .map(|(name, _)| name.clone())
            .collect();
        self.by_input
            .iter()
            .filter(|(input, _)| !loaded.contains(input))
            .flat_map(|(_, views)| views.iter())
            .filter(|v| v.def.input == InputKind::Events)
            .filter(|v| {
                matches!(
                    ViewOperator::new(&v.def).restore_plan(),
                    RestorePlan::FromOutput | RestorePlan::FromOutputAndRowState
                )
            })
            .map(|v| v.def.name.clone())
            .collect()
    }

    /// Rebuilds view `name` from what its topic holds; the events reader then reads its input
    /// from [`Views::events_start`] and skips what the rows already hold. False (nothing changed)
    /// when the content is not usable: a record that could not be read, or nothing written.
    pub fn restore_from_log(&self, name: &str, content: LogContent) -> bool {
        let Some(view) = self.view_named(name) else {
            return false;
        };
        if content.bad > 0 || content.records == 0 || !content.other_def.is_empty() {
            return false;
        }
        let mut op = ViewOperator::new(&view.def);
        let mut rows: Vec<(String, Option<Row>)> = content
            .live_rows()
            .map(|(k, r)| (k.clone(), Some(r.clone())))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        for (k, r) in &rows {
            let Some(r) = r else { continue };
            let state = content.rows.get(k).and_then(|(_, m, _)| m.state.as_ref());
            if !op.rebuild_from_output_and_row_state(k, r, state) {
                // a row without what its operator needs (written by an older version)
                tracing::warn!(
                    view = %view.def.name,
                    key = %k,
                    "view topic row lacks its operator state: view computed from its events"
                );
                return false;
            }
        }
        let ends = content.ends();
        let mut st = lock(&view.state);
        st.op = op;
        // every event before a partition's start is in the rows: the view's position there (an
        // event below it is skipped; a partition without a later event is passed at once)
        st.pos = ends
            .keys()
            .map(|p| (*p, content.start(*p)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let passed = Skip {
            content: LogContent::default(),
            ends: ends.clone(),
            reset: HashSet::new(),
        }
        .passed(&st.pos);
        st.skip = (!passed).then_some(Skip {
            content,
            ends,
            reset: HashSet::new(),
        });
        self.commit(view, &mut st, rows, Default::default());
        self.metrics
            .view_log_restores
            .with_label_values(&[&view.def.name])
            .inc();
        true
    }

    /// The offsets of partition `p` of events input `name` started over (its topic was deleted
    /// and created again): the views hold every event of the old offsets and take the new
    /// topic's from `next` on. Their positions there go back to `next`; a restored view no longer
    /// skips that partition's events by its rows' old marks; and the views' topics are written
    /// whole again, so that each row's mark names the new offsets (a restore from marks of the
    /// old offsets would take the new events for ones its rows hold).
    pub fn events_reset(&self, name: &str, p: i32, next: i64) {
        lock(&self.events_next).insert((name.to_string(), p), next);
        for v in self.by_input.get(name).into_iter().flatten() {
            if v.def.input != InputKind::Events {
                continue;
            }
            let mut st = lock(&v.state);
            st.pos.insert(p, next);
            if let Some(skip) = st.skip.as_mut() {
                skip.start_over(p);
            }
            // whether this node writes the view or takes it over later: the floor first (no
            // record of the new offsets carries the old one), then the rewrite
            v.log.input_reset.store(true, Ordering::Release);
            v.log.dirty.store(true, Ordering::Release);
        }
        self.drop_passed_skips(name);
    }

    /// Whether the event at `offset` of `part`, whose output row is `key`, is already in the
    /// restored rows of the view `st` belongs to.
    pub(super) fn skipped(st: &ViewState, key: Option<&String>, part: i32, offset: i64) -> bool {
        match (&st.skip, key) {
            (Some(s), Some(k)) => s.covers(k, part, offset),
            _ => false,
        }
    }

    /// Drops the skip of each view of events input `name` once the reader passed every mark.
    pub(super) fn drop_passed_skips(&self, name: &str) {
        let Some(views) = self.by_input.get(name) else {
            return;
        };
        for v in views {
            let mut st = lock(&v.state);
            if st.skip.as_ref().is_some_and(|s| s.passed(&st.pos)) {
                st.skip = None;
            }
        }
    }
}
