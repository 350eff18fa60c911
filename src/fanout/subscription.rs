//! One client's subscription to one table: which rows it wants, where it is (`useq` for this node's
//! update order, `seq` and `pos` for the client), and what is pending for it. While the client is
//! slow, changes compose into one pending patch (memory bounded by the rows it subscribes to).

use std::sync::Arc;

use serde_json::{Map, Value};

use super::hub::HubUpdate;
use super::protocol::{Format, Outgoing};
use super::selector::Selector;
use crate::cdc::decode::Row;
use crate::patch::row_diff;
use crate::table::position::{Position, Token};
use crate::table::state::{without_nulls, AppliedChange};

/// What a client has of a key, and what it should have once the pending output is sent.
#[derive(Debug)]
struct PendingRow {
    has: Option<Arc<Row>>,
    want: Option<Arc<Row>>,
}

#[derive(Debug, Default)]
struct Pending {
    /// format=patch: per key, the row the client holds and the row it should hold; the patch is
    /// their diff, so any sequence of changes (a delete and a re-create included) arrives exact.
    rows: std::collections::HashMap<String, PendingRow>,
    /// format=rows: the newest full row per key.
    messages: Map<String, Value>,
    ts_ms: Option<i64>,
    kafka_ts_ms: Option<i64>,
    polled: Option<std::time::Instant>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.messages.is_empty()
    }
}

/// An already serialised patch frame shared by many clients, with its times for the metrics.
#[derive(Debug, Clone)]
pub struct SharedFrame {
    pub text: axum::extract::ws::Utf8Bytes,
    /// The resume token after this frame.
    pub pos: Arc<str>,
    pub ts_ms: Option<i64>,
    pub kafka_ts_ms: Option<i64>,
    pub polled: Option<std::time::Instant>,
}

/// One client's subscription to one table.
#[derive(Debug)]
pub struct Subscription {
    pub table: String,
    pub selector: Selector,
    pub epoch: Arc<str>,
    /// Every update of this node up to this one has been absorbed.
    pub useq: u64,
    /// The table's change count and position as of what was absorbed.
    pub seq: u64,
    pub pos: Position,
    pub format: Format,
    /// What waits to be sent; `None` when nothing does (most of an idle connection's life: the
    /// maps and times are ~170 bytes per subscription).
    pending: Option<Box<Pending>>,
    /// `livetable_subscriptions{table}`: +1 while this subscription lives.
    gauge: prometheus::IntGauge,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// What absorbing an update found.
#[derive(Debug, PartialEq, Eq)]
pub enum Absorbed {
    Ok,
    /// The table's lineage changed under the subscription: re-snapshot.
    EpochChanged,
}

impl Subscription {
    /// Starts from a state of the table: its lineage, the node's update count, the table's change
    /// count and its position, as of the snapshot (or buffered changes) the client gets.
    pub fn start_at(&mut self, epoch: Arc<str>, useq: u64, seq: u64, pos: Position) {
        self.epoch = epoch;
        self.useq = useq;
        self.seq = seq;
        self.pos = pos;
    }

    pub fn new(
        table: &str,
        selector: Selector,
        format: Format,
        gauge: prometheus::IntGauge,
    ) -> Self {
        gauge.inc();
        Subscription {
            table: table.to_string(),
            selector,
            epoch: "".into(),
            useq: 0,
            seq: 0,
            pos: Position::default(),
            format,
            pending: None,
            gauge,
        }
    }

    pub fn token(&self) -> String {
        Token {
            epoch: self.epoch.to_string(),
            pos: self.pos.clone(),
        }
        .to_string()
    }

    /// For an up-to-date patch subscription of whole rows: the update's shared frame, so nothing
    /// is composed or serialised per client. `None`: use [`Subscription::absorb`].
    ///
    /// A subscription with row filters (a token's key globs or row claims, a `where`) takes it
    /// too when its filters accept every changed row before and after the change: then the
    /// client's patch is exactly the whole-table one.
    pub fn forward(&mut self, u: &HubUpdate) -> Option<SharedFrame> {
        if self.format != Format::Patch
            || self.selector.keys.is_some()
            || self.selector.columns.is_some()
            || self.has_pending()
            || u.update.epoch != self.epoch
            || u.update.useq != self.useq + 1
        {
            return None;
        }
        let frame = u.frame.as_ref()?;
        if !self.selector.filters.is_empty() {
            let sel = &self.selector;
            let accepted = |key: &str, row: Option<&crate::cdc::decode::Row>| {
                row.is_none_or(|r| sel.wants(key, Some(r)))
            };
            if !u.update.changes.iter().all(|c| {
                accepted(&c.key, c.before.as_deref()) && accepted(&c.key, c.row.as_deref())
            }) {
                return None;
            }
        }
        self.useq = u.update.useq;
        self.seq = u.update.seq;
        self.pos = u.update.pos.clone();
        Some(SharedFrame {
            text: frame.clone(),
            pos: u.token.clone(),
            ts_ms: u.update.changes.iter().rev().find_map(|c| c.ts_ms),
            kafka_ts_ms: u.update.changes.iter().rev().find_map(|c| c.kafka_ts_ms),
            polled: u.update.changes.iter().rev().find_map(|c| c.polled),
        })
    }

    /// Composes the changes of `u` newer than the subscription into its pending output.
    ///
    /// The lineage is compared first: a table of a new lineage counts its updates (`useq`) from
    /// 0 again, and a routed subscription may be sent no other update of it for a long time.
    pub fn absorb(&mut self, u: &HubUpdate) -> Absorbed {
        if u.update.epoch != self.epoch {
            return Absorbed::EpochChanged;
        }
        if u.update.useq <= self.useq {
            return Absorbed::Ok;
        }
        self.useq = u.update.useq;
        self.seq = u.update.seq;
        self.pos = u.update.pos.clone();
        for c in &u.update.changes {
            self.absorb_change(c);
        }
        Absorbed::Ok
    }

    /// Composes one change (a resume replays buffered changes this way): an update of a selected
    /// row as its patch, a row that starts being selected whole, one that stops as a delete.
    pub fn absorb_change(&mut self, c: &AppliedChange) {
        if !self.selector.wants_key(&c.key) {
            return;
        }
        let (was, is) = if self.selector.filters.is_empty() {
            (c.before.is_some(), c.row.is_some())
        } else {
            (
                self.selector.wants(&c.key, c.before.as_deref()),
                self.selector.wants(&c.key, c.row.as_deref()),
            )
        };
        if !was && !is {
            return;
        }
        let sel = &self.selector;
        match self.format {
            Format::Patch => {
                let want = if is {
                    c.row.as_ref().map(|r| sel.project_arc(r.shared()))
                } else {
                    None
                };
                let pending = self.pending.get_or_insert_with(Box::default);
                match pending.rows.get_mut(&c.key) {
                    Some(p) => p.want = want,
                    None => {
                        let has = if was {
                            c.before.as_ref().map(|r| sel.project_arc(r.shared()))
                        } else {
                            None
                        };
                        pending.rows.insert(c.key.clone(), PendingRow { has, want });
                    }
                }
            }
            Format::Rows => {
                if was
                    && is
                    && sel.columns.as_ref().is_some_and(
                        |p| matches!((&c.before, &c.row), (Some(b), Some(r)) if !p.changed(b, r)),
                    )
                {
                    // only columns this client does not get changed
                    return;
                }
                let before = c.before.as_ref().map(|b| sel.project(b));
                let v = match &c.row {
                    Some(r) if is => Value::Object(sel.project(r).into_owned()),
                    _ => deleted_row(&c.key, before.as_deref()),
                };
                self.pending
                    .get_or_insert_with(Box::default)
                    .messages
                    .insert(c.key.clone(), v);
            }
        }
        if let Some(p) = self.pending.as_mut() {
            p.ts_ms = c.ts_ms.or(p.ts_ms);
            p.kafka_ts_ms = c.kafka_ts_ms.or(p.kafka_ts_ms);
            p.polled = c.polled.or(p.polled);
        }
    }

    /// Whether output is waiting.
    pub fn has_pending(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| !p.is_empty())
    }

    /// Takes the pending output: one patch (what the client holds -> what it should hold), or
    /// one message per changed row.
    pub fn take(&mut self) -> Vec<Outgoing> {
        let Some(p) = self.pending.take() else {
            return Vec::new();
        };
        if p.is_empty() {
            return Vec::new();
        }
        let p = *p;
        match self.format {
            Format::Patch => {
                let mut patch = Map::new();
                for (key, r) in p.rows {
                    match (&r.has, &r.want) {
                        (None, None) => {}
                        (has, want) => {
                            let d = row_diff(has.as_deref(), want.as_deref());
                            if !(d.is_object() && d.as_object().is_some_and(Map::is_empty)) {
                                patch.insert(key, d);
                            }
                        }
                    }
                }
                if patch.is_empty() {
                    return Vec::new();
                }
                vec![Outgoing::Patch {
                    table: self.table.clone(),
                    epoch: self.epoch.to_string(),
                    seq: self.seq,
                    pos: self.token(),
                    ts_ms: p.ts_ms,
                    kafka_ts_ms: p.kafka_ts_ms,
                    polled: p.polled,
                    patch,
                }]
            }
            Format::Rows => p.messages.into_values().map(Outgoing::Row).collect(),
        }
    }

    /// An empty patch at the subscription's position (confirms a resume that missed nothing).
    pub fn confirmation(&self) -> Outgoing {
        Outgoing::Patch {
            table: self.table.clone(),
            epoch: self.epoch.to_string(),
            seq: self.seq,
            pos: self.token(),
            ts_ms: None,
            kafka_ts_ms: None,
            polled: None,
            patch: Map::new(),
        }
    }

    /// Number of composed rows waiting (for the conflation metric).
    pub fn pending_rows(&self) -> usize {
        self.pending
            .as_ref()
            .map_or(0, |p| p.rows.len() + p.messages.len())
    }
}

/// A deleted row in `format=rows`: its last known columns plus `"__deleted": true`.
pub fn deleted_row(key: &str, before: Option<&Map<String, Value>>) -> Value {
    let mut row = before.cloned().unwrap_or_default();
    if row.is_empty() {
        row.insert("__key".into(), Value::String(key.to_string()));
    }
    row.insert("__deleted".into(), Value::Bool(true));
    Value::Object(row)
}

/// A snapshot's row in `format=rows` as `selector` sees it (NULL columns kept), as its JSON
/// text: a row held as JSON goes out as stored when nothing needs its columns.
pub fn row_text(row: &crate::table::stored_row::StoredRow, selector: &Selector) -> Outgoing {
    let text = match row.json().filter(|_| !selector.reads_rows()) {
        Some(json) => json.to_string(),
        // serialising a map of JSON values cannot fail
        None => serde_json::to_string(selector.project(row).as_ref()).unwrap_or_default(),
    };
    Outgoing::RowText(text.into())
}

/// The row as a patch client sees it.
pub fn patch_row(row: &crate::cdc::decode::Row) -> Value {
    Value::Object(without_nulls(row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::decode::{Op, Row};
    use crate::fanout::selector::RowFilter;
    use crate::table::stored_row::StoredRow;
    use serde_json::json;

    #[derive(Debug)]
    struct Above(i64);
    impl RowFilter for Above {
        fn matches(&self, _key: &str, row: &Row) -> bool {
            row.get("n")
                .and_then(Value::as_i64)
                .is_some_and(|n| n > self.0)
        }
    }

    fn change(key: &str, before: Option<Value>, after: Option<Value>) -> AppliedChange {
        let row = |v: Value| StoredRow::from(Arc::new(v.as_object().unwrap().clone()));
        AppliedChange {
            key: key.into(),
            op: Op::Update,
            row: after.map(row),
            before: before.map(row),
            part: 0,
            off: 0,
            ts_ms: None,
            kafka_ts_ms: None,
            polled: None,
        }
    }

    fn sub(format: Format) -> Subscription {
        let selector = Selector {
            keys: None,
            filters: vec![Arc::new(Above(5))],
            ..Selector::default()
        };
        let gauge = prometheus::IntGauge::new("t", "t").unwrap();
        Subscription::new("t", selector, format, gauge)
    }

    fn patch_of(s: &mut Subscription) -> Value {
        match s.take().pop() {
            Some(Outgoing::Patch { patch, .. }) => Value::Object(patch),
            None => Value::Null,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rows_move_in_whole_and_move_out_as_deletes() {
        let mut s = sub(Format::Patch);
        s.absorb_change(&change("a", None, Some(json!({"n": 3, "x": 1}))));
        assert!(!s.has_pending(), "never selected: nothing");
        s.absorb_change(&change(
            "a",
            Some(json!({"n": 3, "x": 1})),
            Some(json!({"n": 7, "x": 1})),
        ));
        assert_eq!(
            patch_of(&mut s),
            json!({"a": {"n": 7, "x": 1}}),
            "moved in: whole"
        );
        s.absorb_change(&change(
            "a",
            Some(json!({"n": 7, "x": 1})),
            Some(json!({"n": 8, "x": 1})),
        ));
        assert_eq!(
            patch_of(&mut s),
            json!({"a": {"n": 8}}),
            "selected both times: the diff"
        );
        s.absorb_change(&change(
            "a",
            Some(json!({"n": 8, "x": 1})),
            Some(json!({"n": 2, "x": 1})),
        ));
        assert_eq!(patch_of(&mut s), json!({"a": null}), "moved out: a delete");
        s.absorb_change(&change("a", Some(json!({"n": 2, "x": 1})), None));
        assert!(!s.has_pending(), "deleted while not selected: nothing");
        // composed: a client holding b sees it move out, then in again with another shape: the
        // patch takes it from what it holds to what it should hold (y removed)
        s.absorb_change(&change("b", None, Some(json!({"n": 9, "y": 1}))));
        assert_eq!(patch_of(&mut s), json!({"b": {"n": 9, "y": 1}}));
        s.absorb_change(&change(
            "b",
            Some(json!({"n": 9, "y": 1})),
            Some(json!({"n": 1, "y": 1})),
        ));
        s.absorb_change(&change(
            "b",
            Some(json!({"n": 1, "y": 1})),
            Some(json!({"n": 6})),
        ));
        assert_eq!(patch_of(&mut s), json!({"b": {"n": 6, "y": null}}));
        // deleted and created again: exact too
        let mut s = Subscription::new(
            "t",
            Selector::default(),
            Format::Patch,
            prometheus::IntGauge::new("u", "u").unwrap(),
        );
        s.absorb_change(&change("c", Some(json!({"a": 1, "b": 2})), None));
        s.absorb_change(&change("c", None, Some(json!({"a": 3}))));
        assert_eq!(patch_of(&mut s), json!({"c": {"a": 3, "b": null}}));
    }

    fn hub_update(useq: u64, changes: Vec<AppliedChange>) -> HubUpdate {
        let update = crate::table::state::TableUpdate {
            table: "t".into(),
            epoch: "".into(),
            useq,
            seq: useq,
            pos: Position::default(),
            changes,
        };
        let token: Arc<str> = update.token().to_string().into();
        let frame = Some(crate::fanout::hub::whole_table_frame(&update, &token).into());
        HubUpdate::new(update, frame, token)
    }

    #[test]
    fn a_filtered_subscription_takes_the_shared_frame_only_when_its_filter_accepts_every_row() {
        let mut s = sub(Format::Patch);
        // n 6 -> 7, selected before and after: the whole-table frame is this client's patch
        let u = hub_update(
            1,
            vec![change("a", Some(json!({"n": 6})), Some(json!({"n": 7})))],
        );
        let shared = s.forward(&u).expect("every row accepted: the shared frame");
        let v: Value = serde_json::from_str(shared.text.as_str()).unwrap();
        assert_eq!(v["patch"], json!({"a": {"n": 7}}));
        // n 7 -> 2 moves out: not the shared frame (it would send n: 2), a delete
        let u = hub_update(
            2,
            vec![change("a", Some(json!({"n": 7})), Some(json!({"n": 2})))],
        );
        assert!(s.forward(&u).is_none());
        s.absorb(&u);
        assert_eq!(patch_of(&mut s), json!({"a": null}));
        // one accepted row and one never selected in the same update: not shared either
        let u = hub_update(
            3,
            vec![
                change("b", Some(json!({"n": 8})), Some(json!({"n": 9}))),
                change("c", None, Some(json!({"n": 1}))),
            ],
        );
        assert!(s.forward(&u).is_none());
        s.absorb(&u);
        assert_eq!(patch_of(&mut s), json!({"b": {"n": 9}}));
        // a key list or a projection never takes it
        let mut k = sub(Format::Patch);
        k.selector.keys = Some(["a".to_string()].into());
        let u = hub_update(
            1,
            vec![change("a", Some(json!({"n": 6})), Some(json!({"n": 7})))],
        );
        assert!(k.forward(&u).is_none());
    }

    #[test]
    fn a_new_lineage_is_seen_even_when_its_update_count_starts_again() {
        let mut s = sub(Format::Patch);
        s.epoch = "old".into();
        s.useq = 500;
        let mut u = hub_update(1, vec![change("a", None, Some(json!({"n": 9})))]);
        u.update.epoch = "new".into();
        assert_eq!(s.absorb(&u), Absorbed::EpochChanged);
        // the same lineage, an update already absorbed: nothing
        let mut old = hub_update(7, vec![]);
        old.update.epoch = "old".into();
        assert_eq!(s.absorb(&old), Absorbed::Ok);
        assert_eq!(s.useq, 500);
    }

    #[test]
    fn rows_format_sends_a_deleted_row_on_move_out() {
        let mut s = sub(Format::Rows);
        s.absorb_change(&change("a", Some(json!({"n": 8})), Some(json!({"n": 2}))));
        match s.take().pop() {
            Some(Outgoing::Row(v)) => assert_eq!(v, json!({"n": 8, "__deleted": true})),
            other => panic!("{other:?}"),
        }
    }
}
