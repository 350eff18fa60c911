//! The memory of publish ids in a sled tree: what makes retries exactly-once, across disconnects
//! and restarts of livetable.
//!
//! Keys of the tree (which belongs to publishing alone):
//! - `i` + scope -> [`Entry`]: `Pending` is written (and flushed) before the record is handed to
//!   the producer; `Done` replaces it when the broker acknowledged (compare-and-swap, so an entry
//!   that expired meanwhile is not resurrected). A `Pending` left by a crash or an uncertain
//!   delivery is resolved by reading the partition from its `floor` (see `recover`).
//! - `t` + created (ms, big-endian) + scope -> empty: the time index that expiry walks in order,
//!   so sweeping costs the expired entries only.
//! - `f` + topic + 0 + partition -> offset: the last acknowledged offset per partition, a lower
//!   bound for the offset of anything produced later (the floor of a pending entry).
//!
//! The scope of an id is (topic, principal, id): without tokens ids are shared by every client of
//! a topic (use UUIDs); with tokens each principal has its own ids.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};

use serde_json::Value;

/// Errors of the id store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("a blocking task failed: {0}")]
    Task(String),
}

/// An id's place in the store: (topic, principal, id as JSON text), length-prefixed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope(Vec<u8>);

impl Scope {
    pub fn new(topic: &str, principal: Option<&str>, id_json: &str) -> Self {
        let p = principal.unwrap_or("");
        let mut b = Vec::with_capacity(4 + topic.len() + p.len() + id_json.len());
        b.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        b.extend_from_slice(topic.as_bytes());
        b.extend_from_slice(&(p.len() as u16).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
        b.extend_from_slice(id_json.as_bytes());
        Scope(b)
    }

    fn id_key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + self.0.len());
        k.push(b'i');
        k.extend_from_slice(&self.0);
        k
    }

    fn time_key(&self, created_ms: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(9 + self.0.len());
        k.push(b't');
        k.extend_from_slice(&created_ms.to_be_bytes());
        k.extend_from_slice(&self.0);
        k
    }
}

/// What the store knows about an id.
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

/// A stable 64-bit digest of a record's key and value (FNV-1a over a canonical form: object keys
/// sorted), so a retry with the same content in another key order is still the same record.
pub fn content_hash(key: Option<&str>, value: &Value) -> u64 {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    match key {
        Some(k) => {
            h.write(b"k");
            h.write(k.as_bytes());
        }
        None => h.write(b"n"),
    }
    h.write(&[0]);
    canonical(&mut h, value);
    h.0
}

struct Fnv(u64);

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
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

fn floor_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + topic.len());
    k.push(b'f');
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The id store over one sled tree. Its methods block (sled): call them from a blocking context
/// or keep them to single small operations.
pub struct IdStore {
    tree: sled::Tree,
    entries: AtomicI64,
}

impl IdStore {
    /// Opens the store over `tree`, counting its entries (O(entries): at start-up, blocking).
    pub fn open(tree: sled::Tree) -> Result<Self, StoreError> {
        let mut n = 0i64;
        for kv in tree.scan_prefix(b"t") {
            kv?;
            n += 1;
        }
        Ok(IdStore {
            tree,
            entries: AtomicI64::new(n),
        })
    }

    /// Ids remembered.
    pub fn len(&self) -> i64 {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() <= 0
    }

    pub fn get(&self, scope: &Scope) -> Result<Option<Entry>, StoreError> {
        Ok(self
            .tree
            .get(scope.id_key())?
            .and_then(|v| Entry::decode(&v)))
    }

    /// Adds a pending entry to `batch`; `new` when the id had no entry (adds it to the time index).
    pub fn stage_pending(&self, batch: &mut sled::Batch, scope: &Scope, entry: &Entry, new: bool) {
        batch.insert(scope.id_key(), &entry.encode()[..]);
        if new {
            batch.insert(scope.time_key(entry.created_ms()), &[][..]);
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
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

    /// [`IdStore::flush`] for blocking contexts.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.tree.flush()?;
        Ok(())
    }

    /// Replaces `pending` with its acknowledgement; false when the entry is no longer `pending`
    /// (expired meanwhile).
    pub fn mark_done(
        &self,
        scope: &Scope,
        pending: &Entry,
        partition: i32,
        offset: i64,
    ) -> Result<bool, StoreError> {
        let done = Entry::Done {
            created_ms: pending.created_ms(),
            hash: pending.hash(),
            partition,
            offset,
        };
        let r = self
            .tree
            .compare_and_swap(
                scope.id_key(),
                Some(&pending.encode()[..]),
                Some(&done.encode()[..]),
            )
            .map_err(StoreError::Sled)?;
        Ok(r.is_ok())
    }

    /// Removes `pending` (the record was certainly not written: a retry produces it again).
    pub fn forget(&self, scope: &Scope, pending: &Entry) -> Result<(), StoreError> {
        let r = self
            .tree
            .compare_and_swap(scope.id_key(), Some(&pending.encode()[..]), None::<&[u8]>)
            .map_err(StoreError::Sled)?;
        if r.is_ok() {
            self.tree.remove(scope.time_key(pending.created_ms()))?;
            self.entries.fetch_sub(1, Ordering::Relaxed);
        }
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

    /// Removes entries created before `cutoff_ms`, then the oldest ones while more than
    /// `max_entries` remain; at most `limit` per call. Returns how many were removed.
    pub fn sweep(
        &self,
        cutoff_ms: u64,
        max_entries: usize,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut removed = 0usize;
        let excess = (self.len() - max_entries as i64).max(0) as usize;
        for kv in self.tree.scan_prefix(b"t") {
            if removed >= limit {
                break;
            }
            let (k, _) = kv?;
            if k.len() < 9 {
                batch.remove(k);
                continue;
            }
            let created = u64::from_be_bytes(k[1..9].try_into().unwrap_or([0; 8]));
            if created >= cutoff_ms && removed >= excess {
                break;
            }
            let scope = Scope(k[9..].to_vec());
            // the id key goes only if it is this generation of the id
            if let Some(e) = self.get(&scope)? {
                if e.created_ms() == created {
                    batch.remove(scope.id_key());
                }
            }
            batch.remove(k);
            removed += 1;
        }
        self.tree.apply_batch(batch)?;
        self.entries.fetch_sub(removed as i64, Ordering::Relaxed);
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> (tempfile::TempDir, IdStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let s = IdStore::open(db.open_tree("publish").unwrap()).unwrap();
        (dir, s)
    }

    fn pending(created_ms: u64) -> Entry {
        Entry::Pending {
            created_ms,
            hash: 7,
            partition: 1,
            floor: 10,
        }
    }

    #[test]
    fn entries_round_trip() {
        for e in [
            pending(5),
            Entry::Done {
                created_ms: u64::MAX,
                hash: 1,
                partition: 0,
                offset: -1,
            },
        ] {
            assert_eq!(Entry::decode(&e.encode()), Some(e));
        }
        assert_eq!(Entry::decode(b"short"), None);
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
    fn pending_done_forget_and_expiry() {
        let (_dir, s) = store();
        let (a, b, c) = (
            Scope::new("t", None, "\"a\""),
            Scope::new("t", None, "\"b\""),
            Scope::new("t", None, "\"c\""),
        );
        let mut batch = sled::Batch::default();
        s.stage_pending(&mut batch, &a, &pending(100), true);
        s.stage_pending(&mut batch, &b, &pending(200), true);
        s.stage_pending(&mut batch, &c, &pending(300), true);
        s.stage_floor(&mut batch, "t", 1, 42);
        s.apply(batch).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.floors().unwrap()[&("t".to_string(), 1)], 42);

        assert!(s.mark_done(&a, &pending(100), 1, 50).unwrap());
        assert!(
            !s.mark_done(&a, &pending(100), 1, 51).unwrap(),
            "no longer pending"
        );
        assert_eq!(
            s.get(&a).unwrap(),
            Some(Entry::Done {
                created_ms: 100,
                hash: 7,
                partition: 1,
                offset: 50
            })
        );
        s.forget(&b, &pending(200)).unwrap();
        assert_eq!(s.get(&b).unwrap(), None);
        assert_eq!(s.len(), 2);

        // expiry walks the time index: a (100) goes, c (300) stays
        assert_eq!(s.sweep(250, 100, 1000).unwrap(), 1);
        assert_eq!(s.get(&a).unwrap(), None);
        assert!(s.get(&c).unwrap().is_some());
        assert_eq!(s.len(), 1);
        // the cap evicts the oldest even inside the window
        assert_eq!(s.sweep(0, 0, 1000).unwrap(), 1);
        assert_eq!(s.get(&c).unwrap(), None);
        assert_eq!(s.len(), 0);
        // a reopened store counts what is left
        let mut batch = sled::Batch::default();
        s.stage_pending(&mut batch, &a, &pending(400), true);
        s.apply(batch).unwrap();
        assert_eq!(IdStore::open(s.tree.clone()).unwrap().len(), 1);
    }
}
