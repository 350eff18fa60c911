//! Declared views: live tables derived from input rows (pure: no I/O, no clocks, no globals).
//!
//! A view reads one input (a table's row changes, or an events topic's events), runs one operator
//! as a state machine, and produces changes of its own output table: `(out key, Some(row))` to
//! insert or replace a row, `(out key, None)` to delete it, to be applied in order. Views chain:
//! a view's output is a table, so another view can read it.
//!
//! # The views file (`--views views.toml`)
//!
//! ```toml
//! # Topics that are not plain Debezium tables. A Debezium topic needs no entry (--topics
//! # subscribes to it; its table name is `source.table`); `format = "debezium"` is the default.
//! [topics."game.scores"]
//! format = "events"        # "debezium" | "upsert" | "events"
//! name = "scores"          # the name `from` uses (default: the topic's last `.` segment)
//! key = ["player"]         # key columns (default: the Kafka message key)
//!
//! # Each view: [views.NAME] (its table name), `from` (a table, a topic name above, or
//! # another view) and exactly one operator: group_by, top_n, max_by, min_by, history, delta.
//!
//! # The high-score board: each player's best score from the scores stream, then the top 5.
//! [views.high_scores]
//! from = "scores"
//! max_by = { key = ["player"], by = "score" }
//!
//! [views.leaderboard]
//! from = "high_scores"
//! top_n = { order_by = ["score desc", "player"], limit = 5 }
//!
//! # Odds history per game: the last 50 values of odd1 (a sparkline), one row per game.
//! [views.odds_history]
//! from = "game_odds"
//! history = { limit = 50, columns = ["odd1", "updated_at"] }
//!
//! # Biggest odds movers: how far odd1 moved at its last change, then the top 5 by that.
//! [views.odds_moves]
//! from = "game_odds"
//! delta = { columns = ["odd1"] }
//!
//! [views.biggest_movers]
//! from = "odds_moves"
//! top_n = { order_by = ["odd1_move desc", "game_id"], limit = 5 }
//!
//! # Balance per account from a stream of transfers (exact decimals).
//! [topics.transfers]
//! format = "events"
//!
//! [views.balances]
//! from = "transfers"
//! [views.balances.group_by]
//! by = ["account"]
//! aggregates = { balance = "sum(amount)", transfers = "count()", largest = "max(amount)",
//!                mean = "avg(amount)", last = "latest(amount)" }
//! ```
//!
//! Operators and their options (output keys and rows are documented in each module):
//! - `group_by = { by = [cols], aggregates = { name = "fn(col)", ... } }` with `count()`,
//!   `count(col)`, `sum`, `min`, `max`, `avg`, `latest` ([`group_by`]).
//! - `top_n = { order_by = ["col [asc|desc]", ...], limit = N, group_by = [cols], rank = "rank" }`
//!   (table input only; `rank = ""` for no rank column) ([`top_n`]).
//! - `max_by` / `min_by = { by = col, key = [cols] }` ([`extreme`]).
//! - `history = { limit = N, key = [cols], columns = [cols], field = "history" }` ([`history`]).
//! - `delta = { columns = [cols], key = [cols] }` ([`delta`]).
//!
//! Validation ([`ViewsFile::parse`]) refuses, naming the line: TOML errors and unknown keys, bad
//! names, no or several operators, a view reading itself or a cycle of views, a view and a topic
//! with one name, `top_n` over events, limits outside 1..=[`MAX_TOP_N_LIMIT`] /
//! 1..=[`MAX_HISTORY_LIMIT`], bad `order_by` entries and aggregates, more than [`MAX_VIEWS`] views,
//! a file over [`MAX_VIEWS_FILE_BYTES`].
//!
//! # Wiring ([`ViewOperator`]; run by `table::derived` and `table::events`)
//!
//! Records of `upsert` and `events` topics decode with [`input::decode_upsert`] and
//! [`input::decode_event`] (a Debezium topic decodes as it does for a CDC table).
//!
//! Build one [`ViewOperator`] per [`ViewDef`] (in the file's order, which puts inputs first), and
//! feed it [`Input::Change`] (table input: the row key and its old and new row, as the table
//! layer applies it; `old` is used by `group_by` to retract and by `history`/`delta` for deletes)
//! or [`Input::Event`] (events input). Apply the returned changes to the view's table in order.
//!
//! # Restore ([`RestorePlan`])
//!
//! - [`RestorePlan::FromOutput`]: `history`, `delta` (without `key` columns), `max_by`/`min_by` over events, `group_by`
//!   over events without `avg`: the view's own rows (its changelog) are its whole state; call
//!   [`ViewOperator::rebuild_from_output`] with each `(key, row)`. Over a table, `history` and
//!   `delta` without `key` ([`ViewOperator::output_per_input_row`]) then need only the input
//!   changes their rows lack, and `history` with `key` ([`ViewOperator::keyed_history`]) the
//!   input rows changed past the positions its records carry.
//! - [`RestorePlan::FromOutputAndRowState`]: `group_by` with `avg` over events: the rows and,
//!   with each, what it does not show ([`ViewOperator::row_state`]: each average's exact sum and
//!   count), which the view's topic carries beside the row; call
//!   [`ViewOperator::rebuild_from_output_and_row_state`].
//! - [`RestorePlan::ReplayInput`]: `top_n`, `max_by`/`min_by` over a table, `group_by` over a table
//!   without `latest`: the state is a function of the input table's current rows; feed each as an
//!   insert (`Change { key, old: None, new: Some(row) }`) and drop the output (it equals the
//!   restored changelog).
//! - [`RestorePlan::PersistedState`]: `latest` over a table (needs the order of changes), or
//!   `delta` over a table with `key` columns (needs each input row's own movement): save
//!   [`ViewOperator::save_state`] atomically with the view's rows and Kafka positions, load with
//!   [`ViewOperator::load_state`]. Every operator supports save/load, so this plan always works.

pub mod config;
pub mod delta;
pub mod extreme;
pub mod group_by;
pub mod history;
pub mod input;
mod pairs;
pub mod top_n;
pub mod value;

pub use config::{
    AggKind, AggregateSpec, DeltaSpec, ExtremeSpec, GroupBySpec, HistorySpec, InputKind,
    OperatorDef, SortColumn, TopNSpec, TopicDef, TopicFormat, ViewDef, ViewProblem, ViewsError,
    ViewsFile, MAX_HISTORY_LIMIT, MAX_TOP_N_LIMIT, MAX_VIEWS, MAX_VIEWS_FILE_BYTES,
};

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::cdc::decode::Row;

/// One output change of a view: its row key and the new row (`None` deletes it).
pub type OutChange = (String, Option<Row>);

/// One input of a view.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A row change of a table (`old: None` = insert, `new: None` = delete).
    Change {
        key: &'a str,
        old: Option<&'a Row>,
        new: Option<&'a Row>,
    },
    /// One event of an events topic, with its key if it has one.
    Event { key: Option<&'a str>, row: &'a Row },
}

/// How to bring a view back after a restart (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestorePlan {
    FromOutput,
    FromOutputAndRowState,
    ReplayInput,
    PersistedState,
}

/// Why a saved state could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("view state is not valid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("view state lacks what this version keeps (saved by an older one)")]
    Outdated,
    #[error("view state is for a {found} operator, the view is a {expected}")]
    WrongOperator {
        expected: &'static str,
        found: &'static str,
    },
}

#[derive(Debug, Clone)]
enum Op {
    GroupBy(group_by::GroupBy),
    TopN(top_n::TopN),
    Extreme(extreme::Extreme),
    History(history::History),
    Delta(delta::Delta),
}

/// A saved operator state, tagged with its operator.
#[derive(Serialize, Deserialize)]
#[serde(tag = "operator", content = "state", rename_all = "snake_case")]
enum SavedState {
    GroupBy(group_by::GroupByState),
    TopN(top_n::TopNState),
    Extreme(extreme::ExtremeState),
    History(history::HistoryState),
    Delta(delta::DeltaState),
}

impl SavedState {
    fn name(&self) -> &'static str {
        match self {
            SavedState::GroupBy(_) => "group_by",
            SavedState::TopN(_) => "top_n",
            SavedState::Extreme(_) => "max_by/min_by",
            SavedState::History(_) => "history",
            SavedState::Delta(_) => "delta",
        }
    }
}

/// A view's operator with its state.
#[derive(Debug, Clone)]
pub struct ViewOperator {
    op: Op,
}

impl ViewOperator {
    /// An empty operator for `def`.
    pub fn new(def: &ViewDef) -> Self {
        let op = match &def.operator {
            OperatorDef::GroupBy(spec) => {
                Op::GroupBy(group_by::GroupBy::new(spec.clone(), def.input))
            }
            OperatorDef::TopN(spec) => Op::TopN(top_n::TopN::new(spec.clone())),
            OperatorDef::Extreme(spec) => {
                Op::Extreme(extreme::Extreme::new(spec.clone(), def.input))
            }
            OperatorDef::History(spec) => Op::History(history::History::new(spec.clone())),
            OperatorDef::Delta(spec) => Op::Delta(delta::Delta::new(spec.clone(), def.input)),
        };
        ViewOperator { op }
    }

    /// Applies one input; returns the output changes to apply in order. An event given to
    /// `top_n` (refused at load) changes nothing.
    pub fn apply(&mut self, input: Input<'_>) -> Vec<OutChange> {
        match input {
            Input::Change { key, old, new } => self.apply_change(key, old, new),
            Input::Event { key, row } => self.apply_event(key, row),
        }
    }

    /// A table change of row `key`.
    pub fn apply_change(
        &mut self,
        key: &str,
        old: Option<&Row>,
        new: Option<&Row>,
    ) -> Vec<OutChange> {
        match &mut self.op {
            Op::GroupBy(o) => o.apply_change(key, old, new),
            Op::TopN(o) => o.apply_change(key, old, new),
            Op::Extreme(o) => o.apply_change(key, old, new),
            Op::History(o) => o.apply_change(key, old, new),
            Op::Delta(o) => o.apply_change(key, old, new),
        }
    }

    /// One event.
    pub fn apply_event(&mut self, key: Option<&str>, row: &Row) -> Vec<OutChange> {
        match &mut self.op {
            Op::GroupBy(o) => o.apply_event(row),
            Op::TopN(_) => Vec::new(),
            Op::Extreme(o) => o.apply_event(key, row),
            Op::History(o) => o.apply_event(key, row),
            Op::Delta(o) => o.apply_event(key, row),
        }
    }

    /// The one output row an event changes, if any (every operator over events changes at most
    /// one row per event: its group, key or series).
    pub fn event_key(&self, key: Option<&str>, row: &Row) -> Option<String> {
        match &self.op {
            Op::GroupBy(o) => o.event_key(row),
            Op::TopN(_) => None,
            Op::Extreme(o) => o.event_key(key, row),
            Op::History(o) => o.event_key(key, row),
            Op::Delta(o) => o.event_key(key, row),
        }
    }

    /// How this view is restored (see the module doc).
    pub fn restore_plan(&self) -> RestorePlan {
        match &self.op {
            Op::History(_) => RestorePlan::FromOutput,
            Op::Delta(o) if o.rebuildable_from_output() => RestorePlan::FromOutput,
            Op::Delta(_) => RestorePlan::PersistedState,
            Op::Extreme(o) if o.rebuildable_from_output() => RestorePlan::FromOutput,
            Op::Extreme(_) | Op::TopN(_) => RestorePlan::ReplayInput,
            Op::GroupBy(o) if o.rebuildable_from_output() => RestorePlan::FromOutput,
            Op::GroupBy(o) if o.rebuildable_from_output_and_row_state() => {
                RestorePlan::FromOutputAndRowState
            }
            Op::GroupBy(o) if o.rebuildable_from_input() => RestorePlan::ReplayInput,
            Op::GroupBy(_) => RestorePlan::PersistedState,
        }
    }

    /// Over a table: whether the output depends on the order in which the input's rows took
    /// their values (`group_by` with `latest`, `delta` with `key` columns), so that a rebuild
    /// from the input's current rows must choose one (`table::derived`, `order.rs`).
    pub fn replay_order_matters(&self) -> bool {
        match &self.op {
            Op::GroupBy(o) => o.has_latest_over_table(),
            Op::Delta(o) => o.keyed_over_table(),
            _ => false,
        }
    }

    /// A `delta` with `key` columns over a table: each input row it holds with its own output
    /// row (`None` for other operators), so that a recomputation goes on from them instead of
    /// starting again (`table::derived`, `members.rs`).
    pub fn keyed_members(&self) -> Option<HashMap<String, Row>> {
        match &self.op {
            Op::Delta(o) if o.keyed_over_table() => Some(o.members()),
            _ => None,
        }
    }

    /// A `group_by`'s `latest` aggregates: (input column, output column) of each (none for
    /// other operators).
    pub fn latest_columns(&self) -> Vec<(&str, &str)> {
        match &self.op {
            Op::GroupBy(o) => o.latest_columns(),
            _ => Vec::new(),
        }
    }

    /// A `delta`: whether own output row `own` holds exactly the values of input row `row`
    /// besides its movement columns (false for other operators).
    pub fn same_values(&self, own: &Row, row: &Row) -> bool {
        match &self.op {
            Op::Delta(o) => o.same_values(own, row),
            _ => false,
        }
    }

    /// A `delta` with `key` columns over a table: makes `own` input row `key`'s own output row
    /// (its movement kept from before a recomputation, or read from the view's topic); the
    /// output change, if any (nothing for other operators).
    pub fn set_own_row(&mut self, key: &str, own: &Row) -> Option<OutChange> {
        match &mut self.op {
            Op::Delta(o) if o.keyed_over_table() => o.set_own(key, own),
            _ => None,
        }
    }

    /// Where the input row of `key`, now `row`, stands in the order in which this operator took
    /// the rows (lower first), when it holds the values that matter of that row as it is now
    /// (`None`: it does not, or the order does not matter); what a view loaded from a clean
    /// stop's save starts its order from. See [`group_by::GroupBy::replay_rank`].
    pub fn replay_rank(&self, key: &str, row: &Row) -> Option<u64> {
        match &self.op {
            Op::GroupBy(o) => o.replay_rank(key, row),
            _ => None,
        }
    }

    /// Over a table: whether each output row is the row of one input key and its rows are the
    /// whole state (`history` and `delta` without `key` columns). Such a view knows, per input
    /// key, which change its row last took, so that after a restore from its topic, or when the
    /// input's updates do not follow on, it takes only what it lacks instead of starting again
    /// from the current rows (`table::derived`).
    pub fn output_per_input_row(&self) -> bool {
        match &self.op {
            Op::History(o) => !o.keyed(),
            Op::Delta(o) => o.rebuildable_from_output(),
            _ => false,
        }
    }

    /// Over a table: a `history` with `key` columns, whose rows are its whole state but gather
    /// the changes of several input rows each. Such a view knows how far in each input
    /// partition it took the changes, so that after a restore from its topic, or when the
    /// input's updates do not follow on, it takes only the rows changed since (`table::derived`).
    pub fn keyed_history(&self) -> bool {
        matches!(&self.op, Op::History(o) if o.keyed())
    }

    /// Feeds one output row back (plan [`RestorePlan::FromOutput`] only; otherwise ignored).
    pub fn rebuild_from_output(&mut self, key: &str, row: &Row) {
        if self.restore_plan() == RestorePlan::FromOutput {
            self.rebuild_from_output_and_row_state(key, row, None);
        }
    }

    /// What output row `key` does not show and a rebuild needs (plan
    /// [`RestorePlan::FromOutputAndRowState`] only; `None` otherwise or for no such row). It
    /// goes with the row wherever the row is kept (the view's topic).
    pub fn row_state(&self, key: &str) -> Option<serde_json::Value> {
        match &self.op {
            Op::GroupBy(o) => o.row_state(key),
            _ => None,
        }
    }

    /// Feeds one output row back with its [`ViewOperator::row_state`] (plans
    /// [`RestorePlan::FromOutput`], where `state` is not needed, and
    /// [`RestorePlan::FromOutputAndRowState`]). False, and nothing changed, for another plan
    /// or a state that is missing or unreadable.
    pub fn rebuild_from_output_and_row_state(
        &mut self,
        key: &str,
        row: &Row,
        state: Option<&serde_json::Value>,
    ) -> bool {
        match self.restore_plan() {
            RestorePlan::FromOutput | RestorePlan::FromOutputAndRowState => {}
            RestorePlan::ReplayInput | RestorePlan::PersistedState => return false,
        }
        match &mut self.op {
            Op::GroupBy(o) => return o.rebuild_from_output(key, row, state),
            Op::Extreme(o) => o.rebuild_from_output(key, row),
            Op::History(o) => o.rebuild_from_output(key, row),
            Op::Delta(o) => o.rebuild_from_output(key, row),
            Op::TopN(_) => return false,
        }
        true
    }

    /// The whole state as JSON bytes (`{"operator": ..., "state": ...}`).
    pub fn save_state(&self) -> Result<Vec<u8>, StateError> {
        let saved = match &self.op {
            Op::GroupBy(o) => serde_json::to_vec(&SavedStateRef::GroupBy(o.state())),
            Op::TopN(o) => serde_json::to_vec(&SavedStateRef::TopN(o.state())),
            Op::Extreme(o) => serde_json::to_vec(&SavedStateRef::Extreme(o.state())),
            Op::History(o) => serde_json::to_vec(&SavedStateRef::History(o.state())),
            Op::Delta(o) => serde_json::to_vec(&SavedStateRef::Delta(o.state())),
        };
        Ok(saved?)
    }

    /// An operator for `def` with a state saved by [`ViewOperator::save_state`].
    pub fn load_state(def: &ViewDef, bytes: &[u8]) -> Result<Self, StateError> {
        let saved: SavedState = serde_json::from_slice(bytes)?;
        let expected = ViewOperator::new(def);
        let op = match (&def.operator, saved) {
            (OperatorDef::GroupBy(spec), SavedState::GroupBy(s)) => {
                Op::GroupBy(group_by::GroupBy::with_state(spec.clone(), def.input, s))
            }
            (OperatorDef::TopN(spec), SavedState::TopN(s)) => {
                Op::TopN(top_n::TopN::with_state(spec.clone(), s))
            }
            (OperatorDef::Extreme(spec), SavedState::Extreme(s)) => {
                Op::Extreme(extreme::Extreme::with_state(spec.clone(), def.input, s))
            }
            (OperatorDef::History(spec), SavedState::History(s)) => {
                Op::History(history::History::with_state(spec.clone(), s))
            }
            (OperatorDef::Delta(spec), SavedState::Delta(s)) => Op::Delta(
                delta::Delta::with_state(spec.clone(), def.input, s).ok_or(StateError::Outdated)?,
            ),
            (_, other) => {
                return Err(StateError::WrongOperator {
                    expected: expected.operator_name(),
                    found: other.name(),
                })
            }
        };
        Ok(ViewOperator { op })
    }

    fn operator_name(&self) -> &'static str {
        match &self.op {
            Op::GroupBy(_) => "group_by",
            Op::TopN(_) => "top_n",
            Op::Extreme(_) => "max_by/min_by",
            Op::History(_) => "history",
            Op::Delta(_) => "delta",
        }
    }
}

/// [`SavedState`] by reference, so saving does not clone the state.
#[derive(Serialize)]
#[serde(tag = "operator", content = "state", rename_all = "snake_case")]
enum SavedStateRef<'a> {
    GroupBy(&'a group_by::GroupByState),
    TopN(&'a top_n::TopNState),
    Extreme(&'a extreme::ExtremeState),
    History(&'a history::HistoryState),
    Delta(&'a delta::DeltaState),
}

#[cfg(test)]
pub(crate) mod tests;
