//! The sled store: rows, per-table `seq` and `epoch`, Kafka positions and the outbox, all in one
//! tree so that one `apply_batch` makes a whole applied batch durable atomically.
//!
//! Key layout (one byte of kind, then the parts; `\0` separates strings):
//! - `r table \0 key`          -> seq of the row's last change (u64 BE) + row JSON
//!   (a value starting with `{` is a row of an older store: seq 0)
//! - `s table`                 -> seq (u64 BE)
//! - `e table`                 -> epoch (UTF-8)
//! - `p topic \0 partition`    -> next offset to consume (i64 BE; partition as i32 BE)
//! - `a table`                 -> changelog acknowledged up to this seq (u64 BE)
//!   (every change up to it is in the changelog topic; rows with a higher seq are the outbox)
//! - `o table \0 key`          -> outbox of deletes: the tombstone must be (re)produced; value = seq
//! - `d id`                    -> outbox: a dead letter not yet acknowledged by the broker (JSON)
//! - `m initialized`           -> the store holds a complete state (restore finished)
//!
//! Invariant: a position is stored in the same batch as the rows, seqs and outbox entries of the
//! records before it, so after any crash the store is a prefix of the applied stream. The outbox
//! costs no write per change: a row carries its seq, and one `a` entry per table and checkpoint
//! says how far the changelog is acknowledged.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cdc::decode::Row;

/// Errors of the sled store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt entry {key:?} in the store: {reason}")]
    Corrupt { key: String, reason: &'static str },
}

const INITIALIZED: &[u8] = b"minitialized";

/// A record that could not be decoded, waiting in the outbox for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub reason: String,
    pub error: String,
    pub truncated: bool,
}

/// Everything read back from the store at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    pub tables: HashMap<String, LoadedTable>,
    pub positions: HashMap<(String, i32), i64>,
    pub outbox: Vec<OutboxEntry>,
    pub dead_letters: Vec<(u64, DeadLetter)>,
    pub initialized: bool,
}

/// A key whose changelog record is not known to be acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub table: String,
    pub key: String,
    /// The seq of the change (the row's, or the delete mark's).
    pub seq: u64,
    /// From a delete mark (cleared by compare-and-swap on `seq` once acknowledged).
    pub deleted: bool,
}

/// One table as stored.
#[derive(Debug, Default)]
pub struct LoadedTable {
    pub seq: u64,
    pub epoch: String,
    pub rows: Vec<(String, Row)>,
}

/// The durable store. Cheap to clone (sled handles are reference-counted).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

/// One atomic write: build it with the methods, then [`Store::apply`].
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
}

impl WriteBatch {
    /// `json`: the row serialised (see [`encode_row`]); `seq`: of the row's last change.
    pub fn put_row(&mut self, table: &str, key: &str, json: &[u8], seq: u64) {
        let mut v = Vec::with_capacity(8 + json.len());
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(json);
        self.batch.insert(two(b'r', table, key), v);
    }
    pub fn remove_row(&mut self, table: &str, key: &str) {
        self.batch.remove(two(b'r', table, key));
    }
    pub fn set_seq(&mut self, table: &str, seq: u64) {
        self.batch
            .insert(one(b's', table), seq.to_be_bytes().to_vec());
    }
    pub fn set_epoch(&mut self, table: &str, epoch: &str) {
        self.batch.insert(one(b'e', table), epoch.as_bytes());
    }
    pub fn set_position(&mut self, topic: &str, partition: i32, next_offset: i64) {
        self.batch.insert(
            position_key(topic, partition),
            next_offset.to_be_bytes().to_vec(),
        );
    }
    /// A deleted key whose tombstone is not yet acknowledged by the changelog.
    pub fn mark_deleted(&mut self, table: &str, key: &str, seq: u64) {
        self.batch
            .insert(two(b'o', table, key), seq.to_be_bytes().to_vec());
    }
    pub fn add_dead_letter(&mut self, id: u64, letter: &DeadLetter) {
        let bytes = serde_json::to_vec(letter).unwrap_or_default();
        self.batch.insert(dead_letter_key(id), bytes);
    }
    pub fn set_acked(&mut self, table: &str, seq: u64) {
        self.batch
            .insert(one(b'a', table), seq.to_be_bytes().to_vec());
    }
    pub fn set_initialized(&mut self) {
        self.batch.insert(INITIALIZED, b"1".to_vec());
    }
}

/// A row as stored and as produced to the changelog: its JSON.
pub fn encode_row(row: &Row) -> Vec<u8> {
    // serialising a Map of Values cannot fail
    serde_json::to_vec(row).unwrap_or_default()
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(200))
            .open()?;
        let tree = db.open_tree("state")?;
        Ok(Store { db, tree })
    }

    /// Applies a batch atomically (not yet flushed: see [`Store::flush`]).
    pub fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.tree.apply_batch(batch.batch)?;
        Ok(())
    }

    /// Makes everything applied so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.tree.flush_async().await?;
        Ok(())
    }

    /// Blocking flush, for shutdown paths outside the runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.tree.flush()?;
        Ok(())
    }

    /// Every change of `table` up to `seq` is acknowledged by the changelog.
    pub fn set_acked(&self, table: &str, seq: u64) -> Result<(), StoreError> {
        self.tree
            .insert(one(b'a', table), seq.to_be_bytes().to_vec())?;
        Ok(())
    }

    /// Removes the outbox mark of a deleted `table/key` if it still names `seq` (a newer delete
    /// keeps it).
    pub fn clear_deleted(&self, table: &str, key: &str, seq: u64) -> Result<(), StoreError> {
        let k = two(b'o', table, key);
        let _ = self.tree.compare_and_swap(
            k,
            Some(seq.to_be_bytes().to_vec()),
            None as Option<Vec<u8>>,
        )?;
        Ok(())
    }

    /// Removes an acknowledged dead letter from the outbox.
    pub fn clear_dead_letter(&self, id: u64) -> Result<(), StoreError> {
        self.tree.remove(dead_letter_key(id))?;
        Ok(())
    }

    /// Removes everything (before a restore from the changelog).
    pub fn clear(&self) -> Result<(), StoreError> {
        self.tree.clear()?;
        Ok(())
    }

    /// Bytes on disk, as sled reports them.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Reads the whole store (start-up only: it scans every entry).
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let mut out = Loaded::default();
        // `a` sorts before `r`: every table's acknowledged seq is known before its rows
        let mut acked: HashMap<String, u64> = HashMap::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            let corrupt = |reason| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                reason,
            };
            match k.first() {
                Some(b'a') => {
                    let table = utf8(&k[1..]).ok_or_else(|| corrupt("acked key"))?;
                    let seq = u64::from_be_bytes(
                        v.as_ref().try_into().map_err(|_| corrupt("acked value"))?,
                    );
                    acked.insert(table, seq);
                }
                Some(b'r') => {
                    let (table, key) = split_two(&k[1..]).ok_or_else(|| corrupt("row key"))?;
                    let (seq, json) = match v.first() {
                        Some(b'{') => (0, v.as_ref()),
                        _ if v.len() >= 8 => (
                            u64::from_be_bytes(v[..8].try_into().map_err(|_| corrupt("row seq"))?),
                            &v[8..],
                        ),
                        _ => return Err(corrupt("row value")),
                    };
                    let row: Row = serde_json::from_slice(json).map_err(|_| corrupt("row json"))?;
                    if seq > acked.get(&table).copied().unwrap_or(0) {
                        out.outbox.push(OutboxEntry {
                            table: table.clone(),
                            key: key.clone(),
                            seq,
                            deleted: false,
                        });
                    }
                    out.tables.entry(table).or_default().rows.push((key, row));
                }
                Some(b's') => {
                    let table = utf8(&k[1..]).ok_or_else(|| corrupt("seq key"))?;
                    let seq = u64::from_be_bytes(
                        v.as_ref().try_into().map_err(|_| corrupt("seq value"))?,
                    );
                    out.tables.entry(table).or_default().seq = seq;
                }
                Some(b'e') => {
                    let table = utf8(&k[1..]).ok_or_else(|| corrupt("epoch key"))?;
                    out.tables.entry(table).or_default().epoch =
                        utf8(&v).ok_or_else(|| corrupt("epoch value"))?;
                }
                Some(b'p') => {
                    let rest = &k[1..];
                    let split = rest
                        .len()
                        .checked_sub(5)
                        .ok_or_else(|| corrupt("position key"))?;
                    let topic = utf8(&rest[..split]).ok_or_else(|| corrupt("position topic"))?;
                    let partition = i32::from_be_bytes(
                        rest[split + 1..]
                            .try_into()
                            .map_err(|_| corrupt("position partition"))?,
                    );
                    let offset = i64::from_be_bytes(
                        v.as_ref()
                            .try_into()
                            .map_err(|_| corrupt("position value"))?,
                    );
                    out.positions.insert((topic, partition), offset);
                }
                Some(b'o') => {
                    let (table, key) = split_two(&k[1..]).ok_or_else(|| corrupt("outbox key"))?;
                    let seq = u64::from_be_bytes(
                        v.as_ref().try_into().map_err(|_| corrupt("outbox value"))?,
                    );
                    out.outbox.push(OutboxEntry {
                        table,
                        key,
                        seq,
                        deleted: true,
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
                Some(b'm') if k.as_ref() == INITIALIZED => out.initialized = true,
                _ => return Err(corrupt("unknown kind")),
            }
        }
        Ok(out)
    }
}

fn one(kind: u8, a: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + a.len());
    k.push(kind);
    k.extend_from_slice(a.as_bytes());
    k
}

fn two(kind: u8, a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + a.len() + b.len());
    k.push(kind);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn position_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = one(b'p', topic);
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

fn dead_letter_key(id: u64) -> Vec<u8> {
    let mut k = vec![b'd'];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn utf8(b: &[u8]) -> Option<String> {
    std::str::from_utf8(b).ok().map(String::from)
}

fn split_two(b: &[u8]) -> Option<(String, String)> {
    let i = b.iter().position(|&c| c == 0)?;
    Some((utf8(&b[..i])?, utf8(&b[i + 1..])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: serde_json::Value) -> Row {
        v.as_object().unwrap().clone()
    }

    /// sled's background flusher may hold the directory's lock for a moment after a drop.
    fn reopen(dir: &Path) -> Store {
        for _ in 0..100 {
            if let Ok(s) = Store::open(dir) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Store::open(dir).unwrap()
    }

    #[test]
    fn batch_round_trips_and_outbox_cas() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut b = WriteBatch::default();
        let g1 = row(json!({"game_id": "g1", "odd1": "1.5"}));
        b.put_row("odds", "g1", &encode_row(&g1), 4);
        b.put_row("odds", "g2", &encode_row(&row(json!({"game_id": "g2"}))), 5);
        b.put_row("odds", "g3", &encode_row(&row(json!({"game_id": "g3"}))), 2);
        b.set_seq("odds", 7);
        b.set_epoch("odds", "ep1");
        b.set_position("cdc.odds", 3, 42);
        b.mark_deleted("odds", "g8", 6);
        b.mark_deleted("odds", "g9", 7);
        b.set_acked("odds", 3);
        let letter = DeadLetter {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            key: None,
            value: Some(b"x".to_vec()),
            reason: "invalid_json".into(),
            error: "e".into(),
            truncated: false,
        };
        b.add_dead_letter(9, &letter);
        b.set_initialized();
        store.apply(b).unwrap();
        store.clear_deleted("odds", "g8", 6).unwrap();
        store.clear_deleted("odds", "g9", 6).unwrap(); // stale seq: kept
        store.set_acked("odds", 4).unwrap(); // g1 acknowledged, g2 (seq 5) not yet
        store.flush_blocking().unwrap();
        drop(store);

        let store = reopen(dir.path());
        let l = store.load().unwrap();
        let t = &l.tables["odds"];
        assert_eq!((t.seq, t.epoch.as_str(), t.rows.len()), (7, "ep1", 3));
        assert_eq!(t.rows[0], ("g1".to_string(), g1));
        assert_eq!(l.positions[&("cdc.odds".to_string(), 3)], 42);
        let outbox: Vec<(&str, &str, u64, bool)> = l
            .outbox
            .iter()
            .map(|e| (e.table.as_str(), e.key.as_str(), e.seq, e.deleted))
            .collect();
        assert_eq!(
            outbox,
            [("odds", "g9", 7, true), ("odds", "g2", 5, false)],
            "unacknowledged rows and deletes"
        );
        assert_eq!(l.dead_letters, vec![(9, letter)]);
        assert!(l.initialized);
        store.clear_dead_letter(9).unwrap();
        assert!(store.load().unwrap().dead_letters.is_empty());
    }

    #[test]
    fn rows_of_an_older_store_load_as_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .tree
            .insert(two(b'r', "odds", "g1"), br#"{"game_id":"g1"}"#.to_vec())
            .unwrap();
        let l = store.load().unwrap();
        assert_eq!(l.tables["odds"].rows[0].1, row(json!({"game_id": "g1"})));
        assert!(l.outbox.is_empty());
    }
}
