//! `delta`: each key's latest row plus how much some numeric columns moved at their last change.
//!
//! Output key: the group key of the `key` columns, else the input key (events: the event key; an
//! event without one is skipped). Output row: the latest input row plus, for each listed column
//! `c`, `c_change` (new value minus previous value, exact) and `c_move` (its absolute value). They
//! are set when `c` changes to another number and kept as they were otherwise, so they always tell
//! the last movement of `c` (`null` until there was one). A table delete deletes the output row.
//! Built for "biggest movers": a `top_n` ordered by `c_move desc` over a delta view.
//!
//! A result is a JSON number when both values were JSON numbers and it is exact as one, else a
//! decimal string. The output is the whole state: rebuildable from it alone.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::DeltaSpec;
use super::value::group_key;
use super::OutChange;
use crate::cdc::decode::Row;
use crate::filter::Decimal;

/// The persisted state of a [`Delta`] (the same as its output).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeltaState {
    rows: HashMap<String, Row>,
}

/// The `delta` operator (see the module doc).
#[derive(Debug, Clone)]
pub struct Delta {
    spec: DeltaSpec,
    state: DeltaState,
}

impl Delta {
    pub fn new(spec: DeltaSpec) -> Self {
        Delta {
            spec,
            state: DeltaState::default(),
        }
    }

    pub(super) fn with_state(spec: DeltaSpec, state: DeltaState) -> Self {
        Delta { spec, state }
    }

    pub(super) fn state(&self) -> &DeltaState {
        &self.state
    }

    fn key_of(&self, row: &Row, input_key: Option<&str>) -> Option<String> {
        match &self.spec.key {
            Some(columns) => group_key(row, columns),
            None => input_key.map(str::to_string),
        }
    }

    fn next_row(&self, previous: Option<&Row>, new: &Row) -> Row {
        let mut out = new.clone();
        for c in &self.spec.columns {
            let change_col = format!("{c}_change");
            let move_col = format!("{c}_move");
            let now = new.get(c);
            let before = previous.and_then(|p| p.get(c));
            let moved = match (
                now.and_then(Decimal::from_json),
                before.and_then(Decimal::from_json),
            ) {
                (Some(n), Some(b)) if n != b => Some((n.sub(&b), now, before)),
                _ => None,
            };
            let (change, movement) = match moved {
                Some((change, now, before)) => {
                    let numbers =
                        now.is_some_and(Value::is_number) && before.is_some_and(Value::is_number);
                    (change.to_json(numbers), change.abs().to_json(numbers))
                }
                None => (
                    previous
                        .and_then(|p| p.get(&change_col).cloned())
                        .unwrap_or(Value::Null),
                    previous
                        .and_then(|p| p.get(&move_col).cloned())
                        .unwrap_or(Value::Null),
                ),
            };
            out.insert(change_col, change);
            out.insert(move_col, movement);
        }
        out
    }

    fn upsert(&mut self, out_key: String, new: &Row) -> Vec<OutChange> {
        let row = self.next_row(self.state.rows.get(&out_key), new);
        if self.state.rows.get(&out_key) == Some(&row) {
            return Vec::new();
        }
        self.state.rows.insert(out_key.clone(), row.clone());
        vec![(out_key, Some(row))]
    }

    /// A table change of row `key` (`old`/`new` `None` = absent).
    pub fn apply_change(
        &mut self,
        key: &str,
        old: Option<&Row>,
        new: Option<&Row>,
    ) -> Vec<OutChange> {
        match new {
            Some(row) => match self.key_of(row, Some(key)) {
                Some(out_key) => self.upsert(out_key, row),
                None => Vec::new(),
            },
            None => {
                let out_key = match (&self.spec.key, old) {
                    (None, _) => Some(key.to_string()),
                    (Some(_), Some(r)) => self.key_of(r, Some(key)),
                    (Some(_), None) => None,
                };
                let Some(out_key) = out_key else {
                    return Vec::new();
                };
                match self.state.rows.remove(&out_key) {
                    Some(_) => vec![(out_key, None)],
                    None => Vec::new(),
                }
            }
        }
    }

    /// One event; `key` is the event key (used when the view has no `key` columns).
    pub fn apply_event(&mut self, key: Option<&str>, row: &Row) -> Vec<OutChange> {
        match self.key_of(row, key) {
            Some(out_key) => self.upsert(out_key, row),
            None => Vec::new(),
        }
    }

    /// Rebuilds one key from its output row.
    pub fn rebuild_from_output(&mut self, key: &str, row: &Row) {
        self.state.rows.insert(key.to_string(), row.clone());
    }
}
