//! `history`: the last `limit` changes of each key, as one row per key.
//!
//! Output key: the group key of the `key` columns, else the input key (events: the event key; an
//! event without one is skipped). Output row: the `key` columns (when given) and `field` (default
//! `history`): a list of entries, oldest first, at most `limit`. An entry is the new row, kept to
//! `columns` when given, or `null` for a delete (table input). A change whose entry equals the
//! previous entry (e.g. an update of a column not kept) adds nothing. With `key` columns, an
//! update files its entry under the key of the new row (a delete: of the old row).
//!
//! History rows are never deleted. The output is the whole state: rebuildable from it alone.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::HistorySpec;
use super::value::group_key;
use super::OutChange;
use crate::cdc::decode::Row;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Series {
    key_values: Vec<Value>,
    entries: VecDeque<Value>,
}

/// The persisted state of a [`History`] (the same as its output).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryState {
    series: HashMap<String, Series>,
}

/// The `history` operator (see the module doc).
#[derive(Debug, Clone)]
pub struct History {
    spec: HistorySpec,
    state: HistoryState,
}

impl History {
    pub fn new(spec: HistorySpec) -> Self {
        History {
            spec,
            state: HistoryState::default(),
        }
    }

    pub(super) fn with_state(spec: HistorySpec, state: HistoryState) -> Self {
        History { spec, state }
    }

    /// Whether `key` columns file entries (else each input key has its own series).
    pub fn keyed(&self) -> bool {
        self.spec.key.is_some()
    }

    pub(super) fn state(&self) -> &HistoryState {
        &self.state
    }

    fn key_of(&self, row: &Row, input_key: Option<&str>) -> Option<String> {
        match &self.spec.key {
            Some(columns) => group_key(row, columns),
            None => input_key.map(str::to_string),
        }
    }

    fn entry(&self, row: Option<&Row>) -> Value {
        match (row, &self.spec.columns) {
            (None, _) => Value::Null,
            (Some(r), None) => Value::Object(r.clone()),
            (Some(r), Some(columns)) => Value::Object(
                columns
                    .iter()
                    .filter_map(|c| r.get(c).map(|v| (c.clone(), v.clone())))
                    .collect(),
            ),
        }
    }

    fn key_values(&self, row: &Row) -> Vec<Value> {
        self.spec
            .key
            .iter()
            .flatten()
            .map(|c| row.get(c).cloned().unwrap_or(Value::Null))
            .collect()
    }

    fn render(&self, series: &Series) -> Row {
        let mut out = Row::new();
        for (c, v) in self.spec.key.iter().flatten().zip(&series.key_values) {
            out.insert(c.clone(), v.clone());
        }
        out.insert(
            self.spec.field.clone(),
            Value::Array(series.entries.iter().cloned().collect()),
        );
        out
    }

    fn append(&mut self, key: String, key_row: Option<&Row>, entry: Value) -> Vec<OutChange> {
        let key_values = key_row.map(|r| self.key_values(r)).unwrap_or_default();
        let limit = self.spec.limit;
        let series = self
            .state
            .series
            .entry(key.clone())
            .or_insert_with(|| Series {
                key_values: key_values.clone(),
                entries: VecDeque::new(),
            });
        if series.entries.back() == Some(&entry) {
            return Vec::new();
        }
        series.key_values = key_values;
        series.entries.push_back(entry);
        while series.entries.len() > limit {
            series.entries.pop_front();
        }
        let row = self.render(&self.state.series[&key]);
        vec![(key, Some(row))]
    }

    /// A table change of row `key` (`old`/`new` `None` = absent).
    pub fn apply_change(
        &mut self,
        key: &str,
        old: Option<&Row>,
        new: Option<&Row>,
    ) -> Vec<OutChange> {
        let key_row = new.or(old);
        let series_key = match (&self.spec.key, key_row) {
            (None, _) => key.to_string(),
            (Some(columns), Some(row)) => match group_key(row, columns) {
                Some(k) => k,
                None => return Vec::new(),
            },
            (Some(_), None) => return Vec::new(),
        };
        let entry = self.entry(new);
        self.append(series_key, key_row, entry)
    }

    /// One event; `key` is the event key (used when the view has no `key` columns).
    /// The output row an event changes (its series).
    pub fn event_key(&self, key: Option<&str>, row: &Row) -> Option<String> {
        self.key_of(row, key)
    }

    pub fn apply_event(&mut self, key: Option<&str>, row: &Row) -> Vec<OutChange> {
        let Some(series_key) = self.key_of(row, key) else {
            return Vec::new();
        };
        let entry = self.entry(Some(row));
        self.append(series_key, Some(row), entry)
    }

    /// Rebuilds one key from its output row.
    pub fn rebuild_from_output(&mut self, key: &str, row: &Row) {
        let entries: VecDeque<Value> = match row.get(&self.spec.field) {
            Some(Value::Array(items)) => items.iter().cloned().collect(),
            _ => VecDeque::new(),
        };
        let key_values = self.key_values(row);
        self.state.series.insert(
            key.to_string(),
            Series {
                key_values,
                entries,
            },
        );
    }
}
