//! Reading the whole store back at start-up. Rows are most of it, so the scanning thread hands
//! them in chunks to parser threads (which check each row's JSON), one per core, through a bounded channel, while it reads the
//! rest of the store itself. A row is checked to be one JSON object and kept as its JSON, parsed
//! on first use ([`StoredRow`]): parsing a million rows into columns took seconds.
//! The chunks come back numbered, so each table's rows are put together in the store's order
//! (sorted by key: the maps are bulk-built).

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use super::{
    read_part_off, split_at_nul, split_topic_partition, split_two, utf8, Loaded, PendingDelete,
    Store, StoreError, ALIVE_KEY, LAST_PREFIX, MARKS_PREFIX,
};
use crate::table::position::{LastApplied, Owner};
use crate::table::state::{Entry, SliceMode, TableState};
use crate::table::stored_row::StoredRow;

/// Rows per chunk handed to a parser thread.
const CHUNK_ROWS: usize = 2048;
/// Parser threads at most (the load has nothing else to do; more than the cores does not help).
const MAX_PARSERS: usize = 8;

/// Raw row entries (`r table \0 key` -> partition, offset, JSON), numbered in store order.
struct RawChunk {
    idx: usize,
    items: Vec<(sled::IVec, sled::IVec)>,
}

/// Parsed rows of one chunk: runs of consecutive rows of one table.
type Runs = Vec<(String, Vec<(String, Entry)>)>;

/// What a parser thread returns: its chunks, by number.
type Parsed = Vec<(usize, Result<Runs, StoreError>)>;

fn corrupt(key: &[u8], reason: &'static str) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    }
}

fn parsers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, MAX_PARSERS)
}

impl Store {
    /// Reads the whole store (start-up only: it scans every entry).
    pub fn load(&self) -> Result<Loaded, StoreError> {
        self.load_with(parsers())
    }

    /// [`Store::load`] with `parsers` row-parsing threads (at least one).
    fn load_with(&self, parsers: usize) -> Result<Loaded, StoreError> {
        let (tx, rx) = sync_channel::<RawChunk>(parsers.max(1) * 2);
        let rx = Mutex::new(rx);
        let started = Instant::now();
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..parsers.max(1))
                .map(|_| s.spawn(|| parse_chunks(&rx)))
                .collect();
            let scanned = self.scan(tx); // ends the parsers when it returns
            let scan_ms = started.elapsed().as_millis() as u64;
            let mut chunks = Vec::new();
            for w in workers {
                match w.join() {
                    Ok(parsed) => chunks.extend(parsed),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            let parsed_ms = started.elapsed().as_millis() as u64;
            let (out, scan) = scanned?;
            let out = assemble(out, scan, chunks)?;
            tracing::info!(
                parsers,
                scan_ms,
                parsed_ms,
                assembled_ms = started.elapsed().as_millis() as u64,
                "store read"
            );
            Ok(out)
        })
    }

    /// Reads every entry but the rows, which go to the parsers through `rows` (dropped at the
    /// end, which ends the parsers).
    fn scan(&self, rows: SyncSender<RawChunk>) -> Result<(Loaded, Scan), StoreError> {
        let mut out = Loaded {
            ignored_old_layout: self.db.tree_names().iter().any(|n| n.as_ref() == b"state")
                && self.db.open_tree("state")?.first()?.is_some(),
            ..Loaded::default()
        };
        let mut scan = Scan::default();
        let mut chunk = RawChunk {
            idx: 0,
            items: Vec::with_capacity(CHUNK_ROWS),
        };
        for item in self.tree.iter() {
            let (k, v) = item?;
            let corrupt = |reason| corrupt(&k, reason);
            match k.first() {
                Some(b'r') => {
                    chunk.items.push((k, v));
                    if chunk.items.len() == CHUNK_ROWS {
                        let next = RawChunk {
                            idx: chunk.idx + 1,
                            items: Vec::with_capacity(CHUNK_ROWS),
                        };
                        if rows.send(std::mem::replace(&mut chunk, next)).is_err() {
                            // every parser is gone, which only a panic does: the join reports it
                            return Ok((out, scan));
                        }
                    }
                }
                Some(b't') => {
                    let table = utf8(&k[1..]).ok_or_else(|| corrupt("table key"))?;
                    let meta = serde_json::from_slice(&v).map_err(|_| corrupt("table meta"))?;
                    scan.metas.insert(table, meta);
                }
                Some(kind @ (b's' | b'a')) => {
                    let rest = &k[1..];
                    let split = rest
                        .len()
                        .checked_sub(5)
                        .ok_or_else(|| corrupt("slice key"))?;
                    let table = utf8(&rest[..split]).ok_or_else(|| corrupt("slice table"))?;
                    let part = u32::from_be_bytes(
                        rest[split + 1..]
                            .try_into()
                            .map_err(|_| corrupt("slice partition"))?,
                    );
                    if *kind == b's' {
                        let meta = serde_json::from_slice(&v).map_err(|_| corrupt("slice meta"))?;
                        scan.slices.entry(table).or_default().push((part, meta));
                    } else {
                        let meta = serde_json::from_slice(&v).map_err(|_| corrupt("ack meta"))?;
                        scan.acks.entry(table).or_default().push((part, meta));
                    }
                }
                Some(b'p') => {
                    let (topic, partition) =
                        split_topic_partition(&k[1..]).ok_or_else(|| corrupt("position key"))?;
                    let offset = i64::from_be_bytes(
                        v.as_ref()
                            .try_into()
                            .map_err(|_| corrupt("position value"))?,
                    );
                    out.positions.insert((topic, partition), offset);
                }
                Some(b'o') => {
                    let (table, key) = split_two(&k[1..]).ok_or_else(|| corrupt("outbox key"))?;
                    let (part, off) = read_part_off(&v).ok_or_else(|| corrupt("outbox value"))?;
                    out.deletes.push(PendingDelete {
                        table,
                        key,
                        part,
                        off,
                    });
                }
                Some(b'd') => {
                    let id = u64::from_be_bytes(
                        k[1..].try_into().map_err(|_| corrupt("dead letter key"))?,
                    );
                    let letter =
                        serde_json::from_slice(&v).map_err(|_| corrupt("dead letter json"))?;
                    out.dead_letters.push((id, letter));
                }
                Some(b'm') if k.starts_with(MARKS_PREFIX) => {
                    let (topic, partition) = split_topic_partition(&k[MARKS_PREFIX.len()..])
                        .ok_or_else(|| corrupt("source marks key"))?;
                    let marks =
                        serde_json::from_slice(&v).map_err(|_| corrupt("source marks json"))?;
                    out.source_marks.insert((topic, partition), marks);
                }
                Some(b'm') if k.starts_with(LAST_PREFIX) => {
                    let (topic, partition) = split_topic_partition(&k[LAST_PREFIX.len()..])
                        .ok_or_else(|| corrupt("last record key"))?;
                    // only a hint: without it the position is not checked
                    match LastApplied::from_bytes(&v) {
                        Some(last) => {
                            out.last_records.insert((topic, partition), last);
                        }
                        None => {
                            tracing::warn!(%topic, partition, "ignoring a malformed record id stored with an input position")
                        }
                    }
                }
                Some(b'm') if k.as_ref() == ALIVE_KEY => {
                    let ms = v
                        .as_ref()
                        .try_into()
                        .map_err(|_| corrupt("alive mark value"))?;
                    out.alive_ms = Some(i64::from_be_bytes(ms));
                }
                Some(b'm') => {}
                _ => return Err(corrupt("unknown kind")),
            }
        }
        if !chunk.items.is_empty() {
            // a send fails only when every parser panicked: the join reports it
            let _ = rows.send(chunk);
        }
        Ok((out, scan))
    }
}

/// Table, slice and acknowledgement metadata read by the scan.
#[derive(Default)]
struct Scan {
    metas: HashMap<String, super::TableMeta>,
    slices: HashMap<String, Vec<(u32, super::SliceMeta)>>,
    acks: HashMap<String, Vec<(u32, super::AckMeta)>>,
}

/// A parser thread: parses chunks until the scan ends. After a corrupt row it only drains the
/// channel (the scan must never block on a full one).
fn parse_chunks(rx: &Mutex<Receiver<RawChunk>>) -> Parsed {
    let mut out = Vec::new();
    let mut failed = false;
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(chunk) = next else { return out };
        if failed {
            continue;
        }
        let runs = parse_rows(chunk.items);
        failed = runs.is_err();
        out.push((chunk.idx, runs));
    }
}

fn parse_rows(items: Vec<(sled::IVec, sled::IVec)>) -> Result<Runs, StoreError> {
    let mut runs: Runs = Vec::new();
    for (k, v) in items {
        let corrupt = |reason| corrupt(&k, reason);
        let (table, key) = split_at_nul(&k[1..]).ok_or_else(|| corrupt("row key"))?;
        let key = utf8(key).ok_or_else(|| corrupt("row key"))?;
        if v.len() < 12 {
            return Err(corrupt("row value"));
        }
        let (part, off) = read_part_off(&v).ok_or_else(|| corrupt("row value"))?;
        let row = StoredRow::from_json(&v[12..]).map_err(|_| corrupt("row json"))?;
        let entry = Entry { row, part, off };
        // rows come grouped by table: the name is compared, not allocated, per row
        match runs.last_mut() {
            Some((name, rows)) if name.as_bytes() == table => rows.push((key, entry)),
            _ => {
                let name = utf8(table).ok_or_else(|| corrupt("row key"))?;
                runs.push((name, vec![(key, entry)]));
            }
        }
    }
    Ok(runs)
}

/// Puts the tables together from the scan and the parsed chunks (the first corrupt row in store
/// order is the error).
fn assemble(mut out: Loaded, mut scan: Scan, mut chunks: Parsed) -> Result<Loaded, StoreError> {
    chunks.sort_unstable_by_key(|(idx, _)| *idx);
    let mut rows: HashMap<String, Vec<Vec<(String, Entry)>>> = HashMap::new();
    for (_, runs) in chunks {
        for (table, run) in runs? {
            rows.entry(table).or_default().push(run);
        }
    }
    for (name, meta) in scan.metas {
        let mut t = TableState::new(&name, &meta.epoch, &meta.source, meta.partitions);
        for (part, m) in scan.slices.remove(&name).unwrap_or_default() {
            let s = t.slice_mut(part);
            s.last_off = m.last_off;
            s.count = m.count;
            s.owner = Owner::parse(&m.owner).unwrap_or_default();
            s.mode = if m.owned {
                SliceMode::Owned
            } else {
                SliceMode::Followed
            };
            if let Some(ms) = m.kept_ms.filter(|_| !m.owned) {
                out.kept.insert((name.clone(), part), ms);
            }
        }
        for (part, a) in scan.acks.remove(&name).unwrap_or_default() {
            let s = t.slice_mut(part);
            s.acked = a.acked;
            s.cl_next = a.cl_next;
        }
        if let Some(runs) = rows.remove(&name) {
            // one allocation of the final size; in key order (the store's): built in linear time
            let mut all = Vec::with_capacity(runs.iter().map(Vec::len).sum());
            for run in runs {
                all.extend(run);
            }
            t.rows = all.into_iter().collect();
        }
        out.tables.push(t);
    }
    for d in &out.deletes {
        if let Some(t) = out.tables.iter_mut().find(|t| *t.name == *d.table) {
            t.slice_mut(d.part).tombs.insert(d.key.clone(), d.off);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
