//! Snapshot frames, serialised straight from a table's rows (no copy of them): a
//! `{"type":"snapshot",...,"rows":{...}}` frame with the first rows and, when the rows exceed
//! [`SNAPSHOT_PART_BYTES`], `"more":true` and further `{"type":"patch",...,"patch":{...}}` frames
//! adding the other rows at the same position (all but the last with `"more":true`).

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Map, Value};

use super::protocol::{Outgoing, SNAPSHOT_PART_BYTES};
use super::selector::Selector;
use crate::table::position::{Position, Token};
use crate::table::state::TableState;
use crate::table::stored_row::StoredRow;

/// The newest whole-table snapshot frames of a table, shared by every client that subscribes
/// while they are current.
pub struct CachedSnapshot {
    pub epoch: Arc<str>,
    pub useq: u64,
    pub seq: u64,
    pub pos: Position,
    pub rows: usize,
    pub parts: Arc<[Utf8Bytes]>,
}

impl CachedSnapshot {
    pub fn outgoing(&self, table: &str) -> Outgoing {
        Outgoing::Snapshot {
            table: table.to_string(),
            epoch: self.epoch.to_string(),
            seq: self.seq,
            pos: Token {
                epoch: self.epoch.to_string(),
                pos: self.pos.clone(),
            }
            .to_string(),
            rows: self.rows,
            parts: self.parts.clone(),
        }
    }
}

/// A row without its NULL columns, serialised without a copy.
struct NonNull<'a>(&'a Map<String, Value>);

impl serde::Serialize for NonNull<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.0.iter().filter(|(_, v)| !v.is_null()) {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// The snapshot frames of a table (only the keys in `keys` when given: looked up, not scanned).
/// Returns the number of rows with the frames.
pub fn snapshot_parts(t: &TableState, selector: &Selector) -> (usize, Arc<[Utf8Bytes]>) {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut rows = 0;
    // a row held as JSON (loaded, restored, followed) is sent as that JSON where nothing needs
    // its columns
    let as_stored = selector.filters.is_empty() && selector.columns.is_none();
    let mut add = |k: &str, r: &StoredRow| {
        let stored = as_stored.then(|| r.json_without_nulls()).flatten();
        if stored.is_none() && !selector.filters.iter().all(|f| f.matches(k, r)) {
            return;
        }
        if current.len() >= SNAPSHOT_PART_BYTES {
            chunks.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push(b',');
        }
        // serialising strings and JSON values into a Vec cannot fail
        let _ = serde_json::to_writer(&mut current, k);
        current.push(b':');
        match stored {
            Some(json) => current.extend_from_slice(json.as_bytes()),
            None => {
                let _ = serde_json::to_writer(&mut current, &NonNull(&selector.project(r)));
            }
        }
        rows += 1;
    };
    match candidates(t, selector) {
        Some(keys) => {
            for k in keys {
                if let Some(e) = t.rows.get(k) {
                    add(k, &e.row);
                }
            }
        }
        None => {
            for (k, e) in &t.rows {
                add(k, &e.row);
            }
        }
    }
    chunks.push(current);
    let token = Token {
        epoch: t.epoch.to_string(),
        pos: t.position(),
    }
    .to_string();
    let head = format!(
        r#""table":{},"epoch":{},"seq":{},"pos":{}"#,
        serde_json::to_string(&*t.name).unwrap_or_default(),
        serde_json::to_string(&*t.epoch).unwrap_or_default(),
        t.seq(),
        serde_json::to_string(&token).unwrap_or_default(),
    );
    (rows, frames(&head, chunks))
}

/// The keys of the rows a selector may select, sorted, when they can be looked up instead of
/// scanned: its `keys`, or its indexed `where` on a column the table indexes
/// ([`crate::table::state::Table::ensure_index`]). Every filter still applies to each of them.
pub fn candidates<'a>(t: &'a TableState, selector: &'a Selector) -> Option<Vec<&'a String>> {
    if let Some(keys) = &selector.keys {
        let mut keys: Vec<&String> = keys.iter().collect();
        keys.sort();
        return Some(keys);
    }
    let (column, literals) = crate::filter::equality(selector.indexed.as_deref()?)?;
    t.rows.lookup(&column, &literals)
}

/// Wraps row chunks into a snapshot frame and continuation patch frames.
pub fn frames(head: &str, chunks: Vec<Vec<u8>>) -> Arc<[Utf8Bytes]> {
    let last = chunks.len().saturating_sub(1);
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let open = if i == 0 {
                format!(r#"{{"type":"snapshot",{head},"rows":{{"#)
            } else {
                format!(r#"{{"type":"patch",{head},"ts_ms":null,"patch":{{"#)
            };
            let tail = if i < last { r#"},"more":true}"# } else { "}}" };
            let mut text = String::with_capacity(open.len() + c.len() + tail.len());
            text.push_str(&open);
            text.push_str(&String::from_utf8_lossy(&c));
            text.push_str(tail);
            Utf8Bytes::from(text)
        })
        .collect()
}

#[cfg(test)]
mod tests;
