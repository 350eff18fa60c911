//! Parsing a table's rows held as JSON without holding up its ingest.
//!
//! A restarted table holds its rows as their JSON until a column is read. A filter that cannot be
//! looked up reads every row while a snapshot copies them under the table's read lock, so the
//! first such snapshot used to parse the whole table there (1M rows: ~1.4 s during which the
//! table's ingest could not commit). Instead the copy gives up when it meets a row not parsed yet
//! (`SnapshotCopy::try_take`), and [`Table::parse_rows`] parses the rows from a copy of them
//! taken under the read lock (the rows are shared: their parse is kept by the table's rows too),
//! holding no lock; the copy is then taken again, over parsed rows.
//!
//! One such pass (or index build) runs at a time per table (its `indexing` lock): clients that
//! arrive together after a restart share one parse instead of each copying the whole table.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Table;

impl Table {
    /// Parses the rows of the table held as JSON and not parsed yet whose key `wanted` accepts
    /// (a token's key globs: the rest is never read), none when another pass did them
    /// meanwhile, outside the table's locks; returns how long it held the read lock (to copy
    /// them).
    pub fn parse_rows(&self, wanted: impl Fn(&str) -> bool) -> Duration {
        let _one_pass = self.indexing.lock().unwrap_or_else(|e| e.into_inner());
        let (copy, copied): (Vec<_>, _) = {
            let t = self.read();
            let started = Instant::now();
            let copy = t
                .rows
                .iter()
                .filter(|(k, e)| !e.row.is_parsed() && wanted(k))
                .map(|(_, e)| e.row.clone())
                .collect();
            (copy, started.elapsed())
        };
        let started = Instant::now();
        if copy.is_empty() {
            return copied;
        }
        for row in &copy {
            row.shared();
        }
        self.parse_passes.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            rows = copy.len(),
            copy_ms = copied.as_secs_f64() * 1e3,
            parse_ms = started.elapsed().as_secs_f64() * 1e3,
            "rows parsed"
        );
        copied
    }
}

#[cfg(test)]
mod tests;
