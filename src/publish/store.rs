//! The memory of publish ids: what makes retries exactly-once across disconnects and restarts.
//!
//! Two halves:
//! - [`IdIndex`], in memory: scope -> [`Entry`] for every remembered id, with a creation-ordered
//!   queue for expiry and the entry cap. Lookups never touch the disk.
//! - [`IdLog`], in a sled tree of its own: the index's changes as an append-only log of records,
//!   one record per writer batch (`r` + seq -> many entries), so one sled insert carries a whole
//!   batch of ids; replayed at start-up. `f` + topic + 0 + partition -> offset keeps the last
//!   acknowledged offset per partition (the floor of later records).
//!
//! An id's `Pending` entry is in a flushed record before its record is produced; `Done` (or the
//! removal of an id whose record was certainly not written) follows in a later record. A `Pending`
//! without its `Done` (a crash, an uncertain delivery) is settled by reading the partition back
//! (see `recover`). Records older than the window (or than the oldest id still remembered) are
//! deleted whole.
//!
//! The scope of an id is (topic, principal, id): without tokens ids are shared by every client of
//! a topic (use UUIDs); with tokens each principal has its own ids.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::digest::Fnv1a as Fnv;

/// Errors of the id log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("a blocking task failed: {0}")]
    Task(String),
}

/// An id's place: (topic, principal, id as JSON text), length-prefixed. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope(Arc<[u8]>);

impl Scope {
    pub fn new(topic: &str, principal: Option<&str>, id_json: &str) -> Self {
        let p = principal.unwrap_or("");
        let mut b = Vec::with_capacity(4 + topic.len() + p.len() + id_json.len());
        b.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        b.extend_from_slice(topic.as_bytes());
        b.extend_from_slice(&(p.len() as u16).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
        b.extend_from_slice(id_json.as_bytes());
        Scope(b.into())
    }
}

/// What is known about an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Handed (or about to be handed) to the producer; the record, if written, is in `partition`
    /// above `floor` (-1: anywhere).
    Pending {
        created_ms: u64,
        hash: u64,
        partition: i32,
        floor: i64,
    },
    /// Acknowledged by the broker at (partition, offset).
    Done {
        created_ms: u64,
        hash: u64,
        partition: i32,
        offset: i64,
    },
}

impl Entry {
    pub fn created_ms(&self) -> u64 {
        match self {
            Entry::Pending { created_ms, .. } | Entry::Done { created_ms, .. } => *created_ms,
        }
    }

    pub fn hash(&self) -> u64 {
        match self {
            Entry::Pending { hash, .. } | Entry::Done { hash, .. } => *hash,
        }
    }

    pub fn encode(&self) -> [u8; 29] {
        let (tag, created, hash, partition, n) = match *self {
            Entry::Pending {
                created_ms,
                hash,
                partition,
                floor,
            } => (1u8, created_ms, hash, partition, floor),
            Entry::Done {
                created_ms,
                hash,
                partition,
                offset,
            } => (2u8, created_ms, hash, partition, offset),
        };
        let mut b = [0u8; 29];
        b[0] = tag;
        b[1..9].copy_from_slice(&created.to_be_bytes());
        b[9..17].copy_from_slice(&hash.to_be_bytes());
        b[17..21].copy_from_slice(&partition.to_be_bytes());
        b[21..29].copy_from_slice(&n.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Entry> {
        if b.len() != 29 {
            return None;
        }
        let created_ms = u64::from_be_bytes(b[1..9].try_into().ok()?);
        let hash = u64::from_be_bytes(b[9..17].try_into().ok()?);
        let partition = i32::from_be_bytes(b[17..21].try_into().ok()?);
        let n = i64::from_be_bytes(b[21..29].try_into().ok()?);
        match b[0] {
            1 => Some(Entry::Pending {
                created_ms,
                hash,
                partition,
                floor: n,
            }),
            2 => Some(Entry::Done {
                created_ms,
                hash,
                partition,
                offset: n,
            }),
            _ => None,
        }
    }
}

/// A change of the index: an id's new entry, or `None` when it is forgotten (its record was
/// certainly not written, so a retry produces it).
pub type Change = (Scope, Option<Entry>);

/// A stable 64-bit digest of a record's key and value (FNV-1a over a canonical form: object keys
/// sorted), so a retry with the same content in another key order is still the same record.
pub fn content_hash(key: Option<&str>, value: &Value) -> u64 {
    let mut h = Fnv::default();
    match key {
        Some(k) => {
            h.write(b"k");
            h.write(k.as_bytes());
        }
        None => h.write(b"n"),
    }
    h.write(&[0]);
    canonical(&mut h, value);
    h.finish()
}

fn canonical(h: &mut Fnv, v: &Value) {
    match v {
        Value::Null => h.write(b"z"),
        Value::Bool(b) => h.write(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.write(b"#");
            h.write(n.to_string().as_bytes());
            h.write(&[0]);
        }
        Value::String(s) => {
            h.write(b"\"");
            h.write(&(s.len() as u64).to_be_bytes());
            h.write(s.as_bytes());
        }
        Value::Array(a) => {
            h.write(b"[");
            h.write(&(a.len() as u64).to_be_bytes());
            for x in a {
                canonical(h, x);
            }
        }
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            h.write(b"{");
            h.write(&(keys.len() as u64).to_be_bytes());
            for k in keys {
                h.write(&(k.len() as u64).to_be_bytes());
                h.write(k.as_bytes());
                canonical(h, &o[k]);
            }
        }
    }
}

/// The remembered ids, in memory, with their creation order for expiry.
#[derive(Debug, Default)]
pub struct IdIndex {
    entries: HashMap<Scope, Entry>,
    /// (created, scope) of every id in creation order; an item whose id was forgotten or
    /// re-created since is skipped when it reaches the front.
    order: VecDeque<(u64, Scope)>,
}

impl IdIndex {
    pub fn get(&self, scope: &Scope) -> Option<Entry> {
        self.entries.get(scope).copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies a change (a new id joins the creation order).
    pub fn apply(&mut self, scope: &Scope, entry: Option<Entry>) {
        match entry {
            Some(e) => {
                let created = e.created_ms();
                let fresh = self
                    .entries
                    .insert(scope.clone(), e)
                    .is_none_or(|old| old.created_ms() != created);
                if fresh {
                    self.order.push_back((created, scope.clone()));
                }
            }
            None => {
                self.entries.remove(scope);
            }
        }
    }

    /// Forgets ids created before `cutoff_ms`, then the oldest while more than `max_entries`
    /// remain (or the order queue holds more than twice that); at most `limit` per call.
    /// Returns how many ids were forgotten.
    pub fn expire(&mut self, cutoff_ms: u64, max_entries: usize, limit: usize) -> usize {
        let mut removed = 0;
        let mut steps = 0;
        while let Some((created, scope)) = self.order.front() {
            let over = self.entries.len() > max_entries || self.order.len() > 2 * max_entries;
            if (*created >= cutoff_ms && !over) || steps >= limit {
                break;
            }
            steps += 1;
            if self
                .entries
                .get(scope)
                .is_some_and(|e| e.created_ms() == *created)
            {
                self.entries.remove(scope);
                removed += 1;
            }
            self.order.pop_front();
        }
        removed
    }

    /// The creation time of the oldest id still remembered.
    pub fn oldest_ms(&mut self) -> Option<u64> {
        while let Some((created, scope)) = self.order.front() {
            if self
                .entries
                .get(scope)
                .is_some_and(|e| e.created_ms() == *created)
            {
                return Some(*created);
            }
            self.order.pop_front();
        }
        None
    }
}

fn floor_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + topic.len());
    k.push(b'f');
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn record_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'r';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn encode_record(time_ms: u64, changes: &[Change]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + changes.len() * 80);
    b.extend_from_slice(&time_ms.to_be_bytes());
    for (scope, entry) in changes {
        b.extend_from_slice(&(scope.0.len() as u32).to_be_bytes());
        b.extend_from_slice(&scope.0);
        match entry {
            Some(e) => b.extend_from_slice(&e.encode()),
            None => b.push(0),
        }
    }
    b
}

/// The changes of a record (a damaged tail is ignored: it cannot be half-written, sled writes a
/// value whole).
fn decode_record(b: &[u8]) -> Option<(u64, Vec<Change>)> {
    let time = u64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    let mut out = Vec::new();
    let mut i = 8;
    while i < b.len() {
        let n = u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?) as usize;
        let scope = Scope(b.get(i + 4..i + 4 + n)?.into());
        i += 4 + n;
        if *b.get(i)? == 0 {
            out.push((scope, None));
            i += 1;
        } else {
            out.push((scope, Some(Entry::decode(b.get(i..i + 29)?)?)));
            i += 29;
        }
    }
    Some((time, out))
}

/// The log of index changes in a sled tree. Its methods block (sled): call them from a blocking
/// context, except single small operations.
pub struct IdLog {
    tree: sled::Tree,
    next_seq: AtomicU64,
}

impl IdLog {
    /// Opens the log over `tree` and replays it into an index (O(records): at start-up, blocking).
    pub fn open(tree: sled::Tree) -> Result<(Self, IdIndex), StoreError> {
        let mut index = IdIndex::default();
        let mut next = 0;
        for kv in tree.scan_prefix(b"r") {
            let (k, v) = kv?;
            if let Ok(seq) = <[u8; 8]>::try_from(&k[1..]) {
                next = u64::from_be_bytes(seq) + 1;
            }
            match decode_record(&v) {
                Some((_, changes)) => {
                    for (scope, entry) in changes {
                        index.apply(&scope, entry);
                    }
                }
                None => tracing::warn!("skipping an unreadable publish id record"),
            }
        }
        Ok((
            IdLog {
                tree,
                next_seq: AtomicU64::new(next),
            },
            index,
        ))
    }

    /// Adds a record of `changes` to `batch`.
    pub fn stage(&self, batch: &mut sled::Batch, time_ms: u64, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        batch.insert(&record_key(seq)[..], encode_record(time_ms, changes));
    }

    /// Adds the last acknowledged offset of a partition to `batch`.
    pub fn stage_floor(&self, batch: &mut sled::Batch, topic: &str, partition: i32, offset: i64) {
        batch.insert(floor_key(topic, partition), &offset.to_be_bytes()[..]);
    }

    pub fn apply(&self, batch: sled::Batch) -> Result<(), StoreError> {
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush_async().await?;
        Ok(())
    }

    /// [`IdLog::flush`] for blocking contexts.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.tree.flush()?;
        Ok(())
    }

    /// The stored last acknowledged offsets per (topic, partition).
    pub fn floors(&self) -> Result<HashMap<(String, i32), i64>, StoreError> {
        let mut out = HashMap::new();
        for kv in self.tree.scan_prefix(b"f") {
            let (k, v) = kv?;
            let k = &k[1..];
            if k.len() < 5 || v.len() != 8 {
                continue;
            }
            let (topic, rest) = k.split_at(k.len() - 5);
            let (Ok(topic), Ok(p), Ok(off)) = (
                std::str::from_utf8(topic),
                <[u8; 4]>::try_from(&rest[1..]),
                <[u8; 8]>::try_from(&v[..]),
            ) else {
                continue;
            };
            out.insert(
                (topic.to_string(), i32::from_be_bytes(p)),
                i64::from_be_bytes(off),
            );
        }
        Ok(out)
    }

    /// Deletes the records written before `cutoff_ms` (every id in them was created before it);
    /// at most `limit` per call. Returns how many were deleted.
    pub fn sweep(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.tree.scan_prefix(b"r") {
            let (k, v) = kv?;
            let time = v
                .get(..8)
                .and_then(|t| <[u8; 8]>::try_from(t).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if time >= cutoff_ms || n >= limit {
                break;
            }
            batch.remove(k);
            n += 1;
        }
        self.tree.apply_batch(batch)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let t = db.open_tree("publish").unwrap();
        (dir, t)
    }

    fn pending(created_ms: u64) -> Entry {
        Entry::Pending {
            created_ms,
            hash: 7,
            partition: 1,
            floor: 10,
        }
    }

    fn done(created_ms: u64, offset: i64) -> Entry {
        Entry::Done {
            created_ms,
            hash: 7,
            partition: 1,
            offset,
        }
    }

    #[test]
    fn entries_and_records_round_trip() {
        for e in [pending(5), done(u64::MAX, -1)] {
            assert_eq!(Entry::decode(&e.encode()), Some(e));
        }
        assert_eq!(Entry::decode(b"short"), None);
        let changes = vec![
            (Scope::new("t", None, "\"a\""), Some(pending(1))),
            (Scope::new("t", Some("u"), "2"), None),
            (Scope::new("t", None, "\"c\""), Some(done(3, 9))),
        ];
        assert_eq!(
            decode_record(&encode_record(42, &changes)),
            Some((42, changes))
        );
    }

    #[test]
    fn scopes_do_not_collide() {
        assert_ne!(
            Scope::new("ab", None, "\"c\""),
            Scope::new("a", None, "b\"c\"")
        );
        assert_ne!(
            Scope::new("t", Some("u1"), "\"x\""),
            Scope::new("t", Some("u2"), "\"x\"")
        );
        assert_ne!(Scope::new("t", None, "1"), Scope::new("t", None, "\"1\""));
    }

    #[test]
    fn content_hash_ignores_key_order_only() {
        let a = json!({"a": 1, "b": [true, null, "x"]});
        let b: Value = serde_json::from_str(r#"{"b": [true, null, "x"], "a": 1}"#).unwrap();
        assert_eq!(content_hash(Some("k"), &a), content_hash(Some("k"), &b));
        assert_ne!(content_hash(Some("k"), &a), content_hash(None, &a));
        assert_ne!(content_hash(Some("k"), &a), content_hash(Some("k2"), &a));
        assert_ne!(
            content_hash(None, &json!({"a": 1})),
            content_hash(None, &json!({"a": 2}))
        );
        assert_ne!(
            content_hash(None, &json!(["ab", "c"])),
            content_hash(None, &json!(["a", "bc"]))
        );
    }

    #[test]
    fn the_index_expires_by_time_and_by_count() {
        let mut ix = IdIndex::default();
        let s = |i: u64| Scope::new("t", None, &i.to_string());
        for i in 0..10 {
            ix.apply(&s(i), Some(pending(100 + i)));
        }
        // a pending id acknowledged keeps its place; a forgotten one leaves a stale queue item
        ix.apply(&s(0), Some(done(100, 5)));
        ix.apply(&s(1), None);
        assert_eq!(ix.len(), 9);
        assert_eq!(ix.oldest_ms(), Some(100));
        assert_eq!(
            ix.expire(103, 100, 1000),
            2,
            "ids 0 and 2 (1 was forgotten)"
        );
        assert_eq!(ix.get(&s(0)), None);
        assert_eq!(ix.get(&s(3)), Some(pending(103)));
        assert_eq!(ix.expire(0, 5, 1000), 2, "the cap keeps the newest 5");
        assert_eq!(ix.oldest_ms(), Some(105));
        assert_eq!(ix.len(), 5);
        assert_eq!(ix.expire(0, 0, 2), 2, "at most `limit` steps per call");
    }

    #[test]
    fn the_log_replays_into_the_index_and_sweeps_whole_records() {
        let (_dir, tree) = tree();
        let (log, ix) = IdLog::open(tree.clone()).unwrap();
        assert!(ix.is_empty());
        let (a, b) = (
            Scope::new("t", None, "\"a\""),
            Scope::new("t", None, "\"b\""),
        );
        let mut batch = sled::Batch::default();
        log.stage(
            &mut batch,
            100,
            &[
                (a.clone(), Some(pending(100))),
                (b.clone(), Some(pending(100))),
            ],
        );
        log.stage_floor(&mut batch, "t", 1, 42);
        log.apply(batch).unwrap();
        let mut batch = sled::Batch::default();
        log.stage(
            &mut batch,
            200,
            &[(a.clone(), Some(done(100, 50))), (b.clone(), None)],
        );
        log.apply(batch).unwrap();
        let (log2, ix) = IdLog::open(tree.clone()).unwrap();
        assert_eq!(ix.get(&a), Some(done(100, 50)));
        assert_eq!(ix.get(&b), None);
        assert_eq!(log2.floors().unwrap()[&("t".to_string(), 1)], 42);
        // a reopened log continues the sequence: its records replay after the old ones
        let mut batch = sled::Batch::default();
        log2.stage(&mut batch, 300, &[(a.clone(), None)]);
        log2.apply(batch).unwrap();
        assert_eq!(IdLog::open(tree.clone()).unwrap().1.get(&a), None);
        assert_eq!(
            log2.sweep(250, 100).unwrap(),
            2,
            "the records of 100 and 200"
        );
        assert_eq!(log2.sweep(250, 100).unwrap(), 0);
        assert_eq!(tree.scan_prefix(b"r").count(), 1);
    }
}
