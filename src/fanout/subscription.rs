//! One client's subscription to one table: which rows it wants, where it is (`useq` for this node's
//! update order, `seq` and `pos` for the client), and what is pending for it. While the client is
//! slow, changes compose into one pending patch (memory bounded by the rows it subscribes to).

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::hub::HubUpdate;
use super::protocol::{Format, Outgoing};
use crate::patch::compose_row;
use crate::table::position::{Position, Token};
use crate::table::state::{without_nulls, AppliedChange};

#[derive(Debug, Default)]
struct Pending {
    /// Composed patch per key (format=patch) or newest full row per key (format=rows).
    rows: Map<String, Value>,
    ts_ms: Option<i64>,
    kafka_ts_ms: Option<i64>,
}

/// An already serialised patch frame shared by many clients, with its times for the metrics.
#[derive(Debug, Clone)]
pub struct SharedFrame {
    pub text: axum::extract::ws::Utf8Bytes,
    /// The resume token after this frame.
    pub pos: Arc<str>,
    pub ts_ms: Option<i64>,
    pub kafka_ts_ms: Option<i64>,
}

/// One client's subscription to one table.
#[derive(Debug)]
pub struct Subscription {
    pub table: String,
    pub keys: Option<HashSet<String>>,
    pub epoch: Arc<str>,
    /// Every update of this node up to this one has been absorbed.
    pub useq: u64,
    /// The table's change count and position as of what was absorbed.
    pub seq: u64,
    pub pos: Position,
    pub format: Format,
    pending: Pending,
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
    pub fn new(
        table: &str,
        keys: Option<HashSet<String>>,
        format: Format,
        gauge: prometheus::IntGauge,
    ) -> Self {
        gauge.inc();
        Subscription {
            table: table.to_string(),
            keys,
            epoch: "".into(),
            useq: 0,
            seq: 0,
            pos: Position::default(),
            format,
            pending: Pending::default(),
            gauge,
        }
    }

    pub fn wants(&self, key: &str) -> bool {
        self.keys.as_ref().is_none_or(|k| k.contains(key))
    }

    pub fn token(&self) -> String {
        Token {
            epoch: self.epoch.to_string(),
            pos: self.pos.clone(),
        }
        .to_string()
    }

    /// For an up-to-date whole-table patch subscription: the update's shared frame, so nothing
    /// is composed or serialised per client. `None`: use [`Subscription::absorb`].
    pub fn forward(&mut self, u: &HubUpdate) -> Option<SharedFrame> {
        if self.format != Format::Patch
            || self.keys.is_some()
            || self.has_pending()
            || u.update.epoch != self.epoch
            || u.update.useq != self.useq + 1
        {
            return None;
        }
        let frame = u.frame.as_ref()?;
        self.useq = u.update.useq;
        self.seq = u.update.seq;
        self.pos = u.update.pos.clone();
        Some(SharedFrame {
            text: frame.clone(),
            pos: u.token.clone(),
            ts_ms: u.update.changes.iter().rev().find_map(|c| c.ts_ms),
            kafka_ts_ms: u.update.changes.iter().rev().find_map(|c| c.kafka_ts_ms),
        })
    }

    /// Composes the changes of `u` newer than the subscription into its pending output.
    pub fn absorb(&mut self, u: &HubUpdate) -> Absorbed {
        if u.update.useq <= self.useq {
            return Absorbed::Ok;
        }
        if u.update.epoch != self.epoch {
            return Absorbed::EpochChanged;
        }
        self.useq = u.update.useq;
        self.seq = u.update.seq;
        self.pos = u.update.pos.clone();
        for c in &u.update.changes {
            self.absorb_change(c);
        }
        Absorbed::Ok
    }

    /// Composes one change (a resume replays buffered changes this way).
    pub fn absorb_change(&mut self, c: &AppliedChange) {
        if !self.wants(&c.key) {
            return;
        }
        match self.format {
            Format::Patch => compose_row(&mut self.pending.rows, &c.key, c.patch()),
            Format::Rows => {
                let v = match (&c.row, &c.before) {
                    (Some(r), _) => Value::Object((**r).clone()),
                    (None, before) => deleted_row(&c.key, before.as_deref()),
                };
                self.pending.rows.insert(c.key.clone(), v);
            }
        }
        self.pending.ts_ms = c.ts_ms.or(self.pending.ts_ms);
        self.pending.kafka_ts_ms = c.kafka_ts_ms.or(self.pending.kafka_ts_ms);
    }

    /// Whether output is waiting.
    pub fn has_pending(&self) -> bool {
        !self.pending.rows.is_empty()
    }

    /// Takes the pending output: one composed patch, or one message per changed row.
    pub fn take(&mut self) -> Vec<Outgoing> {
        if self.pending.rows.is_empty() {
            return Vec::new();
        }
        let p = std::mem::take(&mut self.pending);
        match self.format {
            Format::Patch => vec![Outgoing::Patch {
                table: self.table.clone(),
                epoch: self.epoch.to_string(),
                seq: self.seq,
                pos: self.token(),
                ts_ms: p.ts_ms,
                kafka_ts_ms: p.kafka_ts_ms,
                patch: p.rows,
            }],
            Format::Rows => p.rows.into_values().map(Outgoing::Row).collect(),
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
            patch: Map::new(),
        }
    }

    /// Number of composed rows waiting (for the conflation metric).
    pub fn pending_rows(&self) -> usize {
        self.pending.rows.len()
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

/// A row in `format=rows` as first sent (NULL columns kept).
pub fn row_message(row: &crate::cdc::decode::Row) -> Outgoing {
    Outgoing::Row(Value::Object(row.clone()))
}

/// The row as a patch client sees it.
pub fn patch_row(row: &crate::cdc::decode::Row) -> Value {
    Value::Object(without_nulls(row))
}
