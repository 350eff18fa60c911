//! `max_by` / `min_by`: per key, the row with the largest (smallest) value of one column.
//!
//! Output key: the group key of the `key` columns, or the input key when `key` is not given
//! (events: the event key; an event without one is skipped). Output row: the winning input row as
//! it is. Rows whose compared value is NULL, absent, an array or an object are not candidates.
//!
//! Over a table: every candidate row of a group is kept in an ordered set, so deleting or lowering
//! the current winner hands the place to the next one; ties go to the smallest input row key. A
//! group with no candidate left is deleted. Not rebuildable from the output (the losers are not in
//! it): replay the input table's rows as inserts, or persist [`ExtremeState`].
//!
//! Over events: only the winner per key is kept; a later event replaces it only when strictly
//! better (ties keep the earlier event). The output is the whole state: rebuildable from it.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::config::{ExtremeSpec, InputKind};
use super::value::{group_key, SortCell, SortValue};
use super::OutChange;
use crate::cdc::decode::Row;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Candidate {
    group: String,
    cell: SortCell,
    row: Row,
}

/// The persisted state of an [`Extreme`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExtremeState {
    /// Table input: group -> candidates ordered best first.
    sets: HashMap<String, BTreeSet<(SortCell, String)>>,
    /// Table input: row key -> its candidate.
    candidates: HashMap<String, Candidate>,
    /// Events input: group -> (value, winning event).
    best: HashMap<String, (SortValue, Row)>,
}

/// The `max_by` / `min_by` operator (see the module doc).
#[derive(Debug, Clone)]
pub struct Extreme {
    spec: ExtremeSpec,
    input: InputKind,
    state: ExtremeState,
}

impl Extreme {
    pub fn new(spec: ExtremeSpec, input: InputKind) -> Self {
        Extreme {
            spec,
            input,
            state: ExtremeState::default(),
        }
    }

    pub(super) fn with_state(spec: ExtremeSpec, input: InputKind, state: ExtremeState) -> Self {
        Extreme { spec, input, state }
    }

    pub(super) fn state(&self) -> &ExtremeState {
        &self.state
    }

    /// True for events input (the output is the state).
    pub fn rebuildable_from_output(&self) -> bool {
        self.input == InputKind::Events
    }

    fn group_of(&self, row: &Row, input_key: Option<&str>) -> Option<String> {
        match &self.spec.key {
            Some(columns) => group_key(row, columns),
            None => input_key.map(str::to_string),
        }
    }

    fn cell(&self, row: &Row) -> Option<SortCell> {
        SortValue::of_column(row, &self.spec.by).map(|v| SortCell {
            value: Some(v),
            // best first: descending for max_by
            descending: self.spec.max,
        })
    }

    fn winner(&self, group: &str) -> Option<&Row> {
        let (_, key) = self.state.sets.get(group)?.first()?;
        self.state.candidates.get(key).map(|c| &c.row)
    }

    /// A table change of row `key` (`old`/`new` `None` = absent).
    pub fn apply_change(
        &mut self,
        key: &str,
        _old: Option<&Row>,
        new: Option<&Row>,
    ) -> Vec<OutChange> {
        let new_candidate = new.and_then(|row| {
            let group = self.group_of(row, Some(key))?;
            let cell = self.cell(row)?;
            Some(Candidate {
                group,
                cell,
                row: row.clone(),
            })
        });
        let old_group = self.state.candidates.get(key).map(|c| c.group.clone());
        let mut touched: Vec<String> = Vec::with_capacity(2);
        touched.extend(old_group);
        if let Some(c) = &new_candidate {
            if !touched.contains(&c.group) {
                touched.push(c.group.clone());
            }
        }
        let before: Vec<Option<Row>> = touched.iter().map(|g| self.winner(g).cloned()).collect();
        if let Some(old) = self.state.candidates.remove(key) {
            if let Some(set) = self.state.sets.get_mut(&old.group) {
                set.remove(&(old.cell, key.to_string()));
                if set.is_empty() {
                    self.state.sets.remove(&old.group);
                }
            }
        }
        if let Some(c) = new_candidate {
            self.state
                .sets
                .entry(c.group.clone())
                .or_default()
                .insert((c.cell.clone(), key.to_string()));
            self.state.candidates.insert(key.to_string(), c);
        }
        let mut out = Vec::new();
        for (group, before) in touched.into_iter().zip(before) {
            let after = self.winner(&group).cloned();
            if after != before {
                out.push((group, after));
            }
        }
        out
    }

    /// One event; `key` is the event key (used when the view has no `key` columns).
    /// The output row an event changes (its group).
    pub fn event_key(&self, key: Option<&str>, row: &Row) -> Option<String> {
        self.group_of(row, key)
    }

    pub fn apply_event(&mut self, key: Option<&str>, row: &Row) -> Vec<OutChange> {
        let Some(group) = self.group_of(row, key) else {
            return Vec::new();
        };
        let Some(value) = SortValue::of_column(row, &self.spec.by) else {
            return Vec::new();
        };
        let better = match self.state.best.get(&group) {
            None => true,
            Some((best, _)) if self.spec.max => value > *best,
            Some((best, _)) => value < *best,
        };
        if !better {
            return Vec::new();
        }
        self.state.best.insert(group.clone(), (value, row.clone()));
        vec![(group, Some(row.clone()))]
    }

    /// Rebuilds one key from its output row (events input).
    pub fn rebuild_from_output(&mut self, key: &str, row: &Row) {
        if let Some(value) = SortValue::of_column(row, &self.spec.by) {
            self.state
                .best
                .insert(key.to_string(), (value, row.clone()));
        }
    }
}
