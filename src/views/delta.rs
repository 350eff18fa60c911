//! `delta`: each key's latest row plus how much some numeric columns moved at their last change.
//!
//! Output key: the group key of the `key` columns, else the input key (events: the event key; an
//! event without one is skipped). Output row: the latest input row plus, for each listed column
//! `c`, `c_change` (new value minus previous value, exact) and `c_move` (its absolute value). They
//! are set when `c` changes to another number and kept as they were otherwise, so they always tell
//! the last movement of `c` (`null` until there was one). A table delete deletes the output row.
//! Built for "biggest movers": a `top_n` ordered by `c_move desc` over a delta view.
//!
//! Over a table with `key` columns, several input rows can share an output key: each input row
//! keeps its own movement (measured against its own previous value, also when its `key` columns
//! changed), and the output row is that of the input row changed last among those that have the
//! key now. An input row that leaves (deleted, or its `key` columns changed) hands the output to
//! the one changed last before it; the output row is deleted when none is left. A row without
//! `key` values (a NULL) is in no output row, and its movement starts again when it gets them.
//!
//! A result is a JSON number when both values were JSON numbers and it is exact as one, else a
//! decimal string. The output is the whole state (rebuildable from it alone), except over a table
//! with `key` columns: there the state also keeps every input row with its own movement.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::{DeltaSpec, InputKind};
use super::value::group_key;
use super::OutChange;
use crate::cdc::decode::Row;
use crate::filter::Decimal;

/// The persisted state of a [`Delta`]: its output, and over a table with `key` columns the input
/// rows of each output key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeltaState {
    rows: HashMap<String, Row>,
    /// Table input with `key` columns: the input rows of each output key.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    groups: HashMap<String, Members>,
    /// The number of the last change taken into `groups`.
    #[serde(default)]
    seq: u64,
}

/// The input rows that have one output key, each with its own output row, by their last change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Members {
    order: BTreeMap<u64, String>,
    rows: HashMap<String, (u64, Row)>,
}

impl Members {
    /// The output row: the member changed last (an order entry of a member changed since is
    /// passed over).
    fn newest(&self) -> Option<&Row> {
        self.order
            .iter()
            .rev()
            .find_map(|(seq, key)| self.rows.get(key).filter(|(s, _)| s == seq).map(|(_, r)| r))
    }

    fn remove(&mut self, key: &str) -> Option<Row> {
        let (seq, row) = self.rows.remove(key)?;
        self.order.remove(&seq);
        Some(row)
    }
}

/// The `delta` operator (see the module doc).
#[derive(Debug, Clone)]
pub struct Delta {
    spec: DeltaSpec,
    input: InputKind,
    state: DeltaState,
}

impl Delta {
    pub fn new(spec: DeltaSpec, input: InputKind) -> Self {
        Delta {
            spec,
            input,
            state: DeltaState::default(),
        }
    }

    /// `None` for a state that lacks what the operator needs: rows over a table with `key`
    /// columns but no input rows (saved by a version that kept only the output).
    pub(super) fn with_state(spec: DeltaSpec, input: InputKind, state: DeltaState) -> Option<Self> {
        let d = Delta { spec, input, state };
        let lacks_groups = d.grouped() && !d.state.rows.is_empty() && d.state.groups.is_empty();
        (!lacks_groups).then_some(d)
    }

    /// Over a table with `key` columns: several input rows may share an output row.
    fn grouped(&self) -> bool {
        self.spec.key.is_some() && self.input == InputKind::Table
    }

    pub(super) fn state(&self) -> &DeltaState {
        &self.state
    }

    /// Whether its output alone is its whole state: not over a table with `key` columns, where
    /// the rows sharing an output key are kept apart.
    pub fn rebuildable_from_output(&self) -> bool {
        !self.grouped()
    }

    /// Over a table with `key` columns: whether it keeps each input row apart with its own
    /// movement.
    pub fn keyed_over_table(&self) -> bool {
        self.grouped()
    }

    /// Over a table with `key` columns: each input row it holds, with its own output row (its
    /// values and its movement).
    pub fn members(&self) -> HashMap<String, Row> {
        self.state
            .groups
            .values()
            .flat_map(|m| m.rows.iter().map(|(k, (_, r))| (k.clone(), r.clone())))
            .collect()
    }

    /// Over a table with `key` columns: makes `own` the own output row (values and movement)
    /// of input row `key`, which it holds with the same values, in its place in the order; the
    /// output change, if any.
    pub fn set_own(&mut self, key: &str, own: &Row) -> Option<OutChange> {
        let g = self.key_of(own, None)?;
        let (_, row) = self.state.groups.get_mut(&g)?.rows.get_mut(key)?;
        if *row == *own {
            return None;
        }
        *row = own.clone();
        self.show(g)
    }

    /// Whether own output row `own` holds exactly the values of input row `row` (besides its
    /// movement columns).
    pub fn same_values(&self, own: &Row, row: &Row) -> bool {
        let moves = |c: &str| {
            self.spec.columns.iter().any(|m| {
                c.strip_prefix(m.as_str())
                    .is_some_and(|s| s == "_change" || s == "_move")
            })
        };
        // (an input column with a movement column's name is overwritten by the movement)
        row.iter()
            .filter(|(c, _)| !moves(c))
            .all(|(c, v)| own.get(c) == Some(v))
            && own
                .keys()
                .filter(|c| !row.contains_key(c.as_str()))
                .all(|c| moves(c))
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
        if self.grouped() {
            return self.apply_keyed_change(key, old, new);
        }
        match new {
            Some(row) => self.upsert(key.to_string(), row),
            None => match self.state.rows.remove(key) {
                Some(_) => vec![(key.to_string(), None)],
                None => Vec::new(),
            },
        }
    }

    /// A table change when rows are grouped by `key` columns (see the module doc).
    fn apply_keyed_change(
        &mut self,
        key: &str,
        old: Option<&Row>,
        new: Option<&Row>,
    ) -> Vec<OutChange> {
        let old_out = old.and_then(|r| self.key_of(r, None));
        let new_out = new.and_then(|r| self.key_of(r, None));
        // the row's own last output row, wherever it was
        let mut previous = old_out
            .as_ref()
            .and_then(|g| self.state.groups.get_mut(g))
            .and_then(|m| m.remove(key));
        if previous.is_none() {
            // fed as an insert although it is held (a replay): its entry goes, not doubled
            previous = new_out
                .as_ref()
                .and_then(|g| self.state.groups.get_mut(g))
                .and_then(|m| m.remove(key));
        }
        let mut out = Vec::new();
        if let Some(g) = old_out.filter(|g| new_out.as_ref() != Some(g)) {
            out.extend(self.show(g));
        }
        if let (Some(g), Some(row)) = (new_out, new) {
            let own = self.next_row(previous.as_ref(), row);
            self.state.seq += 1;
            let seq = self.state.seq;
            let m = self.state.groups.entry(g.clone()).or_default();
            m.order.insert(seq, key.to_string());
            m.rows.insert(key.to_string(), (seq, own));
            out.extend(self.show(g));
        }
        out
    }

    /// Sets output row `g` to its newest member's row (deleted when it has none); the change, if
    /// it is one.
    fn show(&mut self, g: String) -> Option<OutChange> {
        let newest = self.state.groups.get(&g).and_then(Members::newest).cloned();
        match newest {
            Some(row) => {
                if self.state.rows.get(&g) == Some(&row) {
                    return None;
                }
                self.state.rows.insert(g.clone(), row.clone());
                Some((g, Some(row)))
            }
            None => {
                self.state.groups.remove(&g);
                self.state.rows.remove(&g).map(|_| (g, None))
            }
        }
    }

    /// One event; `key` is the event key (used when the view has no `key` columns).
    /// The output row an event changes.
    pub fn event_key(&self, key: Option<&str>, row: &Row) -> Option<String> {
        self.key_of(row, key)
    }

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
