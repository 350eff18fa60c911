//! A table's column indexes, built without holding up its ingest.
//!
//! An index is built from a copy of the rows taken under the read lock (keys and shared rows:
//! ~43 ms for 1M rows), outside the table's locks (parsing the rows not parsed yet: a restarted
//! table's), and installed under the write lock, which holds up the table's ingest, after
//! filing anew the rows that changed in the meantime (~8 ms for 1M rows). Built under the write
//! lock, a 1M-row table's first index held its ingest ~1 s, and ~3 s with the parse.
//!
//! One index of a table is built at a time (its `indexing` lock): clients that arrive together
//! with the same new `where` column wait for the first one's build and find it done, instead of
//! each copying and indexing the whole table.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Table;
use crate::table::rows::build_index;

impl Table {
    /// Indexes `column` of the rows for equality lookups (once; see `table::rows`); false when
    /// the table indexes too many columns already.
    pub fn ensure_index(&self, column: &str) -> bool {
        if let Some(known) = self.index_known(column) {
            return known;
        }
        let _one_build = self.indexing.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let copy = {
            let t = self.read();
            // built while this one waited for the build lock?
            if let Some(known) = known(&t.rows, column) {
                return known;
            }
            t.rows.copy_rows()
        };
        self.index_builds.fetch_add(1, Ordering::Relaxed);
        let copied = started.elapsed();
        let index = build_index(column, &copy);
        let built = started.elapsed();
        let mut t = self.write();
        // only a build under the lock held here adds an index: neither check can have changed
        if let Some(known) = known(&t.rows, column) {
            drop(t);
            return known;
        }
        let indexed = t.rows.install_index(column, &copy, index);
        let rows = t.rows.len();
        drop(t);
        tracing::debug!(
            column,
            rows,
            copy_ms = ms(copied),
            build_ms = ms(built - copied),
            under_write_lock_ms = ms(started.elapsed() - built),
            "column indexed"
        );
        // the copy (a key per row) is freed here, not under the lock
        drop(copy);
        indexed
    }

    /// Whether `column` is indexed (`Some(true)`) or cannot be (`Some(false)`), under the read
    /// lock: no write lock (which stalls ingest) just to hear it.
    fn index_known(&self, column: &str) -> Option<bool> {
        known(&self.read().rows, column)
    }
}

fn known(rows: &crate::table::rows::Rows, column: &str) -> Option<bool> {
    if rows.has_index(column) {
        Some(true)
    } else if rows.indexes_full() {
        Some(false)
    } else {
        None
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests;
