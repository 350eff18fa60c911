//! Snapshot frames, serialised from a copy of the rows they hold (keys and shared rows, taken
//! under the table's read lock; see [`SnapshotCopy`]), not from copies of the rows' columns: a
//! `{"type":"snapshot",...,"rows":{...}}` frame with the first rows and, when the rows exceed
//! [`SNAPSHOT_PART_BYTES`], `"more":true` and further `{"type":"patch",...,"patch":{...}}` frames
//! adding the other rows at the same position (all but the last with `"more":true`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Map, Value};

use super::protocol::{Outgoing, SNAPSHOT_PART_BYTES};
use super::selector::Selector;
use crate::table::position::{Position, Token};
use crate::table::state::{Table, TableState};
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

/// The rows a snapshot may select (their keys and the rows, shared) with the state they are
/// the rows of, copied under the table's read lock by [`SnapshotCopy::take`] and serialised by
/// [`SnapshotCopy::parts`] holding no lock: the table's ingest, whose commits wait for that
/// lock, waits for the copy, not for the serialisation (nor, when the rows are looked up, for
/// the filters and the parses they need).
///
/// A copy holds about as many rows as the snapshot sends (a whole table's, the keys looked up,
/// or the rows a filter that cannot be looked up accepts), so its memory follows the frames',
/// not the table's, for each client. A filter that cannot be looked up runs after the copy,
/// outside the lock ([`copy_of`]): under it, the copy only takes the rows its key filters let
/// through (shared, not parsed), so a costly `where` (a long `IN` list on every row of a large
/// table) never holds up the table's ingest; until it has run, the copy holds those rows.
pub struct SnapshotCopy {
    pub name: Arc<str>,
    pub epoch: Arc<str>,
    pub useq: u64,
    pub seq: u64,
    pub pos: Position,
    /// Whether the node holds every slice of the table.
    pub complete: bool,
    rows: Vec<(String, StoredRow)>,
    /// The selector's filters were applied while copying.
    filtered: bool,
}

impl SnapshotCopy {
    /// The rows of `t` `selector` may select, sorted by key: only the keys in its `keys` when
    /// given, or those of its indexed `where` (looked up, not scanned; its filters then apply in
    /// [`SnapshotCopy::parts`]), else the rows its key filters accept (its other filters apply
    /// when the rows are read, or in [`SnapshotCopy::apply_filters`]; see [`copy_of`]).
    pub fn take(t: &TableState, selector: &Selector) -> SnapshotCopy {
        match Self::copy(t, selector, true) {
            Ok(copy) => copy,
            // a copy that may parse is always taken
            Err(NeedsParse) => Self::empty(t),
        }
    }

    /// [`SnapshotCopy::take`], but gives up when a filter that reads rows meets a row not
    /// parsed yet (parse them with [`crate::table::state::Table::parse_rows`], outside the lock).
    pub fn try_take(t: &TableState, selector: &Selector) -> Result<SnapshotCopy, NeedsParse> {
        Self::copy(t, selector, false)
    }

    fn copy(t: &TableState, selector: &Selector, parse: bool) -> Result<SnapshotCopy, NeedsParse> {
        let (rows, filtered) = match candidates(t, selector) {
            Some(keys) => (
                keys.into_iter()
                    .filter_map(|k| t.rows.get(k).map(|e| (k.clone(), e.row.clone())))
                    .collect(),
                false,
            ),
            // no `keys` (they are looked up): the rows the filters accept; without filters,
            // every row, in a vector of the table's size (`filter` gives `collect` no size)
            None if selector.filters.is_empty() => {
                let mut rows = Vec::with_capacity(t.rows.len());
                rows.extend(t.rows.iter().map(|(k, e)| (k.clone(), e.row.clone())));
                (rows, true)
            }
            // the rows the key filters let through; the filters that read rows run on them
            // once the lock is let go
            None => {
                let reads = selector.filters_read_rows();
                let mut rows = Vec::new();
                for (k, e) in t.rows.iter() {
                    if !selector.accepts_key(k) {
                        continue;
                    }
                    if reads && !parse && !e.row.is_parsed() {
                        return Err(NeedsParse);
                    }
                    rows.push((k.clone(), e.row.clone()));
                }
                (rows, false)
            }
        };
        Ok(SnapshotCopy {
            rows,
            filtered,
            ..Self::empty(t)
        })
    }

    /// A copy of no rows at `t`'s state.
    fn empty(t: &TableState) -> SnapshotCopy {
        SnapshotCopy {
            name: t.name.clone(),
            epoch: t.epoch.clone(),
            useq: t.useq,
            seq: t.seq(),
            pos: t.position(),
            complete: t.complete(),
            rows: Vec::new(),
            filtered: true,
        }
    }

    /// Keeps only the copied rows `selector` selects (its filters run here, holding no lock; a
    /// row held as JSON is parsed for them, its parse shared with the table's row).
    pub fn apply_filters(&mut self, selector: &Selector) {
        if !self.filtered {
            self.rows.retain(|(k, r)| selector.accepts(k, r));
            self.rows.shrink_to_fit();
            self.filtered = true;
        }
    }

    /// The resume token of the state the rows were copied from.
    pub fn token(&self) -> String {
        Token {
            epoch: self.epoch.to_string(),
            pos: self.pos.clone(),
        }
        .to_string()
    }

    /// The copied rows `selector` selects, sorted by key (its filters applied here unless they
    /// were while copying; none parses a row when it has no filter).
    pub fn selected<'a>(
        &'a self,
        selector: &'a Selector,
    ) -> impl Iterator<Item = (&'a str, &'a StoredRow)> + 'a {
        self.selected_from(selector, 0).map(|(_, k, r)| (k, r))
    }

    /// [`SnapshotCopy::selected`] from the `start`th copied row on, each with its place among
    /// the copied rows (a body built in pieces goes on from the place after the last row sent).
    pub fn selected_from<'a>(
        &'a self,
        selector: &'a Selector,
        start: usize,
    ) -> impl Iterator<Item = (usize, &'a str, &'a StoredRow)> + 'a {
        self.rows
            .iter()
            .enumerate()
            .skip(start)
            .filter(move |(_, (k, r))| self.filtered || selector.accepts(k, r))
            .map(|(i, (k, r))| (i, k.as_str(), r))
    }

    /// The snapshot frames (what `selector` selects of the copied rows, projected), and the
    /// number of rows in them.
    pub fn parts(&self, selector: &Selector) -> (usize, Arc<[Utf8Bytes]>) {
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        let mut current: Vec<u8> = Vec::new();
        let mut rows = 0;
        // a row held as JSON (loaded, restored, followed) is sent as that JSON where nothing
        // needs its columns
        let as_stored = !selector.reads_rows();
        for (k, r) in self.selected(selector) {
            let stored = as_stored.then(|| r.json_without_nulls()).flatten();
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
        }
        chunks.push(current);
        let token = self.token();
        let head = format!(
            r#""table":{},"epoch":{},"seq":{},"pos":{}"#,
            serde_json::to_string(&*self.name).unwrap_or_default(),
            serde_json::to_string(&*self.epoch).unwrap_or_default(),
            self.seq,
            serde_json::to_string(&token).unwrap_or_default(),
        );
        (rows, frames(&head, chunks))
    }
}

/// A filter that reads rows met a row held as JSON and not parsed yet while copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedsParse;

/// Tries to take a copy before the rows are parsed once more.
const PARSE_TRIES: usize = 2;

/// The snapshot copy of `t` for `selector` (see [`SnapshotCopy::take`]), with no row parsed
/// under the table's read lock where it can: a copy that meets a row not parsed yet gives up, the
/// rows are parsed outside the lock (one pass at a time per table, [`Table::parse_rows`]) and the
/// copy is taken again. Rows held as JSON that keep arriving (a follower) may beat that twice:
/// the last try copies them unparsed. The filters then run on the copy, holding no lock. Also
/// returns how long it held the read lock (in all: the tries and the parse's copy are separate
/// holds).
pub fn copy_of(t: &Table, selector: &Selector) -> (SnapshotCopy, Duration) {
    let (mut copy, locked) = copy_under_lock(t, selector);
    copy.apply_filters(selector);
    (copy, locked)
}

fn copy_under_lock(t: &Table, selector: &Selector) -> (SnapshotCopy, Duration) {
    let mut locked = Duration::ZERO;
    for _ in 0..PARSE_TRIES {
        let tried = {
            let state = t.read();
            let started = Instant::now();
            let tried = SnapshotCopy::try_take(&state, selector);
            locked += started.elapsed();
            tried
        };
        match tried {
            Ok(copy) => return (copy, locked),
            // only the rows the key filters let through are read
            Err(NeedsParse) => locked += t.parse_rows(|k| selector.accepts_key(k)),
        }
    }
    let state = t.read();
    let started = Instant::now();
    let copy = SnapshotCopy::take(&state, selector);
    (copy, locked + started.elapsed())
}

/// The snapshot frames of a table, built under whatever lock the caller holds (tests; the hub
/// copies first, see [`SnapshotCopy`]). Returns the number of rows with the frames.
#[cfg(test)]
pub fn snapshot_parts(t: &TableState, selector: &Selector) -> (usize, Arc<[Utf8Bytes]>) {
    SnapshotCopy::take(t, selector).parts(selector)
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
pub(crate) mod tests;
