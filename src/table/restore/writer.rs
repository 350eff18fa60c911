//! The store writes of a restore, on a thread of their own: while the restoring thread reads and
//! folds the next chunk of a changelog partition, this one serialises the previous chunk's rows
//! and applies them to sled (together a third of a restore's CPU on one thread).
//!
//! Chunks are applied in the order they were sent, at most [`QUEUED`] wait behind the one being
//! written (memory stays bounded), and [`with_writer`] returns only once every chunk sent was
//! applied: the slice's final bookkeeping (it becomes owned) is written after all of them.
//! A chunk is visible in the tables before sled has it; that is no weaker than before, as an
//! applied batch is durable only at sled's next flush either way, and a restore interrupted by a
//! crash is read again from what the store holds.

use std::cell::RefCell;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use crate::table::restore::RestoreError;
use crate::table::state::Entry;
use crate::table::store::{encode_row, Store, StoreError, WriteBatch};

/// Chunks that may wait while one is written.
const QUEUED: usize = 1;

/// One chunk's writes: its rows and the rest of its batch (slice bookkeeping).
pub struct ChunkWrite {
    pub table: String,
    pub rows: Vec<ChunkRow>,
    pub rest: WriteBatch,
}

/// One row of a chunk.
pub struct ChunkRow {
    pub key: String,
    /// `None` removes the row.
    pub entry: Option<Entry>,
}

impl ChunkWrite {
    fn into_batch(self) -> WriteBatch {
        let mut b = self.rest;
        for r in &self.rows {
            put_entry(&mut b, &self.table, &r.key, r.entry.as_ref());
        }
        b
    }
}

/// Adds the write of one row (`None`: its removal) to `b`. A row that came as JSON (a changelog
/// record's) is stored as that JSON, without serialising it again.
pub fn put_entry(b: &mut WriteBatch, table: &str, key: &str, entry: Option<&Entry>) {
    match entry {
        Some(e) => match e.row.json() {
            Some(json) => b.put_row(table, key, e.part, e.off, json.as_bytes()),
            None => b.put_row(table, key, e.part, e.off, &encode_row(&e.row)),
        },
        None => b.remove_row(table, key),
    }
}

/// Hands chunks to the writer thread, or applies them at once where the process has one core.
pub struct Chunks<'a> {
    to: To<'a>,
}

enum To<'a> {
    Thread(&'a SyncSender<ChunkWrite>),
    /// One core: a thread of its own would only add switches; the first error is kept.
    Inline(&'a Store, RefCell<Option<StoreError>>),
}

impl Chunks<'_> {
    /// Queues `chunk` (waits while [`QUEUED`] chunks wait); false when the writer stopped on an
    /// error, which [`with_writer`] then returns.
    pub fn send(&self, chunk: ChunkWrite) -> bool {
        match &self.to {
            To::Thread(tx) => tx.send(chunk).is_ok(),
            To::Inline(store, failed) => {
                if failed.borrow().is_some() {
                    return false;
                }
                let rows = chunk.rows.len();
                match store.apply(chunk.into_batch()) {
                    Ok(()) => {
                        reclaim(rows);
                        true
                    }
                    Err(e) => {
                        *failed.borrow_mut() = Some(e);
                        false
                    }
                }
            }
        }
    }
}

/// Runs `read` with a [`Chunks`] whose chunks a thread of its own applies to `store`, in order
/// (in `read`'s own thread where the process may run on one core only); returns once every chunk
/// was applied. A store error is returned before `read`'s own result (`read` may only have seen
/// that the writer stopped).
pub fn with_writer<T>(
    store: &Store,
    read: impl FnOnce(&Chunks<'_>) -> Result<T, RestoreError>,
) -> Result<T, RestoreError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    with_writer_on(store, cores > 1, read)
}

/// [`with_writer`], with the writer on a thread of its own or not.
fn with_writer_on<T>(
    store: &Store,
    threaded: bool,
    read: impl FnOnce(&Chunks<'_>) -> Result<T, RestoreError>,
) -> Result<T, RestoreError> {
    if !threaded {
        let chunks = Chunks {
            to: To::Inline(store, RefCell::new(None)),
        };
        let result = read(&chunks);
        if let To::Inline(_, failed) = chunks.to {
            if let Some(e) = failed.into_inner() {
                return Err(e.into());
            }
        }
        return result;
    }
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel(QUEUED);
        let writer = std::thread::Builder::new()
            .name("restore-write".into())
            .spawn_scoped(scope, move || write_all(store, rx))
            .map_err(RestoreError::Spawn)?;
        let result = read(&Chunks {
            to: To::Thread(&tx),
        });
        // the writer ends once the chunks sent are written
        drop(tx);
        match writer.join() {
            Ok(written) => written?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
        result
    })
}

fn write_all(store: &Store, rx: Receiver<ChunkWrite>) -> Result<(), StoreError> {
    for chunk in rx {
        let rows = chunk.rows.len();
        store.apply(chunk.into_batch())?;
        reclaim(rows);
    }
    Ok(())
}

/// Frees what sled's copy-on-write left behind a batch of `rows` rows. sled frees the replaced
/// versions of its nodes through crossbeam's epochs, and crossbeam frees only when a thread pins
/// anew (a batch is one pin), at most 512 objects every 128th pin: a thread that only applies
/// batches back to back left them piling up (1M rows restored: 3.3 GB peak instead of 1.9 GB,
/// BENCHMARKS.md). Each flush frees up to 512 (8 bags of 64) whose epoch has passed; a row
/// leaves about one or two. (`crossbeam_epoch` must be the version sled uses, 0.9: with another,
/// this flushes a collector sled does not use, and only the memory is lost.)
fn reclaim(rows: usize) {
    for _ in 0..rows / 128 + 1 {
        crossbeam_epoch::pin().flush();
    }
}

#[cfg(test)]
mod tests;
