//! A row in memory, kept as the JSON it was stored as and parsed into columns on first use.
//!
//! A restart loads every row of the store; parsing each into a map of columns cost most of the
//! load (1M rows: ~1.5 KB of small allocations a row, 2.6-4.1 s on one core) while most rows are
//! then only sent as they are, in snapshots, or never read before their next change. A loaded row
//! keeps its JSON (checked at load to be one JSON object that parses: the check walks it as the
//! parse does, with the same limits, and allocates nothing) and is parsed the first time a column
//! is read: a filter, a diff against its next change, a view, an index. A restore and the
//! changelog follower keep a record's row the same way. A row that came from a change is held
//! parsed and has no JSON.
//!
//! Invariant: when both are present, the JSON and the parsed row are the same row; clones share
//! the parse.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::cdc::decode::Row;

/// A row, parsed on first use. Clones share the row and its parse.
#[derive(Clone)]
pub struct StoredRow(Repr);

#[derive(Clone)]
enum Repr {
    /// From a change: parsed, no JSON kept.
    Parsed(Arc<Row>),
    /// From the store or a changelog record: its JSON, parsed on first use.
    Json(Arc<JsonRow>),
}

struct JsonRow {
    json: Box<str>,
    parsed: OnceLock<Arc<Row>>,
}

/// Why stored bytes are not a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotARow {
    #[error("row is not utf-8")]
    Utf8,
    #[error("row is not one json object")]
    Json,
}

impl StoredRow {
    /// A row from its JSON, checked to be one JSON object that parses into a row (nothing is
    /// allocated for its columns).
    pub fn from_json(json: &[u8]) -> Result<StoredRow, NotARow> {
        let text = std::str::from_utf8(json).map_err(|_| NotARow::Utf8)?;
        serde_json::from_str::<AnObject>(text).map_err(|_| NotARow::Json)?;
        Ok(StoredRow(Repr::Json(Arc::new(JsonRow {
            json: Box::from(text),
            parsed: OnceLock::new(),
        }))))
    }

    /// The row's columns, parsed now if they were not yet.
    pub fn shared(&self) -> &Arc<Row> {
        match &self.0 {
            Repr::Parsed(row) => row,
            Repr::Json(j) => j
                .parsed
                .get_or_init(|| match serde_json::from_str::<Row>(&j.json) {
                    Ok(row) => Arc::new(row),
                    Err(e) => {
                        // unreachable: `from_json` accepts exactly what parses (tests hold it so)
                        tracing::error!(error = %e, "a stored row no longer parses; served empty");
                        Arc::new(Row::new())
                    }
                }),
        }
    }

    /// The JSON the row was loaded or received as, if it was.
    pub fn json(&self) -> Option<&str> {
        match &self.0 {
            Repr::Parsed(_) => None,
            Repr::Json(j) => Some(&j.json),
        }
    }

    /// The columns, if they were parsed (nothing is parsed here).
    pub fn parsed(&self) -> Option<&Row> {
        match &self.0 {
            Repr::Parsed(row) => Some(row),
            Repr::Json(j) => j.parsed.get().map(|r| &**r),
        }
    }

    /// Whether both are the same row (one shared value), not only equal rows.
    pub fn same_as(&self, other: &StoredRow) -> bool {
        match (&self.0, &other.0) {
            (Repr::Parsed(a), Repr::Parsed(b)) => Arc::ptr_eq(a, b),
            (Repr::Json(a), Repr::Json(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Whether the columns were parsed (a row from a change always is).
    pub fn is_parsed(&self) -> bool {
        self.parsed().is_some()
    }

    /// The row's JSON when it has one and no column of it is NULL: what a client is sent for
    /// the row, as it is (a snapshot leaves NULL columns out). `None`: serialise the columns.
    pub fn json_without_nulls(&self) -> Option<&str> {
        self.json().filter(|j| !j.contains("null"))
    }

    /// The row's JSON as the store keeps it.
    pub fn encode(&self) -> Vec<u8> {
        match self.json() {
            Some(j) => j.as_bytes().to_vec(),
            None => crate::table::store::encode_row(self.shared()),
        }
    }
}

impl From<Arc<Row>> for StoredRow {
    fn from(row: Arc<Row>) -> StoredRow {
        StoredRow(Repr::Parsed(row))
    }
}

impl Deref for StoredRow {
    type Target = Row;

    fn deref(&self) -> &Row {
        self.shared()
    }
}

impl PartialEq for StoredRow {
    fn eq(&self, other: &StoredRow) -> bool {
        match (&self.0, &other.0) {
            (Repr::Parsed(a), Repr::Parsed(b)) if Arc::ptr_eq(a, b) => true,
            (Repr::Json(a), Repr::Json(b)) if Arc::ptr_eq(a, b) || a.json == b.json => true,
            _ => **self.shared() == **other.shared(),
        }
    }
}

impl fmt::Debug for StoredRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.parsed(), self.json()) {
            (Some(row), _) => row.fmt(f),
            (None, Some(json)) => write!(f, "StoredRow({json})"),
            (None, None) => f.write_str("StoredRow({})"),
        }
    }
}

/// Accepts one JSON object that parses into a [`Row`], allocating nothing: every value is walked
/// as [`serde_json::Value`]'s parse walks it (`deserialize_any`: numbers parsed, so one out of
/// f64's range is refused; escapes decoded, so a lone surrogate is; the same nesting limit), only
/// nothing is kept. `IgnoredAny` would skip values by their shape alone and accept all three.
struct AnObject;

impl<'de> Deserialize<'de> for AnObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AnObject, D::Error> {
        d.deserialize_map(AnyValue).map(|_| AnObject)
    }
}

/// Any JSON value, checked and dropped.
struct AnyValue;

impl<'de> Deserialize<'de> for AnyValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AnyValue, D::Error> {
        d.deserialize_any(AnyValue)
    }
}

impl<'de> Visitor<'de> for AnyValue {
    type Value = AnyValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }

    fn visit_i64<E>(self, _: i64) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }

    fn visit_u64<E>(self, _: u64) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }

    fn visit_f64<E>(self, _: f64) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }

    fn visit_str<E>(self, _: &str) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }

    fn visit_unit<E>(self) -> Result<AnyValue, E> {
        Ok(AnyValue)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyValue, A::Error> {
        while seq.next_element::<AnyValue>()?.is_some() {}
        Ok(AnyValue)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyValue, A::Error> {
        while map.next_entry::<AnyValue, AnyValue>()?.is_some() {}
        Ok(AnyValue)
    }
}

#[cfg(test)]
mod tests;
