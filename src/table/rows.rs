//! A table's rows by key, with equality indexes on the columns that filtered subscriptions look
//! rows up by. A subscription `where=league = 'EPL'` on a 100k-row table finds its snapshot rows
//! through the `league` index instead of evaluating its filter on every row: 10,000 such clients
//! connecting cost about the rows they get, not 10,000 table scans.
//!
//! An index is built on first use, from a copy of the rows outside the table's locks
//! ([`Rows::copy_rows`], [`build_index`]), and installed by [`Rows::install_index`] under the
//! write lock (see `table::state::index`); then every write, which all go through [`Rows`], keeps
//! it up to date. It only narrows: each candidate's whole filter is still evaluated.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Deref;

use super::state::Entry;
use super::stored_row::StoredRow;
use crate::filter::{value_keys, IndexKey};

/// Columns indexed per table at most; a filter on a further column scans.
pub const MAX_INDEXED_COLUMNS: usize = 16;

/// The rows of a table, by key (read through `Deref`), and their column indexes.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    map: BTreeMap<String, Entry>,
    indexes: HashMap<String, Index>,
}

impl Deref for Rows {
    type Target = BTreeMap<String, Entry>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<'a> IntoIterator for &'a Rows {
    type Item = (&'a String, &'a Entry);
    type IntoIter = std::collections::btree_map::Iter<'a, String, Entry>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

/// Rows from entries with distinct keys, in any order (sorted ones are built in linear time);
/// no column is indexed yet.
impl FromIterator<(String, Entry)> for Rows {
    fn from_iter<I: IntoIterator<Item = (String, Entry)>>(iter: I) -> Self {
        Rows {
            map: iter.into_iter().collect(),
            indexes: HashMap::new(),
        }
    }
}

impl Rows {
    /// Sets the row of `key`, keeping the indexes.
    pub fn insert(&mut self, key: String, entry: Entry) {
        if self.indexes.is_empty() {
            self.map.insert(key, entry);
            return;
        }
        let old = self.map.get(&key).map(|e| e.row.clone());
        for (column, index) in &mut self.indexes {
            let before = value_keys(old.as_ref().and_then(|r| r.get(column)));
            let after = value_keys(entry.row.get(column));
            if before == after {
                continue;
            }
            unfile(index, &before, &key);
            file(index, after, &key);
        }
        self.map.insert(key, entry);
    }

    /// Removes the row of `key`, keeping the indexes.
    pub fn remove(&mut self, key: &str) -> Option<Entry> {
        let e = self.map.remove(key)?;
        for (column, index) in &mut self.indexes {
            unfile(index, &value_keys(e.row.get(column)), key);
        }
        Some(e)
    }

    /// Sets the input offset of every row of partition `part` to `off` (offsets are not indexed).
    pub fn set_offsets(&mut self, part: u32, off: i64) {
        for e in self.map.values_mut().filter(|e| e.part == part) {
            e.off = off;
        }
    }

    /// Keeps the rows `f` accepts, keeping the indexes.
    pub fn retain(&mut self, mut f: impl FnMut(&String, &Entry) -> bool) {
        let gone: Vec<String> = self
            .map
            .iter()
            .filter(|(k, e)| !f(k, e))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    /// A copy of the rows (their keys, and the rows shared) to work on outside the table's locks:
    /// an index's build ([`build_index`], then [`Rows::install_index`]).
    pub fn copy_rows(&self) -> Vec<(String, StoredRow)> {
        self.map
            .iter()
            .map(|(k, e)| (k.clone(), e.row.clone()))
            .collect()
    }

    /// Whether `column` is indexed.
    pub fn has_index(&self, column: &str) -> bool {
        self.indexes.contains_key(column)
    }

    /// Whether no further column can be indexed.
    pub fn indexes_full(&self) -> bool {
        self.indexes.len() >= MAX_INDEXED_COLUMNS
    }

    /// Indexes `column` (a scan of the rows, once) in one go; false when the table has
    /// [`MAX_INDEXED_COLUMNS`] already. Tests only: a table builds its indexes outside its locks.
    #[cfg(test)]
    pub fn ensure_index(&mut self, column: &str) -> bool {
        if self.indexes.contains_key(column) {
            return true;
        }
        let copy = self.copy_rows();
        let index = build_index(column, &copy);
        self.install_index(column, &copy, index)
    }

    /// Installs `index`, built by [`build_index`] from `copy` (taken by
    /// [`Rows::copy_rows`]), after filing anew the rows that changed since the copy: a walk
    /// of both sorted lists comparing rows by identity, without parsing or hashing the rows
    /// that did not change. False when the table has [`MAX_INDEXED_COLUMNS`] already; true,
    /// dropping `index`, when `column` got indexed in the meantime.
    pub fn install_index(
        &mut self,
        column: &str,
        copy: &[(String, StoredRow)],
        mut index: Index,
    ) -> bool {
        if self.indexes.contains_key(column) {
            return true;
        }
        if self.indexes.len() >= MAX_INDEXED_COLUMNS {
            return false;
        }
        let mut now = self.map.iter().peekable();
        let mut then = copy.iter().peekable();
        loop {
            let order = match (now.peek(), then.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((k, _)), Some((c, _))) => k.as_str().cmp(c.as_str()),
            };
            match order {
                Ordering::Equal => {
                    if let (Some((key, e)), Some((_, old))) = (now.next(), then.next()) {
                        if !e.row.same_as(old) {
                            unfile(&mut index, &value_keys(old.get(column)), key);
                            file(&mut index, value_keys(e.row.get(column)), key);
                        }
                    }
                }
                // a row inserted since the copy
                Ordering::Less => {
                    if let Some((key, e)) = now.next() {
                        file(&mut index, value_keys(e.row.get(column)), key);
                    }
                }
                // a row removed since the copy
                Ordering::Greater => {
                    if let Some((key, old)) = then.next() {
                        unfile(&mut index, &value_keys(old.get(column)), key);
                    }
                }
            }
        }
        self.indexes.insert(column.to_string(), index);
        true
    }

    /// The keys of the rows whose `column` is under one of `keys`, sorted; `None` when `column`
    /// is not indexed.
    pub fn lookup(&self, column: &str, keys: &[IndexKey]) -> Option<Vec<&String>> {
        let index = self.indexes.get(column)?;
        let mut out: Vec<&String> = keys
            .iter()
            .filter_map(|k| index.get(k))
            .flatten()
            .collect::<HashSet<&String>>()
            .into_iter()
            .collect();
        out.sort();
        Some(out)
    }
}

/// The keys of the rows by the index keys of one column's values.
pub type Index = HashMap<IndexKey, HashSet<String>>;

/// An index of `column` over `rows` (a [`Rows::copy_rows`]); parses the rows not parsed
/// yet. Takes no lock: run it outside the table's.
pub fn build_index(column: &str, rows: &[(String, StoredRow)]) -> Index {
    for (_, row) in rows {
        row.shared();
    }
    let mut index = Index::new();
    for (key, row) in rows {
        file(&mut index, value_keys(row.get(column)), key);
    }
    index
}

fn file(index: &mut Index, keys: Vec<IndexKey>, key: &str) {
    for k in keys {
        index.entry(k).or_default().insert(key.to_string());
    }
}

fn unfile(index: &mut Index, keys: &[IndexKey], key: &str) {
    for k in keys {
        if let Some(set) = index.get_mut(k) {
            set.remove(key);
            if set.is_empty() {
                index.remove(k);
            }
        }
    }
}

#[cfg(test)]
mod tests;
