//! Derived tables: the runtime of declared views (`--views`).
//!
//! A view is computed on every serving node from the table it reads, which such a node holds
//! whole (owned and followed slices). [`Views`] sits between the table writers and the fan-out:
//! every committed update of an input table is fed to its views' operators in commit order
//! (while the input's order lock is held, so the order is exactly the table's), and their output
//! is committed to the views' own tables, which the fan-out serves like any table: snapshot,
//! diffs, keys, `where`, resume, the HTTP API. A view of a view is fed by that view's commits.
//!
//! A view's table has one slice and its own lineage, drawn anew by each process: its position
//! counts the view's output changes in this process. A client that resumes across a restart (or
//! across nodes) gets a fresh snapshot, never a patch against another computation.
//!
//! Continuity: the operator keeps the input's lineage and update number. When an update does not
//! follow the last one fed (the process started, the table was restored or replaced, a slice was
//! handed over without an update), the view is rebuilt from the input's current rows, in key
//! order (`latest` over a table: in the order it took them, `order.rs`), and the difference to
//! its current rows is committed as one update. `top_n`,
//! `max_by`/`min_by` and `group_by` without `latest` are a function of the input rows and come
//! back exact; `history` (also with `key` columns) and `delta` without `key` columns are brought
//! up to the input's rows instead, keeping their past (`reconcile.rs`); a `delta` with `key`
//! columns goes on from the input rows it holds (`members.rs`); `latest` takes the rows in the
//! order it took them (`order.rs`). On a node where nothing saved them, `latest` and a keyed
//! `delta` take the order of the rows, and a keyed `delta` the movement of each key's row, from
//! their changelog topics (`order.rs`).
//!
//! Clean stops: [`Views::save`] gives each view's operator state and rows with the input's
//! resume token (views over events: the events topics' positions), which the node keeps in its
//! store. At the next start a view whose input table comes back at exactly that token (nothing
//! changed it in between) is loaded instead of rebuilt, so a history survives a rolling restart;
//! views over events resume reading where they stopped. Any other case rebuilds, except views
//! over events whose rows are their whole state (or whose rows with the state their records
//! carry are: `avg`): those are restored from their changelog topics
//! ([`crate::table::viewlog`], `log.rs`), and the events they hold are skipped when read again;
//! and `history` and `delta` without `key` over a table, restored from their topics at start and
//! brought up to their input (`reconcile.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cdc::decode::{Op, Row};
use crate::metrics::Metrics;
use crate::table::state::{
    Delta, RowWrite, SliceMode, Table, TableState, TableUpdate, Tables, UpdateSink,
};
use crate::table::viewlog::{Commit, LogFlags};
use crate::views::{InputKind, OutChange, ViewDef, ViewOperator};

mod log;
mod members;
mod order;
mod positions;
mod reconcile;
pub use log::LogChange;

/// Reads a view's topic at start: `(view name, definition id)` -> its content (`Ok(None)`: no
/// topic; `Err`: it could not be read).
pub type ReadLog<'a> =
    dyn Fn(&str, &str) -> Result<Option<crate::table::viewlog::read::LogContent>, String> + 'a;

/// One event of an events topic, for the views that read it.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: Option<String>,
    pub row: Row,
    pub kafka_ts_ms: Option<i64>,
    /// When the events reader took the record.
    pub polled: Option<Instant>,
    /// The record's partition and offset in the events topic.
    pub part: i32,
    pub offset: i64,
}

/// What the operator of a view was last fed.
struct Fed {
    table: Arc<Table>,
    epoch: Arc<str>,
    useq: u64,
}

impl Fed {
    /// The input `table` as it is now (`t`: its state, read).
    fn at(table: &Arc<Table>, t: &TableState) -> Fed {
        Fed {
            table: table.clone(),
            epoch: t.epoch.clone(),
            useq: t.useq,
        }
    }
}

struct ViewState {
    op: ViewOperator,
    fed: Option<Fed>,
    /// The view table's position: its last output change in this process.
    off: i64,
    /// Views over events: the next offset of each partition of the input whose events the
    /// state holds (the mark of what it writes to its topic).
    pos: HashMap<i32, i64>,
    /// Restored from the view's topic: the events its rows already hold, skipped while the
    /// input is read again.
    skip: Option<log::Skip>,
    /// A view over a table whose rows are its input rows' ([`ViewOperator::output_per_input_row`])
    /// or a keyed `history` ([`ViewOperator::keyed_history`]): the input change each input key
    /// last gave it (`reconcile.rs`).
    track: Option<reconcile::Tracked>,
    /// A view over a table whose output depends on the order of its input's changes
    /// ([`ViewOperator::replay_order_matters`]): when it took each input row, how far it took
    /// each input partition, and what its topic held at a start that saved nothing
    /// (`order.rs`).
    taken: Option<order::Taken>,
}

/// One declared view and its table.
struct View {
    def: ViewDef,
    table: Arc<Table>,
    state: Mutex<ViewState>,
    /// Whether this node writes the view's topic.
    log: Arc<LogFlags>,
}

/// The views of a node, as an [`UpdateSink`] in front of the fan-out.
pub struct Views {
    inner: Arc<dyn UpdateSink>,
    tables: Arc<Tables>,
    metrics: Arc<Metrics>,
    /// Views by the name of the table they read.
    by_input: HashMap<String, Vec<Arc<View>>>,
    /// Next offset per (events input name, partition), as far as the views took them.
    events_next: Mutex<HashMap<(String, i32), i64>>,
    /// Each events input's declaration (its Kafka topic and key columns), by name: a saved state
    /// depends on it.
    sources: HashMap<String, String>,
    /// Where commits of the views this node writes go ([`Views::set_log`]).
    log_tx: OnceLock<SyncSender<Commit>>,
}

/// What a clean stop keeps of one view.
#[derive(Serialize, Deserialize)]
struct SavedView {
    /// The view's definition when saved ([`fingerprint`]).
    def: String,
    /// The input table's resume token and change count the state follows (views over tables).
    input: Option<String>,
    /// [`ViewOperator::save_state`].
    state: Box<serde_json::value::RawValue>,
    rows: Vec<(String, Row)>,
    /// Views over events: the next offset per partition of the view's events input.
    events_next: Vec<(i32, i64)>,
    /// Views over events: the input's declaration when saved (`None`: saved by a version that
    /// did not keep it, taken as unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    /// Views that track their input rows: [`ViewState`]'s `seen`, in the input's lineage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    seen: Vec<(String, u32, i64)>,
    /// A `delta`: the keys deleted that the input may read again (`reconcile::Tracked::gone`),
    /// in the input's lineage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gone: Vec<(String, u32, i64)>,
    /// Views that track their input rows: the keys held ahead of the input that it lacks
    /// (`reconcile::Tracked::pending`), in the input's lineage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending: Vec<(String, u32, i64)>,
}

/// What a saved state depends on: the input and the operator with its options (not the line);
/// an events input's declaration is kept apart ([`SavedView::source`]).
fn fingerprint(def: &ViewDef) -> String {
    format!("{}|{:?}|{:?}", def.from, def.input, def.operator)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Views {
    /// Creates the views' tables (empty, each with a new lineage) in `tables` and computes each
    /// view from its input as it is now, or loads what the last clean stop saved (`saved`, by
    /// view name, from [`Views::save`]) where it still applies. `defs` in the views file's order
    /// (inputs first); `events` the declared events topics. A view over a table whose rows are its
    /// input rows' that nothing saved is restored from what `logs(view name, definition id)`
    /// reads of its topic (`Ok(None)`: no topic; `Err`: not read, restored when this node takes
    /// the topic over), then takes what it lacks of the input; a `latest` over a table takes
    /// the order of its input rows from what it reads there (`order.rs`).
    pub fn start(
        defs: &[ViewDef],
        events: &[crate::table::events::EventsTopic],
        tables: Arc<Tables>,
        inner: Arc<dyn UpdateSink>,
        metrics: Arc<Metrics>,
        saved: &HashMap<String, Vec<u8>>,
        logs: &ReadLog<'_>,
    ) -> Result<Arc<Views>, String> {
        if let Some(def) = defs.iter().find(|d| tables.get(&d.name).is_some()) {
            return Err(format!(
                "view `{}` (line {}) has the name of a table this node holds; rename the view",
                def.name, def.line
            ));
        }
        let mut by_input: HashMap<String, Vec<Arc<View>>> = HashMap::new();
        let mut all = Vec::new();
        for def in defs {
            let mut state = TableState::new(&def.name, &super::new_epoch(), &def.from, 1);
            state.slice_mut(0).mode = SliceMode::Derived;
            let table = tables.insert(state);
            metrics.table_size(&def.name, 0, 0);
            // every view's series exist from the start (alerts see their first increase)
            metrics.view_rebuilds.with_label_values(&[&def.name]);
            metrics.view_changes.with_label_values(&[&def.name]);
            metrics.view_log_restores.with_label_values(&[&def.name]);
            let op = ViewOperator::new(def);
            // not over a view: its lineage is new in each process, so no position of a restored
            // topic would hold in it and every row would be taken again as a new entry
            let keyed = op.keyed_history() && !defs.iter().any(|d| d.name == def.from);
            let track = (def.input == InputKind::Table && (op.output_per_input_row() || keyed))
                .then(|| {
                    reconcile::Tracked::new(
                        matches!(def.operator, crate::views::OperatorDef::Delta(_)),
                        keyed,
                    )
                });
            let taken = (def.input == InputKind::Table && op.replay_order_matters())
                .then(order::Taken::default);
            let view = Arc::new(View {
                def: def.clone(),
                table,
                state: Mutex::new(ViewState {
                    op,
                    fed: None,
                    off: -1,
                    pos: HashMap::new(),
                    skip: None,
                    track,
                    taken,
                }),
                log: Arc::default(),
            });
            by_input
                .entry(def.from.clone())
                .or_default()
                .push(view.clone());
            all.push(view);
        }
        let views = Arc::new(Views {
            inner,
            tables,
            metrics,
            by_input,
            events_next: Mutex::new(HashMap::new()),
            sources: events
                .iter()
                .map(|e| {
                    (
                        e.name.clone(),
                        format!("topic={:?} key={:?}", e.topic, e.key),
                    )
                })
                .collect(),
            log_tx: OnceLock::new(),
        });
        views.load_saved(&all, saved);
        // outputs first: a view's restore is published to the views that read it, which must
        // not take it before they are restored themselves
        for view in all.iter().rev() {
            let (wanted, ordered) = {
                let st = lock(&view.state);
                // a `latest` over a view: its input's lineage is new in each process, so no
                // record's position holds in it
                let ordered = st.taken.is_some()
                    && st.fed.is_none()
                    && !defs.iter().any(|d| d.name == view.def.from);
                (st.track.is_some() && st.fed.is_none(), ordered)
            };
            if ordered {
                views.order_from_log(view, logs(&view.def.name, &views.def_id(view)));
            }
            if wanted {
                match logs(&view.def.name, &views.def_id(view)) {
                    Ok(Some(content)) => {
                        views.restore_tracked_from_log(view, &content);
                    }
                    Ok(None) => {}
                    Err(_) => {
                        // not read: restored when this node takes its topic over, before it
                        // writes the view there
                        if let Some(tr) = lock(&view.state).track.as_mut() {
                            tr.unread = true;
                        }
                    }
                }
            }
        }
        for view in all.iter().filter(|v| v.def.input == InputKind::Table) {
            {
                let st = lock(&view.state);
                let restored = st.track.as_ref().is_some_and(|t| t.restored);
                // a view restored from its topic whose input is a view waits for that view's
                // first commit (an input view not fed yet holds nothing)
                if st.fed.is_some() || (restored && defs.iter().any(|d| d.name == view.def.from)) {
                    continue;
                }
            }
            if let Some(input) = views.tables.get(&view.def.from) {
                // the input's order lock first, as on the publish path: no commit to it runs
                // while it is read
                let _order = input.order_guard();
                let mut st = lock(&view.state);
                views.rebuild(view, &mut st, &input, None);
            }
        }
        Ok(views)
    }

    /// Names of the views' tables.
    pub fn names(&self) -> Vec<String> {
        self.by_input
            .values()
            .flatten()
            .map(|v| v.def.name.clone())
            .collect()
    }

    /// Loads the saved views that still apply (the others are computed as if nothing was saved):
    /// - the saved definition is the view's (`from`, input, operator and options);
    /// - a view over a table: its input is at exactly the saved token and change count, and is not
    ///   itself a view (whose lineage is new in each process);
    /// - views over events: every view of that events input has a usable saved state (its
    ///   operator state readable, the topic declared as it was), else none is loaded (they are
    ///   then restored from their changelog topics where they can be, else the topic is read
    ///   from its beginning); the reader resumes at the lowest of their positions and each view
    ///   skips the events below its own.
    fn load_saved(&self, all: &[Arc<View>], saved: &HashMap<String, Vec<u8>>) {
        let mut usable: HashMap<&str, (SavedView, ViewOperator)> = HashMap::new();
        for view in all {
            let Some(bytes) = saved.get(&view.def.name) else {
                continue;
            };
            match serde_json::from_slice::<SavedView>(bytes) {
                Ok(sv)
                    if sv.def == fingerprint(&view.def)
                        && sv
                            .source
                            .as_ref()
                            .is_none_or(|s| Some(s) == self.sources.get(&view.def.from)) =>
                {
                    let current = match view.def.input {
                        InputKind::Table => self.input_mark(&view.def.from),
                        InputKind::Events => None,
                    };
                    if sv.input != current {
                        continue;
                    }
                    // read before anything is decided: an events input resumes only if every
                    // one of its views can be loaded
                    match ViewOperator::load_state(&view.def, sv.state.get().as_bytes()) {
                        Ok(op) => {
                            usable.insert(view.def.name.as_str(), (sv, op));
                        }
                        Err(e) => {
                            tracing::warn!(view = %view.def.name, error = %e, "the saved view state is not usable; it is computed again")
                        }
                    }
                }
                Ok(_) => {
                    tracing::info!(view = %view.def.name, "the view's definition changed since it was saved; it is computed again")
                }
                Err(e) => {
                    tracing::warn!(view = %view.def.name, error = %e, "the saved view is not readable; it is computed again")
                }
            }
        }
        // an events input resumes only if all its views do; the reader then starts each
        // partition at the lowest of their positions (a view absent from a partition needs it
        // from 0), and each view skips the events below its own
        let mut starts: Vec<((String, i32), i64)> = Vec::new();
        for (input, views) in &self.by_input {
            let events: Vec<&Arc<View>> = views
                .iter()
                .filter(|v| v.def.input == InputKind::Events)
                .collect();
            if events.is_empty() {
                continue;
            }
            let all = events
                .iter()
                .all(|v| usable.contains_key(v.def.name.as_str()));
            if !all {
                for v in &events {
                    usable.remove(v.def.name.as_str());
                }
                continue;
            }
            let mut parts: Vec<i32> = events
                .iter()
                .filter_map(|v| usable.get(v.def.name.as_str()))
                .flat_map(|(sv, _)| sv.events_next.iter().map(|(p, _)| *p))
                .collect();
            parts.sort_unstable();
            parts.dedup();
            for p in parts {
                let lowest = events
                    .iter()
                    .filter_map(|v| usable.get(v.def.name.as_str()))
                    .map(|(sv, _)| {
                        sv.events_next
                            .iter()
                            .find(|(q, _)| *q == p)
                            .map_or(0, |(_, n)| *n)
                    })
                    .min()
                    .unwrap_or(0);
                starts.push(((input.clone(), p), lowest));
            }
        }
        lock(&self.events_next).extend(starts);
        for view in all {
            let Some((sv, op)) = usable.remove(view.def.name.as_str()) else {
                continue;
            };
            match self.load(view, sv, op) {
                Ok(()) => {
                    tracing::info!(view = %view.def.name, "view loaded as the last clean stop left it")
                }
                Err(e) => {
                    tracing::warn!(view = %view.def.name, error = %e, "the saved view is not usable; it is computed again")
                }
            }
        }
    }

    /// The input table's saved-state mark: its resume token and change count (`None`: no such
    /// table, or a view).
    fn input_mark(&self, name: &str) -> Option<String> {
        let input = self.tables.get(name)?;
        let t = input.read();
        if t.slices.iter().any(|s| s.mode == SliceMode::Derived) {
            return None;
        }
        Some(format!("{}#{}", t.token(), t.seq()))
    }

    /// Loads `view` with `op` (read from `saved`); only a view over a table whose input is gone
    /// can fail.
    fn load(&self, view: &View, saved: SavedView, op: ViewOperator) -> Result<(), String> {
        let pos: HashMap<i32, i64> = saved.events_next.iter().copied().collect();
        let fed = match view.def.input {
            InputKind::Table => {
                let input = self
                    .tables
                    .get(&view.def.from)
                    .ok_or("the input table is gone")?;
                let fed = Fed::at(&input, &input.read());
                Some(fed)
            }
            // the reader's start is set by `load_saved` (the lowest over the input's views)
            InputKind::Events => None,
        };
        let mut st = lock(&view.state);
        st.op = op;
        if let (
            ViewState {
                op,
                taken: Some(taken),
                ..
            },
            Some(f),
        ) = (&mut *st, fed.as_ref())
        {
            taken.seed(op, &f.table.read());
        }
        if let (Some(tr), Some(f)) = (st.track.as_mut(), fed.as_ref()) {
            if tr.keyed {
                // saved at exactly the input's rows: it took every change they hold
                tr.upto.pass_input(&f.table.read());
            }
            tr.seen = reconcile::Seen::lineage(saved.seen, &f.epoch);
            tr.gone = reconcile::Seen::lineage(saved.gone, &f.epoch);
            tr.pending = reconcile::Seen::lineage(saved.pending, &f.epoch);
        }
        st.fed = fed;
        st.pos = pos;
        let rows = saved.rows.into_iter().map(|(k, r)| (k, Some(r))).collect();
        self.commit(view, &mut st, rows, Default::default());
        Ok(())
    }

    /// What a clean stop keeps of each view (call it once nothing writes the tables any more):
    /// `(view name, bytes for [`Views::start`])`. A view over a table whose state does not follow
    /// its input's last update is left out.
    pub fn save(&self) -> Vec<(String, Vec<u8>)> {
        let next = lock(&self.events_next).clone();
        let mut out = Vec::new();
        for view in self.by_input.values().flatten() {
            let st = lock(&view.state);
            if st.skip.is_some()
                || st
                    .track
                    .as_ref()
                    .is_some_and(|t| !t.groups.is_empty() || t.unread)
                || st
                    .taken
                    .as_ref()
                    .is_some_and(|t| t.has_records() || t.is_unread())
            {
                // restored from its topic and still reading past events (or changes) again:
                // its rows are ahead of any one position; or its topic not read yet, so its
                // rows lack what the topic holds (the next start reads the topic again)
                continue;
            }
            let input = match (&st.fed, view.def.input) {
                (Some(f), InputKind::Table) => {
                    // the table last fed is still the input (not replaced by one the state was
                    // never fed), at its last update
                    if !self
                        .tables
                        .get(&view.def.from)
                        .is_some_and(|t| Arc::ptr_eq(&t, &f.table))
                    {
                        continue;
                    }
                    {
                        let t = f.table.read();
                        if t.useq != f.useq || t.epoch != f.epoch {
                            continue;
                        }
                    }
                    match self.input_mark(&view.def.from) {
                        Some(mark) => Some(mark),
                        None => continue,
                    }
                }
                (None, InputKind::Table) => continue,
                (_, InputKind::Events) => None,
            };
            let Ok(state) = st.op.save_state() else {
                continue;
            };
            let Ok(state) = serde_json::value::RawValue::from_string(
                String::from_utf8_lossy(&state).into_owned(),
            ) else {
                continue;
            };
            let rows = view
                .table
                .read()
                .rows
                .iter()
                .map(|(k, e)| (k.clone(), (*e.row).clone()))
                .collect();
            // what the reader passed, and what the view holds beyond it (a view restored from
            // its topic holds a partition's events up to where its rows say, read or not)
            let mut positions: HashMap<i32, i64> = st.pos.clone();
            for ((name, p), o) in &next {
                if *name == view.def.from {
                    let e = positions.entry(*p).or_insert(*o);
                    *e = (*e).max(*o);
                }
            }
            let mut events_next: Vec<(i32, i64)> = positions.into_iter().collect();
            events_next.sort_unstable();
            // a tracked view's positions of the input's lineage
            let tracked = |of: fn(&reconcile::Tracked) -> &HashMap<String, reconcile::Seen>| match (
                &st.track, &st.fed,
            ) {
                (Some(tr), Some(f)) => reconcile::Seen::of_lineage(of(tr), &f.epoch),
                _ => Vec::new(),
            };
            let saved = SavedView {
                def: fingerprint(&view.def),
                input,
                state,
                rows,
                events_next,
                source: self.sources.get(&view.def.from).cloned(),
                seen: tracked(|tr| &tr.seen),
                gone: tracked(|tr| &tr.gone),
                pending: tracked(|tr| &tr.pending),
            };
            if let Ok(bytes) = serde_json::to_vec(&saved) {
                out.push((view.def.name.clone(), bytes));
            }
        }
        out
    }

    /// Where the events reader starts partition `p` of the events input `name` (0: its
    /// beginning).
    pub fn events_start(&self, name: &str, p: i32) -> i64 {
        if let Some(n) = lock(&self.events_next).get(&(name.to_string(), p)) {
            return *n;
        }
        // views restored from their topics need it from where their rows say; any other view,
        // from the beginning
        self.by_input
            .get(name)
            .into_iter()
            .flatten()
            .filter(|v| v.def.input == InputKind::Events)
            .map(|v| lock(&v.state).pos.get(&p).copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    /// Feeds events of the events topic named `input` (in the topic's order) to its views.
    pub fn feed_events(&self, input: &str, events: &[Event]) {
        let Some(views) = self.by_input.get(input) else {
            return;
        };
        for view in views.iter().filter(|v| v.def.input == InputKind::Events) {
            let mut st = lock(&view.state);
            let mut out: Vec<OutChange> = Vec::new();
            for e in events {
                let next = st.pos.entry(e.part).or_insert(0);
                if e.offset < *next {
                    // the view holds it already (restored from its topic while the reader
                    // started lower for a sibling view)
                    continue;
                }
                *next = e.offset + 1;
                if st.skip.is_some() {
                    let key = st.op.event_key(e.key.as_deref(), &e.row);
                    if Self::skipped(&st, key.as_ref(), e.part, e.offset) {
                        continue;
                    }
                }
                out.extend(st.op.apply_event(e.key.as_deref(), &e.row));
            }
            let ts = events.last().map(|e| (None, e.kafka_ts_ms, e.polled));
            self.commit(view, &mut st, out, ts.unwrap_or_default());
        }
    }

    /// The events reader fed every record before `next` of these partitions (`(events input
    /// name, partition)`) to the views, or skipped it: the positions the views' states include,
    /// kept by [`Views::save`].
    pub fn events_read(&self, next: impl Iterator<Item = ((String, i32), i64)>) {
        let next: Vec<((String, i32), i64)> = next.collect();
        {
            let mut pos = lock(&self.events_next);
            for (tp, off) in &next {
                pos.insert(tp.clone(), *off);
            }
        }
        // every record before these was fed to the views of its input (or skipped by all)
        let mut inputs: Vec<&str> = next.iter().map(|((name, _), _)| name.as_str()).collect();
        inputs.sort_unstable();
        inputs.dedup();
        for name in inputs {
            for v in self.by_input.get(name).into_iter().flatten() {
                if v.def.input != InputKind::Events {
                    continue;
                }
                let mut st = lock(&v.state);
                for ((n, p), off) in &next {
                    if n == name {
                        let e = st.pos.entry(*p).or_insert(*off);
                        *e = (*e).max(*off);
                    }
                }
            }
            self.drop_passed_skips(name);
        }
    }

    fn feed(&self, view: &View, update: &TableUpdate) {
        if view.def.input != InputKind::Table {
            return;
        }
        let mut st = lock(&view.state);
        let Some(input) = self.tables.get(&update.table) else {
            return;
        };
        let follows = match &st.fed {
            Some(f) => {
                Arc::ptr_eq(&f.table, &input)
                    && f.epoch == update.epoch
                    && f.useq + 1 == update.useq
            }
            // a table created after the views started: its first update is its whole past, so
            // the operator (still empty) takes it change by change (a delta or history keeps it);
            // a view restored from its topic reconciles with it instead
            None => {
                update.useq == 1
                    && !st.track.as_ref().is_some_and(|t| t.restored)
                    && !st.taken.as_ref().is_some_and(order::Taken::has_records)
            }
        };
        // a `latest` that read its topic at start, once its input holds everything the records
        // name: computed again, each group's rows placed by them
        let reached = match &st.taken {
            Some(taken) if taken.has_records() => taken.records_reached(&input.read()),
            _ => false,
        };
        if !follows || reached {
            self.rebuild(view, &mut st, &input, Some(update));
            return;
        }
        let mut out: Vec<OutChange> = Vec::new();
        if st.track.is_some() {
            out = Self::feed_tracked(&mut st, &input, update);
        } else {
            let ViewState { op, taken, .. } = &mut *st;
            if let Some(taken) = taken.as_mut() {
                taken.note_resets(&input.read());
            }
            for c in &update.changes {
                out.extend(op.apply_change(&c.key, c.before.as_deref(), c.row.as_deref()));
                if let Some(taken) = taken.as_mut() {
                    taken.note(&update.epoch, c);
                }
            }
            if let Some(taken) = taken.as_mut() {
                taken.note_held(op, update);
            }
        }
        st.fed = Some(Fed {
            table: input,
            epoch: update.epoch.clone(),
            useq: update.useq,
        });
        let ts = update
            .changes
            .last()
            .map(|c| (c.ts_ms, c.kafka_ts_ms, c.polled));
        self.commit(view, &mut st, out, ts.unwrap_or_default());
    }

    /// Recomputes `view` from the input's current rows (the caller holds the input's order lock,
    /// so they are the rows of its last update) and commits the difference.
    fn rebuild(
        &self,
        view: &View,
        st: &mut ViewState,
        input: &Arc<Table>,
        update: Option<&TableUpdate>,
    ) {
        if st.track.is_some() {
            self.reconcile(view, st, input, update);
            return;
        }
        if self.reconcile_members(view, st, input, update) {
            return;
        }
        let mut op = ViewOperator::new(&view.def);
        let mut result: BTreeMap<String, Option<Row>> = BTreeMap::new();
        let fed = {
            let t = input.read();
            let keys = match st.taken.as_mut() {
                Some(taken) => {
                    if taken.has_records() {
                        let s = taken.seed_from_records(&op, &t);
                        Self::seeded(view, &s);
                    }
                    taken.replay(&t)
                }
                None => {
                    let mut keys: Vec<(&String, &Row)> =
                        t.rows.iter().map(|(k, e)| (k, &*e.row)).collect();
                    keys.sort_by(|a, b| a.0.cmp(b.0));
                    keys
                }
            };
            for (key, row) in keys {
                for (k, r) in op.apply_change(key, None, Some(row)) {
                    result.insert(k, r);
                }
            }
            Fed::at(input, &t)
        };
        st.op = op;
        st.fed = Some(fed);
        let out = Self::recomputed(view, result);
        self.commit_recomputed(view, st, out, update);
    }

    /// The output of a recomputation whose rows are `result` (by key, last change): a delete of
    /// each row of the view it lacks, then its rows.
    fn recomputed(view: &View, result: BTreeMap<String, Option<Row>>) -> Vec<OutChange> {
        let mut out: Vec<OutChange> = {
            let t = view.table.read();
            t.rows
                .keys()
                .filter(|k| !matches!(result.get(*k), Some(Some(_))))
                .map(|k| (k.clone(), None))
                .collect()
        };
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.extend(result.into_iter().filter(|(_, r)| r.is_some()));
        out
    }

    /// Logs what a recomputation took from the records a view read at start; once it dropped
    /// them, the whole view is to be written (nothing was while they were kept).
    fn seeded(view: &View, s: &order::Seeded) {
        if !s.done {
            tracing::debug!(
                view = %view.def.name,
                groups = s.groups,
                rows = s.rows,
                "the input rows its topic's records hold placed by them"
            );
            return;
        }
        tracing::info!(
            view = %view.def.name,
            groups = s.groups,
            rows = s.rows,
            "the input holds what the view's topic does: its rows placed by the records for the last time"
        );
        view.log
            .dirty
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Commits the output of a recomputation from the input's rows (a rebuild or a reconcile),
    /// counted in `livetable_view_rebuilds_total`, stamped with `update`'s last change.
    fn commit_recomputed(
        &self,
        view: &View,
        st: &mut ViewState,
        out: Vec<OutChange>,
        update: Option<&TableUpdate>,
    ) {
        self.metrics
            .view_rebuilds
            .with_label_values(&[&view.def.name])
            .inc();
        let ts = update
            .and_then(|u| u.changes.last())
            .map(|c| (c.ts_ms, c.kafka_ts_ms, c.polled));
        self.commit(view, st, out, ts.unwrap_or_default());
    }

    /// Commits output changes to the view's table (in order; a later change of a key wins).
    fn commit(
        &self,
        view: &View,
        st: &mut ViewState,
        out: Vec<OutChange>,
        (ts_ms, kafka_ts_ms, polled): (Option<i64>, Option<i64>, Option<Instant>),
    ) {
        if out.is_empty() {
            return;
        }
        let out: Vec<(String, Option<Arc<Row>>)> = last_per_key(out)
            .into_iter()
            .map(|(k, r)| (k, r.map(Arc::new)))
            .collect();
        let mut delta = Delta::new(view.table.clone());
        for (key, row) in out.iter().cloned() {
            let op = match (&row, delta.current(&key)) {
                (None, _) => Op::Delete,
                (Some(_), Some(_)) => Op::Update,
                (Some(_), None) => Op::Create,
            };
            st.off += 1;
            delta.stage(RowWrite {
                key,
                row: row.map(Into::into),
                op,
                part: 0,
                off: st.off,
                ts_ms,
                kafka_ts_ms,
                polled,
            });
        }
        self.metrics
            .view_changes
            .with_label_values(&[&view.def.name])
            .inc_by(delta.changes.len() as u64);
        // a view's deletes need no tombstones: nothing older is ever re-applied to it
        delta.slice(0).acked = st.off;
        self.tables.commit(delta, self);
        self.send_log(view, st, &out);
        let t = view.table.read();
        self.metrics
            .table_size(&view.def.name, t.rows.len(), t.seq());
    }
}

/// The last change of each key, in the order of those last changes: one commit is applied whole,
/// so a key's earlier changes in it are never seen (a batch of events over few keys stages each
/// key once instead of once per event).
fn last_per_key(out: Vec<OutChange>) -> Vec<OutChange> {
    if out.len() < 2 {
        return out;
    }
    let mut seen = std::collections::HashSet::with_capacity(out.len());
    let mut kept: Vec<OutChange> = out
        .into_iter()
        .rev()
        .filter(|(key, _)| seen.insert(key.clone()))
        .collect();
    kept.reverse();
    kept
}

impl UpdateSink for Views {
    fn publish(&self, update: TableUpdate) {
        if let Some(views) = self.by_input.get(&*update.table) {
            for view in views {
                self.feed(view, &update);
            }
        }
        self.inner.publish(update);
    }
}

#[cfg(test)]
mod tests;
