//! `group_by`: one output row per group with `count`, `sum`, `min`, `max`, `avg`, `latest`.
//!
//! Output key: the group key ([`super::value::group_key`] of the `by` columns). Output row: the
//! `by` columns (values of the row added to the group last) and one column per aggregate.
//!
//! Over a table, an update retracts the old row from its group and adds the new row to its group
//! (the same group or another), a delete retracts, exactly as a KTable aggregation does; a group
//! whose last row is retracted is deleted. Over events every event is added, nothing is retracted,
//! and groups are never deleted. A table change that leaves a group's output row as it was emits
//! nothing, and so does an event that changes no aggregate (e.g. NULL in every aggregated column
//! of a view without `count()`).
//!
//! Aggregates skip NULL and absent values (`count()` counts rows, `count(col)` non-null values):
//! - `sum(col)`, `avg(col)`: over the values that are numbers or plain decimal strings (other
//!   values are skipped), exact ([`Decimal`]); NULL when there is none. The result is a JSON
//!   number when every value summed was a JSON number and the result is exact as one, else a
//!   decimal string (`"0.30"`). `avg` divides by the number of values summed, exactly or rounded
//!   half-even past `scale + 20` digits ([`Decimal::div_count`]).
//! - `min(col)`, `max(col)`: by [`SortValue`] order; the value shown as it arrived. Over a table
//!   each group keeps a multiset of its values (count per value), so deleting the current extreme
//!   leaves the next one; over events only the extreme is kept.
//! - `latest(col)`: over events, the value of the last event; over a table, the value of the
//!   group's row changed most recently that has a value (deleting that row falls back to the one
//!   changed before it). A recomputation from the table's rows takes them in the order the
//!   view took them (`table::derived`, `order.rs`).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::{AggKind, GroupBySpec, InputKind};
use super::value::{group_key, SortValue};
use super::OutChange;
use crate::cdc::decode::Row;
use crate::filter::Decimal;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Agg {
    Count {
        n: u64,
    },
    Sum {
        sum: Decimal,
        n: u64,
        /// Values summed that were strings (the result is then shown as a string).
        strings: u64,
        /// scale -> how many values summed have it: the result is shown at the largest scale
        /// of the values present (a retracted `"0.125"` leaves no third digit behind).
        scales: BTreeMap<i64, u64>,
    },
    Extreme {
        /// value -> (the value as it arrived, how many rows have it)
        #[serde(with = "super::pairs")]
        values: BTreeMap<SortValue, (Value, u64)>,
    },
    ExtremeOfEvents {
        best: Option<(SortValue, Value)>,
    },
    Latest {
        /// change sequence -> value
        order: BTreeMap<u64, Value>,
        /// row key -> its sequence in `order`
        seq_of: HashMap<String, u64>,
    },
    LatestOfEvents {
        value: Option<Value>,
    },
}

/// An `avg` over events as [`GroupBy::row_state`] carries it (the sum as a plain decimal
/// string, so that it stays exact through JSON).
#[derive(Debug, Serialize, Deserialize)]
struct AvgState {
    sum: String,
    n: u64,
    strings: u64,
    scale: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Group {
    rows: u64,
    by_values: Vec<Value>,
    aggs: Vec<Agg>,
}

/// The persisted state of a [`GroupBy`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupByState {
    groups: HashMap<String, Group>,
    next_seq: u64,
}

/// The `group_by` operator (see the module doc).
#[derive(Debug, Clone)]
pub struct GroupBy {
    spec: GroupBySpec,
    input: InputKind,
    state: GroupByState,
}

impl GroupBy {
    pub fn new(spec: GroupBySpec, input: InputKind) -> Self {
        GroupBy {
            spec,
            input,
            state: GroupByState::default(),
        }
    }

    pub(super) fn with_state(spec: GroupBySpec, input: InputKind, state: GroupByState) -> Self {
        GroupBy { spec, input, state }
    }

    pub(super) fn state(&self) -> &GroupByState {
        &self.state
    }

    /// True when the output rows alone rebuild the state: events input and no `avg`.
    pub fn rebuildable_from_output(&self) -> bool {
        self.input == InputKind::Events && !self.has_avg()
    }

    /// True when the output rows, each with its [`GroupBy::row_state`], rebuild the state:
    /// events input with `avg` (an average shows neither its sum nor its count).
    pub fn rebuildable_from_output_and_row_state(&self) -> bool {
        self.input == InputKind::Events && self.has_avg()
    }

    fn has_avg(&self) -> bool {
        self.spec.aggregates.iter().any(|a| a.kind == AggKind::Avg)
    }

    /// What group `key`'s output row does not show and a rebuild needs (only when
    /// [`GroupBy::rebuildable_from_output_and_row_state`]; `None` otherwise or for no such
    /// group): each `avg`'s exact sum, count, string count and scale, by aggregate name.
    pub fn row_state(&self, key: &str) -> Option<Value> {
        if !self.rebuildable_from_output_and_row_state() {
            return None;
        }
        let group = self.state.groups.get(key)?;
        let mut out = serde_json::Map::new();
        for (spec, agg) in self.spec.aggregates.iter().zip(&group.aggs) {
            if let (
                AggKind::Avg,
                Agg::Sum {
                    sum,
                    n,
                    strings,
                    scales,
                },
            ) = (spec.kind, agg)
            {
                let state = AvgState {
                    sum: sum.to_plain_string(),
                    n: *n,
                    strings: *strings,
                    scale: scales.last_key_value().map_or(0, |(s, _)| *s),
                };
                out.insert(spec.name.clone(), serde_json::to_value(state).ok()?);
            }
        }
        Some(Value::Object(out))
    }

    /// True when replaying the input table's current rows as inserts rebuilds the state exactly:
    /// table input and no `latest` (which depends on the order of changes).
    pub fn rebuildable_from_input(&self) -> bool {
        self.input == InputKind::Table
            && self
                .spec
                .aggregates
                .iter()
                .all(|a| a.kind != AggKind::Latest)
    }

    /// Over a table with `latest`: where the row of input key `key`, now `row`, stands in the
    /// order in which this state took the rows' latest values (the change number it took it
    /// with), when every `latest` column of `row` still has the value taken then; `None` for a
    /// row this state does not hold, holds in another group, or holds with other values (it
    /// changed since). A view loaded from a clean stop's save starts its order from it
    /// (`table::derived`, `order.rs`).
    pub fn replay_rank(&self, key: &str, row: &Row) -> Option<u64> {
        if self.input != InputKind::Table {
            return None;
        }
        let group = self.state.groups.get(&group_key(row, &self.spec.by)?)?;
        let mut rank = None;
        for (spec, agg) in self.spec.aggregates.iter().zip(&group.aggs) {
            let Agg::Latest { order, seq_of } = agg else {
                continue;
            };
            let value = spec.column.as_ref().and_then(|c| row.get(c));
            let value = value.filter(|v| !v.is_null());
            match (seq_of.get(key), value) {
                (Some(seq), Some(v)) if order.get(seq) == Some(v) => {
                    rank = Some(rank.map_or(*seq, |r: u64| r.max(*seq)));
                }
                // no value then, none now: nothing to tell
                (None, None) => {}
                _ => return None,
            }
        }
        rank
    }

    /// Each `latest` aggregate's input column and output column.
    pub fn latest_columns(&self) -> Vec<(&str, &str)> {
        self.spec
            .aggregates
            .iter()
            .filter(|a| a.kind == AggKind::Latest)
            .filter_map(|a| Some((a.column.as_deref()?, a.name.as_str())))
            .collect()
    }

    /// A `latest` over a table: the output depends on the order of the input's changes.
    pub fn has_latest_over_table(&self) -> bool {
        self.input == InputKind::Table
            && self
                .spec
                .aggregates
                .iter()
                .any(|a| a.kind == AggKind::Latest)
    }

    fn new_group(&self, row: &Row) -> Group {
        let aggs = self
            .spec
            .aggregates
            .iter()
            .map(|a| match (a.kind, self.input) {
                (AggKind::Count, _) => Agg::Count { n: 0 },
                (AggKind::Sum | AggKind::Avg, _) => Agg::Sum {
                    sum: Decimal::zero(),
                    n: 0,
                    strings: 0,
                    scales: BTreeMap::new(),
                },
                (AggKind::Min | AggKind::Max, InputKind::Table) => Agg::Extreme {
                    values: BTreeMap::new(),
                },
                (AggKind::Min | AggKind::Max, InputKind::Events) => {
                    Agg::ExtremeOfEvents { best: None }
                }
                (AggKind::Latest, InputKind::Table) => Agg::Latest {
                    order: BTreeMap::new(),
                    seq_of: HashMap::new(),
                },
                (AggKind::Latest, InputKind::Events) => Agg::LatestOfEvents { value: None },
            })
            .collect();
        Group {
            rows: 0,
            by_values: self.initial_by_values(row),
            aggs,
        }
    }

    fn initial_by_values(&self, row: &Row) -> Vec<Value> {
        self.spec
            .by
            .iter()
            .map(|c| row.get(c).cloned().unwrap_or(Value::Null))
            .collect()
    }

    fn render(&self, group: &Group) -> Row {
        let mut out = Row::new();
        for (c, v) in self.spec.by.iter().zip(&group.by_values) {
            out.insert(c.clone(), v.clone());
        }
        for (spec, agg) in self.spec.aggregates.iter().zip(&group.aggs) {
            let v = match agg {
                Agg::Count { n } => Value::from(*n),
                Agg::Sum {
                    sum,
                    n,
                    strings,
                    scales,
                } => {
                    let scale = scales.last_key_value().map_or(0, |(s, _)| *s);
                    let sum = sum.reduce_scale_to(scale);
                    if *n == 0 {
                        Value::Null
                    } else if spec.kind == AggKind::Avg {
                        sum.div_count(*n)
                            .map_or(Value::Null, |avg| avg.to_json(*strings == 0))
                    } else {
                        sum.to_json(*strings == 0)
                    }
                }
                Agg::Extreme { values } => {
                    let entry = if spec.kind == AggKind::Max {
                        values.last_key_value()
                    } else {
                        values.first_key_value()
                    };
                    entry.map_or(Value::Null, |(_, (v, _))| v.clone())
                }
                Agg::ExtremeOfEvents { best } => {
                    best.as_ref().map_or(Value::Null, |(_, v)| v.clone())
                }
                Agg::Latest { order, .. } => order
                    .last_key_value()
                    .map_or(Value::Null, |(_, v)| v.clone()),
                Agg::LatestOfEvents { value } => value.clone().unwrap_or(Value::Null),
            };
            out.insert(spec.name.clone(), v);
        }
        out
    }

    fn rendered(&self, key: &str) -> Option<Row> {
        self.state.groups.get(key).map(|g| self.render(g))
    }

    /// Adds `row` to its group; false when no output column can have changed.
    fn add(&mut self, group_key: &str, row_key: &str, row: &Row) -> bool {
        let seq = self.state.next_seq;
        self.state.next_seq += 1;
        let mut changed = false;
        if !self.state.groups.contains_key(group_key) {
            let group = self.new_group(row);
            self.state.groups.insert(group_key.to_string(), group);
            changed = true;
        }
        let Some(group) = self.state.groups.get_mut(group_key) else {
            return changed;
        };
        group.rows += 1;
        for (value, column) in group.by_values.iter_mut().zip(&self.spec.by) {
            let new = row.get(column).unwrap_or(&Value::Null);
            if value != new {
                *value = new.clone();
                changed = true;
            }
        }
        for (spec, agg) in self.spec.aggregates.iter().zip(group.aggs.iter_mut()) {
            let value = spec.column.as_ref().and_then(|c| row.get(c));
            let value = value.filter(|v| !v.is_null());
            match agg {
                Agg::Count { n } => {
                    if spec.column.is_none() || value.is_some() {
                        *n += 1;
                        changed = true;
                    }
                }
                Agg::Sum {
                    sum,
                    n,
                    strings,
                    scales,
                } => {
                    if let Some(d) = value.and_then(Decimal::from_json) {
                        *sum = sum.add(&d);
                        *n += 1;
                        changed = true;
                        *scales.entry(d.scale()).or_default() += 1;
                        if value.is_some_and(Value::is_string) {
                            *strings += 1;
                        }
                    }
                }
                Agg::Extreme { values } => {
                    if let Some((v, s)) = value.and_then(|v| SortValue::of(v).map(|s| (v, s))) {
                        values.entry(s).or_insert_with(|| (v.clone(), 0)).1 += 1;
                        changed = true;
                    }
                }
                Agg::ExtremeOfEvents { best } => {
                    if let Some((v, s)) = value.and_then(|v| SortValue::of(v).map(|s| (v, s))) {
                        let better = match best {
                            None => true,
                            Some((b, _)) => {
                                if spec.kind == AggKind::Max {
                                    s > *b
                                } else {
                                    s < *b
                                }
                            }
                        };
                        if better {
                            *best = Some((s, v.clone()));
                            changed = true;
                        }
                    }
                }
                Agg::Latest { order, seq_of } => {
                    if let Some(v) = value {
                        order.insert(seq, v.clone());
                        seq_of.insert(row_key.to_string(), seq);
                        changed = true;
                    }
                }
                Agg::LatestOfEvents { value: latest } => {
                    if let Some(v) = value {
                        if latest.as_ref() != Some(v) {
                            *latest = Some(v.clone());
                            changed = true;
                        }
                    }
                }
            }
        }
        changed
    }

    fn retract(&mut self, group_key: &str, row_key: &str, row: &Row) {
        let Some(group) = self.state.groups.get_mut(group_key) else {
            return;
        };
        group.rows = group.rows.saturating_sub(1);
        for (spec, agg) in self.spec.aggregates.iter().zip(group.aggs.iter_mut()) {
            let value = spec.column.as_ref().and_then(|c| row.get(c));
            let value = value.filter(|v| !v.is_null());
            match agg {
                Agg::Count { n } => {
                    if spec.column.is_none() || value.is_some() {
                        *n = n.saturating_sub(1);
                    }
                }
                Agg::Sum {
                    sum,
                    n,
                    strings,
                    scales,
                } => {
                    if let Some(d) = value.and_then(Decimal::from_json) {
                        *sum = sum.sub(&d);
                        *n = n.saturating_sub(1);
                        if let Some(count) = scales.get_mut(&d.scale()) {
                            *count -= 1;
                            if *count == 0 {
                                scales.remove(&d.scale());
                            }
                        }
                        if value.is_some_and(Value::is_string) {
                            *strings = strings.saturating_sub(1);
                        }
                        if *n == 0 {
                            // no value left: start the next sum from a clean scale
                            *sum = Decimal::zero();
                        }
                    }
                }
                Agg::Extreme { values } => {
                    if let Some(s) = value.and_then(SortValue::of) {
                        if let Some(entry) = values.get_mut(&s) {
                            entry.1 -= 1;
                            if entry.1 == 0 {
                                values.remove(&s);
                            }
                        }
                    }
                }
                Agg::Latest { order, seq_of } => {
                    if let Some(seq) = seq_of.remove(row_key) {
                        order.remove(&seq);
                    }
                }
                Agg::ExtremeOfEvents { .. } | Agg::LatestOfEvents { .. } => {}
            }
        }
        if group.rows == 0 {
            self.state.groups.remove(group_key);
        }
    }

    /// A table change of row `key` (`old`/`new` `None` = absent).
    pub fn apply_change(
        &mut self,
        key: &str,
        old: Option<&Row>,
        new: Option<&Row>,
    ) -> Vec<OutChange> {
        let old_group = old.and_then(|r| group_key(r, &self.spec.by));
        let new_group = new.and_then(|r| group_key(r, &self.spec.by));
        let mut touched: Vec<String> = Vec::with_capacity(2);
        touched.extend(old_group.iter().cloned());
        if new_group.is_some() && new_group != old_group {
            touched.extend(new_group.iter().cloned());
        }
        let before: Vec<Option<Row>> = touched.iter().map(|g| self.rendered(g)).collect();
        if let (Some(g), Some(r)) = (&old_group, old) {
            self.retract(g, key, r);
        }
        if let (Some(g), Some(r)) = (&new_group, new) {
            // the table path compares whole output rows below, so the hint is not needed
            let _ = self.add(g, key, r);
        }
        let mut out = Vec::new();
        for (g, before) in touched.into_iter().zip(before) {
            let after = self.rendered(&g);
            if after != before {
                out.push((g, after));
            }
        }
        out
    }

    /// One event (its key is not used: groups come from the `by` columns).
    /// The output row an event changes (its group).
    pub fn event_key(&self, row: &Row) -> Option<String> {
        group_key(row, &self.spec.by)
    }

    pub fn apply_event(&mut self, row: &Row) -> Vec<OutChange> {
        let Some(g) = group_key(row, &self.spec.by) else {
            return Vec::new();
        };
        if self.add(&g, "", row) {
            let after = self.rendered(&g);
            vec![(g, after)]
        } else {
            Vec::new()
        }
    }

    /// Rebuilds one group from its output row and, for `avg`, its [`GroupBy::row_state`]
    /// (only when [`GroupBy::rebuildable_from_output`] or
    /// [`GroupBy::rebuildable_from_output_and_row_state`]). False, and nothing changed, when
    /// an `avg` lacks a readable state.
    pub fn rebuild_from_output(&mut self, key: &str, row: &Row, state: Option<&Value>) -> bool {
        let mut group = self.new_group(row);
        group.rows = 1;
        for (spec, agg) in self.spec.aggregates.iter().zip(group.aggs.iter_mut()) {
            let value = row.get(&spec.name).filter(|v| !v.is_null());
            match agg {
                Agg::Count { n } => *n = value.and_then(Value::as_u64).unwrap_or(0),
                Agg::Sum {
                    sum,
                    n,
                    strings,
                    scales,
                } if spec.kind == AggKind::Avg => {
                    let Some(s) = state
                        .and_then(|s| s.get(&spec.name))
                        .and_then(|s| AvgState::deserialize(s).ok())
                    else {
                        return false;
                    };
                    let Some(d) = Decimal::parse_stored(&s.sum) else {
                        return false;
                    };
                    *sum = d;
                    *n = s.n;
                    *strings = s.strings;
                    if s.n > 0 {
                        scales.insert(s.scale, 1);
                    }
                }
                Agg::Sum {
                    sum,
                    n,
                    strings,
                    scales,
                } => {
                    if let Some(v) = value {
                        // a sum livetable wrote may print longer than an input value; one
                        // that cannot be read is refused, not taken as no sum
                        let Some(d) = Decimal::from_stored_json(v) else {
                            return false;
                        };
                        scales.insert(d.scale(), 1);
                        *sum = d;
                        *n = 1;
                        *strings = u64::from(v.is_string());
                    }
                }
                Agg::ExtremeOfEvents { best } => {
                    *best = value.and_then(|v| SortValue::of(v).map(|s| (s, v.clone())));
                }
                Agg::LatestOfEvents { value: latest } => *latest = value.cloned(),
                Agg::Extreme { .. } | Agg::Latest { .. } => {}
            }
        }
        // a state that does not give the row's averages (corrupt, or another computation's)
        // would go on wrong for good: refused
        let rendered = self.render(&group);
        let agrees = self
            .spec
            .aggregates
            .iter()
            .filter(|a| a.kind == AggKind::Avg)
            .all(|a| {
                rendered.get(&a.name).unwrap_or(&Value::Null)
                    == row.get(&a.name).unwrap_or(&Value::Null)
            });
        if !agrees {
            return false;
        }
        self.state.groups.insert(key.to_string(), group);
        true
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.state.groups.len()
    }

    /// True when there is no group.
    pub fn is_empty(&self) -> bool {
        self.state.groups.is_empty()
    }
}
